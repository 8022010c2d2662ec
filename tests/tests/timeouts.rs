//! Clients that go quiet or never log in: they are disconnected with a FATAL
//! that names the timeout, and what they held goes back to others.

use std::time::Duration;

use shardgate_router::config::RouterConfig;
use shardgate_tests::Harness;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Logs in with a raw socket and returns it ready for queries.
async fn raw_login(h: &Harness) -> TcpStream {
    let mut s = TcpStream::connect(h.router.local_addr).await.expect("connect");
    let body = b"\x00\x03\x00\x00user\0postgres\0database\0app\0\0";
    let mut startup = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    startup.extend_from_slice(body);
    s.write_all(&startup).await.expect("startup");
    read_until(&mut s, b"Z\0\0\0\x05I").await;
    s
}

/// Reads until `marker` has been seen; everything read.
async fn read_until(s: &mut TcpStream, marker: &[u8]) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(marker.len()).any(|w| w == marker) {
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
            .await
            .expect("the router must answer, not hang")
            .expect("read");
        assert!(n > 0, "closed before {marker:?}: {:?}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    seen
}

/// Everything the router sends until it closes the connection.
async fn read_to_close(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
        .await
        .expect("the router must close the connection, not leave it open")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

fn query(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    shardgate_tests::raw::frame(b'Q', &body)
}

/// The value of the first DataRow's first column.
fn first_value(reply: &[u8]) -> String {
    let at = reply.iter().position(|&b| b == b'D').expect("a DataRow");
    let len = i32::from_be_bytes(reply[at + 7..at + 11].try_into().expect("4 bytes")) as usize;
    String::from_utf8_lossy(&reply[at + 11..at + 11 + len]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_idle_in_a_transaction_is_disconnected_and_its_server_connection_serves_others() {
    let mut config = RouterConfig { idle_transaction_timeout: Duration::from_secs(1), ..Default::default() };
    // One server connection: while the idle client holds it, nobody else runs.
    config.pool.size = 1;
    config.pool.queue_timeout = Duration::from_secs(20);
    let h = Harness::start_with(1, config).await;
    h.client().await.batch_execute("CREATE TABLE notes (tenant_id bigint, body text)").await.expect("create");

    let mut idle = raw_login(&h).await;
    idle.write_all(&query("BEGIN; INSERT INTO notes VALUES (1, 'left open'); SELECT pg_backend_pid()"))
        .await
        .expect("send");
    let reply = read_until(&mut idle, b"Z\0\0\0\x05T").await;
    let held_pid = first_value(&reply);

    // Another client waits for the only server connection, and gets it once
    // the idle transaction is cut: the same server process, rolled back.
    let other = h.client().await;
    let sql = "SELECT pg_backend_pid()::text, count(*) FROM notes WHERE tenant_id = 1";
    let row = other.query_one(sql, &[]).await.expect("served");
    assert_eq!(row.get::<_, String>(0), held_pid, "the connection went back to the pool, not closed");
    assert_eq!(row.get::<_, i64>(1), 0, "the idle transaction was rolled back");

    let told = read_to_close(&mut idle).await;
    assert!(told.contains("SFATAL") && told.contains("C25P03"), "{told:?}");
    assert!(told.contains("idle-in-transaction timeout") && told.contains("idle_transaction_timeout"), "{told:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_idle_outside_a_transaction_is_disconnected_with_57p05_only_when_that_timeout_is_set() {
    let config = RouterConfig { client_idle_timeout: Duration::from_secs(1), ..Default::default() };
    let h = Harness::start_with(1, config).await;
    let mut idle = raw_login(&h).await;
    let told = read_to_close(&mut idle).await;
    assert!(told.contains("SFATAL") && told.contains("C57P05"), "{told:?}");
    assert!(told.contains("client_idle_timeout"), "{told:?}");

    // With only the transaction timeout set, a client idle outside a
    // transaction stays; one inside is cut.
    let config = RouterConfig { idle_transaction_timeout: Duration::from_secs(1), ..Default::default() };
    let h = Harness::start_with(1, config).await;
    let mut outside = raw_login(&h).await;
    let mut inside = raw_login(&h).await;
    inside.write_all(&query("BEGIN; SELECT 1")).await.expect("send");
    read_until(&mut inside, b"Z\0\0\0\x05T").await;
    let told = read_to_close(&mut inside).await;
    assert!(told.contains("C25P03"), "{told:?}");
    // The client outside a transaction has been idle as long and still works.
    outside.write_all(&query("SELECT 41 + 1")).await.expect("send");
    let reply = read_until(&mut outside, b"Z\0\0\0\x05I").await;
    assert_eq!(first_value(&reply), "42");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_never_logs_in_is_closed_after_the_login_timeout() {
    let config = RouterConfig { client_login_timeout: Duration::from_secs(1), ..Default::default() };
    let h = Harness::start_with(1, config).await;
    let mut silent = TcpStream::connect(h.router.local_addr).await.expect("connect");
    let told = read_to_close(&mut silent).await;
    assert!(told.contains("SFATAL") && told.contains("C57014"), "{told:?}");
    assert!(told.contains("canceling authentication due to timeout"), "{told:?}");
    // A client that does log in is served.
    h.client().await.simple_query("SELECT 1").await.expect("served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_still_logging_in_beyond_their_limit_are_refused_and_free_their_place_when_gone() {
    let config = RouterConfig { max_pending_logins: 2, ..Default::default() };
    let h = Harness::start_with(1, config).await;
    // Two sockets that connect and say nothing hold both places.
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(TcpStream::connect(h.router.local_addr).await.expect("connect"));
    }
    // The router counts a socket when its session thread takes it.
    let logging_in = || h.router.context.logins.load(std::sync::atomic::Ordering::Relaxed);
    let mut attempts = 0;
    while logging_in() < 2 {
        attempts += 1;
        assert!(attempts < 3000, "the silent sockets were never counted ({} logging in)", logging_in());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A third connection is refused at once.
    let mut third = TcpStream::connect(h.router.local_addr).await.expect("connect");
    let body = b"\x00\x03\x00\x00user\0postgres\0database\0app\0\0";
    let mut startup = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    startup.extend_from_slice(body);
    third.write_all(&startup).await.expect("startup");
    let refused = read_to_close(&mut third).await;
    assert!(refused.contains("C53300"), "{refused:?}");
    assert!(refused.contains("too many connections are logging in"), "{refused:?}");
    // Logged-in clients do not count: once the silent sockets are gone, a client logs in.
    drop(silent);
    let mut attempts = 0;
    let client = loop {
        attempts += 1;
        assert!(attempts < 1000, "the closed sockets never freed their places");
        match tokio_postgres::connect(&h.url(), tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(conn);
                break client;
            }
            Err(e) => {
                assert_eq!(e.code().map(|c| c.code()), Some("53300"), "{e}");
                // The router has not seen the sockets close yet: poll again.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    client.simple_query("SELECT 1").await.expect("served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_connection_past_its_lifetime_is_replaced_between_transactions() {
    let mut config = RouterConfig::default();
    config.pool.size = 1;
    config.pool.server_lifetime = Duration::from_secs(1);
    let h = Harness::start_with(1, config).await;
    let c = h.client().await;
    async fn pid(c: &tokio_postgres::Client) -> i32 {
        c.query_one("SELECT pg_backend_pid()", &[]).await.expect("pid").get(0)
    }
    let first = pid(&c).await;
    // Polled until the shard's backend changes: the old one went at its return
    // to the pool once it had lived a second.
    let mut attempts = 0;
    loop {
        attempts += 1;
        assert!(attempts < 300, "the server connection was never replaced");
        if pid(&c).await != first {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let gone = h.shard(0).await.query_one("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", &[&first]).await;
    assert_eq!(gone.expect("count").get::<_, i64>(0), 0, "the old backend was closed, not kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_server_connections_past_the_idle_timeout_are_closed() {
    let mut config = RouterConfig::default();
    config.pool.server_idle_timeout = Duration::from_secs(1);
    let h = Harness::start_with(1, config).await;
    h.client().await.simple_query("SELECT 1").await.expect("served");
    let shard = h.shard(0).await;
    let routers = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'shardgate'";
    let mut attempts = 0;
    loop {
        attempts += 1;
        assert!(attempts < 300, "idle server connections were never closed");
        if shard.query_one(routers, &[]).await.expect("count").get::<_, i64>(0) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A new statement opens a new connection.
    h.client().await.simple_query("SELECT 1").await.expect("served again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_connections_send_keepalives_as_configured() {
    let mut config = RouterConfig::default();
    config.tcp_keepalive.idle = Duration::from_secs(33);
    let h = Harness::start_with(1, config).await;
    let pool = h.router.context.pool(0).expect("a pool for shard 0");
    let conn = pool.get().await.expect("a shard connection");
    let socket = socket2::SockRef::from(conn.conn.get_ref().tcp().expect("a TCP socket under the stream"));
    assert!(socket.keepalive().expect("SO_KEEPALIVE"));
    assert_eq!(socket.tcp_keepalive_time().expect("TCP_KEEPIDLE"), Duration::from_secs(33));
}

//! Bad input and failing shards get Postgres errors; other sessions never notice.

use std::time::Duration;

use shardgate_tests::{sqlstate, Harness};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Logs in with a raw socket and returns it ready for queries.
async fn raw_login(h: &Harness) -> TcpStream {
    let mut s = TcpStream::connect(h.router.local_addr).await.unwrap();
    let mut startup = Vec::new();
    let body = b"\x00\x03\x00\x00user\0postgres\0database\0app\0\0";
    startup.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    startup.extend_from_slice(body);
    s.write_all(&startup).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(6).any(|w| w == b"Z\0\0\0\x05I") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "router closed during login");
        seen.extend_from_slice(&buf[..n]);
    }
    s
}

async fn read_all(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("router must answer, not hang");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_frame_closes_only_that_connection() {
    let h = Harness::start(1).await;
    let other = h.client().await;
    // A Query whose length field is negative.
    let mut s = raw_login(&h).await;
    s.write_all(b"Q\xff\xff\xff\xf0select 1").await.unwrap();
    let reply = read_all(&mut s).await;
    assert_eq!(reply.first(), Some(&b'E'), "expected an ErrorResponse");
    assert!(reply.windows(6).any(|w| w == b"C08P01"), "{:?}", String::from_utf8_lossy(&reply));
    assert!(reply.windows(6).any(|w| w == b"SFATAL"));
    // An unknown message type.
    let mut s = raw_login(&h).await;
    s.write_all(b"\x01\0\0\0\x04").await.unwrap();
    let reply = read_all(&mut s).await;
    assert!(reply.windows(6).any(|w| w == b"C08P01"));
    // A Bind that lies about its parameter count: an error, the session lives on.
    let mut s = raw_login(&h).await;
    let mut bind = b"B\0\0\0\x10\0\0\0\0\0\x05\0\0\0\x64\0\0".to_vec();
    bind.extend_from_slice(b"S\0\0\0\x04");
    s.write_all(&bind).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(5).any(|w| w == b"Z\0\0\0\x05") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.windows(6).any(|w| w == b"C08P01"), "{:?}", String::from_utf8_lossy(&got));
    // The healthy session never noticed.
    other.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_refused() {
    let config = shardgate_router::config::RouterConfig { max_message_bytes: 1024, ..Default::default() };
    let h = Harness::start_with(1, config).await;
    let c = h.client().await;
    let big = format!("SELECT '{}'", "x".repeat(4096));
    let err = c.simple_query(&big).await.unwrap_err();
    assert_eq!(sqlstate(&err), "54000");
    h.client().await.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_is_down_fails_its_statements_and_the_others_keep_serving() {
    let h = Harness::start(2).await;
    let c = h.client().await;
    c.batch_execute("CREATE TABLE orders (tenant_id bigint, id bigint, PRIMARY KEY (tenant_id, id))").await.unwrap();
    let t0 = h.tenants_on(0, 1)[0];
    let t1 = h.tenants_on(1, 1)[0];
    h.shard_server(1).stop_with(shardgate_localpg::Shutdown::Immediate).unwrap();
    let c2 = h.client().await;
    let err = c2.simple_query(&format!("SELECT * FROM orders WHERE tenant_id = {t1}")).await.unwrap_err();
    assert!(sqlstate(&err).starts_with("08"), "{err:?}");
    assert!(err.as_db_error().unwrap().message().contains("shard_1"), "{err:?}");
    // The same session goes on, and shard_0's tenants are served.
    c2.simple_query(&format!("INSERT INTO orders VALUES ({t0}, 1)")).await.unwrap();
    c.simple_query(&format!("SELECT * FROM orders WHERE tenant_id = {t0}")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_running_query() {
    let h = Harness::start(1).await;
    let c = h.client().await;
    let token = c.cancel_token();
    let slow = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(30)").await });
    // Wait until the query is running on the shard, then cancel it.
    let shard = h.shard(0).await;
    loop {
        let n: i64 = shard
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if n == 1 {
            break;
        }
        tokio::task::yield_now().await;
    }
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), slow).await.unwrap().unwrap().unwrap_err();
    assert_eq!(sqlstate(&err), "57014");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_log_in_with_scram_or_md5_and_wrong_passwords_are_refused() {
    use shardgate_router::config::{AuthMethod, RouterConfig, UserConfig};
    let config = RouterConfig {
        users: vec![
            UserConfig { name: "app".into(), auth: AuthMethod::ScramSha256, password: Some("s3cret".into()) },
            UserConfig { name: "legacy".into(), auth: AuthMethod::Md5, password: Some("old".into()) },
        ],
        ..Default::default()
    };
    let h = Harness::start_with(1, config).await;
    let addr = h.router.local_addr;
    let ok = shardgate_tests::connect(&format!("postgres://app:s3cret@{addr}/app")).await;
    ok.simple_query("SELECT 1").await.unwrap();
    let ok = shardgate_tests::connect(&format!("postgres://legacy:old@{addr}/app")).await;
    ok.simple_query("SELECT 1").await.unwrap();
    for url in [
        format!("postgres://app:wrong@{addr}/app"),
        format!("postgres://legacy:wrong@{addr}/app"),
        format!("postgres://nobody:x@{addr}/app"),
    ] {
        let err = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.err().expect("login must fail");
        assert_eq!(sqlstate(&err), "28P01", "{url}");
    }
}

/// Makes a test server ask TCP clients for a SCRAM password.
async fn require_scram(h: &Harness, shard: usize, password: &str) {
    let direct = h.shard(shard).await;
    direct
        .batch_execute(&format!("SET password_encryption = 'scram-sha-256'; ALTER ROLE postgres PASSWORD '{password}'"))
        .await
        .unwrap();
    let hba = h.shard_server(shard).data_dir().join("pg_hba.conf");
    std::fs::write(&hba, "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n").unwrap();
    direct.batch_execute("SELECT pg_reload_conf()").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_logs_in_to_shards_with_scram_and_reports_a_wrong_password() {
    use shardgate_directory::{Directory, DirectoryHandle, KeyType, Shard};
    use shardgate_router::backend::ShardAddress;
    let h = Harness::start(1).await;
    require_scram(&h, 0, "shard-pw").await;
    let port = h.shard_server(0).port();
    for (password, works) in [("shard-pw", true), ("wrong", false)] {
        let mut addr = ShardAddress::from_url(&format!("postgres://postgres@127.0.0.1:{port}/app")).unwrap();
        addr.password = Some(password.into());
        let dir =
            Directory::new("tenant_id", KeyType::Int, 8, vec![Shard::new("secured", addr.display_url())]).unwrap();
        let config = shardgate_router::config::RouterConfig { listen: "127.0.0.1:0".into(), ..Default::default() };
        let router = shardgate_router::server::start(config, DirectoryHandle::new(dir), vec![addr]).await.unwrap();
        let c = shardgate_tests::connect(&format!("postgres://postgres@{}/app", router.local_addr)).await;
        let r = c.simple_query("SELECT 1").await;
        if works {
            r.unwrap();
        } else {
            let err = r.unwrap_err();
            let db = err.as_db_error().unwrap();
            assert_eq!(db.code().code(), "08004", "{db:?}");
            assert!(db.message().contains("secured"), "{db:?}");
            assert!(!db.message().contains("wrong"), "the password must not appear: {db:?}");
        }
        router.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_makes_statements_wait_then_fail_with_53300() {
    use std::time::Duration;
    let config = shardgate_router::config::RouterConfig {
        pool: shardgate_router::config::PoolConfig {
            size: 1,
            queue_timeout: Duration::from_millis(300),
            ..Default::default()
        },
        ..Default::default()
    };
    let h = Harness::start_with(1, config).await;
    let holder = h.client().await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    // The only connection is held by an open transaction.
    let waiter = h.client().await;
    let err = waiter.simple_query("SELECT 2").await.unwrap_err();
    assert_eq!(sqlstate(&err), "53300");
    assert!(err.as_db_error().unwrap().message().contains("pool.size"), "{err:?}");
    // When the transaction ends, the waiter gets the connection.
    holder.batch_execute("COMMIT").await.unwrap();
    waiter.simple_query("SELECT 3").await.unwrap();
}

//! Shard health as a router sees it: a shard that stops is reported down
//! (`/health/ready` answers 503 naming it, `shardgate_shard_up` is 0); when it
//! is back, the router is ready again and no client is handed a pooled
//! connection to the old server.

use std::time::Duration;

use shardgate_tests::checker::wait_for;
use shardgate_tests::Harness;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET path` on the admin API: the status code and the body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    let code = answer.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, body)
}

#[tokio::test]
async fn a_shard_that_stops_is_reported_and_once_back_costs_clients_no_error() {
    let h = Harness::start(2).await;
    let (admin, _task) =
        shardgate_router::admin::serve("127.0.0.1:0", h.router.context.clone(), Some("t".into())).await.unwrap();
    let setup = h.client().await;
    setup.batch_execute("CREATE TABLE t (tenant_id bigint, v int)").await.unwrap();
    let tenant = h.tenants_on(1, 1)[0];
    setup.execute("INSERT INTO t VALUES ($1, 1)", &[&tenant]).await.unwrap();

    // Eight clients at once leave eight idle pooled connections to shard 1.
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(h.client().await);
    }
    async fn read_all(
        clients: &[tokio_postgres::Client],
        tenant: i64,
    ) -> Vec<Result<tokio_postgres::Row, tokio_postgres::Error>> {
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&tenant];
        let reads = clients.iter().map(|c| c.query_one("SELECT count(*) FROM t WHERE tenant_id = $1", &params));
        futures::future::join_all(reads).await
    }
    for r in read_all(&clients, tenant).await {
        assert_eq!(r.unwrap().get::<_, i64>(0), 1);
    }
    let ready = || async { get(admin, "/health/ready").await };
    let health = h.router.context.shard_health(1);
    wait_for("the first probe", Duration::from_secs(10), || health.is_up()).await;
    assert_eq!(ready().await.0, 200, "{:?}", ready().await);
    assert_eq!(get(admin, "/health/live").await.0, 200);

    h.shard_server(1).stop().unwrap();
    wait_for("shard_1 seen down", Duration::from_secs(10), || !health.is_up()).await;
    let (code, body) = ready().await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("shard shard_1 does not answer"), "{body}");
    let metrics = shardgate_router::metrics::render(&h.router.context);
    assert!(metrics.contains("shardgate_shard_up{shard=\"shard_1\"} 0"), "{metrics}");
    assert!(metrics.contains("shardgate_shard_up{shard=\"shard_0\"} 1"), "{metrics}");

    // Back: at once, before any probe, every client's next statement gets a
    // live connection (the dead idle ones are noticed and dropped).
    h.shard_server(1).start_again().unwrap();
    for r in read_all(&clients, tenant).await {
        assert_eq!(r.expect("no dead pooled connection handed out").get::<_, i64>(0), 1);
    }
    wait_for("shard_1 seen up", Duration::from_secs(10), || health.is_up()).await;
    assert_eq!(ready().await.0, 200);
    assert!(health.failures() >= 1);
}

/// Statements that may run on any shard (`SELECT 1`, a driver preparing a
/// statement with Parse and Describe) pass over a shard whose health probe
/// failed, while another shard can answer: a stopped shard costs the
/// tenants on it their statements, not every client's prepares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_that_may_run_anywhere_avoid_a_shard_that_is_down() {
    let h = Harness::start(2).await;
    let setup = h.client().await;
    setup.batch_execute("CREATE TABLE t (tenant_id bigint, v int)").await.unwrap();
    let up = h.tenants_on(0, 1)[0];
    let health = h.router.context.shard_health(1);
    wait_for("the first probe", Duration::from_secs(10), || health.is_up()).await;
    h.shard_server(1).stop().unwrap();
    wait_for("shard_1 seen down", Duration::from_secs(10), || !health.is_up()).await;
    wait_for("shard_1 passed over", Duration::from_secs(10), || {
        h.router.context.down_shards.load(std::sync::atomic::Ordering::Relaxed) == 0b10
    })
    .await;
    let c = h.client().await;
    // Turn after turn, each would have gone to the stopped shard every other time.
    for i in 0..6 {
        c.simple_query("SELECT 1").await.unwrap_or_else(|e| panic!("SELECT 1, turn {i}: {e:?}"));
        let sql = format!("INSERT INTO t VALUES ($1, {i})");
        let stmt = c.prepare(&sql).await.unwrap_or_else(|e| panic!("prepare, turn {i}: {e:?}"));
        c.execute(&stmt, &[&up]).await.unwrap();
    }
    h.shard_server(1).start_again().unwrap();
}

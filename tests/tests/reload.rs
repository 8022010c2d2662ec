//! A reload as the router's pools and sessions see it: a smaller pool lets
//! the transactions under way finish and closes the extra connections as they
//! come back; a larger one admits waiting statements at once; the pools of
//! clients' own roles follow too; an idle timeout turned on reaches sessions
//! already open; and a configuration that cannot be used changes nothing.
//! (`cli/tests/reload.rs` reloads `shardgate serve`'s file, by SIGHUP and by
//! `shardgate reload`.)

use std::time::{Duration, Instant};

use shardgate_router::config::RouterConfig;
use shardgate_router::reload::ReloadError;
use shardgate_tests::Harness;

/// A router configuration with a pool of `size` whose borrowers wait long
/// enough that a test never sees a queue timeout.
fn pool_of(size: usize) -> RouterConfig {
    let mut c = RouterConfig::default();
    c.pool.size = size;
    c.pool.queue_timeout = Duration::from_secs(60);
    c
}

/// Polls `done` until it holds; fails the test after 30 s.
async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_smaller_pool_lets_open_transactions_finish_and_closes_the_extras_as_they_return() {
    let h = Harness::start_with(1, pool_of(3)).await;
    let ctx = h.router.context.clone();
    let mut holders = Vec::new();
    for _ in 0..3 {
        let c = h.client().await;
        c.batch_execute("BEGIN").await.expect("BEGIN");
        c.simple_query("SELECT pg_backend_pid()").await.expect("a transaction holds a connection");
        holders.push(c);
    }
    let pool = ctx.pool(0).expect("the shard's pool");
    assert_eq!(pool.active_count(), 3);

    let reloaded = ctx.reload(pool_of(1)).expect("reloaded");
    assert_eq!(reloaded.changed, ["router.pool.size"]);
    assert_eq!(pool.size(), 1);
    // A new statement waits: three connections are in use, one is allowed.
    let waiter = h.client().await;
    let waiting = tokio::spawn(async move { waiter.query_one("SELECT 42", &[]).await.map(|r| r.get::<_, i32>(0)) });

    // The transactions under way are not cut: each commits.
    for c in &holders[..2] {
        c.batch_execute("COMMIT").await.expect("an open transaction finishes");
    }
    // Their connections were closed on their way back, not kept idle.
    wait_for("two connections closed", || pool.active_count() == 1).await;
    assert_eq!(pool.idle_count(), 0);
    assert!(!waiting.is_finished(), "a statement got a connection beyond the smaller size");

    holders[2].batch_execute("COMMIT").await.expect("the last transaction finishes");
    let answer = tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("admitted once one is free");
    assert_eq!(answer.expect("no panic").expect("the waiting statement ran"), 42);
    wait_for("one idle connection left", || pool.active_count() == 0 && pool.idle_count() == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_larger_pool_admits_waiting_statements_at_once() {
    let h = Harness::start_with(1, pool_of(1)).await;
    let ctx = h.router.context.clone();
    let holder = h.client().await;
    let pid: i32 = {
        holder.batch_execute("BEGIN").await.expect("BEGIN");
        holder.query_one("SELECT pg_backend_pid()", &[]).await.expect("in the transaction").get(0)
    };
    let waiter = h.client().await;
    let waiting = tokio::spawn(async move { waiter.query_one("SELECT 7", &[]).await.map(|r| r.get::<_, i32>(0)) });

    ctx.reload(pool_of(2)).expect("reloaded");
    // Well before the queue timeout (60 s): the new slot went to the waiter.
    let answer = tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("admitted at once");
    assert_eq!(answer.expect("no panic").expect("the waiting statement ran"), 7);
    // The open transaction kept its connection.
    let same: i32 = holder.query_one("SELECT pg_backend_pid()", &[]).await.expect("still open").get(0);
    assert_eq!(same, pid);
    holder.batch_execute("COMMIT").await.expect("COMMIT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pools_of_clients_own_roles_take_the_new_settings_too() {
    let h = Harness::start_with(1, pool_of(2)).await;
    let ctx = h.router.context.clone();
    let role = ctx.roles.pools_for("reporting", None);
    let role_pool = role.pool(&ctx, &ctx.directory.load(), 0).expect("a pool of the role");
    assert_eq!(role_pool.size(), 2);
    ctx.reload(pool_of(6)).expect("reloaded");
    assert_eq!(role_pool.size(), 6);
    assert_eq!(ctx.pool(0).expect("the router's own pool").size(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_timeout_turned_on_reaches_sessions_already_open() {
    let h = Harness::start(1).await;
    let ctx = h.router.context.clone();
    let quiet = h.client().await;
    quiet.simple_query("SELECT 1").await.expect("a first statement");
    let config = RouterConfig { client_idle_timeout: Duration::from_secs(1), ..Default::default() };
    let reloaded = ctx.reload(config).expect("reloaded");
    assert!(reloaded.changed.contains(&"router.client_idle_timeout".to_string()), "{reloaded:?}");
    // Its next message arms the session's watch; then the janitor finds it quiet.
    quiet.simple_query("SELECT 1").await.expect("still connected");
    wait_for("the quiet client to be disconnected", || quiet.is_closed()).await;
    let err = quiet.simple_query("SELECT 1").await.expect_err("disconnected");
    assert!(err.is_closed(), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_that_cannot_be_used_changes_nothing() {
    let h = Harness::start_with(1, pool_of(3)).await;
    let ctx = h.router.context.clone();
    let open = h.client().await;
    open.simple_query("SELECT 1").await.expect("a first statement");

    // TLS required, but no certificate.
    let mut bad = pool_of(9);
    bad.strict_tenant = true;
    bad.ssl_mode = Some(shardgate_router::tls::ClientSslMode::Require);
    let e = ctx.reload(bad).expect_err("refused");
    assert!(matches!(e, ReloadError::Refused(_)), "{e}");
    assert!(e.to_string().contains("needs a certificate"), "{e}");
    // A certificate file that is not there.
    let mut bad = pool_of(9);
    bad.tls_cert_file = Some("/nonexistent/router.crt".into());
    bad.tls_key_file = Some("/nonexistent/router.key".into());
    let e = ctx.reload(bad).expect_err("refused");
    assert!(e.to_string().contains("/nonexistent/router.crt"), "{e}");

    // Nothing of either was put in force.
    assert_eq!(ctx.pool(0).expect("pool").size(), 3);
    assert!(!ctx.rules().strict_tenant);
    assert!(!ctx.client_tls.load().refuses_plain());
    let plain = h.client().await;
    plain.simple_query("SELECT 1").await.expect("plain clients still get in");
    open.simple_query("SELECT 1").await.expect("the open client is untouched");
    // And a statement the old rules allow still runs.
    open.simple_query("CREATE TABLE orders (tenant_id bigint, id int)").await.expect("DDL");
    open.simple_query("SELECT count(*) FROM orders").await.expect("a read without a tenant is not refused");
}

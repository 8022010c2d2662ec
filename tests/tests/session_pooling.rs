//! Session pooling (`pool_mode = "session"`): a client keeps its server
//! connections for its whole session, so the state it leaves on them works,
//! and none of it reaches the next client of those connections.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use shardgate_router::config::{PoolMode, RouterConfig};
use shardgate_tests::{rows, sqlstate, Harness};
use tokio_postgres::{AsyncMessage, Client, NoTls};

/// One server connection per shard, and the role `sess` in session pooling:
/// the next client of a shard gets the very connection the last one left.
async fn start() -> Harness {
    let mut config = RouterConfig::default();
    config.pool.size = 1;
    config.pool.queue_timeout = Duration::from_secs(20);
    config.role_pool_modes = HashMap::from([("sess".to_string(), PoolMode::Session)]);
    Harness::start_with(2, config).await
}

/// A client logged in as `user`, and the notifications it receives.
async fn connect_as(h: &Harness, user: &str) -> (Client, tokio::sync::mpsc::UnboundedReceiver<(String, String)>) {
    let url = format!("postgres://{user}@127.0.0.1:{}/app", h.port());
    let (client, mut conn) = tokio_postgres::connect(&url, NoTls).await.expect("connect");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let AsyncMessage::Notification(n) = m {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    (client, rx)
}

async fn one(c: &Client, sql: &str) -> String {
    let got = rows(c.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}")));
    got.first().and_then(|r| r[0].clone()).unwrap_or_default()
}

async fn notified(rx: &mut tokio::sync::mpsc::UnboundedReceiver<(String, String)>) -> (String, String) {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a notification within 10 s")
        .expect("the connection is open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_pooled_client_keeps_its_state_and_the_next_client_finds_none() {
    let h = start().await;
    let setup = h.client().await;
    setup.batch_execute("CREATE TABLE items (tenant_id bigint, n int)").await.unwrap();
    let far = h.tenants_on(1, 1)[0];
    setup.execute("INSERT INTO items VALUES ($1, 1), ($1, 2)", &[&far]).await.unwrap();
    drop(setup);

    let (a, mut a_notes) = connect_as(&h, "sess").await;
    // Each statement is a transaction of its own: in transaction pooling the
    // connection would go back to the pool between them.
    a.simple_query("CREATE TEMP TABLE scratch (a int)").await.unwrap();
    a.simple_query("INSERT INTO scratch VALUES (1), (2)").await.unwrap();
    assert_eq!(one(&a, "SELECT sum(a) FROM scratch").await, "3");
    assert_eq!(one(&a, "SELECT pg_advisory_lock(7)").await, "");
    a.simple_query("DECLARE c CURSOR WITH HOLD FOR SELECT a FROM scratch ORDER BY a").await.unwrap();
    assert_eq!(one(&a, "FETCH NEXT FROM c").await, "1");
    // A tenant on the other shard is read as usual, on A's connection there.
    assert_eq!(one(&a, &format!("SELECT count(*) FROM items WHERE tenant_id = {far}")).await, "2");
    assert_eq!(one(&a, "FETCH NEXT FROM c").await, "2");
    // SQL prepared statements: over the temporary table (home), and by tenant.
    a.simple_query("PREPARE scratch_sum AS SELECT sum(a) FROM scratch").await.unwrap();
    assert_eq!(one(&a, "EXECUTE scratch_sum").await, "3");
    a.simple_query("PREPARE per_tenant (bigint) AS SELECT count(*) FROM items WHERE tenant_id = $1").await.unwrap();
    assert_eq!(one(&a, &format!("EXECUTE per_tenant({far})")).await, "2");
    let home_pid = one(&a, "SELECT pg_backend_pid()").await;

    // LISTEN: a NOTIFY sent straight to the home shard reaches A while A is idle,
    // and A's own NOTIFY through the router comes back to it.
    a.simple_query("LISTEN jobs").await.unwrap();
    let home = h.shard(0).await;
    home.simple_query("NOTIFY jobs, 'from the shard'").await.unwrap();
    assert_eq!(notified(&mut a_notes).await, ("jobs".into(), "from the shard".into()));
    a.simple_query("NOTIFY jobs, 'from a'").await.unwrap();
    assert_eq!(notified(&mut a_notes).await, ("jobs".into(), "from a".into()));

    // The state is on the home shard's one connection, held by A.
    let locks: i64 =
        home.query_one("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'", &[]).await.unwrap().get(0);
    assert_eq!(locks, 1, "A holds its advisory lock");

    drop(a);
    // B gets the connection A left (the pool has one), reset.
    let (b, _) = connect_as(&h, "sess").await;
    assert_eq!(one(&b, "SELECT pg_backend_pid()").await, home_pid, "the same server connection, reset, not closed");
    let e = b.simple_query("SELECT * FROM scratch").await.expect_err("A's temporary table");
    assert_eq!(sqlstate(&e), "42P01", "{e:?}");
    let e = b.simple_query("FETCH NEXT FROM c").await.expect_err("A's cursor");
    assert_eq!(sqlstate(&e), "34000", "{e:?}");
    assert_eq!(one(&b, "SELECT count(*) FROM pg_listening_channels()").await, "0");
    let e = b.simple_query(&format!("EXECUTE per_tenant({far})")).await.expect_err("A's prepared statement");
    assert_eq!(sqlstate(&e), "26000", "{e:?}");
    let sql = "SELECT count(*) FROM pg_prepared_statements WHERE statement ILIKE 'PREPARE%'";
    assert_eq!(one(&b, sql).await, "0", "A's SQL prepared statements went with A");
    let locks: i64 =
        home.query_one("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'", &[]).await.unwrap().get(0);
    assert_eq!(locks, 0, "A's advisory lock went with A");
    // B's reads are as before.
    assert_eq!(one(&b, &format!("SELECT count(*) FROM items WHERE tenant_id = {far}")).await, "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursors_follow_their_shard_other_state_of_another_shards_tenant_is_refused_and_other_roles_keep_transaction_pooling(
) {
    let h = start().await;
    let setup = h.client().await;
    setup.batch_execute("CREATE TABLE items (tenant_id bigint, n int)").await.unwrap();
    let far = h.tenants_on(1, 1)[0];
    let near = h.tenants_on(0, 1)[0];
    setup.execute("INSERT INTO items VALUES ($1, 1), ($2, 2)", &[&far, &near]).await.unwrap();
    setup.batch_execute("CREATE TABLE refs (n int)").await.unwrap();

    let (a, _) = connect_as(&h, "sess").await;
    // Cursors WITH HOLD over a tenant of either shard: each FETCH goes to the
    // connection that holds its cursor, across transactions.
    a.simple_query(&format!("DECLARE mine CURSOR WITH HOLD FOR SELECT n FROM items WHERE tenant_id = {near}"))
        .await
        .unwrap();
    a.simple_query(&format!("DECLARE theirs SCROLL CURSOR WITH HOLD FOR SELECT n FROM items WHERE tenant_id = {far}"))
        .await
        .unwrap();
    assert_eq!(one(&a, "FETCH NEXT FROM theirs").await, "1");
    assert_eq!(one(&a, "FETCH ALL FROM mine").await, "2");
    a.simple_query("MOVE BACKWARD ALL IN theirs").await.unwrap();
    assert_eq!(one(&a, "FETCH NEXT FROM theirs").await, "1");
    // CLOSE ALL cannot reach both connections; CLOSE by name can.
    let e = a.simple_query("CLOSE ALL").await.expect_err("cursors on two shards");
    assert_eq!(sqlstate(&e), "0A000", "{e:?}");
    a.simple_query("CLOSE theirs").await.unwrap();
    let e = a.simple_query("FETCH NEXT FROM theirs").await.expect_err("closed");
    assert_eq!(sqlstate(&e), "34000", "{e:?}");
    a.simple_query("CLOSE ALL").await.unwrap();
    // Other state over another shard's tenant is refused: a temporary table
    // lives on the home shard, and reads of it go there.
    let sql = format!("CREATE TEMP TABLE theirs_copy AS SELECT n FROM items WHERE tenant_id = {far}");
    let e = a.simple_query(&sql).await.expect_err("state on another shard");
    assert_eq!(sqlstate(&e), "0A000", "{e:?}");
    assert!(e.as_db_error().unwrap().message().contains("home shard shard_0"), "{e:?}");
    // A temporary table is used like any: through the extended protocol too.
    a.execute("CREATE TEMP TABLE picks (n int)", &[]).await.unwrap();
    a.execute("INSERT INTO picks VALUES ($1)", &[&5i32]).await.unwrap();
    let n: i32 = a.query_one("SELECT n FROM picks", &[]).await.unwrap().get(0);
    assert_eq!(n, 5);
    // What is on every shard cannot be written from it: it is on one.
    for sql in ["CREATE TABLE copied AS SELECT * FROM picks", "INSERT INTO refs SELECT n FROM picks"] {
        let e = a.simple_query(sql).await.expect_err(sql);
        assert_eq!(sqlstate(&e), "0A000", "{sql}: {e:?}");
    }
    for shard in 0..2 {
        let refs: i64 = h.shard(shard).await.query_one("SELECT count(*) FROM refs", &[]).await.unwrap().get(0);
        assert_eq!(refs, 0, "nothing written on shard {shard}");
    }
    a.execute("DROP TABLE picks", &[]).await.unwrap();

    // The router's own role is still in transaction pooling: refused, with
    // the hint that names session pooling.
    let e = setup.simple_query("LISTEN jobs").await.expect_err("transaction pooling");
    assert_eq!(sqlstate(&e), "0A000", "{e:?}");
    let hint = e.as_db_error().unwrap().hint().unwrap_or_default().to_string();
    assert!(hint.contains("pool_mode = \"session\""), "{hint}");
}

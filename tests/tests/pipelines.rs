//! The extended-protocol pipelines drivers send for a statement they prepared
//! (libpq: Bind, Describe portal, Execute, Sync; most others: Bind, Execute,
//! Sync), sent byte for byte to the router and straight to the shard: the
//! client sees the same replies, errors and transaction states from both.

use shardgate_tests::raw::{bind, describe_portal, execute, frame, parse, query, sync, Raw};
use shardgate_tests::Harness;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_pipelines_answer_through_the_router_as_postgres_does() {
    let h = Harness::start(1).await;
    let c = h.client().await;
    c.batch_execute(
        "CREATE TABLE t (tenant_id bigint, id bigint, v int, PRIMARY KEY (tenant_id, id));
         INSERT INTO t VALUES (1, 1, 10), (1, 2, 20), (2, 1, 30);",
    )
    .await
    .unwrap();
    let select = "SELECT v FROM t WHERE tenant_id = $1 AND id = $2";
    let insert = "INSERT INTO t VALUES ($1, $2, $3)";
    // The same bytes, in the same order, to each side; the rows an insert
    // leaves behind are rolled back, so both sides see the same data.
    let steps: Vec<Vec<Vec<u8>>> = vec![
        vec![parse("s1", select, &[20, 20]), parse("s2", insert, &[20, 20, 23]), sync()],
        // libpq's shape, then the shorter one, in text and in binary.
        vec![bind("s1", &[1, 1], false), describe_portal(), execute(), sync()],
        vec![bind("s1", &[1, 2], false), execute(), sync()],
        vec![bind("s1", &[2, 1], true), describe_portal(), execute(), sync()],
        vec![bind("s1", &[9, 9], true), execute(), sync()],
        // In a transaction: a write, a failing write, a read refused in the
        // failed transaction, the rollback.
        vec![query("BEGIN")],
        vec![bind("s2", &[1, 100, 5], false), execute(), sync()],
        vec![bind("s2", &[1, 100, 5], false), describe_portal(), execute(), sync()],
        vec![bind("s1", &[1, 100], false), execute(), sync()],
        vec![query("ROLLBACK")],
        vec![bind("s1", &[1, 100], false), describe_portal(), execute(), sync()],
        // A statement never prepared.
        vec![bind("nope", &[1], false), execute(), sync()],
        vec![bind("s1", &[1, 1], false), execute(), sync()],
    ];
    // One side after the other: the transactions insert the same key.
    let mut direct = Raw::login(h.shard_server(0).port()).await;
    let mut want = Vec::new();
    for step in &steps {
        want.push(direct.run(step).await);
    }
    let mut routed = Raw::login(h.port()).await;
    for (i, step) in steps.iter().enumerate() {
        let got = routed.run(step).await;
        assert_eq!(got, want[i], "step {i}: the router answered otherwise than Postgres");
    }
    assert!(want[1].iter().any(|l| l.starts_with("T ")), "libpq's Describe of the portal answers a RowDescription");
    assert_eq!(want[7].last().map(String::as_str), Some("ready E"), "the duplicate failed the transaction");
    // The rolled-back row is nowhere.
    let n: i64 = c.query_one("SELECT count(*) FROM t WHERE tenant_id = 1", &[]).await.unwrap().get(0);
    assert_eq!(n, 2);
}

/// A pipeline refused midway (its first part already sent to a shard with a
/// Flush, its next part for another shard) is an implicit transaction: it
/// ends at its Sync, as in Postgres, and the session goes on. It used to be
/// left as a failed transaction block, every later statement answered 25P02,
/// for a client that never sent BEGIN (asyncpg's executemany across shards).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_refused_midway_ends_at_its_sync_and_the_session_goes_on() {
    let h = Harness::start(2).await;
    h.client().await.batch_execute("CREATE TABLE p (tenant_id bigint, v bigint)").await.unwrap();
    let (a, b) = (h.tenants_on(0, 1)[0], h.tenants_on(1, 1)[0]);
    let mut c = Raw::login(h.port()).await;
    let flush = frame(b'H', &[]);
    c.send(&[parse("", "INSERT INTO p VALUES ($1, $1)", &[20]), bind("", &[a], false), execute(), flush]).await;
    let replies = c.run(&[bind("", &[b], false), execute(), sync()]).await;
    assert!(replies.iter().any(|r| r == "error 0A000"), "{replies:?}");
    assert_eq!(replies.last().map(String::as_str), Some("ready I"), "the implicit transaction is over: {replies:?}");
    let after = c.run(&[query("SELECT count(*) FROM p")]).await;
    assert!(!after.iter().any(|r| r.starts_with("error")), "the session goes on: {after:?}");
    assert_eq!(after.last().map(String::as_str), Some("ready I"));
    // Nothing of the failed pipeline stays: its first part was rolled back.
    let n: i64 = h.shard(0).await.query_one("SELECT count(*) FROM p", &[]).await.unwrap().get(0);
    assert_eq!(n, 0, "the refused pipeline's first part was rolled back");
}

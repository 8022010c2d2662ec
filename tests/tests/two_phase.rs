//! Transactions that write on several shards commit on all of them or on
//! none: two-phase commit, its failures, and the recovery sweep that settles
//! what a crash left prepared (docs/transactions.md). The write paths that
//! use it are in cross_shard_writes.rs.

use std::time::{Duration, Instant};

use shardgate_directory::fault;
use shardgate_router::config::{CrossShard, RouterConfig};
use shardgate_tests::bank::{balances, bank, prepared, rows, until_settled, SCHEMA};
use shardgate_tests::{sqlstate, Harness};

/// The decision rows on all shards: committed or not.
async fn decision_rows(h: &Harness, shards: usize) -> Vec<bool> {
    let mut all = Vec::new();
    for s in 0..shards {
        for r in h.shard(s).await.query("SELECT committed FROM shardgate.decisions", &[]).await.unwrap() {
            all.push(r.get::<_, bool>(0));
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_across_shards_commits_everywhere_or_nowhere() {
    let (h, t) = bank(3).await;
    let c = h.client().await;
    // Commit: every shard's part is there, and nothing stays prepared.
    c.batch_execute("BEGIN").await.unwrap();
    for (tenant, delta) in t.iter().zip([-30i64, 20, 10]) {
        c.batch_execute(&format!("UPDATE acct SET bal = bal + {delta} WHERE tenant_id = {tenant}")).await.unwrap();
    }
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(balances(&h, &t).await, [70, 120, 110]);
    assert!(prepared(&h, 3).await.is_empty());
    // The transaction sees its own writes on each shard before COMMIT.
    c.batch_execute("BEGIN").await.unwrap();
    c.execute("UPDATE acct SET bal = bal - 5 WHERE tenant_id = $1", &[&t[0]]).await.unwrap();
    c.execute("UPDATE acct SET bal = bal + 5 WHERE tenant_id = $1", &[&t[1]]).await.unwrap();
    let mine: i64 = c.query_one("SELECT bal FROM acct WHERE tenant_id = $1", &[&t[0]]).await.unwrap().get(0);
    assert_eq!(mine, 65);
    // ROLLBACK: nothing anywhere.
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(balances(&h, &t).await, [70, 120, 110]);
    // A statement fails on one shard: COMMIT rolls back every shard.
    c.batch_execute("BEGIN").await.unwrap();
    c.execute("UPDATE acct SET bal = bal - 5 WHERE tenant_id = $1", &[&t[0]]).await.unwrap();
    c.execute("UPDATE acct SET bal = bal + 5 WHERE tenant_id = $1", &[&t[1]]).await.unwrap();
    let e = c.execute("UPDATE acct SET bal = bal / 0 WHERE tenant_id = $1", &[&t[2]]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "22012");
    let e = c.execute("UPDATE acct SET bal = 0 WHERE tenant_id = $1", &[&t[0]]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "25P02", "the failed transaction refuses what follows, on any shard");
    let tag = c.simple_query("COMMIT").await.unwrap();
    assert!(matches!(&tag[..], [tokio_postgres::SimpleQueryMessage::CommandComplete(_)]));
    assert_eq!(balances(&h, &t).await, [70, 120, 110], "COMMIT of a failed transaction rolled back every shard");
    // The session goes on: a one-shard transaction as ever.
    c.execute("UPDATE acct SET bal = bal + 1 WHERE tenant_id = $1", &[&t[0]]).await.unwrap();
    assert_eq!(balances(&h, &t).await, [71, 120, 110]);
    // One decision row, "committed", stands for each committed transaction
    // (the table's creation, and the one transfer; the one rolled back at
    // COMMIT never got to decide) until the sweep deletes rows old enough in
    // bulk.
    assert_eq!(decision_rows(&h, 3).await, [true, true]);
    let mut sweeper = shardgate_router::twophase::recover::Sweeper::default();
    sweeper.sweep(&h.router.context, Some(Duration::ZERO)).await;
    assert_eq!(decision_rows(&h, 3).await, Vec::<bool>::new(), "no transaction needs the row any more");
}

/// A part that fails only at PREPARE (a deferred constraint) rolls back the
/// parts already prepared, and the client gets the shard's error at COMMIT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_refused_at_prepare_rolls_back_every_shard() {
    let (h, t) = bank(2).await;
    let c = h.client().await;
    c.batch_execute(
        "CREATE TABLE once (tenant_id bigint, k int, CONSTRAINT once_k UNIQUE (tenant_id, k) DEFERRABLE INITIALLY DEFERRED)",
    )
    .await
    .unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    c.execute("UPDATE acct SET bal = bal - 10 WHERE tenant_id = $1", &[&t[0]]).await.unwrap();
    c.execute("INSERT INTO once VALUES ($1, 1), ($1, 1)", &[&t[1]]).await.unwrap();
    let e = c.batch_execute("COMMIT").await.unwrap_err();
    assert_eq!(sqlstate(&e), "23505", "{e:?}");
    assert_eq!(balances(&h, &t).await, [100, 100]);
    let n: i64 = h.shard(1).await.query_one("SELECT count(*) FROM once", &[]).await.unwrap().get(0);
    assert_eq!(n, 0);
    assert!(prepared(&h, 2).await.is_empty());
    // The session is idle again.
    c.execute("UPDATE acct SET bal = bal + 1 WHERE tenant_id = $1", &[&t[1]]).await.unwrap();
    assert_eq!(balances(&h, &t).await, [100, 101]);
}

/// The router "dies" (every connection closed without a word, as with
/// kill -9) at each step of a commit across three shards; the recovery
/// sweep settles what it left, the same way on every shard: rolled back
/// before the decision, committed after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_cut_at_any_step_is_settled_the_same_on_every_shard() {
    let (h, t) = bank(3).await;
    let mut expected = vec![100i64, 100, 100];
    for (i, point) in shardgate_router::twophase::FAULT_POINTS.iter().enumerate() {
        fault::set(point, Some(fault::Action::Error));
        let c = h.client().await;
        c.batch_execute("BEGIN").await.unwrap();
        for (j, tenant) in t.iter().enumerate() {
            c.execute("UPDATE acct SET bal = bal + $2 WHERE tenant_id = $1", &[tenant, &(j as i64 + 1)]).await.unwrap();
        }
        let e = c.batch_execute("COMMIT").await.unwrap_err();
        assert!(e.is_closed() || e.code().is_none(), "{point}: the client lost its connection: {e:?}");
        // What is left is in the console's SHOW TRANSACTIONS until settled.
        let console = shardgate_tests::connect(&h.url().replace("/app", "/shardgate")).await;
        let start = Instant::now();
        loop {
            let listed = shardgate_tests::rows(console.simple_query("SHOW TRANSACTIONS").await.unwrap());
            if !listed.is_empty() {
                assert!(listed.iter().all(|r| r[1].as_deref().is_some_and(|g| g.starts_with("sg_"))), "{listed:?}");
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "{point}: nothing in doubt was ever listed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let commits = i > 0;
        if commits {
            for (j, b) in expected.iter_mut().enumerate() {
                *b += j as i64 + 1;
            }
        }
        until_settled(&h, 3).await;
        assert_eq!(balances(&h, &t).await, expected, "after {point}: all or nothing");
    }
    let m = shardgate_router::twophase::counters();
    let recovered = m.recovered_commit.load(std::sync::atomic::Ordering::Relaxed)
        + m.recovered_rollback.load(std::sync::atomic::Ordering::Relaxed);
    assert!(recovered >= 3, "the sweep settled what was left prepared: {recovered}");
}

/// Concurrent transfers between tenants on different shards: money is
/// neither made nor lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transfers_across_shards_keep_the_total() {
    let h = Harness::start(3).await;
    let tenants: Vec<i64> = (0..3).flat_map(|s| h.tenants_on(s, 3)).collect();
    let c = h.client().await;
    c.batch_execute(SCHEMA).await.unwrap();
    for t in &tenants {
        c.execute("INSERT INTO acct VALUES ($1, 1, 1000)", &[t]).await.unwrap();
    }
    let mut tasks = Vec::new();
    for w in 0..6usize {
        let url = h.url();
        let tenants = tenants.clone();
        tasks.push(tokio::spawn(async move {
            let c = shardgate_tests::connect(&url).await;
            // Set on the session, so on every shard a transaction reaches: a
            // lock wait fails instead of hanging this test.
            c.batch_execute("SET lock_timeout = '10s'").await.unwrap();
            let mut committed = 0;
            for i in 0..40usize {
                let from = tenants[(w * 7 + i * 3) % tenants.len()];
                let to = tenants[(w * 5 + i * 2 + 1) % tenants.len()];
                if from == to {
                    continue;
                }
                // Rows locked in one order by every transfer: no deadlock
                // between shards (which neither shard could see).
                let (first, second, delta) = if from < to { (from, to, -7i64) } else { (to, from, 7) };
                c.batch_execute("BEGIN").await.unwrap();
                c.execute("UPDATE acct SET bal = bal + $2 WHERE tenant_id = $1", &[&first, &delta]).await.unwrap();
                c.execute("UPDATE acct SET bal = bal - $2 WHERE tenant_id = $1", &[&second, &delta]).await.unwrap();
                c.batch_execute("COMMIT").await.unwrap();
                committed += 1;
            }
            committed
        }));
    }
    let mut committed = 0;
    for task in tasks {
        committed += task.await.unwrap();
    }
    assert!(committed > 200, "every transfer went through: {committed}");
    let mut total = 0i64;
    for s in 0..3 {
        total += h
            .shard(s)
            .await
            .query_one("SELECT coalesce(sum(bal), 0)::bigint FROM acct", &[])
            .await
            .unwrap()
            .get::<_, i64>(0);
    }
    assert_eq!(total, 1000 * tenants.len() as i64);
    assert!(prepared(&h, 3).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuse_keeps_a_transaction_on_one_shard() {
    let config = RouterConfig { cross_shard_transactions: CrossShard::Refuse, ..RouterConfig::default() };
    let h = Harness::start_with(2, config).await;
    let t = [h.tenants_on(0, 1)[0], h.tenants_on(1, 1)[0]];
    let c = h.client().await;
    c.batch_execute(SCHEMA).await.unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    c.execute("INSERT INTO acct VALUES ($1, 1, 1)", &[&t[0]]).await.unwrap();
    let e = c.execute("INSERT INTO acct VALUES ($1, 1, 1)", &[&t[1]]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "0A000");
    assert!(format!("{e:?}").contains("cross_shard_transactions"), "{e:?}");
    c.batch_execute("ROLLBACK").await.unwrap();
}

/// A transaction the router refused a statement in is failed, as in
/// Postgres: its COMMIT, sent through the extended protocol, rolls back what
/// ran before on the shard. It used to be sent to the shard, which knew of
/// no failure and committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_of_a_transaction_failed_in_the_router_rolls_back() {
    let (h, t) = bank(2).await;
    let c = h.client().await;
    c.batch_execute("BEGIN").await.unwrap();
    c.execute("UPDATE acct SET bal = 0 WHERE tenant_id = $1", &[&t[0]]).await.unwrap();
    // No tenant key: refused by the router, the shard never sees it.
    let e = c.execute("INSERT INTO acct SELECT * FROM acct", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "0A000");
    // tokio-postgres's execute: Parse, Bind, Execute, Sync.
    c.execute("COMMIT", &[]).await.unwrap();
    assert_eq!(balances(&h, &t).await, [100, 100], "nothing of the failed transaction was committed");
    // The same with COMMIT parsed, bound and run in one batch (pgjdbc, psycopg).
    use shardgate_tests::raw::{bind, execute, parse, query, sync, Raw};
    let mut raw = Raw::login(h.port()).await;
    raw.run(&[query("BEGIN")]).await;
    raw.run(&[query(&format!("UPDATE acct SET bal = 0 WHERE tenant_id = {}", t[1]))]).await;
    let refused = raw.run(&[query("INSERT INTO acct SELECT * FROM acct")]).await;
    assert_eq!(refused, ["error 0A000", "ready E"]);
    let replies = raw.run(&[parse("", "COMMIT", &[]), bind("", &[], false), execute(), sync()]).await;
    assert_eq!(replies.last().map(String::as_str), Some("ready I"), "{replies:?}");
    assert_eq!(balances(&h, &t).await, [100, 100], "nothing of the failed transaction was committed");
}

/// A write across shards that fails is rolled back on each shard it reached;
/// the session's settings, sent to a server connection before it, must
/// survive that rollback. They were sent in the same query as the BEGIN, so
/// the rollback undid them while the pool still took them as applied, and
/// the session's next statements on that connection ran without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_across_shards_keeps_the_session_settings() {
    let mut config = RouterConfig::default();
    config.pool.size = 1;
    let h = Harness::start_with(2, config).await;
    let t: Vec<i64> = (0..2).map(|s| h.tenants_on(s, 1)[0]).collect();
    let c = h.client().await;
    c.batch_execute(SCHEMA).await.unwrap();
    c.execute("INSERT INTO acct VALUES ($1, 1, 100)", &[&t[1]]).await.unwrap();
    c.batch_execute("SET TimeZone = 'Asia/Tokyo'").await.unwrap();
    // The rows for t[0] go in first; the duplicate on t[1]'s shard fails it all.
    let insert = format!("INSERT INTO acct VALUES ({}, 1, 5), ({}, 1, 5)", t[0], t[1]);
    let e = c.batch_execute(&insert).await.unwrap_err();
    assert_eq!(sqlstate(&e), "23505");
    assert_eq!(rows(&h, 2).await, 1);
    for tenant in &t {
        // An aggregate answers one row even where the tenant has none.
        let sql = format!("SELECT current_setting('TimeZone'), count(*) FROM acct WHERE tenant_id = {tenant}");
        let zone = shardgate_tests::rows(c.simple_query(&sql).await.unwrap());
        assert_eq!(zone.len(), 1, "{zone:?}");
        assert_eq!(zone[0][0].as_deref(), Some("Asia/Tokyo"), "tenant {tenant}");
    }
}

/// Waits (60 s at most) until move `id` is in one of the phases `want`.
async fn wait_for_phase(h: &Harness, id: u64, want: &[shardgate_directory::state::MovePhase]) {
    let start = Instant::now();
    loop {
        let m = h.directory.load().moves[&id].clone();
        if want.contains(&m.phase) {
            return;
        }
        assert!(m.phase != shardgate_directory::state::MovePhase::Failed, "{m:?}");
        assert!(start.elapsed() < Duration::from_secs(60), "waited for {want:?}: {m:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A cutover never strands a prepared transaction on the source. A
/// transaction cut after its commit decision leaves its part for the moving
/// tenant prepared on the source shard, with nobody to commit it but the
/// sweep. The part holds the move's lock (the fence trigger took it when
/// the row was written), so the cutover's fence waits until the sweep has
/// committed it, and the stream carries it to the target before the flip;
/// a cutover that gives up waiting is undone and tried again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cutover_waits_for_a_prepared_transaction_on_the_moving_rows() {
    use shardgate_directory::state::{Command, MoveOptions, MovePhase, MoveRequest, MoveSubject, Outcome};
    let (h, t) = bank(3).await;
    let config =
        shardgate_migrator::driver::DriverConfig { progress_every: Duration::from_millis(100), ..Default::default() };
    let stop = shardgate_tests::start_move_driver(&h, h.cluster.urls(), config);
    let out = h.directory.apply_local(&Command::CreateMove {
        subject: MoveSubject::Tenant(shardgate_directory::TenantKey::Int(t[0])),
        target: "shard_2".into(),
        options: MoveOptions { cutover_auto: false, complete_auto: false },
        at_ms: shardgate_directory::clock::now_ms(),
    });
    let Outcome::MoveCreated { id, .. } = out else { panic!("{out:?}") };
    let phase = || h.directory.load().moves[&id].phase;
    wait_for_phase(&h, id, &[MovePhase::DualWrite, MovePhase::Shadow]).await;

    // 5 from t[0] (moving) to t[1]: t[1]'s shard, written last, decides;
    // t[0]'s part stays prepared on shard 0.
    let point = "twophase.after_decision";
    assert!(shardgate_router::twophase::FAULT_POINTS.contains(&point));
    fault::set(point, Some(fault::Action::Error));
    let cut = h.client().await;
    cut.batch_execute("BEGIN").await.unwrap();
    cut.execute("UPDATE acct SET bal = bal - 5 WHERE tenant_id = $1", &[&t[0]]).await.unwrap();
    cut.execute("UPDATE acct SET bal = bal + 5 WHERE tenant_id = $1", &[&t[1]]).await.unwrap();
    let e = cut.batch_execute("COMMIT").await.unwrap_err();
    assert!(e.is_closed() || e.code().is_none(), "the client lost its connection: {e:?}");
    fault::set(point, None);
    let on_source = h.shard(0).await.query("SELECT gid FROM pg_prepared_xacts", &[]).await.unwrap();
    assert_eq!(on_source.len(), 1, "the moving tenant's part is prepared on the source");

    // Cut over at once (no verify first), while the part is still prepared.
    let cutover = MoveRequest::Cutover { force: true };
    let request = |r: MoveRequest| {
        let out = h.directory.apply_local(&Command::RequestMove { id, request: Some(r) });
        assert!(!matches!(out, Outcome::Rejected { .. }), "{out:?}");
    };
    request(cutover.clone());
    let start = Instant::now();
    while phase() != MovePhase::Reverse {
        let m = h.directory.load().moves[&id].clone();
        assert!(m.phase != MovePhase::Failed, "{m:?}");
        assert!(start.elapsed() < Duration::from_secs(60), "no cutover: {m:?}");
        if m.request.is_none() && matches!(m.phase, MovePhase::DualWrite | MovePhase::Shadow) {
            request(cutover.clone());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    request(MoveRequest::Complete);
    wait_for_phase(&h, id, &[MovePhase::Done]).await;
    let _ = stop.send(true);

    // The transfer is whole: t[0]'s row on its new shard has the committed
    // balance, the source keeps none of its rows, nothing is left prepared.
    let on_target: i64 =
        h.shard(2).await.query_one("SELECT bal FROM acct WHERE tenant_id = $1", &[&t[0]]).await.unwrap().get(0);
    assert_eq!(on_target, 95, "the prepared part reached the target");
    let left: i64 =
        h.shard(0).await.query_one("SELECT count(*) FROM acct WHERE tenant_id = $1", &[&t[0]]).await.unwrap().get(0);
    assert_eq!(left, 0);
    let c = h.client().await;
    let through: i64 = c.query_one("SELECT bal FROM acct WHERE tenant_id = $1", &[&t[0]]).await.unwrap().get(0);
    assert_eq!(through, 95);
    assert_eq!(balances(&h, &t[1..]).await, [105, 100]);
    assert!(prepared(&h, 3).await.is_empty());
}

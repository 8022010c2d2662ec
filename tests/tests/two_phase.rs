//! Transactions that write on several shards commit on all of them or on
//! none: two-phase commit, its failures, and the recovery sweep that settles
//! what a crash left prepared (docs/transactions.md).

use std::time::{Duration, Instant};

use shardgate_directory::fault;
use shardgate_router::config::{CrossShard, RouterConfig};
use shardgate_tests::{sqlstate, Harness};

const SCHEMA: &str = "CREATE TABLE acct (tenant_id bigint, id int, bal bigint NOT NULL, PRIMARY KEY (tenant_id, id))";

/// A cluster of `n` shards, one tenant on each with 100 in its account.
async fn bank(n: usize) -> (Harness, Vec<i64>) {
    let h = Harness::start(n).await;
    let tenants: Vec<i64> = (0..n).map(|s| h.tenants_on(s, 1)[0]).collect();
    let c = h.client().await;
    c.batch_execute(SCHEMA).await.unwrap();
    for t in &tenants {
        c.execute("INSERT INTO acct VALUES ($1, 1, 100)", &[t]).await.unwrap();
    }
    (h, tenants)
}

/// Each tenant's balance, read on its own shard directly.
async fn balances(h: &Harness, tenants: &[i64]) -> Vec<i64> {
    let mut out = Vec::new();
    for t in tenants {
        let row = h.shard(h.shard_of(*t)).await.query_one("SELECT bal FROM acct WHERE tenant_id = $1", &[t]).await;
        out.push(row.unwrap().get(0));
    }
    out
}

/// Prepared transactions left on the shards, all of them.
async fn prepared(h: &Harness, shards: usize) -> Vec<String> {
    let mut out = Vec::new();
    for s in 0..shards {
        for r in h.shard(s).await.query("SELECT gid FROM pg_prepared_xacts", &[]).await.unwrap() {
            out.push(r.get(0));
        }
    }
    out
}

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

/// Rows of `acct` on all shards.
async fn rows(h: &Harness, shards: usize) -> i64 {
    let mut n = 0;
    for s in 0..shards {
        n += h.shard(s).await.query_one("SELECT count(*) FROM acct", &[]).await.unwrap().get::<_, i64>(0);
    }
    n
}

/// Waits (polling, 20 s at most) until no prepared transaction is left.
async fn until_settled(h: &Harness, shards: usize) {
    let start = Instant::now();
    loop {
        let left = prepared(h, shards).await;
        if left.is_empty() {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "still prepared after 20 s: {left:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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

/// Savepoints in a transaction across shards: each shard the block reaches
/// gets the savepoints open so far, and SAVEPOINT, RELEASE and ROLLBACK TO
/// run on every shard, so rolling back to one undoes the work since on all
/// of them, in the simple and the extended protocol, after an error on a
/// shard and after a statement the router refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn savepoints_work_across_shards() {
    let (h, t) = bank(3).await;
    let c = h.client().await;
    let set = |t: i64, bal: i64| format!("UPDATE acct SET bal = {bal} WHERE tenant_id = {t}");
    let bal_of = |t: i64| format!("SELECT bal FROM acct WHERE tenant_id = {t}");
    let inside = |rows: Vec<tokio_postgres::SimpleQueryMessage>| rows_of(&rows);

    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute(&set(t[0], 1)).await.unwrap();
    c.batch_execute("SAVEPOINT a").await.unwrap();
    c.batch_execute(&set(t[1], 2)).await.unwrap(); // shard 1 joins, with `a`
    c.execute("SAVEPOINT b", &[]).await.unwrap(); // extended protocol
    c.batch_execute(&set(t[2], 3)).await.unwrap(); // shard 2 joins, with `a` and `b`
    c.batch_execute("ROLLBACK TO b").await.unwrap();
    assert_eq!(inside(c.simple_query(&bal_of(t[2])).await.unwrap()), ["100"], "shard 2's work since b undone");
    assert_eq!(inside(c.simple_query(&bal_of(t[1])).await.unwrap()), ["2"], "shard 1's work before b kept");
    c.batch_execute(&set(t[0], 5)).await.unwrap();
    c.execute("ROLLBACK TO a", &[]).await.unwrap();
    assert_eq!(inside(c.simple_query(&bal_of(t[0])).await.unwrap()), ["1"]);
    assert_eq!(inside(c.simple_query(&bal_of(t[1])).await.unwrap()), ["100"]);
    c.batch_execute("RELEASE a").await.unwrap();
    let e = c.batch_execute("ROLLBACK TO a").await.unwrap_err();
    assert_eq!(sqlstate(&e), "3B001", "released: {e}");
    let end = c.simple_query("COMMIT").await.unwrap(); // a failed block's COMMIT rolls it back
    assert!(matches!(end.last(), Some(tokio_postgres::SimpleQueryMessage::CommandComplete(0))), "{end:?}");
    assert_eq!(balances(&h, &t).await, [100, 100, 100]);

    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute(&set(t[0], 1)).await.unwrap();
    c.batch_execute("SAVEPOINT a").await.unwrap();
    c.batch_execute(&set(t[1], 2)).await.unwrap();
    c.batch_execute("RELEASE a").await.unwrap();
    c.batch_execute(&set(t[2], 3)).await.unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(balances(&h, &t).await, [1, 2, 3]);

    // An error on one shard: the block can go back to a savepoint and on.
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute(&set(t[0], 7)).await.unwrap();
    c.batch_execute(&set(t[1], 8)).await.unwrap();
    c.batch_execute("SAVEPOINT s").await.unwrap();
    let e = c.batch_execute(&format!("UPDATE acct SET bal = bal / 0 WHERE tenant_id = {}", t[1])).await.unwrap_err();
    assert_eq!(sqlstate(&e), "22012");
    let e = c.batch_execute("SAVEPOINT t").await.unwrap_err();
    assert_eq!(sqlstate(&e), "25P02", "{e}");
    c.batch_execute("ROLLBACK TO s").await.unwrap();
    c.batch_execute(&set(t[2], 9)).await.unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(balances(&h, &t).await, [7, 8, 9]);

    // A statement the router refused never reached a shard: back to the
    // savepoint, the block goes on.
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute(&set(t[0], 10)).await.unwrap();
    c.batch_execute("SAVEPOINT s").await.unwrap();
    c.batch_execute(&set(t[1], 11)).await.unwrap();
    let refused = format!("UPDATE acct SET tenant_id = tenant_id + 1 WHERE tenant_id = {}", t[0]);
    assert_eq!(sqlstate(&c.batch_execute(&refused).await.unwrap_err()), "0A000");
    c.batch_execute("ROLLBACK TO s").await.unwrap();
    c.batch_execute(&set(t[2], 12)).await.unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(balances(&h, &t).await, [10, 8, 12]);

    // A savepoint beside other statements in one query string: which
    // savepoints the block has is not known, so it keeps to its shards.
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute(&format!("SAVEPOINT x; {}", set(t[0], 13))).await.unwrap();
    let e = c.batch_execute(&set(t[1], 14)).await.unwrap_err();
    assert_eq!(sqlstate(&e), "0A000");
    assert!(format!("{e:?}").contains("beside other statements"), "{e:?}");
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(balances(&h, &t).await, [10, 8, 12]);
    assert!(prepared(&h, 3).await.is_empty());
}

/// A pipeline up to one Sync is one transaction (asyncpg's `executemany`,
/// pgjdbc's `executeBatch`): with rows for tenants on several shards it
/// commits on all of them, or, when any row fails, on none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_across_shards_commits_on_all_or_none() {
    use shardgate_tests::raw::{bind, execute, parse, query, sync, Raw};
    let (h, t) = bank(3).await;
    let mut c = Raw::login(h.port()).await;
    let insert = "INSERT INTO acct VALUES ($1, $2, 1)";
    let mut pipeline = vec![parse("ins", insert, &[20, 20])];
    for (i, tenant) in [t[0], t[1], t[0], t[2], t[1]].iter().enumerate() {
        pipeline.push(bind("ins", &[*tenant, 10 + i as i64], false));
        pipeline.push(execute());
    }
    pipeline.push(sync());
    let replies = c.run(&pipeline).await;
    assert!(!replies.iter().any(|r| r.starts_with("error")), "{replies:?}");
    assert_eq!(replies.iter().filter(|r| r.starts_with("C ")).count(), 5, "{replies:?}");
    assert_eq!(replies.last().map(String::as_str), Some("ready I"));
    assert_eq!(rows(&h, 3).await, 3 + 5);
    // A duplicate key in the last row: nothing of the pipeline stays.
    let mut failing = vec![];
    for (i, tenant) in [t[0], t[1], t[2]].iter().enumerate() {
        failing.push(bind("ins", &[*tenant, 20 + i as i64], false));
        failing.push(execute());
    }
    failing.push(bind("ins", &[t[1], 11], false));
    failing.push(execute());
    failing.push(sync());
    let replies = c.run(&failing).await;
    assert!(replies.iter().any(|r| r == "error 23505"), "{replies:?}");
    assert_eq!(replies.last().map(String::as_str), Some("ready I"), "{replies:?}");
    assert_eq!(rows(&h, 3).await, 3 + 5, "the failed pipeline left nothing on any shard");
    // Inside BEGIN the pipeline joins the block, which goes on until COMMIT.
    assert_eq!(c.run(&[query("BEGIN")]).await.last().map(String::as_str), Some("ready T"));
    let mut inside = vec![];
    for (i, tenant) in t.iter().enumerate() {
        inside.push(bind("ins", &[*tenant, 30 + i as i64], false));
        inside.push(execute());
    }
    inside.push(sync());
    let replies = c.run(&inside).await;
    assert_eq!(replies.last().map(String::as_str), Some("ready T"), "{replies:?}");
    assert_eq!(rows(&h, 3).await, 3 + 5, "not committed yet");
    assert_eq!(c.run(&[query("COMMIT")]).await.last().map(String::as_str), Some("ready I"));
    assert_eq!(rows(&h, 3).await, 3 + 5 + 3);
    assert!(prepared(&h, 3).await.is_empty());
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

/// A multi-row INSERT whose rows are for several shards is one statement:
/// all its rows are committed or none, as on one Postgres. It used to commit
/// shard after shard, and a failure on the last left the others' rows in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_row_insert_across_shards_is_all_or_nothing() {
    let (h, t) = bank(3).await;
    let c = h.client().await;
    let ok =
        format!("INSERT INTO acct VALUES ({}, 2, 1), ({}, 2, 1), ({}, 2, 1) RETURNING tenant_id", t[0], t[1], t[2]);
    let msgs = c.simple_query(&ok).await.unwrap();
    let returned = msgs.iter().filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))).count();
    assert_eq!(returned, 3);
    assert_eq!(rows(&h, 3).await, 6);
    // The last shard's row is a duplicate: nothing of the statement stays.
    let dup = format!("INSERT INTO acct VALUES ({}, 3, 1), ({}, 3, 1), ({}, 2, 1)", t[0], t[1], t[2]);
    let e = c.simple_query(&dup).await.unwrap_err();
    assert_eq!(sqlstate(&e), "23505");
    assert_eq!(rows(&h, 3).await, 6, "no row of the failed INSERT on any shard");
    assert!(prepared(&h, 3).await.is_empty());
}

/// UPDATE and DELETE that name tenants on several shards (`IN (…)`, `=
/// ANY(…)`, `OR`) run on each of those shards and commit together: all
/// their rows or none. They used to be refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_naming_tenants_on_several_shards_commit_together() {
    let (h, t) = bank(3).await;
    let c = h.client().await;
    let ids = format!("{}, {}, {}", t[0], t[1], t[2]);
    let tag = c.simple_query(&format!("UPDATE acct SET bal = bal + 1 WHERE tenant_id IN ({ids})")).await.unwrap();
    assert!(matches!(tag.last(), Some(tokio_postgres::SimpleQueryMessage::CommandComplete(3))), "{tag:?}");
    assert_eq!(balances(&h, &t).await, [101, 101, 101]);
    // One shard's part fails: no shard keeps its part.
    let failing = format!(
        "UPDATE acct SET bal = bal / (CASE WHEN tenant_id = {} THEN 0 ELSE 1 END) WHERE tenant_id = {} OR tenant_id = {}",
        t[2], t[0], t[2]
    );
    let e = c.simple_query(&failing).await.unwrap_err();
    assert_eq!(sqlstate(&e), "22012");
    assert_eq!(balances(&h, &t).await, [101, 101, 101]);
    let deleted = c
        .simple_query(&format!("DELETE FROM acct WHERE tenant_id = ANY(ARRAY[{}, {}]) RETURNING tenant_id", t[1], t[2]))
        .await
        .unwrap();
    let returned = deleted.iter().filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))).count();
    assert_eq!(returned, 2);
    assert_eq!(rows(&h, 3).await, 1);
    assert!(prepared(&h, 3).await.is_empty());
}

/// The same through the extended protocol, as drivers send it: `WHERE
/// tenant_id = ANY($1)` with an array of keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extended_write_naming_tenants_on_several_shards_commits_together() {
    let (h, t) = bank(3).await;
    let c = h.client().await;
    let keys: Vec<i64> = t.clone();
    let n = c.execute("UPDATE acct SET bal = bal + 5 WHERE tenant_id = ANY($1)", &[&keys]).await.unwrap();
    assert_eq!(n, 3);
    assert_eq!(balances(&h, &t).await, [105, 105, 105]);
    // A failing part: nothing anywhere.
    let e = c
        .execute(
            "UPDATE acct SET bal = bal / (CASE WHEN tenant_id = $2 THEN 0 ELSE 1 END) WHERE tenant_id = ANY($1)",
            &[&keys, &t[1]],
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "22012");
    assert_eq!(balances(&h, &t).await, [105, 105, 105]);
    let gone =
        c.query("DELETE FROM acct WHERE tenant_id = ANY($1) RETURNING bal", &[&keys[..2].to_vec()]).await.unwrap();
    assert_eq!(gone.len(), 2);
    assert_eq!(rows(&h, 3).await, 1);
    assert!(prepared(&h, 3).await.is_empty());
}

/// A keyless UPDATE or DELETE of a sharded table, where
/// `allow_cross_shard_writes` lets it run on every shard, commits on every
/// shard or none, and its command tag counts every shard's rows. It used to
/// commit shard after shard and report the first shard's count only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyless_write_on_every_shard_is_all_or_nothing_and_counts_every_row() {
    let config = RouterConfig { allow_cross_shard_writes: true, ..RouterConfig::default() };
    let h = Harness::start_with(3, config).await;
    let t: Vec<i64> = (0..3).map(|s| h.tenants_on(s, 1)[0]).collect();
    let c = h.client().await;
    c.batch_execute(SCHEMA).await.unwrap();
    for tenant in &t {
        c.execute("INSERT INTO acct VALUES ($1, 1, 100)", &[tenant]).await.unwrap();
    }
    let tag = c.simple_query("UPDATE acct SET bal = bal + 1").await.unwrap();
    assert!(matches!(tag.last(), Some(tokio_postgres::SimpleQueryMessage::CommandComplete(3))), "{tag:?}");
    assert_eq!(balances(&h, &t).await, [101, 101, 101]);
    let failing = format!("UPDATE acct SET bal = bal / (CASE WHEN tenant_id = {} THEN 0 ELSE 1 END)", t[2]);
    let e = c.simple_query(&failing).await.unwrap_err();
    assert_eq!(sqlstate(&e), "22012");
    assert_eq!(balances(&h, &t).await, [101, 101, 101], "no shard kept its part");
    let tag = c.simple_query("DELETE FROM acct WHERE bal > 0").await.unwrap();
    assert!(matches!(tag.last(), Some(tokio_postgres::SimpleQueryMessage::CommandComplete(3))), "{tag:?}");
    assert_eq!(rows(&h, 3).await, 0);
    assert!(prepared(&h, 3).await.is_empty());
}

/// The keyless write above, sent with the extended protocol: it used to run
/// shard after shard and answer with the first shard's count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extended_keyless_write_on_every_shard_is_all_or_nothing_and_counts_every_row() {
    let config = RouterConfig { allow_cross_shard_writes: true, ..RouterConfig::default() };
    let h = Harness::start_with(3, config).await;
    let t: Vec<i64> = (0..3).map(|s| h.tenants_on(s, 1)[0]).collect();
    let c = h.client().await;
    c.batch_execute(SCHEMA).await.unwrap();
    for tenant in &t {
        c.execute("INSERT INTO acct VALUES ($1, 1, 100)", &[tenant]).await.unwrap();
    }
    assert_eq!(c.execute("UPDATE acct SET bal = bal + $1", &[&1i64]).await.unwrap(), 3);
    assert_eq!(balances(&h, &t).await, [101, 101, 101]);
    let e = c
        .execute("UPDATE acct SET bal = bal / (CASE WHEN tenant_id = $1 THEN 0 ELSE 1 END)", &[&t[2]])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "22012");
    assert_eq!(balances(&h, &t).await, [101, 101, 101], "no shard kept its part");
    assert_eq!(c.execute("DELETE FROM acct WHERE bal > $1", &[&0i64]).await.unwrap(), 3);
    assert_eq!(rows(&h, 3).await, 0);
    assert!(prepared(&h, 3).await.is_empty());
}

/// How many rows `sql` counts on each shard, read directly.
async fn count_on_each(h: &Harness, shards: usize, sql: &str) -> Vec<i64> {
    let mut out = Vec::new();
    for s in 0..shards {
        out.push(h.shard(s).await.query_one(sql, &[]).await.unwrap().get(0));
    }
    out
}

/// Statements that must land on every shard (DDL, reference-table rows)
/// land on all of them or on none, in the simple and the extended protocol,
/// outside a transaction block and inside one. They used to run shard after
/// shard, so a failure on one shard left the others changed: reference rows
/// that differ between shards, a table on some shards only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_on_every_shard_land_on_all_of_them_or_none() {
    let h = Harness::start(3).await;
    let c = h.client().await;
    c.batch_execute("CREATE TABLE countries (code text PRIMARY KEY, name text)").await.unwrap();
    let countries = "SELECT count(*) FROM countries";
    // A row planted on shard 2 only, behind the router's back.
    h.shard(2).await.batch_execute("INSERT INTO countries VALUES ('jp', 'Japan')").await.unwrap();
    let e = c.batch_execute("INSERT INTO countries VALUES ('fr', 'France'), ('jp', 'Japan')").await.unwrap_err();
    assert_eq!(sqlstate(&e), "23505");
    assert!(e.as_db_error().unwrap().message().contains("shard_2"), "{e:?}");
    let e = c.execute("INSERT INTO countries VALUES ($1, $2)", &[&"jp", &"Japan"]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "23505");
    assert_eq!(count_on_each(&h, 3, countries).await, [0, 0, 1], "no shard kept its part");
    h.shard(2).await.batch_execute("DELETE FROM countries").await.unwrap();
    // Written everywhere, a reference row is counted once, as one Postgres counts it.
    let tag = c.simple_query("INSERT INTO countries VALUES ('fr', 'France')").await.unwrap();
    assert!(matches!(tag.last(), Some(tokio_postgres::SimpleQueryMessage::CommandComplete(1))), "{tag:?}");
    assert_eq!(c.execute("INSERT INTO countries VALUES ($1, $2)", &[&"de", &"Germany"]).await.unwrap(), 1);
    assert_eq!(count_on_each(&h, 3, countries).await, [2, 2, 2]);

    // DDL: a table that exists on shard 1 only is not created on the others.
    let planted = "SELECT count(*) FROM pg_tables WHERE tablename = 'planted'";
    h.shard(1).await.batch_execute("CREATE TABLE planted (id int)").await.unwrap();
    let e = c.batch_execute("CREATE TABLE planted (id int)").await.unwrap_err();
    assert_eq!(sqlstate(&e), "42P07");
    let e = c.execute("CREATE TABLE planted (id int)", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "42P07");
    assert_eq!(count_on_each(&h, 3, planted).await, [0, 1, 0]);

    // What cannot run in a transaction block still runs, shard by shard.
    c.batch_execute("CREATE INDEX CONCURRENTLY countries_by_name ON countries (name)").await.unwrap();
    c.execute("CREATE INDEX CONCURRENTLY countries_by_name_too ON countries (name)", &[]).await.unwrap();
    let indexes = "SELECT count(*) FROM pg_indexes WHERE indexname LIKE 'countries_by_name%'";
    assert_eq!(count_on_each(&h, 3, indexes).await, [2, 2, 2]);

    // A schema change in a transaction block: cut after PREPARE, the sweep
    // rolls it back on every shard; committed, it is on every shard.
    let point = shardgate_router::twophase::FAULT_POINTS[0];
    fault::set(point, Some(fault::Action::Error));
    let cut = h.client().await;
    cut.batch_execute("BEGIN; CREATE TABLE audit (id int)").await.unwrap();
    cut.batch_execute("INSERT INTO countries VALUES ('es', 'Spain')").await.unwrap();
    let e = cut.batch_execute("COMMIT").await.unwrap_err();
    assert!(e.is_closed() || e.code().is_none(), "the client lost its connection: {e:?}");
    fault::set(point, None);
    until_settled(&h, 3).await;
    let audit = "SELECT count(*) FROM pg_tables WHERE tablename = 'audit'";
    assert_eq!(count_on_each(&h, 3, audit).await, [0, 0, 0]);
    assert_eq!(count_on_each(&h, 3, countries).await, [2, 2, 2]);
    c.batch_execute("BEGIN; CREATE TABLE audit (id int)").await.unwrap();
    c.batch_execute("INSERT INTO countries VALUES ('es', 'Spain')").await.unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(count_on_each(&h, 3, audit).await, [1, 1, 1]);
    assert_eq!(count_on_each(&h, 3, countries).await, [3, 3, 3]);
    assert!(prepared(&h, 3).await.is_empty());
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

/// A multi-row INSERT sent with the extended protocol whose rows are for
/// tenants on several shards (pgjdbc's `reWriteBatchedInserts`, an ORM's
/// bulk insert): each shard gets its own rows with their own parameters
/// (binary ones too), and they commit together or not at all; RETURNING
/// gathers every shard's rows. It used to be refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extended_multi_row_insert_across_shards_is_all_or_nothing() {
    use shardgate_tests::raw::{bind, describe_statement, execute, parse, sync, Raw};
    let (h, t) = bank(3).await;
    let c = h.client().await;
    let n = c
        .execute("INSERT INTO acct VALUES ($1, 2, $2), ($3, 2, $4), ($5, 2, $2)", &[&t[0], &7i64, &t[1], &8i64, &t[2]])
        .await
        .unwrap();
    assert_eq!(n, 3);
    let mut on_own_shard = Vec::new();
    for tenant in &t {
        let shard = h.shard(h.shard_of(*tenant)).await;
        let row = shard.query_one("SELECT bal FROM acct WHERE tenant_id = $1 AND id = 2", &[tenant]).await.unwrap();
        on_own_shard.push(row.get::<_, i64>(0));
    }
    assert_eq!(on_own_shard, [7, 8, 7]);

    let returned = c
        .query("INSERT INTO acct VALUES ($1, 3, $2), ($3, 3, $2) RETURNING tenant_id, bal", &[&t[0], &9i64, &t[2]])
        .await
        .unwrap();
    let mut got: Vec<(i64, i64)> = returned.iter().map(|r| (r.get(0), r.get(1))).collect();
    got.sort();
    assert_eq!(got, [(t[0], 9), (t[2], 9)]);

    // A duplicate key on t[1]'s shard: none of the statement's rows anywhere.
    let e = c.execute("INSERT INTO acct VALUES ($1, 4, 1), ($2, 1, 1)", &[&t[0], &t[1]]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "23505");
    let mut fours = 0;
    for s in 0..3 {
        fours +=
            h.shard(s).await.query_one("SELECT count(*) FROM acct WHERE id = 4", &[]).await.unwrap().get::<_, i64>(0);
    }
    assert_eq!(fours, 0, "no shard kept its rows");

    // Described and executed in one pipeline, binary parameters: the router
    // answers as one Postgres does.
    let pipeline = |id: i64| {
        let sql = format!("INSERT INTO acct VALUES ($1, {id}, $2), ($3, {id}, $4)");
        vec![
            parse("ins", &sql, &[20, 20, 20, 20]),
            describe_statement("ins"),
            bind("ins", &[t[0], 1, t[1], 2], true),
            execute(),
            sync(),
        ]
    };
    let through = Raw::login(h.port()).await.run(&pipeline(5)).await;
    let direct = Raw::login(h.shard_server(0).port()).await.run(&pipeline(6)).await;
    assert_eq!(through, direct);
    assert!(through.contains(&format!("C {:?}", b"INSERT 0 2\0".to_vec())), "{through:?}");
    assert!(prepared(&h, 3).await.is_empty());

    // Inside a transaction block, each shard's rows join the block: its
    // ROLLBACK leaves none, its COMMIT keeps all; a failing part fails it.
    let ids = |id: i64| format!("SELECT count(*) FROM acct WHERE id = {id}");
    let insert = "INSERT INTO acct VALUES ($1, $4, 1), ($2, $4, 2), ($3, $4, 3) RETURNING tenant_id";
    c.batch_execute("BEGIN").await.unwrap();
    assert_eq!(c.query(insert, &[&t[0], &t[1], &t[2], &7i32]).await.unwrap().len(), 3);
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(count_on_each(&h, 3, &ids(7)).await.iter().sum::<i64>(), 0);
    c.batch_execute("BEGIN").await.unwrap();
    c.execute("UPDATE acct SET bal = 0 WHERE tenant_id = $1 AND id = 1", &[&t[1]]).await.unwrap();
    assert_eq!(c.execute(insert, &[&t[0], &t[1], &t[2], &8i32]).await.unwrap(), 3);
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(count_on_each(&h, 3, &ids(8)).await.iter().sum::<i64>(), 3);
    c.batch_execute("BEGIN").await.unwrap();
    let e = c.execute(insert, &[&t[0], &t[1], &t[2], &1i32]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "23505");
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(count_on_each(&h, 3, &ids(1)).await.iter().sum::<i64>(), 3, "only the rows from before");
    assert!(prepared(&h, 3).await.is_empty());
}

/// A pipeline that executes multi-row INSERTs whose rows are for several
/// shards more than once before its Sync (pgjdbc's `reWriteBatchedInserts`
/// with a batch that is not a power of two: a 2-row and a 1-row statement),
/// mixed with a one-tenant INSERT: one transaction across shards, answered as
/// one Postgres answers it, and rolled back everywhere when any row fails.
/// It used to be refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_of_split_inserts_is_one_transaction() {
    use shardgate_tests::raw::{bind, describe_statement, execute, parse, query, sync, Raw};
    let (h, t) = bank(3).await;
    let pipeline = |ids: [i64; 3]| {
        let two = "INSERT INTO acct VALUES ($1, $5, $2), ($3, $5, $4)";
        vec![
            parse("two", two, &[20, 20, 20, 20, 20]),
            describe_statement("two"),
            bind("two", &[t[0], 1, t[1], 2, ids[0]], true),
            execute(),
            parse("one", "INSERT INTO acct VALUES ($1, $3, $2)", &[20, 20, 20]),
            bind("one", &[t[2], 3, ids[1]], true),
            execute(),
            bind("two", &[t[2], 4, t[1], 5, ids[2]], true),
            execute(),
            sync(),
        ]
    };
    let through = Raw::login(h.port()).await.run(&pipeline([10, 11, 12])).await;
    // The same messages against one Postgres (other ids, as shard 0 holds
    // some of these tenants).
    let direct = Raw::login(h.shard_server(0).port()).await.run(&pipeline([30, 31, 32])).await;
    assert_eq!(through, direct);
    assert_eq!(through.iter().filter(|m| m.starts_with('C')).count(), 3, "{through:?}");
    let mut placed = Vec::new();
    for tenant in &t {
        let shard = h.shard(h.shard_of(*tenant)).await;
        let rows = shard
            .query("SELECT id, bal FROM acct WHERE tenant_id = $1 AND id BETWEEN 10 AND 12 ORDER BY id", &[tenant])
            .await
            .unwrap();
        placed.push(rows.iter().map(|r| (r.get::<_, i32>(0), r.get::<_, i64>(1))).collect::<Vec<_>>());
    }
    assert_eq!(placed, [vec![(10, 1)], vec![(10, 2), (12, 5)], vec![(11, 3), (12, 4)]]);
    assert!(prepared(&h, 3).await.is_empty());

    // A duplicate key in the last execution: nothing of the pipeline stays,
    // and the client hears what one Postgres says.
    let failed = Raw::login(h.port()).await.run(&pipeline([20, 21, 10])).await;
    let direct = Raw::login(h.shard_server(0).port()).await.run(&pipeline([40, 41, 30])).await;
    assert_eq!(failed, direct);
    assert!(failed.contains(&"error 23505".to_string()), "{failed:?}");
    let rows = "SELECT count(*) FROM acct WHERE id IN (20, 21)";
    assert_eq!(count_on_each(&h, 3, rows).await.iter().sum::<i64>(), 0, "no shard kept its rows");

    // The same statement executed twice in a row.
    let two = "INSERT INTO acct VALUES ($1, $5, $2), ($3, $5, $4)";
    let again = |id: i64| {
        vec![
            parse("", two, &[20, 20, 20, 20, 20]),
            bind("", &[t[0], 1, t[1], 2, id], true),
            execute(),
            bind("", &[t[0], 1, t[1], 2, id + 1], true),
            execute(),
            sync(),
        ]
    };
    let through = Raw::login(h.port()).await.run(&again(70)).await;
    let direct = Raw::login(h.shard_server(0).port()).await.run(&again(80)).await;
    assert_eq!(through, direct);
    let rows = "SELECT count(*) FROM acct WHERE id IN (70, 71)";
    assert_eq!(count_on_each(&h, 3, rows).await.iter().sum::<i64>(), 4);

    // A row limit on its Execute: each shard's part runs whole, so the portal
    // could not be suspended after N rows as on Postgres. Refused, nothing
    // written.
    let limited = vec![
        parse("", two, &[20, 20, 20, 20, 20]),
        bind("", &[t[0], 1, t[1], 2, 90], true),
        shardgate_tests::raw::frame(b'E', &[0, 0, 0, 0, 1]),
        sync(),
    ];
    let got = Raw::login(h.port()).await.run(&limited).await;
    assert!(got.contains(&"error 0A000".to_string()), "{got:?}");
    assert_eq!(count_on_each(&h, 3, "SELECT count(*) FROM acct WHERE id = 90").await.iter().sum::<i64>(), 0);

    // Inside a transaction block the pipeline's rows join the block: its
    // ROLLBACK leaves none of them, its COMMIT keeps all.
    for (end, ids, kept) in [("ROLLBACK", [50, 51, 52], 0), ("COMMIT", [60, 61, 62], 5)] {
        let mut raw = Raw::login(h.port()).await;
        assert_eq!(raw.run(&[query("BEGIN")]).await.last().map(String::as_str), Some("ready T"));
        let got = raw.run(&pipeline(ids)).await;
        assert_eq!(got.last().map(String::as_str), Some("ready T"), "{got:?}");
        raw.run(&[query(end)]).await;
        let rows = format!("SELECT count(*) FROM acct WHERE id IN ({}, {}, {})", ids[0], ids[1], ids[2]);
        assert_eq!(count_on_each(&h, 3, &rows).await.iter().sum::<i64>(), kept, "{end}");
    }
    assert!(prepared(&h, 3).await.is_empty());
}

/// One statement that writes tenants on several shards inside a transaction
/// block: each shard's part joins the block, the answer counts every row, and
/// the block commits (or rolls back) on every shard together. A part that
/// fails fails the block, and its end rolls every shard back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_on_several_shards_inside_a_block_joins_the_block() {
    let (h, t) = bank(3).await;
    let c = h.client().await;
    let in_list = format!("{}, {}", t[0], t[1]);
    // Rolled back: nothing changed anywhere.
    c.batch_execute("BEGIN").await.unwrap();
    c.execute(&format!("UPDATE acct SET bal = bal + 1 WHERE tenant_id = {}", t[2]), &[]).await.unwrap();
    let n = c.simple_query(&format!("UPDATE acct SET bal = bal + 10 WHERE tenant_id IN ({in_list})")).await.unwrap();
    assert!(
        matches!(n.last(), Some(tokio_postgres::SimpleQueryMessage::CommandComplete(2))),
        "the rows written on both shards, counted together"
    );
    let inside = rows_of(&c.simple_query(&format!("SELECT bal FROM acct WHERE tenant_id = {} ", t[0])).await.unwrap());
    assert_eq!(inside, ["110"], "the block sees its own write");
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(balances(&h, &t).await, [100, 100, 100]);
    // As the block's first statement, before it is bound to any shard.
    c.batch_execute("BEGIN").await.unwrap();
    c.simple_query(&format!("DELETE FROM acct WHERE tenant_id IN ({in_list})")).await.unwrap();
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(balances(&h, &t).await, [100, 100, 100]);
    // Through the extended protocol, with the keys as a parameter.
    c.batch_execute("BEGIN").await.unwrap();
    let both = vec![t[0], t[1]];
    let n = c.execute("UPDATE acct SET bal = bal + 7 WHERE tenant_id = ANY($1)", &[&both]).await.unwrap();
    assert_eq!(n, 2);
    let n = c.execute("UPDATE acct SET bal = bal + 1 WHERE tenant_id = $1", &[&t[2]]).await.unwrap();
    assert_eq!(n, 1);
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(balances(&h, &t).await, [100, 100, 100]);
    c.batch_execute("BEGIN").await.unwrap();
    c.execute("UPDATE acct SET bal = bal + 7 WHERE tenant_id = ANY($1)", &[&both]).await.unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(balances(&h, &t).await, [107, 107, 100]);
    c.batch_execute("BEGIN").await.unwrap();
    c.execute("UPDATE acct SET bal = bal - 7 WHERE tenant_id = ANY($1)", &[&both]).await.unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(balances(&h, &t).await, [100, 100, 100]);
    // A multi-row INSERT for tenants on several shards joins the block too.
    c.batch_execute("BEGIN").await.unwrap();
    let ins = c.simple_query(&format!("INSERT INTO acct VALUES ({}, 2, 1), ({}, 2, 1)", t[0], t[1])).await.unwrap();
    assert!(matches!(ins.last(), Some(tokio_postgres::SimpleQueryMessage::CommandComplete(2))));
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(rows(&h, 3).await, 3);
    c.batch_execute("BEGIN").await.unwrap();
    c.simple_query(&format!("INSERT INTO acct VALUES ({}, 2, 1), ({}, 2, 1)", t[0], t[1])).await.unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(rows(&h, 3).await, 5);
    c.simple_query(&format!("DELETE FROM acct WHERE id = 2 AND tenant_id IN ({in_list})")).await.unwrap();
    // Through the extended protocol too.
    c.batch_execute("BEGIN").await.unwrap();
    assert_eq!(c.execute("INSERT INTO acct VALUES ($1, 2, 1), ($2, 2, 1)", &[&t[0], &t[1]]).await.unwrap(), 2);
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(rows(&h, 3).await, 3);
    // Committed: every shard together, RETURNING rows from both.
    c.batch_execute("BEGIN").await.unwrap();
    let back = c
        .simple_query(&format!("UPDATE acct SET bal = bal - 5 WHERE tenant_id IN ({in_list}) RETURNING bal"))
        .await
        .unwrap();
    assert_eq!(rows_of(&back), ["95", "95"]);
    c.execute(&format!("UPDATE acct SET bal = bal + 10 WHERE tenant_id = {}", t[2]), &[]).await.unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(balances(&h, &t).await, [95, 95, 110]);
    assert!(prepared(&h, 3).await.is_empty());
    // A part that fails (a balance below zero on one shard only) fails the
    // block: COMMIT answers ROLLBACK, and nothing of it stays.
    h.client().await.batch_execute("ALTER TABLE acct ADD CHECK (bal >= 0)").await.unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    c.execute(&format!("UPDATE acct SET bal = 0 WHERE tenant_id = {}", t[2]), &[]).await.unwrap();
    c.execute(&format!("UPDATE acct SET bal = bal - 95 WHERE tenant_id = {}", t[1]), &[]).await.unwrap();
    let e = c
        .simple_query(&format!("UPDATE acct SET bal = bal - 1 WHERE tenant_id IN ({}, {}, {})", t[0], t[1], t[2]))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "23514", "{e}");
    let e = c.execute("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "25P02");
    let tag = c.simple_query("COMMIT").await.unwrap();
    assert!(matches!(tag.last(), Some(tokio_postgres::SimpleQueryMessage::CommandComplete(_))));
    assert_eq!(balances(&h, &t).await, [95, 95, 110]);
    // The same through the extended protocol.
    c.batch_execute("BEGIN").await.unwrap();
    c.execute("UPDATE acct SET bal = 0 WHERE tenant_id = $1", &[&t[2]]).await.unwrap();
    let all = t.clone();
    let e = c.execute("UPDATE acct SET bal = bal - 1 WHERE tenant_id = ANY($1)", &[&all]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "23514", "{e}");
    let e = c.execute("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "25P02");
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(balances(&h, &t).await, [95, 95, 110]);
    assert!(prepared(&h, 3).await.is_empty());
}

fn rows_of(msgs: &[tokio_postgres::SimpleQueryMessage]) -> Vec<String> {
    msgs.iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect()
}

/// One query string whose statements are for tenants on different shards
/// runs as Postgres runs a query string: without BEGIN, one implicit
/// transaction, committed on every shard or, after an error in any statement,
/// on none; with BEGIN, in the block it opens, left for the client to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_string_for_several_shards_runs_as_one_transaction() {
    use tokio_postgres::SimpleQueryMessage as M;
    let (h, t) = bank(3).await;
    let c = h.client().await;
    let set = |t: i64, bal: &str| format!("UPDATE acct SET bal = {bal} WHERE tenant_id = {t}");

    let sql = format!("{}; {}; SELECT bal FROM acct WHERE tenant_id = {}", set(t[0], "1"), set(t[1], "1"), t[2]);
    let answer = c.simple_query(&sql).await.unwrap();
    let tags: Vec<u64> =
        answer.iter().filter_map(|m| if let M::CommandComplete(n) = m { Some(*n) } else { None }).collect();
    assert_eq!(tags, [1, 1, 1], "{answer:?}");
    assert_eq!(rows_of(&answer), ["100"]);
    assert_eq!(balances(&h, &t).await, [1, 1, 100]);

    // An error midway: the statements before it are rolled back, the ones
    // after it never run, and the session is idle again.
    let sql = format!("{}; {}; {}", set(t[0], "2"), set(t[1], "bal / 0"), set(t[2], "2"));
    assert_eq!(sqlstate(&c.simple_query(&sql).await.unwrap_err()), "22012");
    assert_eq!(balances(&h, &t).await, [1, 1, 100]);
    assert_eq!(rows_of(&c.simple_query("SELECT 7").await.unwrap()), ["7"]);

    c.batch_execute(&format!("BEGIN; {}; {}; COMMIT", set(t[0], "3"), set(t[2], "3"))).await.unwrap();
    assert_eq!(balances(&h, &t).await, [3, 1, 3]);

    // BEGIN without its end: the block stays open on both shards.
    c.batch_execute(&format!("BEGIN; {}; {}", set(t[0], "4"), set(t[1], "4"))).await.unwrap();
    c.batch_execute(&set(t[2], "4")).await.unwrap();
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(balances(&h, &t).await, [3, 1, 3]);

    // Inside a block, an error leaves it failed, as in Postgres.
    c.batch_execute("BEGIN").await.unwrap();
    let sql = format!("{}; {}", set(t[0], "5"), set(t[1], "bal / 0"));
    assert_eq!(sqlstate(&c.batch_execute(&sql).await.unwrap_err()), "22012");
    assert_eq!(sqlstate(&c.batch_execute(&set(t[2], "5")).await.unwrap_err()), "25P02");
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(balances(&h, &t).await, [3, 1, 3]);
    assert!(prepared(&h, 3).await.is_empty());
}

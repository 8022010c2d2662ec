//! Every way a statement or a pipeline writes on several shards, inside a
//! transaction block and outside one: savepoints, pipelines up to their Sync,
//! multi-row INSERTs split by shard, writes naming tenants on several shards
//! or none, statements on every shard, and query strings of several
//! statements. Each commits on all of its shards or on none
//! (docs/transactions.md); the commit itself is tested in two_phase.rs.

use shardgate_directory::fault;
use shardgate_router::config::RouterConfig;
use shardgate_tests::bank::{balances, bank, count_on_each, prepared, rows, until_settled, SCHEMA};
use shardgate_tests::{sqlstate, Harness};

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

/// A multi-row INSERT split over shards answers its RETURNING rows in the
/// order of its VALUES rows, as one Postgres does: drivers and ORMs pair them
/// with the rows they sent (Django's `bulk_create`, Rails' `insert_all`). They
/// came shard by shard. Every way a split INSERT runs: the simple and the
/// extended protocol, outside a block and inside one, two in one pipeline,
/// and with `cross_shard_transactions = "refuse"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_insert_returns_its_rows_in_values_order() {
    use shardgate_tests::raw::{bind, execute, parse, sync, Raw};
    let (h, t) = bank(3).await;
    let c = h.client().await;
    // Each row's tenant on another shard than the row before it.
    let order = [t[2], t[0], t[1], t[0], t[2], t[1]];
    let values = |id: i64| {
        let rows: Vec<String> =
            order.iter().enumerate().map(|(i, k)| format!("({k}, {}, {i})", id * 10 + i as i64)).collect();
        format!("INSERT INTO acct VALUES {} RETURNING bal", rows.join(", "))
    };
    let want: Vec<String> = (0..6).map(|i| i.to_string()).collect();
    assert_eq!(rows_of(&c.simple_query(&values(10)).await.unwrap()), want, "simple");
    c.batch_execute("BEGIN").await.unwrap();
    assert_eq!(rows_of(&c.simple_query(&values(11)).await.unwrap()), want, "simple, in a block");
    c.batch_execute("COMMIT").await.unwrap();

    let extended = "INSERT INTO acct VALUES ($1, $7, 0), ($2, $7 + 1, 1), ($3, $7 + 2, 2), ($4, $7 + 3, 3), ($5, $7 + 4, 4), ($6, $7 + 5, 5) RETURNING bal";
    let bals = |rows: Vec<tokio_postgres::Row>| rows.iter().map(|r| r.get::<_, i64>(0).to_string()).collect::<Vec<_>>();
    let (o, c) = (&order, &c);
    let run =
        |id: i32| async move { c.query(extended, &[&o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &id]).await.unwrap() };
    assert_eq!(bals(run(120).await), want, "extended");
    c.batch_execute("BEGIN").await.unwrap();
    assert_eq!(bals(run(130).await), want, "extended, in a block");
    c.batch_execute("COMMIT").await.unwrap();

    // Two executions before one Sync, answered as one Postgres answers them.
    let pipeline = |id: i64| {
        let mut msgs = Vec::new();
        for id in [id, id + 1] {
            msgs.extend([parse("", &values(id), &[]), bind("", &[], false), execute()]);
        }
        msgs.push(sync());
        msgs
    };
    let through = Raw::login(h.port()).await.run(&pipeline(20)).await;
    let direct = Raw::login(h.shard_server(0).port()).await.run(&pipeline(40)).await;
    assert_eq!(through, direct, "a pipeline of two");
    assert_eq!(through.iter().filter(|l| l.starts_with("D ")).count(), 12, "{through:?}");

    // Each shard's part committed on its own.
    let refuse = RouterConfig {
        cross_shard_transactions: shardgate_router::config::CrossShard::Refuse,
        ..RouterConfig::default()
    };
    let h = Harness::start_with(3, refuse).await;
    let t: Vec<i64> = (0..3).map(|s| h.tenants_on(s, 1)[0]).collect();
    let order = [t[2], t[0], t[1], t[0], t[2], t[1]];
    let c = h.client().await;
    c.batch_execute(SCHEMA).await.unwrap();
    let rows: Vec<String> = order.iter().enumerate().map(|(i, k)| format!("({k}, {i}, {i})")).collect();
    let sql = format!("INSERT INTO acct VALUES {} RETURNING bal", rows.join(", "));
    assert_eq!(rows_of(&c.simple_query(&sql).await.unwrap()), want, "cross_shard_transactions = refuse");
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

/// Postgres skips a failed pipeline's messages after the error, its Parses
/// too: a statement parsed there does not exist, and the client parses it
/// again (pgjdbc does, under the same name). Across shards the router kept
/// such statements, and answered the client's next Parse of one with
/// ParseComplete where Postgres, with the check for a name in use, would
/// have said 42P05 the other way round. The session must hold what
/// Postgres's holds: the statement parsed before the error, not the one
/// after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_pipeline_across_shards_keeps_no_statement_parsed_after_the_error() {
    use shardgate_tests::raw::{bind, execute, parse, sync, Raw};
    let (h, t) = bank(3).await;
    assert_ne!(h.shard_of(t[0]), h.shard_of(t[1]));
    let insert = "INSERT INTO acct VALUES ($1, $2, 0)";
    let read = "SELECT count(*) >= 0 FROM acct WHERE tenant_id = $1";
    let session = |id: i64| {
        vec![
            // The second execution is a duplicate key on t[0]'s shard; the
            // read after it is for t[1]'s.
            vec![
                parse("ins", insert, &[20, 20]),
                bind("ins", &[t[0], id], true),
                execute(),
                bind("ins", &[t[0], id], true),
                execute(),
                parse("read", read, &[20]),
                bind("read", &[t[1]], true),
                execute(),
                sync(),
            ],
            // "read" was never parsed; "ins" was, before the error.
            vec![parse("read", read, &[20]), bind("read", &[t[1]], true), execute(), sync()],
            vec![parse("ins", insert, &[20, 20]), sync()],
            vec![bind("ins", &[t[2], id], true), execute(), sync()],
        ]
    };
    let (mut through, mut direct) = (Raw::login(h.port()).await, Raw::login(h.shard_server(0).port()).await);
    for (a, b) in session(90).iter().zip(session(95)) {
        let (got, want) = (through.run(a).await, direct.run(&b).await);
        assert_eq!(got, want, "{a:?}");
    }
    let rows = "SELECT count(*) FROM acct WHERE id = 90";
    assert_eq!(count_on_each(&h, 3, rows).await.iter().sum::<i64>(), 1, "only the last pipeline's row stays");
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

    // Bound and not executed before the next Bind: the split would run rows
    // the client never executed. Refused, nothing written.
    let unexecuted = vec![
        parse("", two, &[20, 20, 20, 20, 20]),
        bind("", &[t[0], 1, t[1], 2, 95], true),
        bind("", &[t[0], 1, t[1], 2, 96], true),
        execute(),
        sync(),
    ];
    let got = Raw::login(h.port()).await.run(&unexecuted).await;
    assert!(got.contains(&"error 0A000".to_string()), "{got:?}");
    let rows = "SELECT count(*) FROM acct WHERE id IN (95, 96)";
    assert_eq!(count_on_each(&h, 3, rows).await.iter().sum::<i64>(), 0);

    // A row limit on its Execute. Without RETURNING there are no rows to
    // limit (pgjdbc asks for one row of each statement of a batch): it runs,
    // as on Postgres. With RETURNING each shard's part runs whole, so the
    // portal could not be suspended after N rows as on Postgres: refused,
    // nothing written.
    let limited = |sql: &str, id: i64| {
        vec![
            parse("", sql, &[20, 20, 20, 20, 20]),
            bind("", &[t[0], 1, t[1], 2, id], true),
            shardgate_tests::raw::frame(b'E', &[0, 0, 0, 0, 1]),
            sync(),
        ]
    };
    let through = Raw::login(h.port()).await.run(&limited(two, 90)).await;
    let direct = Raw::login(h.shard_server(0).port()).await.run(&limited(two, 91)).await;
    assert_eq!(through, direct);
    assert_eq!(count_on_each(&h, 3, "SELECT count(*) FROM acct WHERE id = 90").await.iter().sum::<i64>(), 2);
    let returning = format!("{two} RETURNING id");
    let got = Raw::login(h.port()).await.run(&limited(&returning, 92)).await;
    assert!(got.contains(&"error 0A000".to_string()), "{got:?}");
    assert_eq!(count_on_each(&h, 3, "SELECT count(*) FROM acct WHERE id = 92").await.iter().sum::<i64>(), 0);

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

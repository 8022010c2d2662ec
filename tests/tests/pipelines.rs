//! The extended-protocol pipelines drivers send for a statement they prepared
//! (libpq: Bind, Describe portal, Execute, Sync; most others: Bind, Execute,
//! Sync), sent byte for byte to the router and straight to the shard: the
//! client sees the same replies, errors and transaction states from both.

use shardgate_tests::raw::{bind, describe_portal, describe_statement, execute, frame, parse, query, sync, Raw};
use shardgate_tests::Harness;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_pipelines_answer_through_the_router_as_postgres_does() {
    let h = Harness::start(1).await;
    let c = h.client().await;
    c.batch_execute("CREATE TABLE t (tenant_id bigint, id bigint, v int, PRIMARY KEY (tenant_id, id))").await.unwrap();
    c.batch_execute("INSERT INTO t VALUES (1, 1, 10), (1, 2, 20), (2, 1, 30)").await.unwrap();
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

/// asyncpg prepares with Parse, Describe, Flush and runs the statement next
/// with Bind, Execute, Sync. The description comes from whichever shard the
/// router asks; the rows go where their keys say. The connection that
/// described used to stay pinned to the pipeline, and a key on another shard
/// was refused with 0A000 ("this transaction runs on shard …") every other
/// time, by the turn of the shard picked to describe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_described_before_a_flush_runs_on_the_shard_its_key_names() {
    let h = Harness::start(2).await;
    h.client().await.batch_execute("CREATE TABLE p (tenant_id bigint, v bigint)").await.unwrap();
    let keys = [h.tenants_on(0, 1)[0], h.tenants_on(1, 1)[0]];
    let mut c = Raw::login(h.port()).await;
    let flush = frame(b'H', &[]);
    for round in 0..4 {
        // Each key twice in a row: whatever turn the shard asked to describe
        // is at, it is not the key's shard for one of them.
        for (i, key) in [keys[0], keys[0], keys[1], keys[1]].iter().enumerate() {
            let name = format!("s{round}_{i}");
            let sql = format!("INSERT INTO p VALUES ($1, {round})");
            c.send(&[parse(&name, &sql, &[20]), describe_statement(&name), flush.clone()]).await;
            let mut described = Vec::new();
            while described.last() != Some(&b'n') {
                let (tag, _) = c.next().await;
                assert_ne!(tag, b'E', "describing {sql}");
                described.push(tag);
            }
            assert_eq!(described, [b'1', b't', b'n'], "ParseComplete, ParameterDescription, NoData");
            let replies = c.run(&[bind(&name, &[*key], false), execute(), sync()]).await;
            assert_eq!(replies.last().map(String::as_str), Some("ready I"), "{replies:?}");
            assert!(!replies.iter().any(|r| r.starts_with("error")), "round {round}, key {key}: {replies:?}");
        }
    }
    for (shard, key) in keys.iter().enumerate() {
        let n: i64 =
            h.shard(shard).await.query_one("SELECT count(*) FROM p WHERE tenant_id = $1", &[key]).await.unwrap().get(0);
        assert_eq!(n, 8, "every row on its tenant's shard {shard}");
    }
}

/// An Execute with a row limit on a merged cross-shard read (asyncpg's
/// fetchrow and fetchval ask for one row): that many rows, then
/// PortalSuspended, as Postgres answers. Asking for the rest inside a
/// transaction is refused, never answered short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_limit_on_a_merged_read_suspends_the_portal_as_postgres_does() {
    use shardgate_tests::raw::bind_formats;
    let h = Harness::start(2).await;
    let c = h.client().await;
    c.batch_execute("CREATE TABLE m (tenant_id bigint, v bigint)").await.unwrap();
    for (i, t) in h.tenants_on(0, 3).into_iter().chain(h.tenants_on(1, 3)).enumerate() {
        c.execute("INSERT INTO m VALUES ($1, $2)", &[&t, &(i as i64)]).await.unwrap();
    }
    let limited = |n: i32| {
        let mut body = vec![0u8];
        body.extend_from_slice(&n.to_be_bytes());
        frame(b'E', &body)
    };
    let mut raw = Raw::login(h.port()).await;
    // Sorted (streamed merge), an aggregate (gathered), and a limit above the rows.
    for (sql, limit, rows, suspended) in [
        ("SELECT v FROM m ORDER BY v DESC", 1, 1, true),
        ("SELECT v FROM m ORDER BY v DESC", 2, 2, true),
        ("SELECT count(*) FROM m", 1, 1, true),
        ("SELECT v FROM m ORDER BY v", 10, 6, false),
    ] {
        let replies = raw.run(&[parse("", sql, &[]), bind_formats("", &[], false, &[]), limited(limit), sync()]).await;
        assert_eq!(replies.iter().filter(|r| r.starts_with("D ")).count(), rows, "{sql} limit {limit}: {replies:?}");
        assert_eq!(replies.iter().any(|r| r == "s"), suspended, "{sql} limit {limit}: {replies:?}");
        assert_eq!(replies.last().map(String::as_str), Some("ready I"), "{replies:?}");
    }
    let first = raw
        .run(&[
            parse("", "SELECT v FROM m ORDER BY v DESC", &[]),
            bind_formats("", &[], false, &[]),
            limited(1),
            sync(),
        ])
        .await;
    assert!(first.contains(&format!("D {:?}", [0u8, 1, 0, 0, 0, 1, b'5'])), "the highest value first: {first:?}");
    // Inside a transaction the portal outlives the Sync: its rest is refused.
    raw.run(&[query("BEGIN")]).await;
    let replies = raw
        .run(&[parse("", "SELECT v FROM m ORDER BY v", &[]), bind_formats("", &[], false, &[]), limited(1), sync()])
        .await;
    assert!(replies.iter().any(|r| r == "s"), "{replies:?}");
    let rest = raw.run(&[limited(0), sync()]).await;
    assert_eq!(rest.first().map(String::as_str), Some("error 0A000"), "{rest:?}");
    raw.run(&[query("ROLLBACK")]).await;
}

/// psycopg 3 ends each pipeline (its executemany) with Sync and then Flush.
/// The lone Flush has nothing to run. It used to run as an empty batch that
/// left the session marked mid-pipeline, so the next pipeline across shards in
/// a transaction block was refused (0A000 "a pipeline whose statements are for
/// several shards takes SELECT, INSERT, UPDATE and DELETE"), and the ROLLBACK
/// after that refusal could go unanswered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_after_a_sync_runs_nothing_and_the_next_pipeline_may_span_shards() {
    let h = Harness::start(2).await;
    h.client().await.batch_execute("CREATE TABLE p (tenant_id bigint, v bigint)").await.unwrap();
    let (a, b) = (h.tenants_on(0, 1)[0], h.tenants_on(1, 1)[0]);
    let mut c = Raw::login(h.port()).await;
    let flush = frame(b'H', &[]);
    for round in 0..3 {
        assert_eq!(c.run(&[query("BEGIN")]).await.last().map(String::as_str), Some("ready T"));
        let mut pipeline = Vec::new();
        if round == 0 {
            pipeline.push(parse("ins", "INSERT INTO p VALUES ($1, $2)", &[20, 20]));
        }
        for key in [a, b, a, b] {
            pipeline.extend([bind("ins", &[key, round], false), describe_portal(), execute()]);
        }
        pipeline.extend([sync(), flush.clone()]);
        let replies = c.run(&pipeline).await;
        assert!(!replies.iter().any(|r| r.starts_with("error")), "round {round}: {replies:?}");
        assert_eq!(replies.last().map(String::as_str), Some("ready T"), "round {round}: {replies:?}");
        let end = if round == 2 { "ROLLBACK" } else { "COMMIT" };
        let replies = c.run(&[query(end)]).await;
        assert!(!replies.iter().any(|r| r.starts_with("error")), "round {round} {end}: {replies:?}");
        assert_eq!(replies.last().map(String::as_str), Some("ready I"));
    }
    for shard in 0..2 {
        let n: i64 = h.shard(shard).await.query_one("SELECT count(*) FROM p", &[]).await.unwrap().get(0);
        assert_eq!(n, 4, "two committed rounds of two rows on shard {shard}, the rolled-back one nowhere");
    }
}

/// psycopg 3 in pipeline mode rolls a transaction back with one pipeline:
/// ROLLBACK, then DEALLOCATE ALL (it forgets the statements it prepared in the
/// transaction). It used to be refused whole (0A000 "DEALLOCATE ALL must be
/// sent on its own"), the ROLLBACK with it: the session stayed in its failed
/// transaction and psycopg's pipeline broke.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_and_deallocate_in_one_pipeline_end_the_transaction() {
    let h = Harness::start(2).await;
    h.client().await.batch_execute("CREATE TABLE p (tenant_id bigint PRIMARY KEY, v bigint)").await.unwrap();
    let (a, b) = (h.tenants_on(0, 1)[0], h.tenants_on(1, 1)[0]);
    let mut c = Raw::login(h.port()).await;
    let insert = "INSERT INTO p VALUES ($1, $2)";
    // Healthy and failed transactions, on one shard and on two.
    for (keys, fails) in [(vec![a], false), (vec![a, b], false), (vec![a, a], true), (vec![a, b, b], true)] {
        let ready = c.run(&[parse("ins", insert, &[20, 20]), sync()]).await;
        assert_eq!(ready.last().map(String::as_str), Some("ready I"), "{ready:?}");
        assert_eq!(c.run(&[query("BEGIN")]).await.last().map(String::as_str), Some("ready T"));
        let mut pipeline = Vec::new();
        for k in &keys {
            pipeline.extend([bind("ins", &[*k, 1], false), execute()]);
        }
        pipeline.push(sync());
        let replies = c.run(&pipeline).await;
        let want = if fails { "ready E" } else { "ready T" };
        assert_eq!(replies.last().map(String::as_str), Some(want), "{keys:?}: {replies:?}");
        let replies = c
            .run(&[
                parse("", "ROLLBACK", &[]),
                bind("", &[], false),
                describe_portal(),
                execute(),
                parse("", "DEALLOCATE ALL", &[]),
                bind("", &[], false),
                describe_portal(),
                execute(),
                sync(),
            ])
            .await;
        assert!(!replies.iter().any(|r| r.starts_with("error")), "{keys:?}: {replies:?}");
        assert_eq!(replies.iter().filter(|r| r.starts_with("C ")).count(), 2, "{keys:?}: {replies:?}");
        assert_eq!(replies.last().map(String::as_str), Some("ready I"), "{keys:?}: {replies:?}");
        // The statement is gone, and the session is out of its transaction.
        let gone = c.run(&[bind("ins", &[a, 2], false), execute(), sync()]).await;
        assert_eq!(gone.first().map(String::as_str), Some("error 26000"), "{gone:?}");
        assert_eq!(gone.last().map(String::as_str), Some("ready I"), "{gone:?}");
    }
    for shard in 0..2 {
        let n: i64 = h.shard(shard).await.query_one("SELECT count(*) FROM p", &[]).await.unwrap().get(0);
        assert_eq!(n, 0, "every transaction rolled back on shard {shard}");
    }
}

/// The same refusal midway inside a transaction block: the block is failed
/// (25P02 until ROLLBACK), and ROLLBACK ends it on every shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_refused_midway_in_a_transaction_block_is_rolled_back_by_rollback() {
    let h = Harness::start(2).await;
    h.client().await.batch_execute("CREATE TABLE p (tenant_id bigint, v bigint)").await.unwrap();
    let (a, b) = (h.tenants_on(0, 1)[0], h.tenants_on(1, 1)[0]);
    let mut c = Raw::login(h.port()).await;
    let flush = frame(b'H', &[]);
    assert_eq!(c.run(&[query("BEGIN")]).await.last().map(String::as_str), Some("ready T"));
    c.send(&[parse("", "INSERT INTO p VALUES ($1, $1)", &[20]), bind("", &[a], false), execute(), flush]).await;
    // A statement the router refuses (session state a pooled connection cannot carry).
    let refused = parse("", "SELECT pg_advisory_lock($1)", &[20]);
    let replies = c.run(&[refused, bind("", &[b], false), execute(), sync()]).await;
    assert!(replies.iter().any(|r| r == "error 0A000"), "{replies:?}");
    assert_eq!(replies.last().map(String::as_str), Some("ready E"), "{replies:?}");
    let replies = c.run(&[query("ROLLBACK")]).await;
    assert_eq!(replies.last().map(String::as_str), Some("ready I"), "{replies:?}");
    let after = c.run(&[query("SELECT count(*) FROM p")]).await;
    assert!(!after.iter().any(|r| r.starts_with("error")), "the session goes on: {after:?}");
    for shard in 0..2 {
        let n: i64 = h.shard(shard).await.query_one("SELECT count(*) FROM p", &[]).await.unwrap().get(0);
        assert_eq!(n, 0, "shard {shard}");
    }
}

/// A pipeline that parses a statement name again after using it runs each
/// Bind with the text in force at its place, as Postgres does: pgjdbc's
/// batches and psycopg's pipelines parse the unnamed statement before each
/// execution. The router once bound every execution to the pipeline's last
/// text: the first INSERT below was answered "INSERT 0 1" while the row
/// written was the second one's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_parsed_again_in_a_pipeline_runs_each_text_where_it_stands() {
    let h = Harness::start(1).await;
    let c = h.client().await;
    c.batch_execute("CREATE TABLE t (tenant_id bigint, id bigint, v int, PRIMARY KEY (tenant_id, id))").await.unwrap();
    let close_statement = |name: &str| {
        let mut body = vec![b'S'];
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        frame(b'C', &body)
    };
    let steps = |tenant: i64| -> Vec<Vec<Vec<u8>>> {
        let insert = |v: i32| format!("INSERT INTO t VALUES ($1, $2, {v})");
        let select = "SELECT id, v FROM t WHERE tenant_id = $1 ORDER BY id";
        vec![
            // The unnamed statement, three texts in one pipeline.
            vec![
                parse("", &insert(10), &[20, 20]),
                bind("", &[tenant, 1], false),
                execute(),
                parse("", &insert(20), &[20, 20]),
                bind("", &[tenant, 2], true),
                execute(),
                parse("", select, &[20]),
                bind("", &[tenant], false),
                describe_portal(),
                execute(),
                sync(),
            ],
            // A named statement bound as an earlier pipeline defined it, then
            // closed, parsed again and bound in the same pipeline.
            vec![parse("n", &insert(30), &[20, 20]), sync()],
            vec![
                bind("n", &[tenant, 3], false),
                execute(),
                close_statement("n"),
                parse("n", &insert(40), &[20, 20]),
                describe_statement("n"),
                bind("n", &[tenant, 4], false),
                execute(),
                parse("", select, &[20]),
                bind("", &[tenant], false),
                execute(),
                sync(),
            ],
            // The unnamed statement bound as the pipeline before left it,
            // then parsed again.
            vec![
                bind("", &[tenant], false),
                execute(),
                parse("", &insert(50), &[20, 20]),
                bind("", &[tenant, 5], false),
                execute(),
                sync(),
            ],
            vec![parse("", select, &[20]), bind("", &[tenant], false), execute(), sync()],
        ]
    };
    // Tenants 1 and 2 (one shard, one Postgres): the same rows either way.
    let mut direct = Raw::login(h.shard_server(0).port()).await;
    let mut routed = Raw::login(h.port()).await;
    for (i, (d, r)) in steps(1).iter().zip(steps(2)).enumerate() {
        let want = direct.run(d).await;
        let got = routed.run(&r).await;
        assert_eq!(got, want, "step {i}: the router answered otherwise than Postgres");
    }
    let rows: Vec<(i64, i32)> = c
        .query("SELECT id, v FROM t WHERE tenant_id = 2 ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows, [(1, 10), (2, 20), (3, 30), (4, 40), (5, 50)]);
}

/// The same across shards: a pipeline whose unnamed statement is parsed
/// again for each tenant's INSERT (keys as literals, as pgjdbc's
/// `Statement.addBatch` sends them) puts each row on its tenant's shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_parsed_again_in_a_pipeline_across_shards_land_on_their_shards() {
    let h = Harness::start(2).await;
    let c = h.client().await;
    c.batch_execute("CREATE TABLE t (tenant_id bigint, id bigint, v int, PRIMARY KEY (tenant_id, id))").await.unwrap();
    let (a, b) = (h.tenants_on(0, 1)[0], h.tenants_on(1, 1)[0]);
    let mut pipeline = Vec::new();
    for (i, tenant) in [a, b, a, b].into_iter().enumerate() {
        pipeline.push(parse("", &format!("INSERT INTO t VALUES ({tenant}, {i}, {i})"), &[]));
        pipeline.push(bind("", &[], false));
        pipeline.push(execute());
    }
    pipeline.push(sync());
    let got = Raw::login(h.port()).await.run(&pipeline).await;
    assert_eq!(got.last().map(String::as_str), Some("ready I"), "{got:?}");
    for (shard, tenant, ids) in [(0, a, [0i64, 2]), (1, b, [1, 3])] {
        let on_shard: Vec<(i64, i64)> = h
            .shard(shard)
            .await
            .query("SELECT tenant_id, id FROM t ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        assert_eq!(on_shard, ids.map(|id| (tenant, id)), "shard {shard}");
    }
}

/// A pipeline whose part before a Flush fails on the server (a duplicate
/// key in asyncpg's or psycopg's pipeline): Postgres skips the rest up to the
/// Sync and answers it with ReadyForQuery alone. The router sent the rest to
/// the server and waited for replies the server never sends: the session
/// hung.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_failed_before_its_flush_skips_to_its_sync() {
    use shardgate_tests::raw::flush;
    let h = Harness::start(1).await;
    let c = h.client().await;
    c.batch_execute("CREATE TABLE t (tenant_id bigint, id bigint, PRIMARY KEY (tenant_id, id))").await.unwrap();
    c.batch_execute("INSERT INTO t VALUES (1, 1), (2, 1)").await.unwrap();
    let select = "SELECT id FROM t WHERE tenant_id = $1 ORDER BY id";
    for (side, port, tenant) in [("Postgres", h.shard_server(0).port(), 1), ("router", h.port(), 2)] {
        let mut raw = Raw::login(port).await;
        raw.send(&[parse("", "INSERT INTO t VALUES ($1, 1)", &[20]), bind("", &[tenant], false), execute(), flush()])
            .await;
        let mut tags = Vec::new();
        for _ in 0..3 {
            tags.push(raw.next().await.0);
        }
        assert_eq!(tags, [b'1', b'2', b'E'], "{side}: ParseComplete, BindComplete, the duplicate key");
        let rest = raw.run(&[parse("", select, &[20]), bind("", &[tenant], false), execute(), sync()]).await;
        assert_eq!(rest, ["ready I"], "{side}: the rest skipped up to the Sync");
        let after = raw.run(&[parse("", select, &[20]), bind("", &[tenant], false), execute(), sync()]).await;
        assert_eq!(after.len(), 5, "{side}: the session goes on: {after:?}");
        assert_eq!(after.last().map(String::as_str), Some("ready I"), "{side}: {after:?}");
    }
}

/// Runs each step (a pipeline of raw messages, or a simple query) through
/// the router over one shard and straight on its Postgres, each side in a
/// database of its own holding `t` with the same rows, and asserts the same
/// replies, step by step. Returns Postgres's.
async fn same_as_postgres(steps: &[Vec<Vec<u8>>]) -> Vec<Vec<String>> {
    same_as_postgres_on(1, steps).await
}

/// [`same_as_postgres`] through a router of `shards` shards.
async fn same_as_postgres_on(shards: usize, steps: &[Vec<Vec<u8>>]) -> Vec<Vec<String>> {
    let h = Harness::start(shards).await;
    let table = "CREATE TABLE t (tenant_id bigint, id bigint, v int, PRIMARY KEY (tenant_id, id));
                 INSERT INTO t VALUES (1, 1, 10), (1, 2, 20), (1, 3, 30)";
    // Through the router, the table is written once its creation committed.
    for statement in table.split(';') {
        h.client().await.batch_execute(statement).await.unwrap();
    }
    h.shard_server(0).create_database("mirror").await.unwrap();
    h.shard_server(0).connect("mirror").await.unwrap().batch_execute(table).await.unwrap();
    let mut direct = Raw::login_to(h.shard_server(0).port(), "mirror").await;
    let mut routed = Raw::login(h.port()).await;
    let mut answers = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let want = direct.run(step).await;
        let got = routed.run(step).await;
        assert_eq!(got, want, "step {i}: the router answered otherwise than Postgres");
        answers.push(want);
    }
    answers
}

const SELECT_V: &str = "SELECT v FROM t WHERE tenant_id = $1 ORDER BY id";

/// Postgres runs a pipeline's messages one after the other, up to the first
/// that fails. The router refused the whole pipeline when it found the
/// failing message itself (a Bind of a statement not defined, a Bind short
/// of the tenant's parameter, a Describe of a statement closed before it):
/// the client got the error alone, without the replies to the messages
/// before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_messages_before_one_the_router_refuses_run_first() {
    use shardgate_tests::raw::close_statement;
    let insert = "INSERT INTO t VALUES (1, $1, 0)";
    let answers = same_as_postgres(&[
        // Run, then rolled back with the pipeline's implicit transaction.
        vec![parse("", insert, &[20]), bind("", &[7], false), execute(), bind("nope", &[], false), execute(), sync()],
        vec![parse("a", SELECT_V, &[20]), sync()],
        vec![parse("", SELECT_V, &[20]), close_statement("a"), bind("a", &[8], false), execute(), sync()],
        vec![parse("", SELECT_V, &[20]), bind("", &[], false), execute(), sync()],
        vec![close_statement("a"), describe_statement("a"), sync()],
        vec![
            parse("", "SELECT count(*) FROM t WHERE tenant_id = 1 AND id > 3", &[]),
            bind("", &[], false),
            execute(),
            sync(),
        ],
    ])
    .await;
    assert_eq!(answers[0][..3], ["1", "2", "C [73, 78, 83, 69, 82, 84, 32, 48, 32, 49, 0]"]);
    assert_eq!(answers[0][3..], ["error 26000", "ready I"]);
    assert_eq!(answers[2], ["1", "3", "error 26000", "ready I"]);
    assert_eq!(answers[3], ["1", "error 08P01", "ready I"]);
    assert_eq!(answers[4], ["3", "error 26000", "ready I"]);
    assert!(answers[5].contains(&format!("D {:?}", [0u8, 1, 0, 0, 0, 1, b'0'])), "nothing stays: {:?}", answers[5]);
}

/// After an error Postgres skips the rest of the pipeline: a Parse or Close
/// after it does nothing. The router learnt them all the same: the unnamed
/// statement stood for the text parsed after the error, a statement parsed
/// after it was defined, one closed after it was gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_statements_a_pipeline_names_after_an_error_stay_as_they_were() {
    use shardgate_tests::raw::{close_statement, execute_portal};
    let other = "SELECT id, v FROM t WHERE tenant_id = $1 ORDER BY id";
    let answers = same_as_postgres(&[
        vec![parse("c", other, &[20]), sync()],
        // Two parameters for one: the server fails the Bind.
        vec![
            parse("", SELECT_V, &[20]),
            bind("", &[1, 2], false),
            execute(),
            parse("", other, &[20]),
            parse("b", other, &[20]),
            close_statement("c"),
            sync(),
        ],
        vec![describe_statement(""), sync()],
        vec![bind("b", &[1], false), execute(), sync()],
        // A portal that does not exist: the Close after it is skipped.
        vec![execute_portal("nope", 0), close_statement("c"), sync()],
        vec![bind("c", &[1], false), execute(), sync()],
    ])
    .await;
    assert_eq!(answers[1], ["1", "error 08P01", "ready I"]);
    assert_eq!(answers[2][1], "T v 23 4 -1 0", "the first text stands: {:?}", answers[2]);
    assert_eq!(answers[3], ["error 26000", "ready I"]);
    assert_eq!(answers[5].last().map(String::as_str), Some("ready I"));
    assert!(!answers[5].iter().any(|r| r.starts_with("error")), "{:?}", answers[5]);
}

/// A pipeline that closes a statement name never defined, then parses it:
/// the router answered the Close, dropped the statement the Parse defined,
/// and never answered the Parse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_closed_then_parsed_in_one_pipeline_is_defined() {
    use shardgate_tests::raw::close_statement;
    let answers = same_as_postgres(&[
        vec![close_statement("n"), parse("n", SELECT_V, &[20]), bind("n", &[1], false), execute(), sync()],
        vec![bind("n", &[1], false), execute(), sync()],
    ])
    .await;
    assert_eq!(answers[0][..3], ["3", "1", "2"]);
    assert_eq!(answers[1].len(), 6, "BindComplete, three rows, CommandComplete, ready: {:?}", answers[1]);
}

/// A simple query drops the unnamed statement, in Postgres (it runs as if it
/// used the unnamed statement and portal). The router kept it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simple_query_drops_the_unnamed_statement() {
    let answers = same_as_postgres(&[
        vec![parse("", SELECT_V, &[20]), sync()],
        vec![query("SELECT v FROM t WHERE tenant_id = 1 ORDER BY id")],
        vec![bind("", &[1], false), execute(), sync()],
    ])
    .await;
    assert_eq!(answers[2], ["error 26000", "ready I"]);
}

/// In a failed transaction block Postgres still answers Close, looks a
/// Bind's statement up (26000) and counts its parameters (08P01), looks an
/// Execute's portal up (34000), and answers a lone Sync; its refusal, 25P02,
/// comes after those. The router refused every one with 25P02 when the block
/// failed in the router; and when it failed on the shard, the router
/// answered a Parse of a statement the shard had itself (ParseComplete).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_transaction_block_answers_each_message_as_postgres_does() {
    use shardgate_tests::raw::{close_portal, close_statement, execute_portal};
    let answers = same_as_postgres(&[
        vec![parse("s", SELECT_V, &[20]), sync()],
        vec![query("BEGIN")],
        // Failed in the router, before any shard.
        vec![bind("nope", &[], false), sync()],
        vec![close_statement("x"), close_portal("p"), sync()],
        vec![execute_portal("", 0), sync()],
        vec![bind("s", &[], false), sync()],
        vec![bind("s", &[1], false), execute(), sync()],
        vec![sync()],
        vec![query("ROLLBACK")],
        // Failed on the shard: a duplicate key.
        vec![parse("", SELECT_V, &[20]), bind("", &[1], false), execute(), sync()],
        vec![query("BEGIN")],
        vec![parse("", "INSERT INTO t VALUES (1, 1, 0)", &[]), bind("", &[], false), execute(), sync()],
        vec![parse("", SELECT_V, &[20]), bind("", &[1], false), execute(), sync()],
        vec![close_statement("s"), sync()],
        vec![query("ROLLBACK")],
    ])
    .await;
    assert_eq!(answers[2], ["error 26000", "ready E"]);
    assert_eq!(answers[3], ["3", "3", "ready E"]);
    assert_eq!(answers[4], ["error 34000", "ready E"]);
    assert_eq!(answers[5], ["error 08P01", "ready E"]);
    assert_eq!(answers[6], ["error 25P02", "ready E"]);
    assert_eq!(answers[7], ["ready E"]);
    assert_eq!(answers[12], ["error 25P02", "ready E"]);
    assert_eq!(answers[13], ["3", "ready E"]);
}

/// A pipeline that binds without executing, in a transaction block that has
/// not reached a shard yet: its portal is the block's. The router ran such a
/// pipeline aside, as it runs one that only prepares, and the portal was
/// gone at its Sync: binding its name again succeeded (Postgres: 42P03).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_portal_bound_in_a_transaction_block_is_the_blocks() {
    use shardgate_tests::raw::bind_portal;
    let answers = same_as_postgres(&[
        vec![query("BEGIN")],
        vec![parse("", SELECT_V, &[20]), bind_portal("p", "", &[1], false, &[]), sync()],
        vec![bind_portal("p", "", &[1], false, &[]), sync()],
        vec![query("ROLLBACK")],
    ])
    .await;
    assert_eq!(answers[2], ["error 42P03", "ready E"]);
}

/// A DELETE … RETURNING executed with a row limit has deleted its rows, but
/// the statements after it see that only once the server parses one
/// (Postgres moves the command counter at each Parse). The router answered
/// a Parse of a statement its shard connection had itself: the SELECT after
/// it still saw the deleted row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_suspended_by_a_row_limit_is_seen_by_the_statements_parsed_after_it() {
    use shardgate_tests::raw::{bind_portal, execute_portal};
    let delete = "DELETE FROM t WHERE tenant_id = 1 AND id > $1 RETURNING id";
    let selected = |n: usize| format!("C {:?}", format!("SELECT {n}\0").into_bytes());
    let select = "SELECT id FROM t WHERE tenant_id = 1 ORDER BY id";
    let answers = same_as_postgres(&[
        vec![parse("", select, &[]), bind("", &[], false), execute(), sync()],
        vec![
            parse("", delete, &[20]),
            bind("", &[2], false),
            execute_portal("", 1),
            parse("", select, &[]),
            bind_portal("p", "", &[], false, &[]),
            execute_portal("p", 0),
            sync(),
        ],
    ])
    .await;
    assert_eq!(answers[0][answers[0].len() - 2], selected(3));
    assert_eq!(answers[1][answers[1].len() - 2], selected(2), "the deleted row is gone: {:?}", answers[1]);
}

/// In a transaction block that failed in the router before it reached a
/// shard, Postgres describes a statement that returns no rows (its
/// parameters, NoData); the router has no shard to ask for the parameters'
/// types, and refuses it with 25P02, as Postgres does for a statement that
/// returns rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the router refuses a Describe of a statement in a block failed before any shard (25P02); Postgres describes one without result columns"]
async fn a_statement_described_in_a_block_failed_before_any_shard_is_described() {
    same_as_postgres(&[
        vec![query("BEGIN")],
        vec![parse("a", "INSERT INTO t VALUES ($1, $2, 0)", &[20, 20]), bind("nope", &[], false), sync()],
        vec![describe_statement("a"), sync()],
        vec![query("ROLLBACK")],
    ])
    .await;
}

/// Postgres fails a Parse of a statement name in use (42P05); the router
/// parsed the name again. (Its table of a session's statements held those a
/// failed pipeline across shards parsed after the error, which Postgres
/// skipped, and pgjdbc parses such a statement again: see
/// `cross_shard_writes::a_failed_pipeline_across_shards_keeps_no_statement_parsed_after_the_error`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parse_of_a_statement_name_in_use_fails() {
    let answers =
        same_as_postgres(&[vec![parse("a", SELECT_V, &[20]), sync()], vec![parse("a", "SELECT 1", &[]), sync()]]).await;
    assert_eq!(answers[1], ["error 42P05", "ready I"]);
}

/// pgjdbc sends a transaction's BEGIN in the pipeline of its first statement
/// (`Bind` of its BEGIN statement, `Execute`, then `Parse` of the statement
/// under a name of its own, `Bind`, `Describe`, `Execute`, `Sync`). When the
/// statement reads every shard the router answers BEGIN first and runs the
/// rest again: it learnt the statement on the first pass, and, with the
/// check for a name in use, refused its own second pass with 42P05 (the
/// pgjdbc driver check caught it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_parsed_after_begin_in_a_pipeline_that_reads_every_shard_is_parsed_once() {
    let read = "SELECT count(*) FROM t WHERE id >= 2";
    let answers = same_as_postgres_on(
        2,
        &[
            vec![parse("begin", "BEGIN", &[]), sync()],
            vec![
                bind("begin", &[], false),
                execute(),
                parse("S_7", read, &[]),
                bind("S_7", &[], false),
                describe_portal(),
                execute(),
                sync(),
            ],
            vec![bind("S_7", &[], false), execute(), sync()],
            vec![parse("S_7", read, &[]), sync()],
            vec![query("ROLLBACK")],
        ],
    )
    .await;
    assert_eq!(answers[1][..2], ["2", "C [66, 69, 71, 73, 78, 0]"]);
    assert_eq!(answers[3], ["error 42P05", "ready E"]);
}

/// A Parse of the unnamed statement with the text it has is answered by the
/// router (ParseComplete, nothing sent) — but not in a block that failed on
/// its shard, where Postgres refuses the Parse itself (25P02).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_unnamed_statement_parsed_in_a_failed_block_is_refused() {
    let fails = "SELECT 1 / (v - 10) FROM t WHERE tenant_id = $1 ORDER BY id";
    let answers = same_as_postgres(&[
        vec![query("BEGIN")],
        vec![parse("", fails, &[20]), bind("", &[1], false), execute(), sync()],
        vec![parse("", fails, &[20]), bind("", &[1], false), execute(), sync()],
        vec![query("ROLLBACK")],
    ])
    .await;
    assert_eq!(answers[1].last().map(String::as_str), Some("ready E"));
    assert_eq!(answers[2], ["error 25P02", "ready E"]);
}

/// In a block the router failed before any shard, a Parse of a statement in
/// use is refused (25P02) and the statement stays defined: a later Bind of
/// it is refused for the block (25P02), not as unknown (26000). The router
/// dropped the statement when it undid the refused pipeline's statements a
/// second time. (Found by the random pipelines test, seed 201861.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_parsed_again_in_a_block_failed_in_the_router_stays_defined() {
    let insert = "INSERT INTO t (tenant_id, id, v) VALUES (1, $1, $2) RETURNING id, v";
    let answers = same_as_postgres(&[
        vec![parse("b", insert, &[20, 20]), sync()],
        vec![query("BEGIN")],
        vec![describe_statement(""), sync()],
        vec![parse("b", insert, &[20, 20]), sync()],
        vec![bind("b", &[2, 1], false), sync()],
        vec![query("ROLLBACK")],
    ])
    .await;
    assert_eq!(answers[4], ["error 25P02", "ready E"]);
}

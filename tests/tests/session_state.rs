//! What one client does to its own session never reaches another client's,
//! though both run on the same pooled server connections.

use std::time::Duration;

use shardgate_router::config::RouterConfig;
use shardgate_tests::raw::{bind, execute, parse, query, sync, Raw};
use shardgate_tests::{sqlstate, Harness};

/// One server connection per shard: every client runs on the same one.
async fn one_connection() -> Harness {
    let mut config = RouterConfig::default();
    config.pool.size = 1;
    config.pool.queue_timeout = Duration::from_secs(20);
    Harness::start_with(1, config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_all_from_one_client_leaves_another_clients_prepared_statements_working() {
    let h = one_connection().await;
    let a = h.client().await;
    let b = h.client().await;
    let stmt = a.prepare("SELECT $1::int + 1").await.expect("prepare");
    let before: i32 = a.query_one(&stmt, &[&41i32]).await.expect("run").get(0);
    assert_eq!(before, 42);
    // B starts its session over on the very server connection A's statement lives on.
    b.simple_query("SET application_name = 'b'").await.expect("set");
    let tag = b.simple_query("DISCARD ALL").await.expect("discard");
    assert!(matches!(tag.last(), Some(tokio_postgres::SimpleQueryMessage::CommandComplete(_))));
    let after: i32 = a.query_one(&stmt, &[&1i32]).await.expect("A's statement still runs").get(0);
    assert_eq!(after, 2);
    // B's own session did start over.
    let name = b.query_one("SHOW application_name", &[]).await.expect("show");
    assert_ne!(name.get::<_, String>(0), "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_all_inside_a_transaction_is_refused_as_postgres_refuses_it() {
    let h = one_connection().await;
    let c = h.client().await;
    let e = c.batch_execute("BEGIN; SELECT 1").await.and(c.simple_query("DISCARD ALL").await.map(|_| ())).unwrap_err();
    assert_eq!(sqlstate(&e), "25001", "{e:?}");
    // The transaction is failed until it ends, as in Postgres.
    let e = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e), "25P02", "{e:?}");
    c.simple_query("ROLLBACK").await.expect("rollback");
    c.simple_query("SELECT 1").await.expect("served again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_closes_a_prepared_statement_of_this_session_only() {
    let h = one_connection().await;
    let mut a = Raw::login(h.port()).await;
    let mut b = Raw::login(h.port()).await;
    // Both sessions prepare "seven"; the server keeps one copy for both.
    for c in [&mut a, &mut b] {
        assert_eq!(c.run(&[parse("seven", "SELECT 7", &[]), sync()]).await, ["1", "ready I"]);
    }
    let run_seven = [bind("seven", &[], false), execute(), sync()];
    assert_eq!(a.run(&[query("DEALLOCATE seven")]).await, [format!("C {:?}", b"DEALLOCATE\0"), "ready I".into()]);
    assert_eq!(a.run(&run_seven).await, ["error 26000", "ready I"], "closed in A");
    assert_eq!(a.run(&[query("DEALLOCATE seven")]).await, ["error 26000", "ready I"]);
    // B's statement of the same name is untouched.
    let replies = b.run(&run_seven).await;
    assert_eq!(replies.first().map(String::as_str), Some("2"), "{replies:?}");
    assert!(replies.iter().any(|r| r.starts_with("D ")), "{replies:?}");
    assert_eq!(b.run(&[query("DEALLOCATE ALL")]).await.last().map(String::as_str), Some("ready I"));
    assert_eq!(b.run(&run_seven).await, ["error 26000", "ready I"], "closed in B");
}

/// Session state a pooled connection cannot carry is refused before it reaches
/// a shard, each time with what to use instead; the state that ends with its
/// transaction works. With one server connection per shard, every other
/// client would inherit what a client left on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_that_would_outlive_the_transaction_is_refused_and_reaches_no_shard() {
    let h = one_connection().await;
    h.shard(0).await.batch_execute("CREATE ROLE reporting").await.unwrap();
    let a = h.client().await;
    let b = h.client().await;
    for (sql, hint) in [
        ("LISTEN jobs", "poll"),
        ("SELECT pg_advisory_lock(7)", "pg_advisory_xact_lock"),
        ("SELECT pg_try_advisory_lock_shared(7)", "pg_advisory_xact_lock"),
        ("CREATE TEMP TABLE scratch (a int)", "ON COMMIT DROP"),
        ("CREATE TEMPORARY TABLE scratch AS SELECT 1 AS a", "ON COMMIT DROP"),
        // RESET ALL leaves the role: the next client would run as it.
        ("SET ROLE reporting", "log in as that role"),
        ("SET SESSION AUTHORIZATION reporting", "log in as that role"),
    ] {
        let e = a.simple_query(sql).await.expect_err(sql);
        assert_eq!(sqlstate(&e), "0A000", "{sql}: {e:?}");
        let db = e.as_db_error().unwrap();
        assert!(db.message().contains("pools server connections per transaction"), "{sql}: {}", db.message());
        assert!(db.hint().is_some_and(|h| h.contains(hint)), "{sql}: {:?}", db.hint());
        // The extended protocol too.
        let e = a.query(sql, &[]).await.expect_err(sql);
        assert_eq!(sqlstate(&e), "0A000", "{sql} (extended): {e:?}");
    }
    a.simple_query("BEGIN").await.unwrap();
    let e = a.simple_query("DECLARE c CURSOR WITH HOLD FOR SELECT 1").await.expect_err("WITH HOLD");
    assert_eq!(sqlstate(&e), "0A000");
    a.simple_query("ROLLBACK").await.unwrap();

    // Nothing reached the shard: no other client holds the lock, no temporary
    // table exists, no backend ever ran LISTEN.
    b.simple_query("BEGIN").await.unwrap();
    let free = b.query_one("SELECT pg_try_advisory_xact_lock(7)", &[]).await.unwrap();
    assert!(free.get::<_, bool>(0), "the advisory lock is free");
    b.simple_query("COMMIT").await.unwrap();
    let shard = h.shard(0).await;
    let temp: i64 =
        shard.query_one("SELECT count(*) FROM pg_class WHERE relpersistence = 't'", &[]).await.unwrap().get(0);
    assert_eq!(temp, 0, "no temporary table on the shard");
    let listened: i64 =
        shard.query_one("SELECT count(*) FROM pg_stat_activity WHERE query ILIKE 'LISTEN%'", &[]).await.unwrap().get(0);
    assert_eq!(listened, 0);

    // What ends with the transaction is carried: a transaction-level lock, a
    // temporary table dropped at COMMIT, a role or setting for the
    // transaction.
    a.batch_execute(
        "BEGIN; SELECT pg_advisory_xact_lock(7); CREATE TEMP TABLE t1 (a int) ON COMMIT DROP; \
         INSERT INTO t1 VALUES (1); SET LOCAL ROLE reporting; SELECT set_config('timezone', 'Asia/Tokyo', true); COMMIT",
    )
    .await
    .expect("transaction-scoped state is fine");
    // The other client, on the same server connection, has its own role and
    // time zone.
    let row = b.query_one("SELECT current_user::text, current_setting('timezone')", &[]).await.unwrap();
    assert_ne!(row.get::<_, String>(0), "reporting");
    assert_ne!(row.get::<_, String>(1), "Asia/Tokyo");
    // set_config(…, false) is the client's own (asyncpg turns jit off so
    // around its type lookups): the connection is reset before another
    // client borrows it. It used to keep the setting for the next client.
    a.simple_query("SELECT set_config('timezone', 'Asia/Tokyo', false)").await.unwrap();
    a.query_one("SELECT set_config('timezone', $1, false)", &[&"Asia/Tokyo"]).await.unwrap();
    let zone: String = b.query_one("SELECT current_setting('timezone')", &[]).await.unwrap().get(0);
    assert_ne!(zone, "Asia/Tokyo");
}

/// A cursor reads from the one connection that declared it: over a sharded
/// table it must name one tenant, else it would page through one shard's rows
/// as if they were all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_over_a_sharded_table_names_its_tenant_or_is_refused() {
    let h = Harness::start(2).await;
    let c = h.client().await;
    c.batch_execute("CREATE TABLE items (tenant_id bigint, n int)").await.unwrap();
    for t in 1..=20i64 {
        c.execute("INSERT INTO items VALUES ($1, 1), ($1, 2), ($1, 3)", &[&t]).await.unwrap();
    }
    c.simple_query("BEGIN").await.unwrap();
    let e = c.simple_query("DECLARE every CURSOR FOR SELECT * FROM items").await.expect_err("keyless cursor");
    assert_eq!(sqlstate(&e), "0A000", "{e:?}");
    assert!(e.as_db_error().unwrap().message().contains("must name one tenant_id"), "{e:?}");
    c.simple_query("ROLLBACK").await.unwrap();

    c.simple_query("BEGIN").await.unwrap();
    c.simple_query("DECLARE mine CURSOR FOR SELECT n FROM items WHERE tenant_id = 7 ORDER BY n").await.unwrap();
    let rows: Vec<i32> = c.query("FETCH ALL FROM mine", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(rows, vec![1, 2, 3]);
    c.simple_query("COMMIT").await.unwrap();
}

/// `currval()` and `lastval()` read what `nextval()` last gave on the server
/// connection. In a transaction of their own (PHP's `lastInsertId()` sends
/// `SELECT lastval()` after the INSERT) that connection's last value was
/// another client's: B read A's id. They are refused there, and answer the
/// client's own value after its INSERT in one query string, one pipeline or
/// one transaction block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_sequence_values_are_read_only_in_the_transaction_that_made_them() {
    let h = one_connection().await;
    let a = h.client().await;
    let b = h.client().await;
    a.batch_execute("CREATE TABLE notes (tenant_id bigint, id bigserial, body text, PRIMARY KEY (tenant_id, id))")
        .await
        .unwrap();
    let insert = "INSERT INTO notes (tenant_id, body) VALUES (1, 'x')";
    for _ in 0..5 {
        a.batch_execute(insert).await.unwrap(); // A's last value: 5
    }
    b.batch_execute(insert).await.unwrap(); // B's: 6
    a.batch_execute(insert).await.unwrap(); // A's: 7, and the connection's
    let refused = |e: tokio_postgres::Error, sql: &str| {
        assert_eq!(sqlstate(&e), "0A000", "{sql}: {e:?}");
        let db = e.as_db_error().unwrap();
        assert!(db.message().contains("not this client's"), "{sql}: {db:?}");
        assert!(db.hint().unwrap_or_default().contains("RETURNING"), "{sql}: {db:?}");
    };
    for sql in
        ["SELECT lastval()", "SELECT currval('notes_id_seq')", "select CURRVAL(pg_get_serial_sequence('notes', 'id'))"]
    {
        refused(b.simple_query(sql).await.unwrap_err(), sql);
        refused(b.query(sql, &[]).await.unwrap_err(), sql);
    }
    // At the start of a block, nothing of the client's is on the connection.
    b.batch_execute("BEGIN").await.unwrap();
    refused(b.simple_query("SELECT lastval()").await.unwrap_err(), "first in a block");
    b.batch_execute("ROLLBACK").await.unwrap();

    let last = |rows: Vec<tokio_postgres::SimpleQueryMessage>| -> Vec<String> {
        rows.iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .collect()
    };
    // One query string: the client's own value.
    assert_eq!(last(b.simple_query(&format!("{insert}; SELECT lastval()")).await.unwrap()), ["8"]);
    // One transaction block, in both protocols.
    b.batch_execute("BEGIN").await.unwrap();
    b.batch_execute(insert).await.unwrap();
    assert_eq!(last(b.simple_query("SELECT currval('notes_id_seq')").await.unwrap()), ["9"]);
    let row = b.query_one("SELECT lastval()", &[]).await.unwrap();
    assert_eq!(row.get::<_, i64>(0), 9);
    b.batch_execute("COMMIT").await.unwrap();
    // One pipeline, up to its Sync.
    let mut raw = Raw::login(h.port()).await;
    let replies = raw
        .run(&[
            parse("", insert, &[]),
            bind("", &[], false),
            execute(),
            parse("", "SELECT lastval()::text", &[]),
            bind("", &[], false),
            execute(),
            sync(),
        ])
        .await;
    assert!(replies.iter().any(|l| l == &format!("D {:?}", [0u8, 1, 0, 0, 0, 2, b'1', b'0'].to_vec())), "{replies:?}");
    // Alone in its pipeline: refused, as in a query of its own.
    let replies = raw.run(&[parse("", "SELECT lastval()", &[]), bind("", &[], false), execute(), sync()]).await;
    assert_eq!(replies, ["1", "error 0A000", "ready I"]);
    let replies = raw.run(&[query("SELECT lastval()")]).await;
    assert_eq!(replies, ["error 0A000", "ready I"]);
}

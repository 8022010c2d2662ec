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

//! Simple queries outside a transaction run as their shape's prepared statement
//! on the server, and a client cannot tell: every answer, error and column type is
//! the one Postgres gives the text itself.

use shardgate_router::config::{PoolConfig, RouterConfig};
use shardgate_tests::{sqlstate, Harness};
use tokio_postgres::{Client, SimpleQueryMessage};

/// Column names (and the row count) and rows, as text, of one result.
type Answer = (Vec<String>, Vec<Vec<Option<String>>>);

/// Every result of a simple query; or its error's SQLSTATE and message.
async fn answer(c: &Client, sql: &str) -> Result<Vec<Answer>, (String, String)> {
    let msgs = c.simple_query(sql).await.map_err(|e| {
        let msg = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
        (sqlstate(&e), msg)
    })?;
    let mut out: Vec<Answer> = Vec::new();
    let mut rows = Vec::new();
    let mut names = Vec::new();
    for m in msgs {
        match m {
            SimpleQueryMessage::RowDescription(cols) => names = cols.iter().map(|c| c.name().to_string()).collect(),
            SimpleQueryMessage::Row(r) => {
                if names.is_empty() {
                    names = r.columns().iter().map(|c| c.name().to_string()).collect();
                }
                rows.push((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect());
            }
            SimpleQueryMessage::CommandComplete(n) => {
                out.push((std::mem::take(&mut names), std::mem::take(&mut rows)));
                out.last_mut().unwrap().0.push(format!("rows={n}"));
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The statements prepared on the shard's one pooled server connection, seen
/// through the router (a transaction runs as text, on that connection).
async fn prepared_on_server(c: &Client) -> Vec<String> {
    let rows = c.simple_query("BEGIN; SELECT statement FROM pg_prepared_statements ORDER BY 1; COMMIT").await.unwrap();
    rows.into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect()
}

async fn one_connection_router() -> Harness {
    let config = RouterConfig { pool: PoolConfig { size: 1, ..PoolConfig::default() }, ..RouterConfig::default() };
    Harness::start_with(1, config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_those_of_the_text() {
    let h = one_connection_router().await;
    let c = h.client().await;
    let direct = h.shard(0).await;
    c.batch_execute(
        "CREATE TABLE t (tenant_id bigint, id int, d date, s text, n numeric, PRIMARY KEY (tenant_id, id));
         CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
         CREATE TABLE ref (k int PRIMARY KEY, m mood, j jsonb)",
    )
    .await
    .unwrap();
    for i in 1..=5 {
        c.simple_query(&format!("INSERT INTO t VALUES (1, {i}, '2020-01-0{i}', 'a{i}', {i}.25)")).await.unwrap();
    }
    c.simple_query("INSERT INTO ref VALUES (1, 'ok', '{\"a\": [1, 2]}')").await.unwrap();
    let reads = [
        "SELECT id, s, n FROM t WHERE tenant_id = 1 ORDER BY 1",
        "SELECT id FROM t WHERE tenant_id = 1 ORDER BY 1 LIMIT 2 OFFSET 1",
        "SELECT id % 2, count(*) FROM t WHERE tenant_id = 1 GROUP BY 1 ORDER BY 1",
        "SELECT DISTINCT ON (1) id % 2, id FROM t WHERE tenant_id = 1 ORDER BY 1, 2",
        "SELECT 5 / 2, 1.5 + 1, 9999999999 * 2, -5, - 2147483648, 99999999999999999999 + 1",
        "SELECT pg_typeof(5)::text, pg_typeof(9999999999)::text, pg_typeof(1.5)::text, pg_typeof(-2147483648)::text",
        "SELECT 'abc', 'a' || 'b', CASE WHEN 1 = 1 THEN 'x' ELSE 'y' END",
        "SELECT pg_typeof('abc')::text",
        "SELECT DATE '2020-01-01' + 1, INTERVAL '1 day' * 2, '2020-01-01'::date - 3",
        "SELECT count(*) FROM t WHERE d > '2020-01-02' AND tenant_id = 1",
        "SELECT id FROM t WHERE tenant_id = 1 AND s LIKE 'a%' AND id IN (1, 3, 5) ORDER BY id",
        "SELECT n::numeric(10,1), s::varchar(1) FROM t WHERE tenant_id = 1 AND id = 2",
        "SELECT format('%s-%s', 'a', 1), concat('x', 2, 'y')",
        "SELECT m, m > 'sad', j -> 'a' -> 1, j @> '{\"a\": [2]}' FROM ref WHERE k = 1",
        "SELECT E'tab\\there', $$dollar 'quoted'$$, 'it''s' /* tenant_id=1 */",
        "SELECT id FROM t WHERE tenant_id = 1 AND id = ANY('{2,4}') ORDER BY 1",
        "SELECT 1e3, .5, 5., 1.5e-3",
    ];
    // The first run of a shape parses it, the second prepares it on the
    // server, the third runs the prepared statement: all the same answer.
    for sql in reads {
        let want = answer(&direct, sql).await;
        for run in 0..3 {
            assert_eq!(answer(&c, sql).await, want, "run {run} of {sql}");
        }
    }
    // Another text of the same shape runs the same server statement.
    let want = answer(&direct, "SELECT id, s, n FROM t WHERE tenant_id = 1 AND id = 4").await;
    c.simple_query("SELECT id, s, n FROM t WHERE tenant_id = 1 AND id = 3").await.unwrap();
    c.simple_query("SELECT id, s, n FROM t WHERE tenant_id = 1 AND id = 3").await.unwrap();
    assert_eq!(answer(&c, "SELECT id, s, n FROM t WHERE tenant_id = 1 AND id = 4").await, want);
    let prepared = prepared_on_server(&c).await;
    assert!(
        prepared.iter().any(|s| s == "SELECT id, s, n FROM t WHERE tenant_id = $1 AND id = $2"),
        "the shape runs prepared on the server: {prepared:?}"
    );

    // Errors, at bind time or while running, are the text's own.
    for sql in [
        "SELECT 1 / 0 FROM t WHERE tenant_id = 1",
        "SELECT * FROM t WHERE tenant_id = 1 AND d = 'notadate'",
        "SELECT * FROM t WHERE tenant_id = 1 AND id = 'x'",
        "SELECT * FROM t WHERE tenant_id = 1 AND id = 99999999999::int",
        "SELECT no_such_column FROM t WHERE tenant_id = 1",
    ] {
        let want = answer(&direct, sql).await;
        assert!(want.is_err(), "{sql}");
        for run in 0..3 {
            assert_eq!(answer(&c, sql).await, want, "run {run} of {sql}");
        }
    }
    // Writes: each acknowledged once.
    for i in 0..3 {
        let r = answer(&c, "UPDATE t SET n = n + 1 WHERE tenant_id = 1 AND id = 1 RETURNING n").await.unwrap();
        assert_eq!(r[0].1, vec![vec![Some(format!("{}.25", 2 + i))]]);
    }
    for i in 10..13 {
        c.simple_query(&format!("INSERT INTO t (tenant_id, id) VALUES (1, {i})")).await.unwrap();
    }
    let n = direct.query_one("SELECT count(*) FROM t WHERE id >= 10", &[]).await.unwrap().get::<_, i64>(0);
    assert_eq!(n, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_change_does_not_break_a_prepared_shape() {
    let h = one_connection_router().await;
    let c = h.client().await;
    c.batch_execute("CREATE TABLE t (tenant_id bigint, id int, PRIMARY KEY (tenant_id, id))").await.unwrap();
    c.simple_query("INSERT INTO t VALUES (1, 1)").await.unwrap();
    for _ in 0..3 {
        c.simple_query("SELECT * FROM t WHERE tenant_id = 1 AND id = 1").await.unwrap();
    }
    assert!(prepared_on_server(&c).await.iter().any(|s| s.contains("id = $2")));
    // The server's cached plan now has another result type: Bind refuses it,
    // and the router runs the text instead.
    c.simple_query("ALTER TABLE t ADD COLUMN extra int DEFAULT 7").await.unwrap();
    let r = answer(&c, "SELECT * FROM t WHERE tenant_id = 1 AND id = 1").await.unwrap();
    assert_eq!(r[0].0, vec!["tenant_id", "id", "extra", "rows=1"]);
    assert_eq!(r[0].1, vec![vec![Some("1".into()), Some("1".into()), Some("7".into())]]);
    // And the shape is prepared again from then on.
    c.simple_query("SELECT * FROM t WHERE tenant_id = 1 AND id = 1").await.unwrap();
    let r = answer(&c, "SELECT * FROM t WHERE tenant_id = 1 AND id = 1").await.unwrap();
    assert_eq!(r[0].1.len(), 1);
    assert!(prepared_on_server(&c).await.iter().any(|s| s.contains("id = $2")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_and_the_setting_keep_texts() {
    let h = one_connection_router().await;
    let c = h.client().await;
    c.batch_execute("CREATE TABLE t (tenant_id bigint, id int, PRIMARY KEY (tenant_id, id))").await.unwrap();
    for _ in 0..3 {
        c.simple_query("BEGIN").await.unwrap();
        c.simple_query("SELECT * FROM t WHERE tenant_id = 1 AND id = 5").await.unwrap();
        c.simple_query("COMMIT").await.unwrap();
    }
    assert_eq!(prepared_on_server(&c).await, Vec::<String>::new(), "inside a transaction, texts run as they are");

    let config = RouterConfig {
        prepare_simple_queries: false,
        pool: PoolConfig { size: 1, ..PoolConfig::default() },
        ..RouterConfig::default()
    };
    let h = Harness::start_with(1, config).await;
    let c = h.client().await;
    c.batch_execute("CREATE TABLE t (tenant_id bigint, id int, PRIMARY KEY (tenant_id, id))").await.unwrap();
    for _ in 0..3 {
        c.simple_query("SELECT * FROM t WHERE tenant_id = 1 AND id = 5").await.unwrap();
    }
    assert_eq!(prepared_on_server(&c).await, Vec::<String>::new(), "prepare_simple_queries = false");
}

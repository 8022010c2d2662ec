//! The same cross-shard reads on one Postgres holding every row and through the
//! router on three shards give the same answers.

use shardgate_localpg::TestServer;
use shardgate_tests::{connect, Harness};
use tokio_postgres::SimpleQueryMessage;

const SCHEMA: &str = "CREATE TABLE orders (tenant_id bigint, id bigint, region text, total numeric, qty int, \
                      PRIMARY KEY (tenant_id, id))";

fn rows(msgs: Vec<SimpleQueryMessage>) -> Vec<Vec<Option<String>>> {
    msgs.into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_shard_reads_match_a_single_postgres() {
    let h = Harness::start(3).await;
    let single = TestServer::start().await.unwrap();
    single.create_database("app").await.unwrap();
    let one = connect(&single.url("app")).await;
    let router = h.client().await;
    one.batch_execute(SCHEMA).await.unwrap();
    router.batch_execute(SCHEMA).await.unwrap();
    // Deterministic data: 60 tenants, several orders each, some NULLs.
    let mut values = Vec::new();
    for t in 1..=60i64 {
        for id in 1..=((t % 5) + 1) {
            let region = ["eu", "us", "apac", "latam"][(t * id % 4) as usize];
            let total = if (t + id) % 11 == 0 {
                "NULL".to_string()
            } else {
                format!("{}.{:02}", (t * 37 + id * 13) % 500, (t * id) % 100)
            };
            let qty = if (t * id) % 13 == 0 { "NULL".to_string() } else { ((t * 7 + id) % 40 - 5).to_string() };
            values.push(format!("({t}, {id}, '{region}', {total}, {qty})"));
        }
    }
    let insert = format!("INSERT INTO orders VALUES {}", values.join(", "));
    one.batch_execute(&insert).await.unwrap();
    router.batch_execute(&insert).await.unwrap();
    // Ordered queries compare row for row; others as sorted sets.
    let ordered = [
        "SELECT tenant_id, id, total FROM orders ORDER BY total DESC, tenant_id, id",
        "SELECT tenant_id, id FROM orders ORDER BY tenant_id, id LIMIT 7 OFFSET 5",
        "SELECT id, tenant_id, qty FROM orders ORDER BY qty NULLS FIRST, 2, 1 LIMIT 20",
        "SELECT tenant_id, id, region FROM orders ORDER BY region, tenant_id DESC, id LIMIT 15",
        "SELECT region, count(*), sum(total), min(qty), max(total) FROM orders GROUP BY region ORDER BY region",
        "SELECT count(*), count(total), sum(qty), sum(total), min(total), max(qty) FROM orders",
        "SELECT region, sum(qty) AS s FROM orders GROUP BY 1 ORDER BY s DESC, region LIMIT 2",
        "SELECT count(*) FROM orders WHERE qty > 100",
        "SELECT sum(total), max(region) FROM orders WHERE qty > 100",
        "SELECT avg(total), avg(qty), count(*) FROM orders",
        "SELECT region, avg(total) AS mean, avg(qty::int8), avg(id) FROM orders GROUP BY region ORDER BY mean DESC",
        "SELECT tenant_id, avg(total) FROM orders GROUP BY 1 ORDER BY 2 NULLS FIRST, 1 LIMIT 10 OFFSET 3",
        "SELECT avg(total) FROM orders WHERE qty > 100",
    ];
    for sql in ordered {
        let a = rows(one.simple_query(sql).await.unwrap());
        let b = rows(router.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}")));
        assert_eq!(b, a, "{sql}");
    }
    let unordered = [
        "SELECT tenant_id, id FROM orders WHERE qty > 10",
        "SELECT region, count(*) FROM orders GROUP BY region",
        "SELECT tenant_id, count(*), sum(total) FROM orders GROUP BY tenant_id",
    ];
    for sql in unordered {
        let mut a = rows(one.simple_query(sql).await.unwrap());
        let mut b = rows(router.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}")));
        a.sort();
        b.sort();
        assert_eq!(b, a, "{sql}");
    }
}

/// The router's avg (the shards' sums and counts, divided at the router) prints
/// exactly what Postgres's own numeric division prints, for sums of every size
/// and scale and counts from 1 up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn averages_divide_as_a_real_server_does() {
    let server = TestServer::start().await.unwrap();
    let c = server.connect("postgres").await.unwrap();
    let mut sums: Vec<String> =
        ["0", "0.00", "1", "-1", "7", "9999", "10000", "10001", "123456789", "0.5", "-0.05"].map(String::from).to_vec();
    for e in [1usize, 3, 4, 5, 8, 17, 40] {
        let digits: String = (0..e).map(|i| char::from(b'1' + (i * 7 % 9) as u8)).collect();
        sums.push(digits.clone());
        sums.push(format!("-{digits}.25"));
        sums.push(format!("0.{}{digits}", "0".repeat(e)));
        sums.push(format!("{digits}.{}", "9".repeat(e % 7)));
    }
    let counts: Vec<i64> = vec![1, 2, 3, 6, 7, 9, 10, 11, 999, 1000, 9999, 10000, 10001, 123457, 1 << 40, i64::MAX];
    let rows = c
        .query(
            "SELECT s, n, (s::numeric / n::numeric)::text FROM unnest($1::text[]) s, unnest($2::int8[]) n",
            &[&sums, &counts],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), sums.len() * counts.len());
    for r in &rows {
        let (s, n, want): (String, i64, String) = (r.get(0), r.get(1), r.get(2));
        assert_eq!(
            shardgate_router::fanout::avg_decimal(&s, &n.to_string()).as_deref(),
            Some(want.as_str()),
            "{s} / {n}"
        );
    }
}

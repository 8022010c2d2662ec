//! The same cross-shard reads on one Postgres holding every row and through the
//! router on three shards give the same answers.

use shardgate_localpg::TestServer;
use shardgate_tests::raw::{bind_formats, describe_portal, describe_statement, execute, frame, parse, sync, Raw};
use shardgate_tests::wire::wire_rows;
use shardgate_tests::{connect, rows, Harness};

const SCHEMA: &str = "CREATE TABLE orders (tenant_id bigint, id bigint, region text, total numeric, qty int, \
                      PRIMARY KEY (tenant_id, id))";

/// The cluster and the single server with the same rows.
async fn same_rows_twice() -> (Harness, TestServer, tokio_postgres::Client, tokio_postgres::Client) {
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
    (h, single, one, router)
}

const ORDERED: &[&str] = &[
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_shard_reads_match_a_single_postgres() {
    let (_h, _single, one, router) = same_rows_twice().await;
    // Ordered queries compare row for row; others as sorted sets.
    for &sql in ORDERED {
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

/// Results far larger than the router's per-shard queues stream through whole,
/// merged in order (a k-way merge of the shards' sorted answers), and an error
/// in the middle of a shard's answer ends the result with that error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_cross_shard_reads_stream_in_order_and_errors_midway_end_them() {
    let (h, single, one, router) = same_rows_twice().await;
    for chunk in (1..=30000i64).collect::<Vec<_>>().chunks(3000) {
        let values: Vec<String> = chunk
            .iter()
            .map(|g| format!("({}, {g}, 'x', {}.{:02}, {})", 1000 + g % 97, g * 7919 % 10007 / 100, g % 100, g % 1000))
            .collect();
        let insert = format!("INSERT INTO orders VALUES {}", values.join(", "));
        one.batch_execute(&insert).await.unwrap();
        router.batch_execute(&insert).await.unwrap();
    }
    for sql in [
        "SELECT tenant_id, id, total FROM orders ORDER BY total DESC, tenant_id, id",
        "SELECT id, qty FROM orders ORDER BY qty, id DESC LIMIT 5000 OFFSET 12345",
    ] {
        let a = rows(one.simple_query(sql).await.unwrap());
        let b = rows(router.simple_query(sql).await.unwrap());
        assert!(a.len() >= 5000);
        assert_eq!(b, a, "{sql}");
    }
    let mut a = rows(one.simple_query("SELECT tenant_id, id, region FROM orders").await.unwrap());
    let mut b = rows(router.simple_query("SELECT tenant_id, id, region FROM orders").await.unwrap());
    a.sort();
    b.sort();
    assert_eq!(b.len(), a.len());
    assert_eq!(b, a);
    // id 29000 is on one shard only: the others answer, that one fails midway.
    for sql in ["SELECT id, 1 / (id - 29000) FROM orders", "SELECT id, 1 / (id - 29000) FROM orders ORDER BY id"] {
        let err = router.simple_query(sql).await.unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some("22012"), "{sql}: {err:?}");
        assert!(err.as_db_error().unwrap().message().contains("on shard"), "{err:?}");
    }
    // The extended protocol streams the same way: the same rows in binary as a
    // single server sends, and an error midway ends the Execute, then Sync.
    for sql in [
        "SELECT id, qty, total FROM orders ORDER BY qty, id DESC LIMIT 5000 OFFSET 12345",
        "SELECT tenant_id, id, total FROM orders ORDER BY total DESC, tenant_id, id",
    ] {
        let a = wire_rows(&one.query(sql, &[]).await.unwrap());
        let b = wire_rows(&router.query(sql, &[]).await.unwrap());
        assert!(a.len() >= 5000);
        assert_eq!(b, a, "{sql}");
    }
    let plain = "SELECT tenant_id, id, region, total FROM orders WHERE qty >= $1";
    let mut a = wire_rows(&one.query(plain, &[&0i32]).await.unwrap());
    let mut b = wire_rows(&router.query(plain, &[&0i32]).await.unwrap());
    a.sort();
    b.sort();
    assert!(a.len() >= 20000);
    assert_eq!(b, a, "{plain}");
    let (mut direct, mut routed) = (Raw::login(single.port()).await, Raw::login(h.port()).await);
    let midway = "SELECT id, 1 / (id - 29000) FROM orders ORDER BY id";
    let p = vec![parse("", midway, &[]), bind_formats("", &[], false, &[1]), describe_portal(), execute(), sync()];
    let without_rows = |r: Vec<String>| r.into_iter().filter(|l| !l.starts_with("D ")).collect::<Vec<_>>();
    let want = without_rows(direct.run(&p).await);
    assert_eq!(want.last().map(String::as_str), Some("ready I"));
    assert!(want.contains(&"error 22012".to_string()), "{want:?}");
    assert_eq!(without_rows(routed.run(&p).await), want);
    let count = "SELECT count(*) FROM orders";
    assert_eq!(rows(router.simple_query(count).await.unwrap()), rows(one.simple_query(count).await.unwrap()));
}

/// The same reads through the extended protocol: tokio-postgres asks for every
/// column in binary, and gets the bytes a single Postgres sends; with
/// parameters, too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_shard_reads_in_the_extended_protocol_match_a_single_postgres_byte_for_byte() {
    let (h, single, one, router) = same_rows_twice().await;
    for &sql in ORDERED {
        let a = wire_rows(&one.query(sql, &[]).await.unwrap());
        let b = wire_rows(&router.query(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e:?}")));
        assert_eq!(b, a, "{sql}");
    }
    let sql = "SELECT region, avg(total), count(*), min(id) FROM orders WHERE qty > $1 AND id <= $2 \
               GROUP BY region ORDER BY 2 DESC LIMIT 3";
    for (qty, id) in [(0i32, 3i64), (10, 6), (1000, 1)] {
        let a = wire_rows(&one.query(sql, &[&qty, &id]).await.unwrap());
        let b = wire_rows(&router.query(sql, &[&qty, &id]).await.unwrap());
        assert_eq!(b, a, "{sql} with {qty}, {id}");
    }

    // Byte for byte as a driver sends them: a named statement, described, bound
    // with text results, with one format code per column, and with too many codes.
    let sql = "SELECT region, avg(total) AS mean, count(*) FROM orders WHERE qty > $1 GROUP BY region ORDER BY mean";
    let mut direct = Raw::login(single.port()).await;
    let mut routed = Raw::login(h.port()).await;
    let pipelines: Vec<Vec<Vec<u8>>> = vec![
        vec![parse("m", sql, &[20]), describe_statement("m"), sync()],
        vec![bind_formats("m", &[3], false, &[]), describe_portal(), execute(), sync()],
        vec![bind_formats("m", &[3], true, &[0, 1, 0]), describe_portal(), execute(), sync()],
        vec![bind_formats("m", &[3], false, &[1]), execute(), sync()],
        vec![parse("", sql, &[20]), bind_formats("", &[-5], false, &[]), describe_statement(""), execute(), sync()],
        vec![bind_formats("m", &[3], false, &[0, 1]), describe_portal(), execute(), sync()],
        vec![bind_formats("m", &[3], false, &[]), execute(), frame(b'C', b"Sm\0"), sync()],
        vec![bind_formats("m", &[3], false, &[]), execute(), sync()],
    ];
    for p in &pipelines {
        let want = direct.run(p).await;
        let got = routed.run(p).await;
        assert_eq!(got, want, "{:?}", p.iter().map(|m| m[0] as char).collect::<String>());
    }

    // Rows that are only relayed (no ORDER BY, LIMIT or aggregates) come in the
    // client's formats whatever their type: floats and dates in binary too.
    let sql = "SELECT tenant_id, id, total::float8 AS f, DATE '2026-01-01' + id::int AS d FROM orders WHERE qty > $1";
    for qty in [-100i32, 10] {
        let mut a = wire_rows(&one.query(sql, &[&qty]).await.unwrap());
        let mut b = wire_rows(&router.query(sql, &[&qty]).await.unwrap());
        a.sort();
        b.sort();
        assert!(!a.is_empty());
        assert_eq!(b, a, "{sql} with {qty}");
    }

    // A read merged as it streams (ORDER BY, LIMIT, no aggregates), message for
    // message as a single server answers it.
    let sql = "SELECT tenant_id, id, total, region FROM orders WHERE qty > $1 \
               ORDER BY total DESC NULLS LAST, tenant_id, id LIMIT 12 OFFSET 2";
    let pipelines: Vec<Vec<Vec<u8>>> = vec![
        vec![parse("s", sql, &[20]), describe_statement("s"), sync()],
        vec![bind_formats("s", &[3], false, &[]), describe_portal(), execute(), sync()],
        vec![bind_formats("s", &[3], true, &[1, 1, 1, 0]), describe_portal(), execute(), sync()],
        vec![bind_formats("s", &[3], false, &[1]), execute(), sync()],
        vec![parse("", sql, &[20]), bind_formats("", &[-5], false, &[]), describe_statement(""), execute(), sync()],
        vec![bind_formats("s", &[3], false, &[0, 1]), describe_portal(), execute(), sync()],
        vec![bind_formats("s", &[3], false, &[]), execute(), frame(b'C', b"Ss\0"), sync()],
        vec![bind_formats("s", &[3], false, &[]), execute(), sync()],
        vec![parse("bad", "SELECT nope FROM orders ORDER BY 1", &[]), describe_statement("bad"), sync()],
        vec![bind_formats("bad", &[], false, &[]), execute(), sync()],
    ];
    for p in &pipelines {
        let want = direct.run(p).await;
        let got = routed.run(p).await;
        assert_eq!(got, want, "{:?}", p.iter().map(|m| m[0] as char).collect::<String>());
    }

    // What the router cannot give exactly is an error, never a different answer:
    // a float in binary (its text depends on extra_float_digits).
    let float = "SELECT region, max(total::float8) FROM orders GROUP BY region ORDER BY region";
    let err = router.query(float, &[]).await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("0A000"), "{err:?}");
    assert!(err.as_db_error().unwrap().message().contains("binary format"), "{err:?}");
    // A fetch in parts (a row limit on Execute) outside a transaction: the
    // first rows, then PortalSuspended, as from one server.
    let part = vec![parse("", float, &[]), bind_formats("", &[], false, &[]), frame(b'E', b"\0\0\0\0\x02"), sync()];
    let want = direct.run(&part).await;
    assert!(want.iter().any(|r| r == "s"), "{want:?}");
    assert_eq!(routed.run(&part).await, want);
    // The session goes on.
    assert_eq!(routed.run(&pipelines[1]).await, direct.run(&pipelines[1]).await);
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

/// Dates and timestamps sort across shards as one server sorts them, BC years,
/// years past 9999 and ±infinity included (and numerics with ±Infinity and
/// NaN); under a DateStyle whose text does
/// not sort (SQL, German, Postgres) the router refuses rather than misorder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dates_sort_across_shards_as_one_server_sorts_them() {
    let h = Harness::start(3).await;
    let single = TestServer::start().await.unwrap();
    single.create_database("app").await.unwrap();
    let one = connect(&single.url("app")).await;
    let router = h.client().await;
    let schema = "CREATE TABLE events (tenant_id bigint, id bigint, day date, at timestamp, amount numeric, \
                  PRIMARY KEY (tenant_id, id))";
    one.batch_execute(schema).await.unwrap();
    router.batch_execute(schema).await.unwrap();
    let days = [
        "'0044-03-15 BC'",
        "'4713-01-01 BC'",
        "'0001-01-01'",
        "'0001-12-31 BC'",
        "'9999-12-31'",
        "'10000-01-01'",
        "'2026-12-04'",
        "'infinity'",
        "'-infinity'",
        "'1999-02-28'",
        "NULL",
        "'200000-06-01'",
    ];
    let ats = [
        "'2026-12-04 11:39:55'",
        "'2026-12-04 11:39:55.5'",
        "'2026-12-04 11:39:55.25'",
        "'0100-01-01 00:00:00 BC'",
        "'12345-01-01 00:00:01'",
        "'infinity'",
        "'-infinity'",
        "'2026-12-04 00:00:00'",
        "NULL",
        "'1970-01-01 00:00:00.000001'",
    ];
    let mut values = Vec::new();
    for t in 1..=24i64 {
        for id in 1..=3i64 {
            let day = days[((t * 5 + id) % days.len() as i64) as usize];
            let at = ats[((t * 3 + id * 7) % ats.len() as i64) as usize];
            let amount =
                ["'-Infinity'", "-1000000", "-5.5", "0", "'NaN'", "7.25", "'Infinity'", "NULL", "7.250", "-0.0"]
                    [((t + id * 3) % 10) as usize];
            values.push(format!("({t}, {id}, {day}, {at}, {amount})"));
        }
    }
    let insert = format!("INSERT INTO events VALUES {}", values.join(", "));
    one.batch_execute(&insert).await.unwrap();
    router.batch_execute(&insert).await.unwrap();
    let ordered = [
        "SELECT tenant_id, id, day FROM events ORDER BY day, tenant_id, id",
        "SELECT tenant_id, id, at FROM events ORDER BY at DESC NULLS LAST, tenant_id, id LIMIT 30",
        "SELECT day, count(*), min(at), max(at) FROM events GROUP BY day ORDER BY day DESC",
        "SELECT min(day), max(day), min(at), max(at) FROM events",
        "SELECT tenant_id % 4 AS k, min(day), max(at) FROM events GROUP BY 1 ORDER BY 1",
    ];
    let numbers = [
        "SELECT tenant_id, id, amount FROM events ORDER BY amount, tenant_id, id",
        "SELECT tenant_id % 5 AS k, min(amount), max(amount) FROM events GROUP BY 1 ORDER BY 1",
        "SELECT tenant_id, id, amount FROM events ORDER BY amount DESC NULLS LAST, tenant_id DESC, id LIMIT 20",
    ];
    for sql in numbers {
        let a = rows(one.simple_query(sql).await.unwrap());
        let b = rows(router.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}")));
        assert_eq!(b, a, "{sql}");
    }
    // 7.25 and 7.250, 0 and -0.0 are one group each, wherever their rows live
    // (which of the equal texts names the group is up to the server).
    let sql = "SELECT amount, count(*) FROM events GROUP BY amount ORDER BY amount";
    let counts = |r: Vec<Vec<Option<String>>>| r.into_iter().map(|r| r[1].clone()).collect::<Vec<_>>();
    let a = rows(one.simple_query(sql).await.unwrap());
    let b = rows(router.simple_query(sql).await.unwrap());
    assert_eq!(a.len(), 8, "{a:?}");
    assert_eq!(counts(b), counts(a), "{sql}");
    for style in ["ISO, MDY", "ISO, DMY"] {
        let set = format!("SET DateStyle = '{style}'");
        one.batch_execute(&set).await.unwrap();
        router.batch_execute(&set).await.unwrap();
        for sql in ordered {
            let a = rows(one.simple_query(sql).await.unwrap());
            let b = rows(router.simple_query(sql).await.unwrap_or_else(|e| panic!("{style}: {sql}: {e:?}")));
            assert_eq!(b, a, "{style}: {sql}");
        }
    }
    for style in ["SQL, DMY", "German", "Postgres, MDY"] {
        router.batch_execute(&format!("SET DateStyle = '{style}'")).await.unwrap();
        for sql in ordered {
            let e = router.simple_query(sql).await.expect_err(sql);
            let db = e.as_db_error().unwrap_or_else(|| panic!("{style}: {sql}: {e:?}"));
            assert_eq!(db.code().code(), "0A000", "{style}: {sql}");
            assert!(db.message().contains("DateStyle is ISO"), "{style}: {sql}: {}", db.message());
        }
        // Rows that are not sorted by a date pass through in any DateStyle.
        let sql = "SELECT tenant_id, id, day FROM events ORDER BY tenant_id, id LIMIT 3";
        one.batch_execute(&format!("SET DateStyle = '{style}'")).await.unwrap();
        assert_eq!(rows(router.simple_query(sql).await.unwrap()), rows(one.simple_query(sql).await.unwrap()));
    }
}

/// Text sorts across shards only where the shards compare text by bytes: once
/// a column has a collation of its own (here ICU's root collation, where `a`
/// sorts before `B`), the router refuses text sorts unless the query says
/// `COLLATE "C"`, and it sorts again once that column is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_sorts_follow_the_shards_collations() {
    let (_h, _single, one, router) = same_rows_twice().await;
    let sorted = "SELECT tenant_id, id, region FROM orders ORDER BY region, tenant_id DESC, id LIMIT 15";
    assert_eq!(rows(router.simple_query(sorted).await.unwrap()), rows(one.simple_query(sorted).await.unwrap()));
    let schema = "CREATE TABLE names (tenant_id bigint, id bigint, n text COLLATE \"und-x-icu\", \
                  PRIMARY KEY (tenant_id, id))";
    one.batch_execute(schema).await.unwrap();
    router.batch_execute(schema).await.unwrap();
    let words = ["a", "B", "b", "A", "ä", "Z", "z", "é", "e"];
    let values: Vec<String> =
        (1..=30i64).map(|t| format!("({t}, 1, '{}')", words[(t as usize * 7) % words.len()])).collect();
    let insert = format!("INSERT INTO names VALUES {}", values.join(", "));
    one.batch_execute(&insert).await.unwrap();
    router.batch_execute(&insert).await.unwrap();
    for sql in [
        "SELECT tenant_id, n FROM names ORDER BY n, tenant_id",
        "SELECT n, count(*) FROM names GROUP BY n ORDER BY n",
        "SELECT max(n) FROM names",
        sorted,
    ] {
        let e = router.simple_query(sql).await.expect_err(sql);
        let db = e.as_db_error().unwrap_or_else(|| panic!("{sql}: {e:?}"));
        assert_eq!(db.code().code(), "0A000", "{sql}: {}", db.message());
    }
    for sql in [
        "SELECT tenant_id, n FROM names ORDER BY n COLLATE \"C\", tenant_id",
        "SELECT n, count(*) FROM names GROUP BY n ORDER BY n COLLATE \"C\" DESC",
        "SELECT tenant_id, id, region FROM orders ORDER BY region COLLATE \"C\", tenant_id DESC, id LIMIT 15",
    ] {
        let a = rows(one.simple_query(sql).await.unwrap());
        let b = rows(router.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}")));
        assert_eq!(b, a, "{sql}");
    }
    router.batch_execute("DROP TABLE names").await.unwrap();
    assert_eq!(rows(router.simple_query(sorted).await.unwrap()), rows(one.simple_query(sorted).await.unwrap()));
}

/// `items`, a second sharded table for joins and UNION ALL, on both sides.
async fn with_items(one: &tokio_postgres::Client, router: &tokio_postgres::Client) {
    let schema = "CREATE TABLE items (tenant_id bigint, id bigint, sku text, qty int, PRIMARY KEY (tenant_id, id))";
    one.batch_execute(schema).await.unwrap();
    router.batch_execute(schema).await.unwrap();
    let values: Vec<String> = (1..=45i64)
        .map(|t| {
            let qty = if t % 9 == 0 { "NULL".to_string() } else { (t * 11 % 23).to_string() };
            format!("({t}, {}, 'sku-{}', {qty})", t % 3 + 1, t % 6)
        })
        .collect();
    let insert = format!("INSERT INTO items VALUES {}", values.join(", "));
    one.batch_execute(&insert).await.unwrap();
    router.batch_execute(&insert).await.unwrap();
    let extras = "CREATE TABLE extras (tenant_id bigint PRIMARY KEY, doc jsonb)";
    let values: Vec<String> =
        (1..=60i64).map(|t| format!("({t}, '{{\"t\": {t}, \"even\": {}}}')", t % 2 == 0)).collect();
    let insert = format!("INSERT INTO extras VALUES {}", values.join(", "));
    for sql in [extras, &insert] {
        one.batch_execute(sql).await.unwrap();
        router.batch_execute(sql).await.unwrap();
    }
}

/// Whether a query's rows have a defined order: its ORDER BY leaves no ties.
enum Rows {
    Ordered,
    /// Compared as sorted lists.
    AnyOrder,
}

/// Reads whose merge needs `*` expanded, DISTINCT, HAVING or UNION ALL.
const MERGED: &[(&str, Rows)] = &[
    ("SELECT * FROM orders ORDER BY total DESC NULLS LAST, tenant_id, id LIMIT 5", Rows::Ordered),
    ("SELECT * FROM orders ORDER BY 4, 1, 2 LIMIT 10 OFFSET 3", Rows::Ordered),
    ("SELECT orders.* FROM orders ORDER BY orders.total, orders.tenant_id DESC, orders.id LIMIT 8", Rows::Ordered),
    ("SELECT *, total * 2 AS twice FROM orders ORDER BY twice DESC NULLS LAST, tenant_id, id LIMIT 6", Rows::Ordered),
    ("SELECT o.*, i.sku FROM orders o JOIN items i USING (tenant_id, id) ORDER BY sku, tenant_id LIMIT 9", Rows::Ordered),
    ("SELECT i.qty, o.* FROM orders o JOIN items i USING (tenant_id, id) ORDER BY o.total, 1, tenant_id", Rows::Ordered),
    ("SELECT DISTINCT ON (tenant_id) * FROM orders ORDER BY tenant_id, total DESC NULLS LAST, id", Rows::Ordered),
    // `qty` is o.qty, the output column of that name, not i.qty.
    ("SELECT o.*, i.qty AS q FROM orders o JOIN items i USING (tenant_id, id) ORDER BY qty NULLS FIRST, tenant_id", Rows::Ordered),
    (
        "SELECT * FROM orders UNION ALL SELECT tenant_id, id, sku, qty::numeric, qty FROM items \
         ORDER BY total DESC NULLS LAST, tenant_id, id LIMIT 10",
        Rows::Ordered,
    ),
    ("SELECT DISTINCT region COLLATE \"C\" AS r FROM orders ORDER BY 1 DESC", Rows::Ordered),
    ("SELECT DISTINCT region FROM orders", Rows::AnyOrder),
    // Grouped by the primary key, the other columns of `o.*` depend on it.
    (
        "SELECT o.*, count(*) AS n, max(p.total) FROM orders o JOIN orders p USING (tenant_id) \
         GROUP BY o.tenant_id, o.id ORDER BY n DESC, tenant_id, id LIMIT 10",
        Rows::Ordered,
    ),
    ("SELECT *, count(*) FROM orders GROUP BY tenant_id, id ORDER BY total NULLS FIRST, 1, 2 LIMIT 5", Rows::Ordered),
    // Each order once, however many orders of its tenant it joined.
    ("SELECT DISTINCT o.* FROM orders o JOIN orders p USING (tenant_id) ORDER BY o.total, o.tenant_id, o.id", Rows::Ordered),
    ("SELECT DISTINCT o.* FROM orders o JOIN orders p USING (tenant_id)", Rows::AnyOrder),
    ("SELECT DISTINCT * FROM orders ORDER BY region, tenant_id DESC, id LIMIT 12", Rows::Ordered),
    ("SELECT DISTINCT region, qty FROM orders ORDER BY qty DESC NULLS LAST, region LIMIT 10", Rows::Ordered),
    ("SELECT DISTINCT qty FROM orders ORDER BY qty LIMIT 5 OFFSET 2", Rows::Ordered),
    ("SELECT DISTINCT region, tenant_id % 3 AS k FROM orders ORDER BY k", Rows::AnyOrder),
    ("SELECT DISTINCT ON (region) region, tenant_id, id, total FROM orders ORDER BY region, total DESC, tenant_id, id", Rows::Ordered),
    (
        "SELECT DISTINCT ON (region) region, qty, count(*) AS n FROM orders GROUP BY region, qty \
         ORDER BY region, n DESC, qty NULLS FIRST",
        Rows::Ordered,
    ),
    ("SELECT region, count(*) FROM orders GROUP BY region HAVING count(*) > 40 ORDER BY region", Rows::Ordered),
    (
        "SELECT tenant_id % 7 AS k, sum(total) FROM orders GROUP BY 1 \
         HAVING sum(total) >= 2000.5 AND NOT max(qty) < 20 OR avg(total) IS NULL ORDER BY k",
        Rows::Ordered,
    ),
    ("SELECT region FROM orders GROUP BY region HAVING avg(qty) > 14 OR min(total) < 5 ORDER BY 1", Rows::Ordered),
    ("SELECT qty, count(*) FROM orders GROUP BY qty HAVING qty <> 3 AND count(*) >= 3 ORDER BY qty NULLS FIRST", Rows::Ordered),
    ("SELECT count(*) FROM orders HAVING count(*) > 1000", Rows::Ordered),
    ("SELECT region, max(tenant_id) FROM orders GROUP BY region HAVING max(region) > 'f' AND region <> 'us'", Rows::AnyOrder),
    (
        "SELECT region, count(DISTINCT tenant_id) AS tenants FROM orders GROUP BY region \
         HAVING count(DISTINCT tenant_id) > 10 ORDER BY tenants DESC, region",
        Rows::Ordered,
    ),
    ("SELECT count(DISTINCT tenant_id), count(*) FROM orders", Rows::Ordered),
    ("SELECT tenant_id, id FROM orders WHERE qty > 30 UNION ALL SELECT tenant_id, id FROM items", Rows::AnyOrder),
    (
        "SELECT tenant_id, id, total FROM orders UNION ALL SELECT tenant_id, id, NULL FROM items \
         ORDER BY 3 DESC NULLS LAST, 1, 2 LIMIT 12",
        Rows::Ordered,
    ),
    ("SELECT id AS n FROM orders UNION ALL SELECT qty FROM items ORDER BY n NULLS FIRST LIMIT 7 OFFSET 5", Rows::Ordered),
    // Groups by the sharding key are whole on their shard: any aggregate,
    // and HAVING, run there.
    (
        "SELECT tenant_id, count(DISTINCT region) AS r, string_agg(region, ',' ORDER BY region, id) AS s \
         FROM orders GROUP BY tenant_id HAVING count(*) > 2 ORDER BY r DESC, tenant_id LIMIT 10",
        Rows::Ordered,
    ),
    (
        "SELECT o.tenant_id, o.id, count(i.id), bool_or(i.qty > 10) FROM orders o \
         LEFT JOIN items i ON i.tenant_id = o.tenant_id GROUP BY o.tenant_id, o.id ORDER BY 3 DESC, 1, 2",
        Rows::Ordered,
    ),
    ("SELECT DISTINCT count(*) FROM orders GROUP BY tenant_id", Rows::AnyOrder),
    ("SELECT tenant_id, count(DISTINCT region) FROM orders GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 9", Rows::Ordered),
    (
        "SELECT tenant_id AS t, count(DISTINCT region) FROM orders GROUP BY t ORDER BY 2 DESC, t LIMIT 9",
        Rows::Ordered,
    ),
    // An ORDER BY or GROUP BY item that is a select-list expression.
    ("SELECT region, count(*) FROM orders GROUP BY region ORDER BY count(*) DESC, region", Rows::Ordered),
    ("SELECT tenant_id % 4, sum(qty) FROM orders GROUP BY tenant_id % 4 ORDER BY tenant_id % 4", Rows::Ordered),
    // WITH queries and subqueries in FROM whose rows are each of one shard.
    (
        "WITH big AS (SELECT * FROM orders WHERE total > 100) \
         SELECT region, count(*), sum(total) FROM big GROUP BY region ORDER BY region",
        Rows::Ordered,
    ),
    (
        "WITH o AS (SELECT tenant_id, id, total FROM orders) SELECT o.tenant_id, o.id, o.total, i.sku \
         FROM o JOIN items i ON i.tenant_id = o.tenant_id AND i.id = o.id ORDER BY 1, 2",
        Rows::Ordered,
    ),
    ("SELECT count(*), max(t.total), avg(t.qty) FROM (SELECT * FROM orders WHERE qty > 10) t", Rows::Ordered),
    (
        "SELECT * FROM (SELECT tenant_id, id, total FROM orders) t ORDER BY total DESC NULLS LAST, tenant_id, id LIMIT 5",
        Rows::Ordered,
    ),
    ("SELECT avg(n) FROM (SELECT tenant_id, id, qty AS n FROM orders) t", Rows::Ordered),
    // Groups by the key a WITH query or subquery passes through: whole on
    // their shard.
    (
        "WITH f AS (SELECT * FROM orders WHERE qty > 5) \
         SELECT tenant_id, count(DISTINCT region), string_agg(region, ',' ORDER BY region, id) FROM f \
         GROUP BY tenant_id ORDER BY 1",
        Rows::Ordered,
    ),
    (
        "SELECT t.tenant_id, count(DISTINCT t.region) AS r FROM (SELECT tenant_id, id, region FROM orders) t \
         GROUP BY t.tenant_id HAVING count(*) > 1 ORDER BY r DESC, 1 LIMIT 6",
        Rows::Ordered,
    ),
    (
        "SELECT x.tenant_id, count(DISTINCT x.sku) FROM (SELECT o.tenant_id, i.sku FROM orders o \
         JOIN items i ON i.tenant_id = o.tenant_id AND i.id = o.id) x GROUP BY 1 ORDER BY 2 DESC, 1",
        Rows::Ordered,
    ),
];

/// `SELECT *` expanded from the shards' row descriptions, DISTINCT and
/// DISTINCT ON, HAVING (its aggregates hidden from the client), UNION ALL and
/// count(DISTINCT tenant_id): the same rows and row descriptions as a single
/// Postgres, in the simple protocol and in the extended one with text and
/// binary results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn star_distinct_having_and_union_all_match_a_single_postgres() {
    let (h, single, one, router) = same_rows_twice().await;
    with_items(&one, &router).await;
    let (mut direct, mut routed) = (Raw::login(single.port()).await, Raw::login(h.port()).await);
    let sorted_if = |mut r: Vec<String>, how: &Rows| {
        if let Rows::AnyOrder = how {
            r.sort();
        }
        r
    };
    for (sql, how) in MERGED {
        let a = sorted_if(rows(one.simple_query(sql).await.unwrap()).iter().map(|r| format!("{r:?}")).collect(), how);
        let b = router.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        let b = sorted_if(rows(b).iter().map(|r| format!("{r:?}")).collect(), how);
        assert_eq!(b, a, "simple: {sql}");
        for formats in [&[0i16][..], &[1]] {
            let p =
                vec![parse("", sql, &[]), bind_formats("", &[], false, formats), describe_portal(), execute(), sync()];
            let (want, got) = (direct.run(&p).await, routed.run(&p).await);
            assert_eq!(sorted_if(got, how), sorted_if(want, how), "extended {formats:?}: {sql}");
        }
        // A statement described before it runs: its columns, hidden ones left out.
        let p = vec![parse("", sql, &[]), describe_statement(""), sync()];
        assert_eq!(routed.run(&p).await, direct.run(&p).await, "described: {sql}");
    }
    // A column of `*` grouped by its primary key is carried along, not
    // compared: jsonb, which the router cannot group by, too (in text).
    let sql = "SELECT e.*, count(*) AS n FROM extras e JOIN orders o USING (tenant_id) GROUP BY e.tenant_id \
               ORDER BY n DESC, tenant_id LIMIT 8";
    let a = rows(one.simple_query(sql).await.unwrap());
    assert_eq!(rows(router.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"))), a, "{sql}");
    let p = vec![parse("", sql, &[]), bind_formats("", &[], false, &[0]), describe_portal(), execute(), sync()];
    assert_eq!(routed.run(&p).await, direct.run(&p).await, "extended: {sql}");
    // A parameter in the HAVING of groups by the key: the shards run it.
    let sql = "SELECT tenant_id, count(*), sum(total) FROM orders GROUP BY tenant_id HAVING count(*) >= $1 \
               ORDER BY tenant_id";
    for n in [1i64, 4, 9] {
        let a = wire_rows(&one.query(sql, &[&n]).await.unwrap());
        let b = wire_rows(&router.query(sql, &[&n]).await.unwrap_or_else(|e| panic!("{sql}: {e:?}")));
        assert_eq!(b, a, "{sql} with {n}");
    }
    // Parameters in the HAVING of groups that span shards: the shards send
    // each one's value beside the groups, typed as HAVING types it.
    let sql = "SELECT region, count(*) AS n FROM orders WHERE qty > $1 GROUP BY region \
               HAVING count(*) > $2 AND max(qty) >= $3 OR min(qty) < $4 ORDER BY region";
    for (total, n, qty, low) in [(-10i32, 1i64, 10i32, -100i32), (5, 5, 30, 8), (0, 1000, 0, 0)] {
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] = [&total, &n, &qty, &low];
        let a = wire_rows(&one.query(sql, &params).await.unwrap());
        let b = wire_rows(&router.query(sql, &params).await.unwrap_or_else(|e| panic!("{sql}: {e:?}")));
        assert_eq!(b, a, "{sql} with {total}, {n}, {qty}, {low}");
    }
    let p = vec![parse("", sql, &[]), describe_statement(""), sync()];
    assert_eq!(routed.run(&p).await, direct.run(&p).await, "described: {sql}");
    // Parameters outside HAVING keep their places and types.
    let sql = "SELECT region, count(*) AS n, avg(total) FROM orders WHERE qty > $1 GROUP BY region \
               HAVING count(*) > 5 AND max(total) >= 100 ORDER BY n DESC, region";
    for qty in [0i32, 12, 1000] {
        let a = wire_rows(&one.query(sql, &[&qty]).await.unwrap());
        let b = wire_rows(&router.query(sql, &[&qty]).await.unwrap_or_else(|e| panic!("{sql}: {e:?}")));
        assert_eq!(b, a, "{sql} with {qty}");
    }
}

/// With ties in ORDER BY one Postgres may return any of the tied rows; the
/// router's answer is one it could have returned: the same sort values in the
/// same order, each row a row of the table, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_over_ties_give_an_answer_one_postgres_could_give() {
    let (_h, _single, one, router) = same_rows_twice().await;
    let table = rows(one.simple_query("SELECT * FROM orders").await.unwrap());
    for (sql, sort_columns) in [
        ("SELECT * FROM orders ORDER BY total DESC LIMIT 3", &[3][..]),
        ("SELECT * FROM orders ORDER BY region LIMIT 20 OFFSET 10", &[2]),
        ("SELECT DISTINCT ON (region) * FROM orders ORDER BY region, qty DESC", &[2, 4]),
        // Without ORDER BY, any row of each region.
        ("SELECT DISTINCT ON (region) * FROM orders", &[2]),
    ] {
        let want = rows(one.simple_query(sql).await.unwrap());
        let got = rows(router.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}")));
        let sort_values = |r: &[Vec<Option<String>>]| {
            r.iter().map(|r| sort_columns.iter().map(|&c| r[c].clone()).collect::<Vec<_>>()).collect::<Vec<_>>()
        };
        assert_eq!(sort_values(&got), sort_values(&want), "{sql}");
        assert!(got.iter().all(|r| table.contains(r)), "{sql}: {got:?}");
        let mut distinct = got.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), got.len(), "{sql}: a row twice");
    }
}

/// What the router cannot answer exactly is refused with 0A000, and the
/// message names the part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merges_the_router_cannot_do_exactly_are_refused_by_name() {
    let h = Harness::start(3).await;
    let router = h.client().await;
    router.batch_execute(SCHEMA).await.unwrap();
    router.batch_execute("CREATE TABLE plans (id bigint PRIMARY KEY)").await.unwrap();
    // An aggregate of the application's own is an aggregate, not a value each
    // shard would return a row of.
    router.batch_execute("CREATE AGGREGATE my_sum(int) (sfunc = int4pl, stype = int)").await.unwrap();
    for (sql, named) in [
        ("SELECT my_sum(qty) FROM orders", "my_sum()"),
        ("SELECT * FROM (SELECT my_sum(qty) FROM orders) t", "computes aggregates"),
        ("SELECT corr(qty, total) FROM orders", "corr()"),
        ("SELECT id FROM orders UNION ALL SELECT id FROM plans", "UNION ALL reads only reference tables"),
        ("SELECT DISTINCT * FROM orders o JOIN orders p USING (tenant_id, id)", "DISTINCT *"),
        ("SELECT region, count(*) FROM orders GROUP BY region HAVING stddev(qty) > 1", "stddev()"),
        ("SELECT region, count(*) FROM orders GROUP BY region HAVING sum(qty) + 1 > 1", "operator +"),
        ("SELECT count(DISTINCT region) FROM orders", "count(DISTINCT …)"),
        // A derived table's column named like the key that is not the key,
        // or may be NULL: groups across shards.
        (
            "SELECT tenant_id, count(DISTINCT id) FROM (SELECT region AS tenant_id, id FROM orders) t GROUP BY tenant_id",
            "count(DISTINCT …)",
        ),
        (
            "SELECT tenant_id, count(DISTINCT id) FROM (SELECT tenant_id::text, id FROM orders) t GROUP BY tenant_id",
            "count(DISTINCT …)",
        ),
        (
            "WITH f AS (SELECT p.id, o.tenant_id FROM orders p LEFT JOIN orders o ON o.tenant_id = p.tenant_id \
             AND o.id = p.id + 1) SELECT tenant_id, count(DISTINCT id) FROM f GROUP BY tenant_id",
            "count(DISTINCT …)",
        ),
        // GROUP BY takes an input column before an output alias: these are
        // groups by region, not by the key.
        ("SELECT max(tenant_id) AS region, count(DISTINCT id) FROM orders GROUP BY region", "count(DISTINCT …)"),
        ("SELECT * FROM (SELECT region, count(*) FROM orders GROUP BY region) c", "computes GROUP BY or HAVING"),
        ("WITH r AS (SELECT DISTINCT region FROM orders) SELECT count(*) FROM r", "computes DISTINCT"),
        ("SELECT id FROM orders UNION SELECT id FROM orders", "UNION"),
        ("SELECT o.* FROM orders o JOIN orders p USING (tenant_id, id) ORDER BY p.qty", "not output columns"),
    ] {
        for extended in [false, true] {
            let e = if extended {
                router.query(sql, &[]).await.map(|_| ()).expect_err(sql)
            } else {
                router.simple_query(sql).await.map(|_| ()).expect_err(sql)
            };
            let db = e.as_db_error().unwrap_or_else(|| panic!("{sql}: {e:?}"));
            assert_eq!(db.code().code(), "0A000", "{sql}: {}", db.message());
            assert!(db.message().contains(named), "{sql}: {}", db.message());
        }
    }
    // A parameter in HAVING that the statement uses elsewhere too: its type
    // might be decided there first.
    let sql = "SELECT region FROM orders WHERE qty > $1 GROUP BY region HAVING count(*) > $1";
    let e = router.query(sql, &[&1i32]).await.expect_err(sql);
    let db = e.as_db_error().unwrap_or_else(|| panic!("{sql}: {e:?}"));
    assert_eq!(db.code().code(), "0A000", "{sql}: {}", db.message());
    assert!(db.message().contains("both in HAVING and elsewhere"), "{sql}: {}", db.message());
    assert_eq!(router.query("SELECT 1", &[]).await.unwrap().len(), 1);
}

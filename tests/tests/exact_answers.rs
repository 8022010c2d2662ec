//! Statements that would strand a row or answer wrong across shards: a write
//! that changes a row's tenant key is refused and moves nothing, and an outer
//! join whose ON names a tenant returns exactly what one Postgres holding every
//! row returns (or is refused when the shards cannot answer it exactly).

use shardgate_localpg::TestServer;
use shardgate_tests::{connect, rows, sqlstate, Harness};
use tokio_postgres::Client;

const ORDERS: &str = "CREATE TABLE orders (tenant_id bigint, id bigint, total numeric, PRIMARY KEY (tenant_id, id))";

const KEY_CHANGE: &str =
    "cannot change the sharding key tenant_id of rows in \"orders\": the row would stay on a shard its new key does not route to";

/// Every row of `orders` as each shard holds it, read on the shards themselves.
async fn placement(h: &Harness, shards: usize) -> Vec<Vec<Vec<Option<String>>>> {
    let mut all = Vec::new();
    for i in 0..shards {
        let sql = "SELECT tenant_id::text, id::text, total::text FROM orders ORDER BY 1, 2";
        all.push(rows(h.shard(i).await.simple_query(sql).await.unwrap()));
    }
    all
}

/// Two shards; tenant `t0` on shard 0 with orders 1 and 2, `t1` on shard 1
/// with order 1.
async fn two_tenants_with_orders() -> (Harness, Client, i64, i64) {
    let h = Harness::start(2).await;
    let c = h.client().await;
    c.batch_execute(ORDERS).await.unwrap();
    let (t0, t1) = (h.tenants_on(0, 1)[0], h.tenants_on(1, 1)[0]);
    c.batch_execute(&format!("INSERT INTO orders VALUES ({t0}, 1, 10), ({t0}, 2, 20), ({t1}, 1, 30)")).await.unwrap();
    (h, c, t0, t1)
}

fn refused_as_key_change(e: &tokio_postgres::Error, sql: &str) {
    assert_eq!(sqlstate(e), "0A000", "{sql}: {e:?}");
    let db = e.as_db_error().unwrap();
    assert_eq!(db.message(), KEY_CHANGE, "{sql}");
    let hint = db.hint().unwrap_or_default();
    assert!(hint.contains("delete it and insert it again with the new tenant_id"), "{sql}: {hint}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_that_changes_the_tenant_key_is_refused_and_moves_no_row() {
    let (h, c, t0, t1) = two_tenants_with_orders().await;
    let before = placement(&h, 2).await;
    assert_eq!(before[0].len(), 2);
    assert_eq!(before[1].len(), 1);

    // Every form that writes the key, in the simple protocol.
    for sql in [
        format!("UPDATE orders SET tenant_id = {t1} WHERE tenant_id = {t0} AND id = 1"),
        format!("UPDATE orders SET total = 0, \"tenant_id\" = {t1} WHERE tenant_id = {t0}"),
        format!("UPDATE orders SET (total, tenant_id) = (1, {t1}) WHERE tenant_id = {t0}"),
        format!("UPDATE orders SET (total, tenant_id) = (SELECT 1, {t1}) WHERE tenant_id = {t0}"),
        format!("UPDATE orders SET tenant_id = tenant_id + 1 WHERE tenant_id = {t0}"),
        format!("INSERT INTO orders VALUES ({t0}, 1, 5) ON CONFLICT (tenant_id, id) DO UPDATE SET tenant_id = {t1}"),
        format!(
            "MERGE INTO orders o USING (VALUES ({t0}, 1)) v(t, id) ON o.tenant_id = v.t AND o.id = v.id \
             WHEN MATCHED THEN UPDATE SET tenant_id = {t1}"
        ),
        format!(
            "WITH m AS (UPDATE orders SET tenant_id = {t1} WHERE tenant_id = {t0} RETURNING id) SELECT count(*) FROM m"
        ),
    ] {
        let e = c.simple_query(&sql).await.unwrap_err();
        refused_as_key_change(&e, &sql);
    }
    // The extended protocol, the new key a bind parameter.
    let sql = "UPDATE orders SET tenant_id = $2 WHERE tenant_id = $1 AND id = $3";
    let e = c.execute(sql, &[&t0, &t1, &1i64]).await.unwrap_err();
    refused_as_key_change(&e, sql);
    // With the session's tenant, a new key other than that tenant.
    c.batch_execute(&format!("SET shardgate.tenant = {t0}")).await.unwrap();
    let sql = "UPDATE orders SET tenant_id = $1, total = 0 WHERE id = $2";
    let e = c.execute(sql, &[&t1, &1i64]).await.unwrap_err();
    refused_as_key_change(&e, sql);
    c.batch_execute("RESET shardgate.tenant").await.unwrap();
    // A qualified target column is Postgres's own error.
    let sql = format!("UPDATE orders o SET o.tenant_id = {t1} WHERE o.tenant_id = {t0}");
    assert_eq!(sqlstate(&c.simple_query(&sql).await.unwrap_err()), "42703", "{sql}");

    assert_eq!(placement(&h, 2).await, before, "no row moved, changed or was added");

    // Assignments that keep every row's key run as usual.
    let n = c
        .execute(
            &*format!("UPDATE orders SET tenant_id = tenant_id, total = 11 WHERE tenant_id = {t0} AND id = 1"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    let n = c
        .execute(
            "UPDATE orders SET tenant_id = $1, total = $2::int4 WHERE tenant_id = $1 AND id = $3",
            &[&t1, &31i32, &1i64],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    c.batch_execute(&format!(
        "INSERT INTO orders VALUES ({t0}, 2, 22), ({t1}, 1, 33) \
         ON CONFLICT (tenant_id, id) DO UPDATE SET tenant_id = EXCLUDED.tenant_id, total = EXCLUDED.total"
    ))
    .await
    .unwrap();
    let after = placement(&h, 2).await;
    let row = |t: i64, id: i64, total: &str| vec![Some(t.to_string()), Some(id.to_string()), Some(total.to_string())];
    assert_eq!(after[0], vec![row(t0, 1, "11"), row(t0, 2, "22")]);
    assert_eq!(after[1], vec![row(t1, 1, "33")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_select_that_would_put_rows_on_another_tenants_shard_is_refused() {
    let (h, c, t0, t1) = two_tenants_with_orders().await;
    let before = placement(&h, 2).await;
    for sql in [
        format!(
            "INSERT INTO orders (tenant_id, id, total) SELECT {t1}, id + 100, total FROM orders WHERE tenant_id = {t0}"
        ),
        format!("INSERT INTO orders SELECT tenant_id + 1, id, total FROM orders WHERE tenant_id = {t0}"),
    ] {
        let e = c.simple_query(&sql).await.unwrap_err();
        assert_eq!(sqlstate(&e), "0A000", "{sql}: {e:?}");
        let msg = e.as_db_error().unwrap().message().to_string();
        assert!(msg.contains("INSERT … SELECT into the sharded table orders"), "{msg}");
    }
    let sql =
        "INSERT INTO orders (tenant_id, id, total) SELECT $2::int8, id + 100, total FROM orders WHERE tenant_id = $1";
    assert_eq!(sqlstate(&c.execute(sql, &[&t0, &t1]).await.unwrap_err()), "0A000");
    assert_eq!(placement(&h, 2).await, before, "nothing was inserted");

    // Rows that keep their own key, or take the tenant the statement names,
    // stay on their tenant's shard.
    c.simple_query(&format!(
        "INSERT INTO orders (tenant_id, id, total) SELECT tenant_id, id + 100, total FROM orders WHERE tenant_id = {t0}"
    ))
    .await
    .unwrap();
    let sql =
        "INSERT INTO orders (tenant_id, id, total) SELECT $1::int8, id + 200, total FROM orders WHERE tenant_id = $1";
    assert_eq!(c.execute(sql, &[&t1]).await.unwrap(), 1);
    let after = placement(&h, 2).await;
    assert_eq!(after[0].len(), 4);
    assert!(after[0].iter().all(|r| r[0] == Some(t0.to_string())), "{after:?}");
    assert_eq!(after[1].len(), 2);
    assert!(after[1].iter().all(|r| r[0] == Some(t1.to_string())), "{after:?}");
}

const SCHEMA: &str = "CREATE TABLE orders (tenant_id bigint, id bigint, plan bigint, PRIMARY KEY (tenant_id, id));
                      CREATE TABLE items (tenant_id bigint, order_id bigint, id bigint, qty int, PRIMARY KEY (tenant_id, id));
                      CREATE TABLE plans (id bigint PRIMARY KEY, name text)";

/// Three shards through the router, and one Postgres holding the same rows.
/// Orders of 30 tenants (every shard has some), items for some of them, and
/// items whose order_id matches orders of other tenants.
async fn cluster_and_single() -> (Harness, TestServer, Client, Client) {
    let h = Harness::start(3).await;
    let single = TestServer::start().await.unwrap();
    single.create_database("app").await.unwrap();
    let one = connect(&single.url("app")).await;
    let router = h.client().await;
    for c in [&one, &router] {
        c.batch_execute(SCHEMA).await.unwrap();
    }
    let mut orders = Vec::new();
    let mut items = Vec::new();
    for t in 1..=30i64 {
        for id in 1..=(t % 3 + 1) {
            orders.push(format!("({t}, {id}, {})", t % 4));
            if (t + id) % 2 == 0 {
                items.push(format!("({t}, {id}, {}, {})", t * 10 + id, t + id));
            }
        }
    }
    let fill = [
        format!("INSERT INTO orders VALUES {}", orders.join(", ")),
        format!("INSERT INTO items VALUES {}", items.join(", ")),
        "INSERT INTO plans VALUES (0, 'free'), (1, 'basic'), (2, 'gold'), (3, 'team'), (9, 'unused')".to_string(),
    ];
    for sql in &fill {
        one.batch_execute(sql).await.unwrap();
        router.batch_execute(sql).await.unwrap();
    }
    (h, single, one, router)
}

fn sorted(mut r: Vec<Vec<Option<String>>>) -> Vec<Vec<Option<String>>> {
    r.sort();
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outer_join_with_a_tenant_in_its_on_returns_every_preserved_row_from_every_shard() {
    let (h, _single, one, router) = cluster_and_single().await;
    // A tenant with items, whose shard is one of three.
    let t = 4i64;
    let shards_with_orders: std::collections::BTreeSet<usize> = (1..=30).map(|t| h.shard_of(t)).collect();
    assert_eq!(shards_with_orders.len(), 3, "rows on every shard");

    for sql in [
        format!(
            "SELECT o.tenant_id, o.id, i.id FROM orders o \
             LEFT JOIN items i ON i.tenant_id = o.tenant_id AND i.order_id = o.id AND i.tenant_id = {t}"
        ),
        format!(
            "SELECT o.tenant_id, o.id, i.id FROM items i \
             RIGHT JOIN orders o ON i.tenant_id = o.tenant_id AND i.order_id = o.id AND i.tenant_id = {t}"
        ),
        format!(
            "SELECT o.tenant_id, o.id, i.tenant_id, i.id FROM orders o \
             FULL JOIN items i ON i.tenant_id = o.tenant_id AND i.order_id = o.id AND o.tenant_id = {t}"
        ),
        format!(
            "SELECT count(*), count(i.id), sum(i.qty) FROM orders o \
             LEFT JOIN items i ON i.tenant_id = o.tenant_id AND i.order_id = o.id AND i.tenant_id = {t}"
        ),
        // An outer join nested in an inner join with a reference table.
        format!(
            "SELECT o.tenant_id, o.id, p.name, i.id FROM plans p JOIN \
             (orders o LEFT JOIN items i ON i.tenant_id = o.tenant_id AND i.order_id = o.id AND i.tenant_id = {t}) \
             ON p.id = o.plan"
        ),
        // In WHERE the tenant does filter: one shard answers.
        format!(
            "SELECT o.tenant_id, o.id, i.id FROM orders o \
             LEFT JOIN items i ON i.tenant_id = o.tenant_id AND i.order_id = o.id WHERE o.tenant_id = {t}"
        ),
    ] {
        let expected = sorted(rows(one.simple_query(&sql).await.unwrap()));
        let got = sorted(rows(router.simple_query(&sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"))));
        assert_eq!(got, expected, "{sql}");
    }
    // The preserved side really spans the shards: every order is there.
    let sql = format!(
        "SELECT o.tenant_id FROM orders o LEFT JOIN items i ON i.tenant_id = o.tenant_id AND i.order_id = o.id AND i.tenant_id = {t}"
    );
    assert_eq!(rows(router.simple_query(&sql).await.unwrap()).len(), 60);

    // The extended protocol, the tenant a bind parameter.
    let sql = "SELECT o.tenant_id, o.id, i.id, i.qty FROM orders o \
               LEFT JOIN items i ON i.tenant_id = o.tenant_id AND i.order_id = o.id AND i.tenant_id = $1";
    let read = |r: Vec<tokio_postgres::Row>| {
        let mut v: Vec<(i64, i64, Option<i64>, Option<i32>)> =
            r.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
        v.sort();
        v
    };
    let expected = read(one.query(sql, &[&t]).await.unwrap());
    assert_eq!(expected.len(), 60);
    assert_eq!(read(router.query(sql, &[&t]).await.unwrap()), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_shard_joins_the_shards_cannot_answer_alone_are_refused() {
    let (_h, _single, one, router) = cluster_and_single().await;
    let refused = |e: tokio_postgres::Error, says: &str| {
        assert_eq!(sqlstate(&e), "0A000", "{e:?}");
        let db = e.as_db_error().unwrap();
        assert!(db.message().starts_with("cannot answer this read across shards exactly: "), "{db:?}");
        assert!(db.message().contains(says), "{db:?}");
        assert!(db.hint().is_some(), "{db:?}");
    };
    // Refused, or else the same answer as one Postgres (which it is not).
    let refused_not_short = |sql: &'static str, says: &'static str| {
        let (one, router) = (&one, &router);
        async move {
            let expected = sorted(rows(one.simple_query(sql).await.unwrap()));
            match router.simple_query(sql).await {
                Ok(r) => panic!("{sql}: answered {:?}, one Postgres answers {expected:?}", sorted(rows(r))),
                Err(e) => refused(e, says),
            }
        }
    };
    // Orders joined to items of other tenants: the count needs rows of two shards.
    refused_not_short("SELECT count(*) FROM orders o JOIN items i ON i.order_id = o.id", "joined without").await;
    // Joined on the key as well, the shards answer it exactly.
    let sql =
        "SELECT count(*), sum(i.qty) FROM orders o JOIN items i ON i.order_id = o.id AND i.tenant_id = o.tenant_id";
    assert_eq!(rows(router.simple_query(sql).await.unwrap()), rows(one.simple_query(sql).await.unwrap()));
    // A subquery that sees only its shard's rows.
    refused_not_short("SELECT o.tenant_id, o.id FROM orders o WHERE o.id IN (SELECT order_id FROM items)", "subquery")
        .await;
    let sql = "SELECT o.tenant_id, o.id FROM orders o \
               WHERE EXISTS (SELECT 1 FROM items i WHERE i.tenant_id = o.tenant_id AND i.order_id = o.id)";
    assert_eq!(
        sorted(rows(router.simple_query(sql).await.unwrap())),
        sorted(rows(one.simple_query(sql).await.unwrap()))
    );
    // Every plan is kept; each shard would add its own unmatched copy of it.
    let sql = "SELECT p.id, o.id FROM plans p LEFT JOIN orders o ON o.plan = p.id";
    refused(router.simple_query(sql).await.unwrap_err(), "keeps every row of plans");
    refused(router.query(sql, &[]).await.unwrap_err(), "keeps every row of plans");
    // With the orders restricted to one tenant, that tenant's shard has every
    // plan and every order the join can take: it answers exactly.
    let sql = "SELECT p.id, o.id FROM plans p LEFT JOIN orders o ON o.plan = p.id AND o.tenant_id = 4";
    let want = sorted(rows(one.simple_query(sql).await.unwrap()));
    assert_eq!(sorted(rows(router.simple_query(sql).await.unwrap())), want);
    let tenant = format!("/* tenant_id=4 */ {sql}");
    assert_eq!(sorted(rows(router.simple_query(&tenant).await.unwrap())), want);
    // A key on one side of a join whose other side is any tenant's: the
    // shard of that tenant alone would miss the other shards' items.
    let sql = "SELECT o.id, i.id FROM orders o JOIN items i ON i.order_id = o.id WHERE o.tenant_id = 4";
    refused(router.simple_query(sql).await.unwrap_err(), "joined without");
    let sql = "SELECT o.id FROM orders o WHERE o.tenant_id = 4 AND o.plan > (SELECT avg(plan) FROM orders)";
    refused(router.simple_query(sql).await.unwrap_err(), "subquery");
    // Keys inside a WITH query or a subquery in FROM: their tenant's shard.
    for sql in [
        "WITH mine AS (SELECT * FROM orders WHERE tenant_id = 4) SELECT id, plan FROM mine",
        "SELECT count(*), sum(plan) FROM (SELECT * FROM orders WHERE tenant_id = 4) t",
        "SELECT id FROM (SELECT * FROM orders) t WHERE tenant_id = 4",
    ] {
        assert_eq!(
            sorted(rows(router.simple_query(sql).await.unwrap())),
            sorted(rows(one.simple_query(sql).await.unwrap())),
            "{sql}"
        );
    }
}

/// An UPDATE or DELETE on tenants of several shards runs on each of them: a
/// FROM (USING) or subquery that pairs a row with rows of another shard's
/// tenant would find them on no shard, and change less than one Postgres. Such
/// a write is refused and changes nothing; one whose pairs share the key runs
/// on every shard and changes what one Postgres changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_on_several_shards_that_pair_rows_of_different_shards_are_refused() {
    let (h, _single, one, router) = cluster_and_single().await;
    let with_items: Vec<i64> = rows(one.simple_query("SELECT DISTINCT tenant_id FROM items").await.unwrap())
        .into_iter()
        .map(|r| r[0].as_deref().unwrap().parse().unwrap())
        .collect();
    let on = |s: usize| *with_items.iter().find(|t| h.shard_of(**t) == s).expect("a tenant with items on the shard");
    let (a, b) = (on(0), on(1));
    let everything =
        "SELECT 'order', tenant_id, id, plan FROM orders UNION ALL SELECT 'item', tenant_id, id, qty FROM items";
    // What one Postgres changes, rolled back: each must change some row.
    let changed_by_one = |sql: String| {
        let one = &one;
        async move {
            one.batch_execute("BEGIN").await.unwrap();
            let n = one.execute(sql.as_str(), &[]).await.unwrap();
            one.batch_execute("ROLLBACK").await.unwrap();
            n
        }
    };
    for sql in [
        format!("UPDATE orders o SET plan = i.qty FROM items i WHERE o.tenant_id = {a} AND i.tenant_id = {b} AND i.order_id = o.id"),
        format!("DELETE FROM orders o USING items i WHERE o.tenant_id = {a} AND i.tenant_id = {b} AND i.order_id = o.id"),
        format!("DELETE FROM orders WHERE tenant_id IN ({a}, {b}) AND id IN (SELECT order_id FROM items WHERE tenant_id = {b})"),
        format!("UPDATE orders SET plan = (SELECT max(qty) FROM items WHERE tenant_id = {b}) WHERE tenant_id IN ({a}, {b})"),
    ] {
        let n = changed_by_one(sql.clone()).await;
        assert!(n > 0, "{sql}: one Postgres changes no row, the case tests nothing");
        for e in [router.simple_query(&sql).await.unwrap_err(), router.execute(sql.as_str(), &[]).await.unwrap_err()] {
            assert_eq!(sqlstate(&e), "0A000", "{sql}: {e:?}");
            let db = e.as_db_error().unwrap();
            assert!(db.message().starts_with("cannot run this "), "{sql}: {db:?}");
            assert!(db.message().contains("across shards exactly"), "{sql}: {db:?}");
            assert!(db.hint().is_some(), "{sql}: {db:?}");
        }
    }
    assert_eq!(
        sorted(rows(router.simple_query(everything).await.unwrap())),
        sorted(rows(one.simple_query(everything).await.unwrap())),
        "the refused writes changed nothing"
    );
    // Paired on the key, each shard has every pair of its rows.
    for sql in [
        format!("UPDATE orders o SET plan = i.qty FROM items i WHERE i.tenant_id = o.tenant_id AND i.order_id = o.id AND o.tenant_id IN ({a}, {b})"),
        format!("DELETE FROM items i USING orders o WHERE o.tenant_id = i.tenant_id AND o.id = i.order_id AND i.tenant_id IN ({a}, {b})"),
    ] {
        let want = one.execute(sql.as_str(), &[]).await.unwrap();
        assert!(want > 0, "{sql}: one Postgres changes no row");
        assert_eq!(router.execute(sql.as_str(), &[]).await.unwrap(), want, "{sql}");
    }
    assert_eq!(
        sorted(rows(router.simple_query(everything).await.unwrap())),
        sorted(rows(one.simple_query(everything).await.unwrap())),
    );
}

/// A view without the key column over sharded tables, or an inheritance
/// parent without it over sharded children, was taken for a reference
/// table and read on one shard: a count over it gave that shard's part.
/// Such a read is refused; a view with the key column is read as a sharded
/// table, and one over reference tables as a reference table, each giving
/// what one Postgres gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_and_parents_without_the_key_over_sharded_rows_are_refused() {
    let (_h, _single, one, router) = cluster_and_single().await;
    let ddl = [
        "CREATE VIEW order_counts AS SELECT plan, count(*) AS n FROM orders GROUP BY plan",
        "CREATE VIEW plan_orders AS SELECT p.name, c.n FROM plans p JOIN order_counts c ON c.plan = p.id",
        "CREATE VIEW gold_orders AS SELECT tenant_id, id FROM orders WHERE plan = 2",
        "CREATE VIEW plan_names AS SELECT name FROM plans",
        "CREATE TABLE events_base (id int)",
        "CREATE TABLE events (tenant_id bigint) INHERITS (events_base)",
    ];
    for sql in ddl {
        one.batch_execute(sql).await.unwrap();
        router.batch_execute(sql).await.unwrap();
    }
    let fill = "INSERT INTO events VALUES (1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6)";
    one.batch_execute(fill).await.unwrap();
    router.batch_execute(fill).await.unwrap();
    for sql in [
        "SELECT plan, n FROM order_counts",
        "SELECT * FROM plan_orders",
        "SELECT count(*) FROM events_base",
        "SELECT o.id FROM orders o JOIN order_counts c ON c.plan = o.plan WHERE o.tenant_id = 4",
    ] {
        let want = sorted(rows(one.simple_query(sql).await.unwrap()));
        for e in [
            router.simple_query(sql).await.map(|r| sorted(rows(r))),
            router.query(sql, &[]).await.map(|_| want.clone()),
        ] {
            let e = match e {
                Ok(got) => panic!("{sql}: answered {got:?}, one Postgres answers {want:?}"),
                Err(e) => e,
            };
            assert_eq!(sqlstate(&e), "0A000", "{sql}: {e:?}");
            let db = e.as_db_error().unwrap();
            assert!(db.message().contains("reads rows of sharded tables but has no tenant_id column"), "{sql}: {db:?}");
            assert!(db.hint().is_some(), "{sql}: {db:?}");
        }
    }
    for sql in [
        "SELECT tenant_id, id FROM gold_orders",
        "SELECT id FROM gold_orders WHERE tenant_id = 4",
        "SELECT name FROM plan_names",
        "SELECT count(*) FROM events",
    ] {
        let want = sorted(rows(one.simple_query(sql).await.unwrap()));
        assert_eq!(sorted(rows(router.simple_query(sql).await.unwrap())), want, "{sql}");
    }
    // DDL on them runs.
    router.batch_execute("DROP VIEW plan_orders").await.unwrap();
    router.batch_execute("DROP VIEW order_counts").await.unwrap();
    router.batch_execute("CREATE VIEW order_counts AS SELECT tenant_id, plan FROM orders").await.unwrap();
    let sql = "SELECT count(*) FROM order_counts";
    assert_eq!(
        rows(router.simple_query(sql).await.unwrap()),
        vec![vec![Some(one_count(&one).await)]],
        "now with the key"
    );
}

async fn one_count(one: &Client) -> String {
    let r = one.query_one("SELECT count(*)::text FROM orders", &[]).await.unwrap();
    r.get(0)
}

const SEVERAL_SHARDS: &str = "this statement changes data inside WITH (or under EXPLAIN ANALYZE or COPY) and would need several shards: it must run on one shard, where every row it writes or reads belongs";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_changing_with_queries_write_only_on_their_own_tenants_shard() {
    let (h, c, t0, t1) = two_tenants_with_orders().await;
    let row = |t: i64, id: i64, total: &str| vec![Some(t.to_string()), Some(id.to_string()), Some(total.to_string())];

    // The inserted row's own tenant decides, not a comment's, the session's or
    // the outer SELECT's; and with no key at all the INSERT runs once.
    let runs = [
        format!(
            "/* tenant_id={t0} */ WITH x AS (INSERT INTO orders VALUES ({t1}, 7, 70) RETURNING id) SELECT id FROM x"
        ),
        format!("WITH x AS (INSERT INTO orders VALUES ({t1}, 8, 80) RETURNING id) SELECT id FROM x"),
        format!("WITH x AS (INSERT INTO orders VALUES ({t1}, 9, 90) RETURNING id) SELECT id FROM x WHERE {t0} > 0"),
    ];
    for (sql, id) in runs.iter().zip(["7", "8", "9"]) {
        assert_eq!(rows(c.simple_query(sql).await.unwrap()), vec![vec![Some(id.to_string())]], "{sql}");
        let on_shard_0 = placement(&h, 2).await.swap_remove(0);
        assert!(on_shard_0.iter().all(|r| r[0] == Some(t0.to_string())), "{sql} stranded a row: {on_shard_0:?}");
    }
    c.batch_execute(&format!("SET shardgate.tenant = {t0}")).await.unwrap();
    let sql = "WITH x AS (INSERT INTO orders VALUES ($1, 10, 100) RETURNING id) SELECT id FROM x";
    assert_eq!(c.query(sql, &[&t1]).await.unwrap().len(), 1, "{sql}");
    c.batch_execute("RESET shardgate.tenant").await.unwrap();
    // An UPDATE pinned to its tenant.
    let sql = format!("WITH u AS (UPDATE orders SET total = total + 1 WHERE tenant_id = {t1} AND id = 1 RETURNING id) SELECT count(*) FROM u");
    assert_eq!(rows(c.simple_query(&sql).await.unwrap()), vec![vec![Some("1".to_string())]]);

    let before = placement(&h, 2).await;
    for sql in [
        // A DELETE that names no tenant would run on every shard.
        "WITH d AS (DELETE FROM orders WHERE id = 2 RETURNING *) SELECT count(*) FROM d".to_string(),
        "EXPLAIN ANALYZE DELETE FROM orders WHERE id = 2".to_string(),
        // Rows for two shards, or a read of another shard's tenant beside the write.
        format!("WITH x AS (INSERT INTO orders VALUES ({t0}, 11, 0), ({t1}, 11, 0) RETURNING *) SELECT count(*) FROM x"),
        format!("WITH x AS (INSERT INTO orders VALUES ({t1}, 12, 0) RETURNING *) SELECT count(*) FROM orders WHERE tenant_id = {t0}"),
        format!("WITH d AS (DELETE FROM orders WHERE tenant_id = {t0} RETURNING id) UPDATE orders SET total = 0 WHERE tenant_id = {t1}"),
    ] {
        let e = c.simple_query(&sql).await.unwrap_err();
        assert_eq!(sqlstate(&e), "0A000", "{sql}: {e:?}");
        assert_eq!(e.as_db_error().unwrap().message(), SEVERAL_SHARDS, "{sql}");
    }
    assert_eq!(placement(&h, 2).await, before, "the refused statements changed nothing");
    assert_eq!(before[0], vec![row(t0, 1, "10"), row(t0, 2, "20")], "no row of {t1} on shard 0");
    assert_eq!(
        before[1],
        // In text order, as `placement` reads them.
        vec![row(t1, 1, "31"), row(t1, 10, "100"), row(t1, 7, "70"), row(t1, 8, "80"), row(t1, 9, "90")]
    );
}

/// SQL PREPARE and EXECUTE, carried by the session: each EXECUTE runs on the
/// shard of the tenant its arguments name, with the parameter types the
/// PREPARE declared; errors come where Postgres gives them; DEALLOCATE and
/// another session see what they would on one server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_prepare_and_execute_run_each_execution_on_its_tenants_shard() {
    let (h, c, t0, t1) = two_tenants_with_orders().await;
    let row = |t: i64, id: i64, total: &str| vec![Some(t.to_string()), Some(id.to_string()), Some(total.to_string())];
    let one = |sql: &str, msgs: Vec<tokio_postgres::SimpleQueryMessage>| {
        let r = rows(msgs);
        assert_eq!(r.len(), 1, "{sql}: {r:?}");
        r.into_iter().next().unwrap()
    };
    c.simple_query("PREPARE ins (bigint, int, numeric) AS INSERT INTO orders VALUES ($1, $2, $3)").await.unwrap();
    for (t, id) in [(t1, 5), (t0, 5), (t1, 6)] {
        c.simple_query(&format!("EXECUTE ins({t}, {id}, {id}0)")).await.unwrap();
    }
    let after = placement(&h, 2).await;
    assert_eq!(after[0], vec![row(t0, 1, "10"), row(t0, 2, "20"), row(t0, 5, "50")]);
    assert_eq!(after[1], vec![row(t1, 1, "30"), row(t1, 5, "50"), row(t1, 6, "60")]);

    // Reads, by the tenant of the argument, on either shard.
    c.simple_query("PREPARE ids AS SELECT string_agg(id::text, ',' ORDER BY id) FROM orders WHERE tenant_id = $1")
        .await
        .unwrap();
    for (t, want) in [(t0, "1,2,5"), (t1, "1,5,6"), (t0, "1,2,5")] {
        let sql = format!("EXECUTE ids({t})");
        assert_eq!(one(&sql, c.simple_query(&sql).await.unwrap()), vec![Some(want.to_string())], "{sql}");
    }
    // The declared type is the parameter's, as on one server: '41' is an int.
    c.simple_query("PREPARE typed (int) AS SELECT pg_typeof($1)::text, $1 + 1").await.unwrap();
    let r = one("typed", c.simple_query("EXECUTE typed('41')").await.unwrap());
    assert_eq!(r, vec![Some("integer".to_string()), Some("42".to_string())]);
    c.simple_query("PREPARE constant AS SELECT 7").await.unwrap();
    assert_eq!(one("constant", c.simple_query("execute constant").await.unwrap()), vec![Some("7".to_string())]);

    // Inside a transaction: it follows the block and rolls back with it.
    c.batch_execute("BEGIN").await.unwrap();
    c.simple_query(&format!("EXECUTE ins({t0}, 9, 90)")).await.unwrap();
    let sql = format!("EXECUTE ids({t0})");
    assert_eq!(one(&sql, c.simple_query(&sql).await.unwrap()), vec![Some("1,2,5,9".to_string())]);
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(placement(&h, 2).await, after, "the rolled-back EXECUTE left nothing");

    // Errors, each with Postgres's SQLSTATE, and nothing written by them.
    for (sql, code) in [
        ("PREPARE ins AS SELECT 1".to_string(), "42P05"),
        ("PREPARE bad AS SELECT * FROM no_such_table".to_string(), "42P01"),
        ("EXECUTE bad".to_string(), "26000"),
        ("EXECUTE nope(1)".to_string(), "26000"),
        (format!("EXECUTE ins({t1}, 7)"), "42601"),
        // No constant tenant among the arguments: it would read every shard.
        ("EXECUTE ids(random()::bigint)".to_string(), "0A000"),
        // Beside another statement or under EXPLAIN, it is not the session's.
        (format!("SELECT 1; EXECUTE ids({t0})"), "0A000"),
        (format!("EXPLAIN EXECUTE ids({t0})"), "0A000"),
    ] {
        let e = c.simple_query(&sql).await.unwrap_err();
        assert_eq!(sqlstate(&e), code, "{sql}: {e:?}");
    }
    assert_eq!(placement(&h, 2).await, after, "the refused statements changed nothing");

    // A column renamed under a prepared statement: Postgres's own error, once,
    // on the connection that had it and on one that prepares it afresh.
    c.simple_query("PREPARE totals AS SELECT total FROM orders WHERE tenant_id = $1").await.unwrap();
    c.simple_query(&format!("EXECUTE totals({t0})")).await.unwrap();
    c.batch_execute("ALTER TABLE orders RENAME COLUMN total TO amount").await.unwrap();
    for t in [t0, t1] {
        let e = c.simple_query(&format!("EXECUTE totals({t})")).await.unwrap_err();
        assert_eq!(sqlstate(&e), "42703", "{e:?}");
    }
    c.batch_execute("ALTER TABLE orders RENAME COLUMN amount TO total").await.unwrap();

    // Another session has none of them, though it may draw the same server
    // connections.
    let other = h.client().await;
    let e = other.simple_query(&format!("EXECUTE ids({t0})")).await.unwrap_err();
    assert_eq!(sqlstate(&e), "26000", "{e:?}");
    // DEALLOCATE forgets one, DEALLOCATE ALL the rest; the name is free again.
    c.simple_query("DEALLOCATE ins").await.unwrap();
    let e = c.simple_query(&format!("EXECUTE ins({t0}, 8, 0)")).await.unwrap_err();
    assert_eq!(sqlstate(&e), "26000", "{e:?}");
    c.simple_query("DEALLOCATE ALL").await.unwrap();
    let e = c.simple_query(&format!("EXECUTE ids({t0})")).await.unwrap_err();
    assert_eq!(sqlstate(&e), "26000", "{e:?}");
    c.simple_query("PREPARE ids AS SELECT count(*) FROM orders WHERE tenant_id = $1").await.unwrap();
    let sql = format!("EXECUTE ids({t1})");
    assert_eq!(one(&sql, c.simple_query(&sql).await.unwrap()), vec![Some("3".to_string())]);
    // The protocol-level prepared statements still route per execution.
    let insert = c.prepare("INSERT INTO orders VALUES ($1, $2, 0)").await.unwrap();
    c.execute(&insert, &[&t1, &8i64]).await.unwrap();
    c.execute(&insert, &[&t0, &8i64]).await.unwrap();
    let last = placement(&h, 2).await;
    assert!(
        last[0].iter().all(|r| r[0] == Some(t0.to_string())) && last[1].iter().all(|r| r[0] == Some(t1.to_string()))
    );
    assert_eq!((last[0].len(), last[1].len()), (4, 4));
}

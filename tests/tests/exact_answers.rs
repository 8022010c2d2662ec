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
    let sql = "SELECT p.id, o.id FROM plans p LEFT JOIN orders o ON o.plan = p.id AND o.tenant_id = 4";
    refused(router.simple_query(sql).await.unwrap_err(), "keeps every row of plans");
    refused(router.query(sql, &[]).await.unwrap_err(), "keeps every row of plans");
    // Named as one tenant's read, its shard answers it exactly.
    let tenant = format!("/* tenant_id=4 */ {sql}");
    assert_eq!(
        sorted(rows(router.simple_query(&tenant).await.unwrap())),
        sorted(rows(one.simple_query(sql).await.unwrap()))
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_prepare_and_execute_are_refused_and_place_no_row() {
    let (h, c, t0, t1) = two_tenants_with_orders().await;
    let before = placement(&h, 2).await;
    for (sql, message) in [
        ("PREPARE ins AS INSERT INTO orders VALUES ($1, $2, $3)".to_string(), "PREPARE ins is not supported: "),
        ("PREPARE one AS SELECT 1".to_string(), "PREPARE one is not supported: "),
        (format!("EXECUTE ins({t1}, 5, 0)"), "EXECUTE ins is not supported: "),
        (format!("EXECUTE ins({t0}, 5, 0)"), "EXECUTE ins is not supported: "),
    ] {
        let e = c.simple_query(&sql).await.unwrap_err();
        assert_eq!(sqlstate(&e), "0A000", "{sql}: {e:?}");
        let db = e.as_db_error().unwrap();
        assert!(db.message().starts_with(message), "{sql}: {}", db.message());
        assert!(db.hint().unwrap_or_default().contains("protocol-level prepared statements"), "{sql}");
    }
    // DEALLOCATE is answered like a Close: nothing named "ins" was prepared.
    let e = c.simple_query("DEALLOCATE ins").await.unwrap_err();
    assert_eq!(sqlstate(&e), "26000", "{e:?}");
    c.simple_query("DEALLOCATE ALL").await.unwrap();
    // The protocol-level prepared statements the hint names: routed per execution.
    let insert = c.prepare("INSERT INTO orders VALUES ($1, $2, 0)").await.unwrap();
    c.execute(&insert, &[&t1, &5i64]).await.unwrap();
    c.execute(&insert, &[&t0, &5i64]).await.unwrap();
    let after = placement(&h, 2).await;
    let ids =
        |shard: &Vec<Vec<Option<String>>>| shard.iter().map(|r| r[1].clone().unwrap_or_default()).collect::<Vec<_>>();
    assert_eq!(ids(&after[0]), vec!["1", "2", "5"], "{before:?} -> {after:?}");
    assert_eq!(ids(&after[1]), vec!["1", "5"]);
    assert!(
        after[0].iter().all(|r| r[0] == Some(t0.to_string())) && after[1].iter().all(|r| r[0] == Some(t1.to_string()))
    );
}

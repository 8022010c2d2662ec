//! Text and uuid tenant keys route like bigint ones: by Postgres's own hash.

use shardgate_directory::{KeyType, TenantKey};
use shardgate_router::config::RouterConfig;
use shardgate_tests::{sqlstate, Harness};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_keys_route_from_literals_and_parameters() {
    let h = Harness::start_keyed(2, RouterConfig::default(), KeyType::Text).await;
    let c = h.client().await;
    c.batch_execute("CREATE TABLE notes (tenant_id text, id int, body text, PRIMARY KEY (tenant_id, id))")
        .await
        .unwrap();
    let tenants: Vec<String> = (0..40).map(|i| format!("acme-{i}")).collect();
    for (i, t) in tenants.iter().enumerate() {
        if i % 2 == 0 {
            c.batch_execute(&format!("INSERT INTO notes VALUES ('{t}', 1, 'x')")).await.unwrap();
        } else {
            c.execute("INSERT INTO notes VALUES ($1, 1, 'x')", &[t]).await.unwrap();
        }
    }
    let dir = h.directory.load();
    for i in 0..2 {
        let rows = h.shard(i).await.query("SELECT tenant_id FROM notes", &[]).await.unwrap();
        for r in &rows {
            let t: String = r.get(0);
            assert_eq!(dir.shard_for(&TenantKey::Text(t.clone())), i, "{t} on the wrong shard");
        }
    }
    let n = c.query("SELECT * FROM notes WHERE tenant_id = $1", &[&"acme-7"]).await.unwrap().len();
    assert_eq!(n, 1);
    // The shard itself agrees on the bucket.
    let row = h
        .shard(0)
        .await
        .query_one("SELECT (hashtextextended('acme-7', 0) & 9223372036854775807) % 64", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0) as u32, dir.bucket_of(&TenantKey::Text("acme-7".into())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uuid_keys_route_from_binary_parameters_and_bad_ones_are_errors() {
    let h = Harness::start_keyed(2, RouterConfig::default(), KeyType::Uuid).await;
    let c = h.client().await;
    c.batch_execute("CREATE TABLE events (tenant_id uuid, id int, PRIMARY KEY (tenant_id, id))").await.unwrap();
    let ids: Vec<uuid::Uuid> = (0..40u128).map(|i| uuid::Uuid::from_u128(i * 0x0123_4567_89ab_cdef_1111 + 7)).collect();
    for u in &ids {
        c.execute("INSERT INTO events VALUES ($1, 1)", &[u]).await.unwrap();
    }
    let dir = h.directory.load();
    let mut seen = 0;
    for i in 0..2 {
        let rows = h.shard(i).await.query("SELECT tenant_id FROM events", &[]).await.unwrap();
        for r in &rows {
            let u: uuid::Uuid = r.get(0);
            assert_eq!(dir.shard_for(&TenantKey::Uuid(u)), i);
            seen += 1;
        }
    }
    assert_eq!(seen, 40);
    let err = c.simple_query("SELECT * FROM events WHERE tenant_id = 'not-a-uuid'").await.unwrap_err();
    assert_eq!(sqlstate(&err), "22P02");
}

/// Binary COPY (tokio-postgres's BinaryCopyInWriter) reads a uuid key's 16
/// bytes and a text key's UTF-8 into the keys their text forms give: each
/// row lands where a query for its tenant looks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_copy_routes_uuid_and_text_keys_as_their_text_forms() {
    use tokio_postgres::binary_copy::BinaryCopyInWriter;
    use tokio_postgres::types::{ToSql, Type};
    for key_type in [KeyType::Uuid, KeyType::Text] {
        let h = Harness::start_keyed(2, RouterConfig::default(), key_type).await;
        let c = h.client().await;
        let create =
            format!("CREATE TABLE events (tenant_id {}, id int, PRIMARY KEY (tenant_id, id))", key_type.sql_name());
        c.batch_execute(&create).await.unwrap();
        let sink = c.copy_in("COPY events (tenant_id, id) FROM STDIN (FORMAT binary)").await.unwrap();
        let ty = if key_type == KeyType::Uuid { Type::UUID } else { Type::TEXT };
        let writer = BinaryCopyInWriter::new(sink, &[ty, Type::INT4]);
        futures::pin_mut!(writer);
        for i in 0..100i32 {
            let u = uuid::Uuid::from_u128(i as u128 * 0x0123_4567_89ab_cdef_1111 + 7);
            let t = format!("acme-{i} ✓");
            let key: &(dyn ToSql + Sync) = if key_type == KeyType::Uuid { &u } else { &t };
            writer.as_mut().write(&[key, &i]).await.unwrap();
        }
        assert_eq!(writer.finish().await.unwrap(), 100);
        let dir = h.directory.load();
        let mut seen = 0;
        for i in 0..2 {
            let rows = h.shard(i).await.query("SELECT tenant_id::text FROM events", &[]).await.unwrap();
            for r in &rows {
                let text: String = r.get(0);
                assert_eq!(dir.shard_for(&key_type.parse_text(&text).unwrap()), i, "{text} on shard {i}");
                seen += 1;
            }
        }
        assert_eq!(seen, 100, "{key_type:?}");
        if key_type == KeyType::Text {
            let found = c.simple_query("SELECT id FROM events WHERE tenant_id = 'acme-7 ✓'").await.unwrap();
            assert_eq!(shardgate_tests::rows(found), vec![vec![Some("7".to_string())]]);
        }
    }
}

/// The routes counted so far (`shardgate_queries_total`), by kind.
fn routes(h: &Harness, kind: &str) -> u64 {
    let text = shardgate_router::metrics::render(&h.router.context);
    let line = format!("shardgate_queries_total{{route=\"{kind}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&line)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// `tenant_id = ANY($1)` with an array of keys, and `= ANY(ARRAY[…])`, go to
/// just the shards holding those tenants: one shard when they share it, a
/// read over those shards when they do not; a write over several is refused as
/// any cross-shard write is. Answers are whole either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_in_an_array_route_to_the_shards_that_hold_them() {
    let h = Harness::start(3).await;
    let c = h.client().await;
    c.batch_execute("CREATE TABLE orders (tenant_id bigint, id int, total int, PRIMARY KEY (tenant_id, id))")
        .await
        .unwrap();
    for t in 1..=30i64 {
        c.execute("INSERT INTO orders VALUES ($1, 1, $2), ($1, 2, $2)", &[&t, &(t as i32)]).await.unwrap();
    }
    let same: Vec<i64> = h.tenants_on(1, 3);
    let spread: Vec<i64> = vec![h.tenants_on(0, 1)[0], h.tenants_on(2, 1)[0]];
    let count = |rows: &[tokio_postgres::Row]| rows.len();

    // Binary array parameter (what drivers send), tenants on one shard.
    let before = routes(&h, "shard");
    let rows =
        c.query("SELECT * FROM orders WHERE tenant_id = ANY($1) ORDER BY tenant_id, id", &[&same]).await.unwrap();
    assert_eq!(count(&rows), 6);
    assert_eq!(routes(&h, "shard"), before + 1, "one shard, not a fan-out");

    // Tenants on two shards: read from those, answered whole and in order.
    let before = routes(&h, "fanout");
    let rows =
        c.query("SELECT tenant_id FROM orders WHERE tenant_id = ANY($1) ORDER BY tenant_id", &[&spread]).await.unwrap();
    let got: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    let mut want: Vec<i64> = spread.iter().flat_map(|t| [*t, *t]).collect();
    want.sort();
    assert_eq!(got, want);
    assert_eq!(routes(&h, "fanout"), before + 1);

    // A text array parameter, and ARRAY[…] literals in a simple query.
    let text = format!("{{{}}}", same.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(","));
    let before = routes(&h, "shard");
    let rows = c.query("SELECT * FROM orders WHERE tenant_id = ANY($1::text::bigint[])", &[&text]).await;
    // (tokio-postgres sends text parameters as text: the cast makes it an array on the server.)
    assert!(rows.is_ok(), "{rows:?}");
    let list = same.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ");
    let r = c.simple_query(&format!("SELECT * FROM orders WHERE tenant_id = ANY(ARRAY[{list}])")).await.unwrap();
    let n = r.iter().filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))).count();
    assert_eq!(n, 6);
    assert!(routes(&h, "shard") > before);

    // Writes: one shard runs; several run together (two-phase commit,
    // tests/tests/two_phase.rs), and the count is theirs summed.
    let n = c.execute("UPDATE orders SET total = total + 1 WHERE tenant_id = ANY($1)", &[&same]).await.unwrap();
    assert_eq!(n, 6);
    let want: i64 =
        c.query_one("SELECT count(*) FROM orders WHERE tenant_id = ANY($1)", &[&spread]).await.unwrap().get(0);
    let n = c.execute("UPDATE orders SET total = 0 WHERE tenant_id = ANY($1)", &[&spread]).await.unwrap();
    assert_eq!(n as i64, want);
    let zeroed: i64 = c
        .query_one("SELECT count(*) FROM orders WHERE tenant_id = ANY($1) AND total = 0", &[&spread])
        .await
        .unwrap()
        .get(0);
    assert_eq!(zeroed, want);
    // An empty array and an array with only NULLs match nothing, anywhere.
    let none: Vec<Option<i64>> = vec![None];
    assert_eq!(
        c.query("SELECT * FROM orders WHERE tenant_id = ANY($1)", &[&Vec::<i64>::new()]).await.unwrap().len(),
        0
    );
    assert_eq!(c.query("SELECT * FROM orders WHERE tenant_id = ANY($1)", &[&none]).await.unwrap().len(), 0);
}

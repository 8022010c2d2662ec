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

//! Bucket sizes read from the shards match what the shards hold, and the status
//! views (`GET /status`, the web page's events) carry each shard's share.

use std::time::Duration;

use shardgate_router::sizes::{measure, SizeCache};
use shardgate_tests::checker::wait_for;
use shardgate_tests::Harness;

/// Rows and data bytes of `orders` straight on shard `i`.
async fn on_shard(h: &Harness, i: usize) -> (u64, u64) {
    let row = h
        .shard(i)
        .await
        .query_one("SELECT count(*), coalesce(sum(pg_column_size(x.*)), 0)::bigint FROM orders x", &[])
        .await
        .unwrap();
    (row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sizes_match_the_shards_and_reach_the_status() {
    let h = Harness::start(2).await;
    let c = h.client().await;
    c.batch_execute("CREATE TABLE orders (tenant_id bigint, id bigint, note text, PRIMARY KEY (tenant_id, id))")
        .await
        .unwrap();
    let a = h.tenants_on(0, 2);
    let b = h.tenants_on(1, 1)[0];
    for (tenant, rows) in [(a[0], 30), (a[1], 5), (b, 12)] {
        c.simple_query(&format!(
            "/* tenant_id={tenant} */ INSERT INTO orders SELECT {tenant}, g, repeat('x', g::int) FROM generate_series(1, {rows}) g"
        ))
        .await
        .unwrap();
    }
    let ctx = h.router.context.clone();
    assert!(admin_status(&h).shards.iter().all(|s| s.bytes.is_none()), "no sizes before a measurement");

    let sizes = measure(&ctx).await.unwrap();
    for (i, name) in ["shard_0", "shard_1"].iter().enumerate() {
        let (rows, bytes) = on_shard(&h, i).await;
        let mine: Vec<_> = sizes.buckets.iter().filter(|x| x.shard == *name).collect();
        assert_eq!(mine.iter().map(|x| x.rows).sum::<u64>(), rows, "{name} rows");
        // pg_column_size of a row differs by a byte here and there with the
        // plan that forms it (short or long varlena headers): close, not equal.
        let measured = mine.iter().map(|x| x.bytes).sum::<u64>();
        assert!(measured.abs_diff(bytes) * 50 <= bytes, "{name} bytes: measured {measured}, on the shard {bytes}");
    }
    assert_eq!(sizes.tenants[0].tenant, a[0].to_string(), "the largest tenant first");

    // A page watching the node has it measured in the background.
    assert!(ctx.sizes.per_shard().is_none());
    SizeCache::refresh_if_stale(&ctx);
    wait_for("the background measurement", Duration::from_secs(20), || ctx.sizes.per_shard().is_some()).await;
    let status = admin_status(&h);
    assert!(status.sizes_age_ms.is_some());
    for s in &status.shards {
        let measured = sizes.buckets.iter().filter(|x| x.shard == s.name);
        let (rows, bytes) = measured.fold((0, 0), |(r, b), x| (r + x.rows, b + x.bytes));
        assert_eq!((s.rows, s.bytes), (Some(rows), Some(bytes)), "{}", s.name);
    }
}

fn admin_status(h: &Harness) -> shardgate_router::admin::api::Status {
    shardgate_router::admin::status(&h.router.context)
}

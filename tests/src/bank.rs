//! A small bank for tests of transactions across shards: one account per
//! tenant, and reads of what each shard holds, straight from the shards.

use std::time::{Duration, Instant};

use crate::Harness;

/// The accounts table.
pub const SCHEMA: &str =
    "CREATE TABLE acct (tenant_id bigint, id int, bal bigint NOT NULL, PRIMARY KEY (tenant_id, id))";

/// A cluster of `n` shards, one tenant on each with 100 in its account.
pub async fn bank(n: usize) -> (Harness, Vec<i64>) {
    let h = Harness::start(n).await;
    let tenants: Vec<i64> = (0..n).map(|s| h.tenants_on(s, 1)[0]).collect();
    let c = h.client().await;
    c.batch_execute(SCHEMA).await.unwrap();
    for t in &tenants {
        c.execute("INSERT INTO acct VALUES ($1, 1, 100)", &[t]).await.unwrap();
    }
    (h, tenants)
}

/// Each tenant's balance, read on its own shard directly.
pub async fn balances(h: &Harness, tenants: &[i64]) -> Vec<i64> {
    let mut out = Vec::new();
    for t in tenants {
        let row = h.shard(h.shard_of(*t)).await.query_one("SELECT bal FROM acct WHERE tenant_id = $1", &[t]).await;
        out.push(row.unwrap().get(0));
    }
    out
}

/// Prepared transactions left on the shards, all of them.
pub async fn prepared(h: &Harness, shards: usize) -> Vec<String> {
    let mut out = Vec::new();
    for s in 0..shards {
        for r in h.shard(s).await.query("SELECT gid FROM pg_prepared_xacts", &[]).await.unwrap() {
            out.push(r.get(0));
        }
    }
    out
}

/// How many rows `sql` counts on each shard, read directly.
pub async fn count_on_each(h: &Harness, shards: usize, sql: &str) -> Vec<i64> {
    let mut out = Vec::new();
    for s in 0..shards {
        out.push(h.shard(s).await.query_one(sql, &[]).await.unwrap().get(0));
    }
    out
}

/// Rows of `acct` on all shards.
pub async fn rows(h: &Harness, shards: usize) -> i64 {
    let mut n = 0;
    for s in 0..shards {
        n += h.shard(s).await.query_one("SELECT count(*) FROM acct", &[]).await.unwrap().get::<_, i64>(0);
    }
    n
}

/// Waits (polling, 20 s at most) until no prepared transaction is left.
pub async fn until_settled(h: &Harness, shards: usize) {
    let start = Instant::now();
    loop {
        let left = prepared(h, shards).await;
        if left.is_empty() {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "still prepared after 20 s: {left:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

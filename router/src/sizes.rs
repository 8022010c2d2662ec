//! How big each bucket is, read from the shards: rows and bytes per bucket (all
//! sharded tables together), and the largest tenants. What `shardgate rebalance`
//! plans with and what the status views chart.
//!
//! Exactness: a table of up to [`EXACT_ROWS`] rows (by the planner's estimate,
//! `pg_class.reltuples`) is read whole and counted exactly. A bigger one is read
//! through `TABLESAMPLE SYSTEM` at a rate that reads about that many rows, and the
//! counts are scaled up: block sampling is cheap but coarse, so a bucket's figure
//! is then an estimate (to within a few percent for buckets of many blocks; rows
//! clustered in few blocks vary more). Bytes are `pg_column_size` of each row,
//! the size of its data without page and index overhead. Each shard counts only
//! the rows it owns: buckets placed on it and tenants pinned to it (rows of a move
//! under way on its other shard are left out).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shardgate_directory::hash::bucket_sql;
use shardgate_directory::{Directory, ShardId};

use crate::context::RouterContext;
use crate::sql::quote;

/// Tables up to this many rows are counted exactly; larger ones are sampled.
pub const EXACT_ROWS: f64 = 1_000_000.0;
/// The largest tenants reported (per shard, then overall).
const TOP_TENANTS: usize = 20;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Sizes {
    /// One entry per bucket, in bucket order.
    pub buckets: Vec<BucketSize>,
    /// The largest tenants by bytes, biggest first.
    pub tenants: Vec<TenantSize>,
    /// Pinned tenants, each counted on its own shard.
    pub pins: Vec<TenantSize>,
    /// Tables that were sampled: shard, table and the percentage of blocks read.
    pub sampled: Vec<(String, String, f64)>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BucketSize {
    pub bucket: u32,
    pub shard: String,
    pub rows: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TenantSize {
    pub tenant: String,
    pub bucket: u32,
    pub shard: String,
    pub rows: u64,
    pub bytes: u64,
}

/// Reads the sizes from every live shard (one scan, or one sample, per table).
pub async fn measure(ctx: &RouterContext) -> Result<Sizes, String> {
    let dir = ctx.directory.load();
    let tables = ctx.catalog.tables();
    let mut sizes = Sizes {
        buckets: (0..dir.bucket_count)
            .map(|b| BucketSize {
                bucket: b,
                shard: shard_name(&dir, dir.placements[b as usize]),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let mut tenants: Vec<TenantSize> = Vec::new();
    for (shard, s) in dir.live_shards() {
        let pool = ctx.pool(shard).ok_or_else(|| format!("no pool for shard {}", s.name))?;
        let mut conn = pool.get().await.map_err(|e| e.to_string())?;
        let pinned_here: Vec<String> =
            dir.pins.iter().filter(|(_, p)| **p == shard).map(|(k, _)| quote::key_literal(k, dir.key_type)).collect();
        let all_pinned: Vec<String> = dir.pins.keys().map(|k| quote::key_literal(k, dir.key_type)).collect();
        for table in &tables {
            let sql_table = quote::table(table);
            let estimate = conn
                .simple_query(&format!(
                    "SELECT reltuples::float8 FROM pg_class WHERE oid = {}::regclass",
                    quote::literal(&sql_table)
                ))
                .await;
            let estimate = match estimate {
                Ok(r) => r,
                // A shard added since the table was created has none of it yet
                // (a move creates it there): nothing to count.
                Err((c, _)) if c == "42P01" => continue,
                Err((c, m)) => return Err(format!("shard {}: {c}: {m}", s.name)),
            };
            let estimate: f64 =
                estimate.first().and_then(|r| r.first()).and_then(|v| v.as_deref()?.parse().ok()).unwrap_or(0.0);
            let (sample, scale) = if estimate > EXACT_ROWS {
                let pct = (100.0 * EXACT_ROWS / estimate).clamp(0.01, 100.0);
                sizes.sampled.push((s.name.clone(), table.clone(), pct));
                (format!(" TABLESAMPLE SYSTEM ({pct})"), 100.0 / pct)
            } else {
                (String::new(), 1.0)
            };
            let col = quote::ident(&dir.key_column);
            let b = bucket_sql(&format!("x.{col}"), dir.key_type, dir.bucket_count);
            let not_pinned = if all_pinned.is_empty() {
                String::new()
            } else {
                format!(" WHERE x.{col} NOT IN ({})", all_pinned.join(", "))
            };
            let rows = conn
                .simple_query(&format!(
                    "SELECT {b}, count(*), coalesce(sum(pg_column_size(x.*)), 0) FROM {sql_table} x{sample}{not_pinned} GROUP BY 1"
                ))
                .await
                .map_err(|(c, m)| format!("shard {}: {table}: {c}: {m}", s.name))?;
            for r in rows {
                let (Some(bucket), rows, bytes) = (num(&r, 0), num(&r, 1), num(&r, 2)) else { continue };
                let bucket = bucket as u32;
                // Only the buckets this shard owns: a move's other copy is not counted.
                if dir.placements.get(bucket as usize) != Some(&shard) {
                    continue;
                }
                let e = &mut sizes.buckets[bucket as usize];
                e.rows += (rows.unwrap_or(0) as f64 * scale) as u64;
                e.bytes += (bytes.unwrap_or(0) as f64 * scale) as u64;
            }
            // The largest tenants of the shard, and its pinned tenants.
            let only_pinned = format!(" WHERE x.{col} IN ({})", pinned_here.join(", "));
            for (filter, pinned) in [(not_pinned.as_str(), false), (only_pinned.as_str(), true)] {
                if pinned && pinned_here.is_empty() {
                    continue;
                }
                let limit = if pinned { String::new() } else { format!(" ORDER BY 4 DESC LIMIT {TOP_TENANTS}") };
                let rows = conn
                    .simple_query(&format!(
                        "SELECT x.{col}::text, {b}, count(*), coalesce(sum(pg_column_size(x.*)), 0) \
                         FROM {sql_table} x{sample}{filter} GROUP BY 1, 2{limit}"
                    ))
                    .await
                    .map_err(|(c, m)| format!("shard {}: {table}: {c}: {m}", s.name))?;
                for r in rows {
                    let (Some(tenant), Some(bucket)) = (r.first().cloned().flatten(), num(&r, 1)) else { continue };
                    if !pinned && dir.placements.get(bucket as usize) != Some(&shard) {
                        continue;
                    }
                    let t = TenantSize {
                        tenant,
                        bucket: bucket as u32,
                        shard: s.name.clone(),
                        rows: (num(&r, 2).unwrap_or(0) as f64 * scale) as u64,
                        bytes: (num(&r, 3).unwrap_or(0) as f64 * scale) as u64,
                    };
                    let list = if pinned { &mut sizes.pins } else { &mut tenants };
                    match list.iter_mut().find(|x| x.tenant == t.tenant) {
                        Some(x) => {
                            x.rows += t.rows;
                            x.bytes += t.bytes;
                        }
                        None => list.push(t),
                    }
                }
            }
        }
    }
    tenants.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.tenant.cmp(&b.tenant)));
    tenants.truncate(TOP_TENANTS);
    sizes.tenants = tenants;
    Ok(sizes)
}

/// The last measurement this node made, for the status views: `GET /sizes`
/// stores what it read, and a web page open on the node has it measured again
/// once it is older than [`SizeCache::MAX_AGE`].
#[derive(Default)]
pub struct SizeCache {
    last: Mutex<Option<(Instant, Arc<Sizes>)>>,
    measuring: AtomicBool,
}

/// One shard's share of a measurement.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardSize {
    pub rows: u64,
    pub bytes: u64,
}

impl SizeCache {
    /// How old a measurement may get while someone watches the web page. Each
    /// measurement reads every sharded table once (sampled when big).
    pub const MAX_AGE: Duration = Duration::from_secs(30);

    pub fn store(&self, sizes: &Sizes) {
        *self.lock() = Some((Instant::now(), Arc::new(sizes.clone())));
    }

    /// Rows and bytes per shard name from the last measurement, and its age.
    pub fn per_shard(&self) -> Option<(Duration, HashMap<String, ShardSize>)> {
        let (at, sizes) = self.lock().clone()?;
        let mut out: HashMap<String, ShardSize> = HashMap::new();
        for t in sizes
            .buckets
            .iter()
            .map(|b| (&b.shard, b.rows, b.bytes))
            .chain(sizes.pins.iter().map(|p| (&p.shard, p.rows, p.bytes)))
        {
            let e = out.entry(t.0.clone()).or_default();
            e.rows += t.1;
            e.bytes += t.2;
        }
        Some((at.elapsed(), out))
    }

    /// Measures again in the background when the last measurement is missing or
    /// older than [`Self::MAX_AGE`]; one measurement at a time.
    pub fn refresh_if_stale(ctx: &Arc<RouterContext>) {
        let cache = &ctx.sizes;
        let fresh = cache.lock().as_ref().is_some_and(|(at, _)| at.elapsed() < Self::MAX_AGE);
        if fresh || cache.measuring.swap(true, Ordering::AcqRel) {
            return;
        }
        let ctx = ctx.clone();
        tokio::spawn(async move {
            match measure(&ctx).await {
                Ok(sizes) => ctx.sizes.store(&sizes),
                Err(e) => tracing::debug!(error = %e, "could not read bucket sizes for the status views"),
            }
            ctx.sizes.measuring.store(false, Ordering::Release);
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Instant, Arc<Sizes>)>> {
        self.last.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn shard_name(dir: &Directory, s: ShardId) -> String {
    dir.shards.get(s).map(|x| x.name.clone()).unwrap_or_default()
}

fn num(r: &[Option<String>], i: usize) -> Option<i64> {
    r.get(i)?.as_deref()?.parse::<f64>().ok().map(|v| v as i64)
}

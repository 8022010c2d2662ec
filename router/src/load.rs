//! What each bucket and the busiest tenants cost this router: statements, rows
//! written and time spent, for `shardgate rebalance --strategy load` and whale
//! detection. Per bucket it is three atomic adds per statement; per tenant it is
//! a sample (one statement in [`TENANT_SAMPLE`]) into a bounded map, scaled up.
//! The router sends a summary to the directory every few heartbeats.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use shardgate_directory::state::{LoadCount, LoadReport, TenantLoadCount};

/// One statement in this many is counted for its tenant.
pub const TENANT_SAMPLE: u64 = 8;
/// Tenants tracked at most; when full, the least busy half is forgotten.
const TENANTS_TRACKED: usize = 4096;
/// Tenants reported.
const TENANTS_REPORTED: usize = 20;

#[derive(Default, Clone, Copy)]
struct Counts {
    statements: u64,
    rows: u64,
    micros: u64,
}

/// One bucket's counters, side by side: a statement touches one cache line.
#[derive(Default)]
struct BucketCounts {
    statements: AtomicU64,
    rows: AtomicU64,
    micros: AtomicU64,
}

pub struct Load {
    buckets: Box<[BucketCounts]>,
    tick: AtomicU64,
    tenants: Mutex<HashMap<String, Counts>>,
}

impl Load {
    pub fn new(bucket_count: u32) -> Load {
        Load {
            buckets: (0..bucket_count).map(|_| BucketCounts::default()).collect(),
            tick: AtomicU64::new(0),
            tenants: Default::default(),
        }
    }

    /// One statement (or batch) on `buckets` took `elapsed` and wrote `rows`;
    /// shared evenly when it touched several.
    pub fn record(&self, buckets: &[u32], elapsed: Duration, rows: u64) {
        let n = buckets.len() as u64;
        if n == 0 {
            return;
        }
        let us = elapsed.as_micros() as u64 / n;
        for &b in buckets {
            if let Some(c) = self.buckets.get(b as usize) {
                c.statements.fetch_add(1, Ordering::Relaxed);
                c.rows.fetch_add(rows / n, Ordering::Relaxed);
                c.micros.fetch_add(us, Ordering::Relaxed);
            }
        }
    }

    /// Whether this statement is one of the sampled ones for tenant counts.
    pub fn sample_tenant(&self) -> bool {
        self.tick.fetch_add(1, Ordering::Relaxed).is_multiple_of(TENANT_SAMPLE)
    }

    pub fn record_tenant(&self, tenant: String, elapsed: Duration, rows: u64) {
        let mut t = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        if t.len() >= TENANTS_TRACKED && !t.contains_key(&tenant) {
            let mut by: Vec<u64> = t.values().map(|c| c.micros).collect();
            by.sort_unstable();
            let cut = by[by.len() / 2];
            t.retain(|_, c| c.micros > cut);
        }
        let c = t.entry(tenant).or_default();
        c.statements += TENANT_SAMPLE;
        c.rows += rows * TENANT_SAMPLE;
        c.micros += elapsed.as_micros() as u64 * TENANT_SAMPLE;
    }

    /// The totals since the router started.
    pub fn report(&self) -> LoadReport {
        let buckets = self
            .buckets
            .iter()
            .enumerate()
            .filter_map(|(b, c)| {
                let statements = c.statements.load(Ordering::Relaxed);
                (statements > 0).then(|| LoadCount {
                    bucket: b as u32,
                    statements,
                    rows_written: c.rows.load(Ordering::Relaxed),
                    micros: c.micros.load(Ordering::Relaxed),
                })
            })
            .collect();
        let t = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        let mut tenants: Vec<TenantLoadCount> = t
            .iter()
            .map(|(k, c)| TenantLoadCount {
                tenant: k.clone(),
                statements: c.statements,
                rows_written: c.rows,
                micros: c.micros,
            })
            .collect();
        tenants.sort_by(|a, b| b.micros.cmp(&a.micros).then_with(|| a.tenant.cmp(&b.tenant)));
        tenants.truncate(TENANTS_REPORTED);
        LoadReport { buckets, tenants }
    }
}

/// Every router's counts together, per bucket (every bucket, in order) and for
/// the busiest tenants: what `GET /load` answers.
pub fn cluster_load(dir: &shardgate_directory::Directory) -> LoadReport {
    let mut buckets: Vec<LoadCount> =
        (0..dir.bucket_count).map(|b| LoadCount { bucket: b, ..Default::default() }).collect();
    let mut tenants: HashMap<String, TenantLoadCount> = HashMap::new();
    for r in dir.load.values() {
        for c in &r.buckets {
            if let Some(x) = buckets.get_mut(c.bucket as usize) {
                x.statements += c.statements;
                x.rows_written += c.rows_written;
                x.micros += c.micros;
            }
        }
        for t in &r.tenants {
            let x = tenants
                .entry(t.tenant.clone())
                .or_insert_with(|| TenantLoadCount { tenant: t.tenant.clone(), ..Default::default() });
            x.statements += t.statements;
            x.rows_written += t.rows_written;
            x.micros += t.micros;
        }
    }
    let mut tenants: Vec<TenantLoadCount> = tenants.into_values().collect();
    tenants.sort_by(|a, b| b.micros.cmp(&a.micros).then_with(|| a.tenant.cmp(&b.tenant)));
    tenants.truncate(TENANTS_REPORTED);
    LoadReport { buckets, tenants }
}

/// The rows a CommandComplete tag reports written (`INSERT 0 5`, `UPDATE 3`,
/// `DELETE 2`, `COPY 10`, `MERGE 1`); 0 for reads and everything else.
pub fn rows_written(tag: &[u8]) -> u64 {
    // Most tags are SELECT's: skip them without decoding.
    if !matches!(tag.first(), Some(b'I' | b'U' | b'D' | b'C' | b'M')) {
        return 0;
    }
    let tag = tag.strip_suffix(&[0]).unwrap_or(tag);
    let Ok(text) = std::str::from_utf8(tag) else { return 0 };
    let mut words = text.split(' ');
    match words.next() {
        Some("INSERT" | "UPDATE" | "DELETE" | "COPY" | "MERGE") => {
            text.rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0)
        }
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_tenants_add_up() {
        let l = Load::new(4);
        l.record(&[1], Duration::from_micros(100), 2);
        l.record(&[1, 3], Duration::from_micros(100), 4);
        let r = l.report();
        assert_eq!(r.buckets.len(), 2);
        assert_eq!((r.buckets[0].bucket, r.buckets[0].statements, r.buckets[0].micros), (1, 2, 150));
        assert_eq!((r.buckets[0].rows_written, r.buckets[1].rows_written), (4, 2));
        l.record_tenant("42".into(), Duration::from_micros(10), 1);
        assert_eq!(l.report().tenants[0].statements, TENANT_SAMPLE);
        assert_eq!(rows_written(b"INSERT 0 5\0"), 5);
        assert_eq!(rows_written(b"UPDATE 3"), 3);
        assert_eq!(rows_written(b"SELECT 7"), 0);
    }
}

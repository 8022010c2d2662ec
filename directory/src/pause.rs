//! The pause clients feel: how long statements waited on each hold of a move
//! (a verify's cut, a cutover, a rollback), per router.
//!
//! Each router keeps a small histogram of its statements' waits per hold and
//! sends it with its heartbeat; the directory keeps the last few holds of each
//! move with every router's histogram, so `status` can say "57 statements held,
//! p50 12 ms, p99 40 ms, max 46 ms" for the cluster and for each router. The
//! histograms merge exactly (counts add), so the cluster's percentiles are those
//! of all statements, not an average of routers' percentiles.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Sub-buckets per power of two: a percentile is reported within 1/16 (6 %) of
/// the true wait, far finer than anyone reads a pause.
const SUB_BITS: u32 = 4;

/// How many holds of one move the directory keeps.
pub const PAUSES_KEPT: usize = 8;

/// How long one router's statements waited on one hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldStats {
    pub statements: u64,
    pub max_us: u64,
    /// A log-linear histogram of the waits in µs, sparse: (bucket, count), by
    /// bucket. See [`bucket_of`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub buckets: Vec<(u16, u64)>,
}

impl HeldStats {
    /// One statement waited `us` µs.
    pub fn record(&mut self, us: u64) {
        self.statements += 1;
        self.max_us = self.max_us.max(us);
        let b = bucket_of(us);
        match self.buckets.binary_search_by_key(&b, |(k, _)| *k) {
            Ok(i) => self.buckets[i].1 += 1,
            Err(i) => self.buckets.insert(i, (b, 1)),
        }
    }

    /// Adds another router's waits on the same hold.
    pub fn add(&mut self, o: &HeldStats) {
        self.statements += o.statements;
        self.max_us = self.max_us.max(o.max_us);
        for &(b, n) in &o.buckets {
            match self.buckets.binary_search_by_key(&b, |(k, _)| *k) {
                Ok(i) => self.buckets[i].1 += n,
                Err(i) => self.buckets.insert(i, (b, n)),
            }
        }
    }

    /// The wait that `p` (0..=1) of the statements did not exceed, in µs: the
    /// middle of its bucket, never above the longest wait.
    pub fn percentile_us(&self, p: f64) -> u64 {
        let total: u64 = self.buckets.iter().map(|(_, n)| n).sum();
        if total == 0 {
            return 0;
        }
        let rank = ((p.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for &(b, n) in &self.buckets {
            seen += n;
            if seen >= rank {
                let (low, high) = bounds_of(b);
                return (low + (high - low) / 2).min(self.max_us);
            }
        }
        self.max_us
    }
}

/// The bucket of a wait of `us` µs: below 16 µs one bucket per µs; above, 16
/// buckets per power of two.
fn bucket_of(us: u64) -> u16 {
    let sub = 1u64 << SUB_BITS;
    if us < sub {
        return us as u16;
    }
    let power = 63 - us.leading_zeros(); // us in [2^power, 2^(power+1))
    let shift = power - SUB_BITS;
    let within = (us >> shift) - sub; // 0..sub
    ((power - SUB_BITS + 1) as u64 * sub + within) as u16
}

/// The µs range [low, high) of a bucket.
fn bounds_of(b: u16) -> (u64, u64) {
    let sub = 1u64 << SUB_BITS;
    let b = b as u64;
    if b < sub {
        return (b, b + 1);
    }
    let shift = b / sub - 1;
    let low = (sub + b % sub) << shift;
    (low, low + (1 << shift))
}

/// What a hold was for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldKind {
    /// Verify's cut: statements wait while both sides take a snapshot.
    Verify,
    #[default]
    Cutover,
    Rollback,
}

impl HoldKind {
    pub fn name(self) -> &'static str {
        match self {
            HoldKind::Verify => "verify",
            HoldKind::Cutover => "cutover",
            HoldKind::Rollback => "rollback",
        }
    }
}

/// One hold of a move and what every router's statements waited on it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pause {
    pub token: u64,
    pub kind: HoldKind,
    /// When the hold started (proposer's clock, ms since the epoch).
    pub at_ms: u64,
    /// By router run (`router@started_ms`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub routers: BTreeMap<String, HeldStats>,
}

impl Pause {
    /// Every router's waits together.
    pub fn total(&self) -> HeldStats {
        let mut t = HeldStats::default();
        for s in self.routers.values() {
            t.add(s);
        }
        t
    }
}

/// One router's waits on one hold, as its heartbeat carries them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldReport {
    pub move_id: u64,
    pub token: u64,
    pub stats: HeldStats,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_wait_and_their_bounds_hold_it() {
        let mut last = 0;
        for us in (0..5000).chain([65_535, 1 << 20, 10_000_000, u32::MAX as u64]) {
            let b = bucket_of(us);
            assert!(b >= last, "buckets rise with the wait");
            last = b;
            let (low, high) = bounds_of(b);
            assert!(low <= us && us < high, "{us} µs in bucket {b} = [{low}, {high})");
            assert!(high - low <= (low / 16).max(1), "a bucket is at most 1/16 of its value wide");
        }
    }

    #[test]
    fn percentiles_of_merged_routers_are_those_of_all_statements() {
        let mut a = HeldStats::default();
        let mut b = HeldStats::default();
        for us in 1..=90 {
            a.record(us * 1000); // 1 ms … 90 ms
        }
        for us in 91..=100 {
            b.record(us * 1000); // 91 ms … 100 ms
        }
        let mut all = a.clone();
        all.add(&b);
        assert_eq!(all.statements, 100);
        assert_eq!(all.max_us, 100_000);
        let near = |got: u64, want: u64| got.abs_diff(want) <= want / 16;
        assert!(near(all.percentile_us(0.5), 50_000), "{}", all.percentile_us(0.5));
        assert!(near(all.percentile_us(0.99), 99_000), "{}", all.percentile_us(0.99));
        assert_eq!(all.percentile_us(1.0), 100_000);
        assert_eq!(HeldStats::default().percentile_us(0.5), 0);
    }
}

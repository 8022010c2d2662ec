//! The rebalance planner: which buckets (and whale tenants) to move where so that
//! shards carry a more even share of one measure — bytes, load or bucket count.
//!
//! Pure and deterministic: the same input gives the same plan, which is what an
//! operator reviewing `shardgate rebalance --dry-run` and then running `--apply`
//! needs. The greedy step is the one Citus's rebalancer and Vitess's resharding
//! advice use in spirit: take from the fullest shard, give to the emptiest, and only
//! make a move that narrows the gap between them. Every move therefore lowers the
//! sum of squared deviations from the mean, so the plan always lowers the spread
//! (or is empty), never moves a bucket twice, and stops at `max_moves`.
//!
//! Draining shards come first: all their buckets and pins are planned off them,
//! whatever that does to the spread, onto the shards with the least.

use std::collections::BTreeSet;

use serde::Serialize;
use shardgate_directory::{ShardId, TenantKey};

/// What the plan evens out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Bytes of the buckets' rows.
    Size,
    /// Work done for the buckets (statements and time, as the routers count it).
    Load,
    /// Number of buckets.
    Count,
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Strategy, String> {
        match s {
            "size" => Ok(Strategy::Size),
            "load" => Ok(Strategy::Load),
            "count" => Ok(Strategy::Count),
            other => Err(format!("unknown strategy {other:?}: use size, load or count")),
        }
    }
}

/// One bucket as the planner sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct BucketInfo {
    pub bucket: u32,
    pub shard: ShardId,
    pub bytes: u64,
    pub load: u64,
    /// The bucket's largest tenants, biggest first (a few are enough).
    pub top_tenants: Vec<TenantInfo>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TenantInfo {
    pub tenant: TenantKey,
    pub bytes: u64,
    pub load: u64,
}

/// A tenant pinned to a shard of its own choosing.
#[derive(Debug, Clone, PartialEq)]
pub struct PinInfo {
    pub tenant: TenantKey,
    /// The bucket the tenant hashes to: that bucket cannot move onto or off the
    /// pinned shard.
    pub bucket: u32,
    pub shard: ShardId,
    pub bytes: u64,
    pub load: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ShardInfo {
    pub id: ShardId,
    pub name: String,
    /// Takes new buckets (active); a draining shard must be emptied; a removed
    /// one is ignored.
    pub accepts: bool,
    pub draining: bool,
}

#[derive(Debug, Clone)]
pub struct Input {
    pub shards: Vec<ShardInfo>,
    pub buckets: Vec<BucketInfo>,
    pub pins: Vec<PinInfo>,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub strategy: Strategy,
    pub max_moves: usize,
    /// A tenant holding at least this share of its bucket's measure, in a bucket
    /// bigger than what the gap between the fullest and the emptiest shard can
    /// take, is proposed as a tenant move of its own. Default 0.5.
    pub whale_share: f64,
}

impl Default for Options {
    fn default() -> Self {
        Options { strategy: Strategy::Size, max_moves: 16, whale_share: 0.5 }
    }
}

/// What one planned move takes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Subject {
    Bucket { bucket: u32 },
    Tenant { tenant: String },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlannedMove {
    #[serde(flatten)]
    pub subject: Subject,
    pub from: ShardId,
    pub to: ShardId,
    pub bytes: u64,
    pub load: u64,
    /// Why: `drain` (off a draining shard), `whale` (a tenant isolated from its
    /// bucket) or `balance`.
    pub reason: &'static str,
}

/// How uneven the shards are in the chosen measure.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Spread {
    /// The measure per shard, in shard order (shards that take part only).
    pub per_shard: Vec<(ShardId, u64)>,
    pub max: u64,
    pub min: u64,
    /// Coefficient of variation: standard deviation / mean (0 when even).
    pub cv: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub strategy: Strategy,
    pub moves: Vec<PlannedMove>,
    pub before: Spread,
    pub after: Spread,
}

fn measure(strategy: Strategy, bytes: u64, load: u64) -> u64 {
    match strategy {
        Strategy::Size => bytes,
        Strategy::Load => load,
        Strategy::Count => 1,
    }
}

/// The measure each shard carries now; draining shards count too (they hold
/// data until drained), removed ones do not.
fn totals(input: &Input, strategy: Strategy) -> Vec<(ShardId, u64)> {
    let mut per: Vec<(ShardId, u64)> =
        input.shards.iter().filter(|s| s.accepts || s.draining).map(|s| (s.id, 0)).collect();
    let mut add = |shard: ShardId, v: u64| {
        if let Some(x) = per.iter_mut().find(|x| x.0 == shard) {
            x.1 += v;
        }
    };
    for b in &input.buckets {
        add(b.shard, measure(strategy, b.bytes, b.load));
    }
    if strategy != Strategy::Count {
        for p in &input.pins {
            add(p.shard, measure(strategy, p.bytes, p.load));
        }
    }
    per
}

pub fn spread(per_shard: Vec<(ShardId, u64)>) -> Spread {
    let values: Vec<f64> = per_shard.iter().map(|x| x.1 as f64).collect();
    let max = per_shard.iter().map(|x| x.1).max().unwrap_or(0);
    let min = per_shard.iter().map(|x| x.1).min().unwrap_or(0);
    let n = values.len().max(1) as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    let cv = if mean > 0.0 { var.sqrt() / mean } else { 0.0 };
    Spread { per_shard, max, min, cv }
}

/// Plans the moves. See the module docs for the rules.
pub fn plan(input: &Input, opts: &Options) -> Plan {
    let strategy = opts.strategy;
    let before = spread(totals(input, strategy));
    // Working copy: the measure per shard as planned moves change it.
    let mut per: Vec<(ShardId, u64)> = before.per_shard.clone();
    let mut buckets: Vec<BucketInfo> = input.buckets.clone();
    // Bucket order is part of determinism: by bucket number.
    buckets.sort_by_key(|b| b.bucket);
    let mut moved: BTreeSet<u32> = BTreeSet::new();
    let mut moved_tenants: BTreeSet<String> = BTreeSet::new();
    let mut moves = Vec::new();
    let accepting: Vec<ShardId> = input.shards.iter().filter(|s| s.accepts && !s.draining).map(|s| s.id).collect();
    let draining: BTreeSet<ShardId> = input.shards.iter().filter(|s| s.draining).map(|s| s.id).collect();
    let value = |per: &[(ShardId, u64)], s: ShardId| per.iter().find(|x| x.0 == s).map(|x| x.1).unwrap_or(0);
    let shift = |per: &mut Vec<(ShardId, u64)>, from: ShardId, to: ShardId, v: u64| {
        for x in per.iter_mut() {
            if x.0 == from {
                x.1 = x.1.saturating_sub(v);
            } else if x.0 == to {
                x.1 += v;
            }
        }
    };
    // The emptiest shard that takes buckets (lowest id on ties).
    let emptiest = |per: &[(ShardId, u64)]| accepting.iter().copied().min_by_key(|s| (value(per, *s), *s));
    // … leaving out `avoid` when another shard can take it.
    let emptiest_but = |per: &[(ShardId, u64)], avoid: &[ShardId]| {
        accepting.iter().copied().filter(|s| !avoid.contains(s)).min_by_key(|s| (value(per, *s), *s)).or(emptiest(per))
    };
    // Where each bucket's pinned tenants are (as planned): the bucket moves
    // around them, never onto or off their shard.
    let mut pinned: Vec<(u32, ShardId)> = input.pins.iter().map(|p| (p.bucket, p.shard)).collect();
    let pinned_on = |pinned: &[(u32, ShardId)], b: u32| -> Vec<ShardId> {
        pinned.iter().filter(|x| x.0 == b).map(|x| x.1).collect()
    };

    // 1. Drain: everything off draining shards, pinned tenants first (so that
    //    their buckets can plan around where they go), then buckets, biggest first.
    if !draining.is_empty() && !accepting.is_empty() {
        for p in input.pins.iter().filter(|p| draining.contains(&p.shard)) {
            if moves.len() >= opts.max_moves {
                break;
            }
            let bucket_shard = buckets.iter().find(|b| b.bucket == p.bucket).map(|b| b.shard);
            let Some(to) = emptiest_but(&per, &bucket_shard.into_iter().collect::<Vec<_>>()) else { break };
            let v = measure(strategy, p.bytes, p.load);
            shift(&mut per, p.shard, to, v);
            moved_tenants.insert(p.tenant.to_string());
            if let Some(x) = pinned.iter_mut().find(|x| x.0 == p.bucket && x.1 == p.shard) {
                x.1 = to;
            }
            moves.push(PlannedMove {
                subject: Subject::Tenant { tenant: p.tenant.to_string() },
                from: p.shard,
                to,
                bytes: p.bytes,
                load: p.load,
                reason: "drain",
            });
        }
        let mut off: Vec<&BucketInfo> = buckets.iter().filter(|b| draining.contains(&b.shard)).collect();
        off.sort_by_key(|b| (std::cmp::Reverse(measure(strategy, b.bytes, b.load)), b.bucket));
        for b in off {
            if moves.len() >= opts.max_moves {
                break;
            }
            let Some(to) = emptiest_but(&per, &pinned_on(&pinned, b.bucket)) else { break };
            let v = measure(strategy, b.bytes, b.load);
            shift(&mut per, b.shard, to, v);
            moved.insert(b.bucket);
            moves.push(PlannedMove {
                subject: Subject::Bucket { bucket: b.bucket },
                from: b.shard,
                to,
                bytes: b.bytes,
                load: b.load,
                reason: "drain",
            });
        }
    }

    // 2. Balance among the shards that take buckets.
    while moves.len() < opts.max_moves && accepting.len() >= 2 {
        let Some(to) = emptiest(&per) else { break };
        let Some(from) = accepting.iter().copied().max_by_key(|s| (value(&per, *s), std::cmp::Reverse(*s))) else {
            break;
        };
        let gap = value(&per, from).saturating_sub(value(&per, to));
        if gap == 0 {
            break;
        }
        // A move of v from the fullest to the emptiest narrows their gap iff
        // 0 < v < gap; the best is the one closest to gap / 2. Candidates: the
        // fullest shard's buckets, and its whale tenants (a tenant that makes up
        // most of its bucket) moved on their own.
        let score = |v: u64| (v as i128 * 2 - gap as i128).unsigned_abs();
        let best_bucket = buckets
            .iter()
            .filter(|b| b.shard == from && !moved.contains(&b.bucket))
            .filter(|b| pinned_on(&pinned, b.bucket).iter().all(|s| *s != from && *s != to))
            .map(|b| (b, measure(strategy, b.bytes, b.load)))
            .filter(|(_, v)| *v > 0 && *v < gap)
            .min_by_key(|(b, v)| (score(*v), b.bucket));
        let best_whale = buckets
            .iter()
            .filter(|b| strategy != Strategy::Count && b.shard == from && !moved.contains(&b.bucket))
            .filter_map(|b| {
                let bv = measure(strategy, b.bytes, b.load);
                let t = b.top_tenants.first()?;
                let tv = measure(strategy, t.bytes, t.load);
                let whale = bv > 0 && tv as f64 >= opts.whale_share * bv as f64;
                (whale && tv > 0 && tv < gap && !moved_tenants.contains(&t.tenant.to_string())).then_some((b, t, tv))
            })
            .min_by_key(|(b, _, tv)| (score(*tv), b.bucket));
        let whale_wins = match (&best_bucket, &best_whale) {
            (Some((_, v)), Some((_, _, tv))) => score(*tv) < score(*v),
            (None, Some(_)) => true,
            _ => false,
        };
        if whale_wins {
            let Some((b, t, tv)) = best_whale else { break };
            shift(&mut per, from, to, tv);
            moved_tenants.insert(t.tenant.to_string());
            // The rest of the bucket stays; it is not moved as a whole in this plan.
            moved.insert(b.bucket);
            moves.push(PlannedMove {
                subject: Subject::Tenant { tenant: t.tenant.to_string() },
                from,
                to,
                bytes: t.bytes,
                load: t.load,
                reason: "whale",
            });
            continue;
        }
        let Some((b, v)) = best_bucket else { break };
        shift(&mut per, from, to, v);
        moved.insert(b.bucket);
        moves.push(PlannedMove {
            subject: Subject::Bucket { bucket: b.bucket },
            from,
            to,
            bytes: b.bytes,
            load: b.load,
            reason: "balance",
        });
    }
    // A drained shard no longer takes part.
    per.retain(|(s, v)| !draining.contains(s) || *v > 0);
    let after = spread(per);
    Plan { strategy, moves, before, after }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shards(n: usize) -> Vec<ShardInfo> {
        (0..n).map(|i| ShardInfo { id: i, name: format!("shard_{i}"), accepts: true, draining: false }).collect()
    }

    fn bucket(bucket: u32, shard: ShardId, bytes: u64) -> BucketInfo {
        BucketInfo { bucket, shard, bytes, load: bytes / 10, top_tenants: Vec::new() }
    }

    /// A skewed cluster: shard 0 holds most of the data.
    fn skewed() -> Input {
        let mut buckets = Vec::new();
        for b in 0..16 {
            buckets.push(bucket(b, 0, 1_000 + 37 * b as u64));
        }
        for b in 16..24 {
            buckets.push(bucket(b, 1, 500 + 11 * b as u64));
        }
        for b in 24..32 {
            buckets.push(bucket(b, 2, 100));
        }
        Input { shards: shards(3), buckets, pins: Vec::new() }
    }

    /// A small deterministic generator of cluster shapes, for properties.
    fn random_input(seed: u64) -> Input {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let n_shards = 2 + (next() % 4) as usize;
        let n_buckets = 8 + (next() % 56) as u32;
        let buckets = (0..n_buckets)
            .map(|b| {
                let shard = (next() % n_shards as u64) as usize;
                let bytes = if next() % 10 == 0 { 50_000 + next() % 50_000 } else { next() % 5_000 };
                let top = TenantInfo { tenant: TenantKey::Int(b as i64), bytes: bytes * (next() % 100) / 100, load: 0 };
                BucketInfo { bucket: b, shard, bytes, load: next() % 1_000, top_tenants: vec![top] }
            })
            .collect();
        Input { shards: shards(n_shards), buckets, pins: Vec::new() }
    }

    #[test]
    fn the_plan_lowers_the_spread_and_moves_no_bucket_twice() {
        for seed in 0..500 {
            let input = random_input(seed);
            for strategy in [Strategy::Size, Strategy::Load, Strategy::Count] {
                let p = plan(&input, &Options { strategy, max_moves: 64, ..Default::default() });
                if p.moves.is_empty() {
                    assert_eq!(p.after, p.before);
                    continue;
                }
                assert!(p.after.cv < p.before.cv, "seed {seed} {strategy:?}: {:?} → {:?}", p.before, p.after);
                assert!(p.after.max - p.after.min <= p.before.max - p.before.min, "seed {seed} {strategy:?}");
                let mut seen = BTreeSet::new();
                for m in &p.moves {
                    assert!(seen.insert(m.subject.clone()), "seed {seed}: {:?} planned twice", m.subject);
                    assert_ne!(m.from, m.to);
                }
            }
        }
    }

    #[test]
    fn the_plan_respects_max_moves_and_is_deterministic() {
        let input = skewed();
        for max in [0, 1, 3, 100] {
            let a = plan(&input, &Options { max_moves: max, ..Default::default() });
            let b = plan(&input, &Options { max_moves: max, ..Default::default() });
            assert!(a.moves.len() <= max);
            assert_eq!(a, b);
        }
        let p = plan(&input, &Options { max_moves: 100, ..Default::default() });
        assert!(p.moves.iter().all(|m| m.from == 0 || m.from == 1), "{:?}", p.moves);
        assert!(p.after.cv < 0.1, "{:?}", p.after);
        assert!(!p.moves.is_empty());
    }

    #[test]
    fn an_even_cluster_needs_no_moves() {
        let buckets = (0..12).map(|b| bucket(b, (b % 3) as usize, 1_000)).collect();
        let p = plan(&Input { shards: shards(3), buckets, pins: Vec::new() }, &Options::default());
        assert!(p.moves.is_empty(), "{:?}", p.moves);
    }

    #[test]
    fn a_whale_tenant_is_moved_on_its_own() {
        // Shard 0: one huge bucket that is nearly all one tenant, and small ones.
        let mut buckets = vec![BucketInfo {
            bucket: 0,
            shard: 0,
            bytes: 10_000,
            load: 0,
            top_tenants: vec![TenantInfo { tenant: TenantKey::Int(42), bytes: 9_000, load: 0 }],
        }];
        buckets.push(bucket(1, 0, 100));
        buckets.push(bucket(2, 1, 100));
        let p = plan(&Input { shards: shards(2), buckets, pins: Vec::new() }, &Options::default());
        assert_eq!(p.moves[0].subject, Subject::Tenant { tenant: "42".into() }, "{:?}", p.moves);
        assert_eq!((p.moves[0].from, p.moves[0].to, p.moves[0].reason), (0, 1, "whale"));
        assert!(p.after.cv < p.before.cv);
    }

    #[test]
    fn a_draining_shard_is_emptied_first() {
        let mut input = skewed();
        input.shards[2].draining = true;
        input.pins.push(PinInfo { tenant: TenantKey::Int(7), bucket: 3, shard: 2, bytes: 10, load: 1 });
        let p = plan(&input, &Options { max_moves: 100, ..Default::default() });
        let off: Vec<&PlannedMove> = p.moves.iter().filter(|m| m.from == 2).collect();
        assert_eq!(off.len(), 9, "8 buckets and a pin leave shard 2: {:?}", p.moves);
        assert!(off.iter().all(|m| m.reason == "drain" && m.to != 2));
        assert!(p.moves.iter().all(|m| m.to != 2));
        assert!(p.after.per_shard.iter().all(|x| x.0 != 2), "{:?}", p.after);
    }

    #[test]
    fn buckets_move_around_their_pinned_tenants() {
        // Shard 2 drains; its bucket 24 has a tenant pinned to shard 1, which is
        // the emptiest: the bucket goes to shard 0 instead. Bucket 25's tenant is
        // pinned to shard 2 itself: the tenant moves first, and the bucket avoids
        // where it went.
        let mut input = skewed();
        for b in 0..16 {
            input.buckets[b].bytes = 10;
        }
        input.shards[2].draining = true;
        input.pins.push(PinInfo { tenant: TenantKey::Int(7), bucket: 24, shard: 1, bytes: 1, load: 0 });
        input.pins.push(PinInfo { tenant: TenantKey::Int(8), bucket: 25, shard: 2, bytes: 1, load: 0 });
        let p = plan(&input, &Options { max_moves: 100, ..Default::default() });
        let to = |s: Subject| p.moves.iter().find(|m| m.subject == s).map(|m| m.to).unwrap();
        assert_eq!(to(Subject::Bucket { bucket: 24 }), 0, "{:?}", p.moves);
        let pin = to(Subject::Tenant { tenant: "8".into() });
        let first = |s: Subject| p.moves.iter().position(|m| m.subject == s).unwrap();
        assert!(first(Subject::Tenant { tenant: "8".into() }) < first(Subject::Bucket { bucket: 25 }));
        assert_ne!(to(Subject::Bucket { bucket: 25 }), pin, "{:?}", p.moves);

        // Balancing never moves a bucket onto or off its pinned tenant's shard.
        for seed in 0..200 {
            let mut input = random_input(seed);
            let n = input.shards.len();
            for (i, b) in input.buckets.iter().enumerate().step_by(3) {
                let shard = if i % 2 == 0 { b.shard } else { (b.shard + 1) % n };
                input.pins.push(PinInfo {
                    tenant: TenantKey::Int(i as i64),
                    bucket: b.bucket,
                    shard,
                    bytes: 0,
                    load: 0,
                });
            }
            let p = plan(&input, &Options { max_moves: 100, ..Default::default() });
            for m in p.moves.iter().filter(|m| m.reason == "balance") {
                let Subject::Bucket { bucket } = m.subject else { continue };
                for pin in input.pins.iter().filter(|x| x.bucket == bucket) {
                    assert!(pin.shard != m.from && pin.shard != m.to, "seed {seed}: {m:?} and {pin:?}");
                }
            }
        }
    }
}

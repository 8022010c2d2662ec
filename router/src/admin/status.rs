//! What `GET /status` says: the directory as this node holds it, with what only
//! this node knows (its replica, its clients, its last size measurement).
//! [`status_of`] is the whole rule and needs no running node: tests render
//! what it makes.

use std::collections::HashMap;
use std::time::Duration;

use shardgate_directory::clock::now_ms;
use shardgate_directory::pause::Pause;
use shardgate_directory::state::Move;
use shardgate_directory::Directory;

use super::api::{
    HeldSummary, MoveStatus, PauseStatus, PlacementRange, ReplicaRole, ReplicaStatus, ShardStatus, Status,
};
use crate::context::RouterContext;
use crate::sizes::ShardSize;

/// What a node adds to its directory in [`Status`].
#[derive(Debug, Clone, Default)]
pub struct NodeFacts {
    /// The node's clock (ms since the Unix epoch).
    pub now_ms: u64,
    /// Its last size measurement: its age and each shard's share, by name.
    pub sizes: Option<(Duration, HashMap<String, ShardSize>)>,
    pub sharded_tables: Vec<String>,
    pub replica: Option<ReplicaStatus>,
    pub clients: usize,
}

/// This node's status now.
pub fn status(ctx: &RouterContext) -> Status {
    let facts = NodeFacts {
        now_ms: now_ms(),
        sizes: ctx.sizes.per_shard(),
        sharded_tables: ctx.catalog.tables(),
        replica: ctx.replica.as_ref().map(|(node, lease)| {
            let st = node.status();
            ReplicaStatus {
                node_id: st.id,
                leader: st.leader,
                term: st.term,
                role: if st.is_leader {
                    ReplicaRole::Leader
                } else if st.learners.contains(&st.id) {
                    ReplicaRole::Learner
                } else {
                    ReplicaRole::Follower
                },
                applied_index: st.applied,
                voters: st.voters,
                learners: st.learners,
                lease_valid: node.lease_valid(*lease),
            }
        }),
        clients: ctx.clients.load(std::sync::atomic::Ordering::Relaxed),
    };
    status_of(&ctx.directory.load(), facts)
}

/// The status of a node holding `dir`.
pub fn status_of(dir: &Directory, node: NodeFacts) -> Status {
    let counts = dir.bucket_counts();
    let name = |s: usize| shard_name(dir, s);
    let mut ranges: Vec<PlacementRange> = Vec::new();
    for (b, &s) in dir.placements.iter().enumerate() {
        let b = b as u32;
        match ranges.last_mut() {
            Some(r) if r.shard == name(s) && r.last_bucket + 1 == b => r.last_bucket = b,
            _ => ranges.push(PlacementRange { first_bucket: b, last_bucket: b, shard: name(s) }),
        }
    }
    let mut pins: Vec<(String, String)> = dir.pins.iter().map(|(k, &s)| (k.to_string(), name(s))).collect();
    pins.sort();
    let size_of = |shard: &str| node.sizes.as_ref().map(|(_, m)| m.get(shard).copied().unwrap_or_default());
    Status {
        epoch: dir.epoch,
        now_ms: node.now_ms,
        key_column: dir.key_column.clone(),
        key_type: dir.key_type.sql_name().to_string(),
        bucket_count: dir.bucket_count,
        shards: dir
            .shards
            .iter()
            .zip(counts)
            .map(|(s, buckets)| ShardStatus {
                name: s.name.clone(),
                url: s.url.clone(),
                state: s.state,
                buckets,
                reference: s.reference,
                rows: size_of(&s.name).map(|z| z.rows),
                bytes: size_of(&s.name).map(|z| z.bytes),
            })
            .collect(),
        sizes_age_ms: node.sizes.as_ref().map(|(age, _)| age.as_millis() as u64),
        placements: dir.placements.iter().map(|&s| name(s)).collect(),
        placement_ranges: ranges,
        pins,
        sharded_tables: node.sharded_tables,
        replica: node.replica,
        routers: dir.routers.values().cloned().collect(),
        moves: moves(dir),
        clients: node.clients,
        in_doubt: crate::twophase::recover::state().in_doubt.lock().unwrap_or_else(|p| p.into_inner()).clone(),
    }
}

/// Every move of `dir`, oldest first: what `GET /moves` answers.
pub fn moves(dir: &Directory) -> Vec<MoveStatus> {
    dir.moves.values().map(|m| move_status(dir, m)).collect()
}

/// One move as the API shows it.
pub fn move_status(dir: &Directory, m: &Move) -> MoveStatus {
    let name = |s: usize| shard_name(dir, s);
    let mut shadow_samples: Vec<_> = m.shadow.values().flat_map(|c| c.samples.iter().cloned()).collect();
    shadow_samples.sort_by_key(|x| std::cmp::Reverse(x.at_ms));
    shadow_samples.truncate(5);
    MoveStatus {
        id: m.id,
        subject: m.subject.to_string(),
        phase: m.phase,
        source: name(m.source),
        target: name(m.target),
        owner: name(dir.owner_of(m)),
        counters: m.counters.clone(),
        verified_clean: m.verified_clean,
        cutover_back: m.cutover_back,
        keep_source: m.keep_source,
        note: m.note.clone(),
        request: m.request.clone(),
        cutover_auto: m.options.cutover_auto,
        complete_auto: m.options.complete_auto,
        holding: dir.holds.contains_key(&m.id),
        shadow_samples,
        history: m.history.clone(),
        pauses: m.pauses.iter().rev().map(pause_status).collect(),
        created_ms: m.created_ms,
        updated_ms: m.updated_ms,
    }
}

fn pause_status(p: &Pause) -> PauseStatus {
    PauseStatus {
        kind: p.kind.name().to_string(),
        at_ms: p.at_ms,
        held: HeldSummary::of(&p.total()),
        routers: p.routers.iter().map(|(r, s)| (r.clone(), HeldSummary::of(s))).collect(),
    }
}

fn shard_name(dir: &Directory, s: usize) -> String {
    dir.shards.get(s).map(|x| x.name.clone()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardgate_directory::state::{Command, MoveFlagUpdate, MovePhase, MoveSubject, Outcome};
    use shardgate_directory::{KeyType, Shard, TenantKey};

    /// A directory with a pin and a move that verified clean and cut over.
    fn directory() -> Directory {
        let shards = (0..2).map(|i| Shard::new(format!("shard_{i}"), format!("postgres://h/{i}"))).collect();
        let mut d = Directory::new("tenant_id", KeyType::Int, 8, shards).unwrap();
        let subject = MoveSubject::Bucket(1);
        let out =
            d.apply(&Command::CreateMove { subject, target: "shard_1".into(), options: Default::default(), at_ms: 1 });
        let Outcome::MoveCreated { id, .. } = out else { panic!("{out:?}") };
        d.apply(&Command::UpdateMove {
            id,
            phase: MovePhase::Shadow,
            counters: [("verified_at_ms".to_string(), 5), ("lag_bytes".to_string(), 0)].into(),
            flags: MoveFlagUpdate { verified_clean: Some(true), ..Default::default() },
            note: Some("verified clean".into()),
            at_ms: 5,
        });
        d.apply(&Command::HoldMove { id, token: 1, deadline_ms: 100, at_ms: 0 });
        d.apply(&Command::FlipMove { id, shard: "shard_1".into(), token: 1 });
        d.apply(&Command::PinTenant { tenant: TenantKey::Int(42), shard: "shard_1".into() });
        d
    }

    #[test]
    fn the_status_names_shards_ranges_pins_and_where_a_moves_rows_are() {
        let sizes = [("shard_0".to_string(), ShardSize { rows: 10, bytes: 100 })].into();
        let facts = NodeFacts { now_ms: 7, sizes: Some((Duration::from_millis(1500), sizes)), ..Default::default() };
        let s = status_of(&directory(), facts);
        assert_eq!(
            s.placements,
            ["shard_0", "shard_1", "shard_0", "shard_0", "shard_1", "shard_1", "shard_1", "shard_1"]
        );
        let ranges: Vec<_> =
            s.placement_ranges.iter().map(|r| (r.first_bucket, r.last_bucket, r.shard.as_str())).collect();
        assert_eq!(ranges, [(0, 0, "shard_0"), (1, 1, "shard_1"), (2, 3, "shard_0"), (4, 7, "shard_1")]);
        assert_eq!(s.pins, [("42".to_string(), "shard_1".to_string())]);
        assert_eq!((s.shards[0].rows, s.shards[1].rows, s.sizes_age_ms), (Some(10), Some(0), Some(1500)));
        let m = &s.moves[0];
        assert_eq!((m.subject.as_str(), m.source.as_str(), m.owner.as_str()), ("bucket 1", "shard_0", "shard_1"));
        assert!(m.verified_clean && !m.holding, "{m:?}");
    }

    #[test]
    fn the_status_json_reads_back_into_the_api_type() {
        let s = status_of(&directory(), NodeFacts { now_ms: 7, ..Default::default() });
        let json = serde_json::to_string(&s).unwrap();
        let back: Status = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        // The names the web page and scripts read.
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let m = &v["moves"][0];
        assert_eq!((m["phase"].as_str(), m["verified_clean"].as_bool()), (Some("shadow"), Some(true)));
        assert_eq!(m["history"][0][0], "plan");
        assert_eq!(v["shards"][0]["state"], "active");
        assert!(m["counters"].get("verified_clean").is_none(), "flags are fields, not counters: {m}");
    }
}

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use crate::hash::bucket_of;

/// Index of a shard in [`Directory::shards`]. Stable for the life of a directory
/// (shards are marked removed, never deleted), so routing tables can hold it.
pub type ShardId = usize;

/// The value of the sharding column for one statement or row.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TenantKey {
    Int(i64),
    Uuid(uuid::Uuid),
    Text(String),
}

impl fmt::Display for TenantKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TenantKey::Int(v) => write!(f, "{v}"),
            TenantKey::Text(s) => write!(f, "{s}"),
            TenantKey::Uuid(u) => write!(f, "{u}"),
        }
    }
}

/// The SQL type of the sharding column, one for the whole cluster: it decides which
/// Postgres hash function a key goes through, so `'42'` and `42` land in the same
/// bucket when the column is a bigint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KeyType {
    #[default]
    #[serde(alias = "bigint", alias = "int8", alias = "integer", alias = "int4")]
    Int,
    #[serde(alias = "varchar")]
    Text,
    Uuid,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DirectoryError {
    #[error("{value:?} is not a valid {key_type} tenant key")]
    BadKey { value: String, key_type: &'static str },
    #[error("the directory has no shards")]
    NoShards,
    #[error("bucket count must be between 1 and 65536, not {0}")]
    BadBucketCount(u32),
}

impl KeyType {
    pub fn sql_name(self) -> &'static str {
        match self {
            KeyType::Int => "bigint",
            KeyType::Text => "text",
            KeyType::Uuid => "uuid",
        }
    }

    /// Reads a key from its text form, as it appears in a literal, a text-format
    /// parameter or a COPY row.
    pub fn parse_text(self, s: &str) -> Result<TenantKey, DirectoryError> {
        let bad = || DirectoryError::BadKey { value: s.to_string(), key_type: self.sql_name() };
        match self {
            KeyType::Int => s.trim().parse::<i64>().map(TenantKey::Int).map_err(|_| bad()),
            KeyType::Text => Ok(TenantKey::Text(s.to_string())),
            KeyType::Uuid => uuid::Uuid::parse_str(s.trim()).map(TenantKey::Uuid).map_err(|_| bad()),
        }
    }

    /// Brings a key parsed from SQL (an integer literal, a string) to this type.
    pub fn coerce(self, key: TenantKey) -> Result<TenantKey, DirectoryError> {
        match (self, key) {
            (KeyType::Int, k @ TenantKey::Int(_)) => Ok(k),
            (KeyType::Text, k @ TenantKey::Text(_)) => Ok(k),
            (KeyType::Uuid, k @ TenantKey::Uuid(_)) => Ok(k),
            (t, k) => t.parse_text(&k.to_string()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShardState {
    Active,
    Draining,
    Removed,
}

impl ShardState {
    /// `active`, `draining` or `removed`: as the CLI and the admin API name it.
    pub fn name(self) -> &'static str {
        match self {
            ShardState::Active => "active",
            ShardState::Draining => "draining",
            ShardState::Removed => "removed",
        }
    }
}

/// One physical shard: a Postgres server and database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub name: String,
    /// libpq URL without a password (`postgres://user@host:port/db`).
    pub url: String,
    pub state: ShardState,
    /// Whether the shard holds the reference tables' rows: true for the shards
    /// a cluster starts with, false for one added at run time (its first move
    /// copies the schema, not the reference rows). Reference reads and writes
    /// go to reference shards only; see docs/routing.md.
    #[serde(default = "reference_default")]
    pub reference: bool,
}

fn reference_default() -> bool {
    true
}

impl Shard {
    /// An active shard the cluster starts with (it holds the reference tables).
    pub fn new(name: impl Into<String>, url: impl Into<String>) -> Shard {
        Shard { name: name.into(), url: url.into(), state: ShardState::Active, reference: true }
    }
}

/// An immutable snapshot of the shard map. Routers read it through a
/// [`DirectoryHandle`]; every change produces a new snapshot with a higher epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Directory {
    pub epoch: u64,
    pub key_column: String,
    pub key_type: KeyType,
    pub bucket_count: u32,
    pub shards: Vec<Shard>,
    /// `placements[bucket]` is the shard that holds the bucket.
    pub placements: Vec<ShardId>,
    /// Tenants placed on a shard of their own, overriding their bucket.
    #[serde(with = "pins_as_list")]
    pub pins: HashMap<TenantKey, ShardId>,
    /// Moves of buckets or tenants, by id (written by the migrator). Read from a
    /// snapshot of this version or an older one.
    #[serde(default, deserialize_with = "crate::state::moves_of_any_version")]
    pub moves: std::collections::BTreeMap<u64, crate::state::Move>,
    #[serde(default)]
    pub next_move_id: u64,
    /// Cutover holds in force, by move id: routers hold new statements for these
    /// rows until the hold is released or the placement flips.
    #[serde(default)]
    pub holds: std::collections::BTreeMap<u64, crate::state::Hold>,
    /// Routers serving from this directory, by id.
    #[serde(default)]
    pub routers: std::collections::BTreeMap<String, crate::state::RouterInfo>,
    /// Raft addresses of directory nodes that joined after the cluster started.
    #[serde(default)]
    pub nodes: std::collections::BTreeMap<u64, String>,
    /// The load each serving router has counted, by router run
    /// (`router@started_ms`): a summary sent every few heartbeats, not a log entry
    /// per query. Runs of routers that expired are dropped with them.
    #[serde(default)]
    pub load: std::collections::BTreeMap<String, crate::state::LoadReport>,
}

impl Directory {
    /// A fresh directory: buckets spread over the shards in contiguous ranges
    /// (bucket `b` on shard `b * shards / bucket_count`), which keeps neighbouring
    /// buckets together and makes the initial map easy to read.
    pub fn new(
        key_column: impl Into<String>,
        key_type: KeyType,
        bucket_count: u32,
        shards: Vec<Shard>,
    ) -> Result<Directory, DirectoryError> {
        if shards.is_empty() {
            return Err(DirectoryError::NoShards);
        }
        if bucket_count == 0 || bucket_count > 65536 {
            return Err(DirectoryError::BadBucketCount(bucket_count));
        }
        let n = shards.len() as u64;
        let placements = (0..bucket_count as u64).map(|b| (b * n / bucket_count as u64) as ShardId).collect();
        Ok(Directory {
            epoch: 1,
            key_column: key_column.into(),
            key_type,
            bucket_count,
            shards,
            placements,
            pins: HashMap::new(),
            moves: Default::default(),
            next_move_id: 1,
            holds: Default::default(),
            routers: Default::default(),
            nodes: Default::default(),
            load: Default::default(),
        })
    }

    pub fn bucket_of(&self, key: &TenantKey) -> u32 {
        bucket_of(key, self.bucket_count)
    }

    /// The shard that holds a tenant: its pin if it has one, else its bucket's shard.
    pub fn shard_for(&self, key: &TenantKey) -> ShardId {
        if !self.pins.is_empty() {
            if let Some(&s) = self.pins.get(key) {
                return s;
            }
        }
        self.placements[self.bucket_of(key) as usize]
    }

    /// A tenant's bucket and the shard that holds it (its pin, if it has one).
    pub fn locate(&self, key: &TenantKey) -> (u32, ShardId) {
        let b = self.bucket_of(key);
        if !self.pins.is_empty() {
            if let Some(&s) = self.pins.get(key) {
                return (b, s);
            }
        }
        (b, self.placements[b as usize])
    }

    /// The move whose cutover holds statements for this tenant, if any. Cheap when
    /// no hold is in force (the common case): one emptiness check.
    pub fn held(&self, key: &TenantKey) -> Option<u64> {
        if self.holds.is_empty() {
            return None;
        }
        self.holds.values().find(|h| self.subject_covers(&h.subject, key)).map(|h| h.move_id)
    }

    /// Whether a move of `subject` moves `key`'s rows.
    pub fn subject_covers(&self, subject: &crate::state::MoveSubject, key: &TenantKey) -> bool {
        match subject {
            crate::state::MoveSubject::Bucket(b) => self.bucket_of(key) == *b && !self.pins.contains_key(key),
            crate::state::MoveSubject::Tenant(t) => t == key,
        }
    }

    /// Shards that serve traffic (not removed), in directory order.
    pub fn live_shards(&self) -> impl Iterator<Item = (ShardId, &Shard)> {
        self.shards.iter().enumerate().filter(|(_, s)| s.state != ShardState::Removed)
    }

    pub fn shard_by_name(&self, name: &str) -> Option<ShardId> {
        self.shards.iter().position(|s| s.name == name)
    }

    /// Live shards that hold the reference tables; all live shards if none does
    /// (a directory written before shards carried the flag has it set anyway).
    pub fn reference_shards(&self) -> Vec<ShardId> {
        let refs: Vec<ShardId> = self.live_shards().filter(|(_, s)| s.reference).map(|(i, _)| i).collect();
        if refs.is_empty() {
            self.live_shards().map(|(i, _)| i).collect()
        } else {
            refs
        }
    }

    /// Live shards that own rows: a bucket or a pinned tenant. A shard added
    /// and not moved to yet owns nothing (and may not have the tables yet).
    pub fn owning_shards(&self) -> Vec<ShardId> {
        let counts = self.bucket_counts();
        self.live_shards()
            .filter(|(i, _)| counts[*i] > 0 || self.pins.values().any(|p| p == i))
            .map(|(i, _)| i)
            .collect()
    }

    /// How many buckets each shard holds, in shard order.
    pub fn bucket_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.shards.len()];
        for &s in &self.placements {
            counts[s] += 1;
        }
        counts
    }
}

mod pins_as_list {
    //! JSON objects need string keys; pins are written as a list of pairs.
    use super::{ShardId, TenantKey};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::collections::HashMap;

    pub fn serialize<S: Serializer>(pins: &HashMap<TenantKey, ShardId>, s: S) -> Result<S::Ok, S::Error> {
        let mut list: Vec<_> = pins.iter().collect();
        list.sort();
        list.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<HashMap<TenantKey, ShardId>, D::Error> {
        Ok(Vec::<(TenantKey, ShardId)>::deserialize(d)?.into_iter().collect())
    }
}

/// The router's window onto the directory: a snapshot that can be read without a
/// lock on every statement and replaced atomically when the directory changes.
#[derive(Clone)]
pub struct DirectoryHandle {
    current: Arc<ArcSwap<Directory>>,
    /// Bumped on every store, so waiters (held statements, the migrator waiting for
    /// acknowledgements) wake on change instead of polling.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
    /// Serializes [`DirectoryHandle::apply_local`] (load, apply, store).
    local_writes: Arc<std::sync::Mutex<()>>,
}

impl DirectoryHandle {
    pub fn new(directory: Directory) -> DirectoryHandle {
        DirectoryHandle {
            current: Arc::new(ArcSwap::from_pointee(directory)),
            changes: Arc::new(tokio::sync::watch::Sender::new(0)),
            local_writes: Arc::new(std::sync::Mutex::new(())),
        }
    }

    /// A receiver that sees every later store.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Applies a command to the snapshot and stores the result: the directory of a
    /// single router with no replicas (tests, `shardgate serve` without a
    /// `[directory]` section). Replicated directories go through Raft instead.
    pub fn apply_local(&self, cmd: &crate::state::Command) -> crate::state::Outcome {
        let _one_at_a_time = self.local_writes.lock().unwrap_or_else(|p| p.into_inner());
        let mut d = (*self.load()).clone();
        let out = d.apply(cmd);
        if !matches!(out, crate::state::Outcome::Rejected { .. }) {
            self.store(d);
        }
        out
    }

    /// The current snapshot. Cheap; hold it for the length of one routing decision.
    pub fn load(&self) -> Arc<Directory> {
        self.current.load_full()
    }

    /// Installs a new snapshot. The caller bumps the epoch.
    pub fn store(&self, directory: Directory) {
        self.current.store(Arc::new(directory));
        self.changes.send_modify(|n| *n += 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shards(n: usize) -> Vec<Shard> {
        (0..n)
            .map(|i| Shard::new(format!("shard_{i}"), format!("postgres://postgres@127.0.0.1:{}/app", 5432 + i)))
            .collect()
    }

    #[test]
    fn new_directory_spreads_buckets_in_ranges() {
        let d = Directory::new("tenant_id", KeyType::Int, 256, shards(3)).unwrap();
        assert_eq!(d.bucket_counts(), vec![86, 85, 85]);
        assert_eq!(d.placements[0], 0);
        assert_eq!(d.placements[255], 2);
        assert!(d.placements.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn pin_overrides_bucket() {
        let mut d = Directory::new("tenant_id", KeyType::Int, 8, shards(2)).unwrap();
        let k = TenantKey::Int(42);
        let home = d.shard_for(&k);
        d.pins.insert(k.clone(), 1 - home);
        assert_eq!(d.shard_for(&k), 1 - home);
    }

    #[test]
    fn keys_coerce_to_the_cluster_type() {
        assert_eq!(KeyType::Int.coerce(TenantKey::Text("42".into())), Ok(TenantKey::Int(42)));
        assert!(KeyType::Int.coerce(TenantKey::Text("x".into())).is_err());
        assert_eq!(KeyType::Text.coerce(TenantKey::Int(7)), Ok(TenantKey::Text("7".into())));
    }

    #[test]
    fn directory_round_trips_through_json() {
        let mut d = Directory::new("tenant_id", KeyType::Int, 4, shards(2)).unwrap();
        d.pins.insert(TenantKey::Int(9), 1);
        let back: Directory = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
        assert_eq!(back, d);
    }
}

//! The admin API's requests and answers, defined once: the server (see
//! [`super::routes`]) writes them, the `shardgate` CLI reads them into these same
//! types, and the web page's script (`router/web/app.js`) reads their JSON.
//!
//! The field names are the JSON's, and scripts read `shardgate status --json`:
//! keep them stable. A field added later is `#[serde(default)]`, so that a CLI
//! still reads the answer of a node one version older.
//!
//! | endpoint | request | answer |
//! |---|---|---|
//! | `GET /status` (`/api/status`) | | [`Status`] |
//! | `GET /moves` | | `Vec<`[`MoveStatus`]`>` |
//! | `GET /directory` | | [`Directory`] (linearizable read) |
//! | `GET /sizes` | | [`Sizes`] (measured on the shards now) |
//! | `GET /load` | | [`LoadReport`] (all routers together) |
//! | `GET /health` | | [`Health`] |
//! | `POST /moves` | [`NewMove`] | [`Outcome`] (`move_created`) |
//! | `POST /moves/request` | [`MoveRequestBody`] | [`Outcome`] |
//! | `POST /shards` | [`AddShard`] | [`ShardAdded`] |
//! | `POST /shards/drain`, `/shards/remove` | [`ShardName`] | [`Outcome`] |
//! | `POST /tenants/pin` | [`PinTenant`] | [`Outcome`] |
//! | `POST /nodes` | [`AddNode`] | [`Outcome`] |
//! | `POST /nodes/remove` | [`NodeId`] | [`Outcome`] |
//! | `POST /reload` | | [`Reloaded`] (422: the file was refused) |
//!
//! Every answer other than 200 is an [`ApiError`]. `GET /metrics` (Prometheus
//! text), `GET /events` (server-sent [`Status`] events) and the web page's files
//! are not JSON answers.

use serde::{Deserialize, Serialize};
use shardgate_directory::state::MovePhase;
use shardgate_directory::ShardState;

pub use crate::reload::Reloaded;
pub use crate::sizes::{BucketSize, Sizes, TenantSize};
pub use shardgate_directory::state::{LoadReport, MoveRequest, Outcome, RouterInfo, ShadowSample};
pub use shardgate_directory::Directory;

/// `GET /status` and each event of `GET /events`: the cluster as this node sees
/// it (its own replica, possibly stale; `GET /directory` is the linearizable
/// read). What `shardgate status --json` prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub epoch: u64,
    /// This node's clock when it answered (ms since the Unix epoch): the reference
    /// for the ages and durations computed from the other timestamps.
    pub now_ms: u64,
    pub key_column: String,
    /// The key's SQL type: `bigint`, `text` or `uuid`.
    pub key_type: String,
    pub bucket_count: u32,
    pub shards: Vec<ShardStatus>,
    /// `placements[b]` is the name of the shard holding bucket `b`.
    pub placements: Vec<String>,
    /// The same, as runs of consecutive buckets.
    pub placement_ranges: Vec<PlacementRange>,
    /// Pinned tenants: `[tenant, shard name]`, sorted.
    pub pins: Vec<(String, String)>,
    pub sharded_tables: Vec<String>,
    /// Age of the size measurement the shards' `rows` and `bytes` come from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sizes_age_ms: Option<u64>,
    /// Client sessions open on this node.
    pub clients: usize,
    /// This node's directory replica, when the directory is replicated (`null`
    /// for a static directory).
    pub replica: Option<ReplicaStatus>,
    pub routers: Vec<RouterInfo>,
    /// Every move, oldest first.
    pub moves: Vec<MoveStatus>,
    /// Prepared transactions shardgate left on the shards, as this node's
    /// last recovery sweep found them (docs/transactions.md). Normally empty:
    /// one that stays is a shard that does not answer.
    #[serde(default)]
    pub in_doubt: Vec<crate::twophase::recover::InDoubt>,
}

/// One shard in [`Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardStatus {
    pub name: String,
    /// Its URL without a password.
    pub url: String,
    /// `active`, `draining` or `removed`.
    pub state: ShardState,
    /// Buckets placed on it.
    pub buckets: usize,
    /// Whether it holds the reference tables' rows (a shard added at run time
    /// does not: reference reads and writes skip it).
    pub reference: bool,
    /// Rows and bytes the shard holds, from this node's last size measurement
    /// (`sizes_age_ms` old); absent until one was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
}

/// Buckets `first_bucket..=last_bucket`, all on `shard`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementRange {
    pub first_bucket: u32,
    pub last_bucket: u32,
    pub shard: String,
}

/// This node's directory replica in [`Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub node_id: u64,
    /// The leader this node knows of, if any.
    pub leader: Option<u64>,
    pub term: u64,
    pub role: ReplicaRole,
    pub applied_index: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// Whether this node is within its lease (it may route writes).
    pub lease_valid: bool,
}

/// What a directory node is in the Raft group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaRole {
    Leader,
    Follower,
    /// Receives the log without voting.
    Learner,
}

impl ReplicaRole {
    pub fn name(self) -> &'static str {
        match self {
            ReplicaRole::Leader => "leader",
            ReplicaRole::Follower => "follower",
            ReplicaRole::Learner => "learner",
        }
    }
}

/// One move, in [`Status`] and `GET /moves`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveStatus {
    pub id: u64,
    /// `bucket 17` or `tenant 42`.
    pub subject: String,
    pub phase: MovePhase,
    /// Shard names.
    pub source: String,
    pub target: String,
    /// The shard that owns the rows now.
    pub owner: String,
    /// Progress counts, sizes, durations and times by name, as the migrator and
    /// the routers' heartbeats recorded them: `rows_total`, `rows_copied`,
    /// `copy_rows_per_s`, `eta_s`, `tables`, `tables_ready`,
    /// `copy_rows:<table>`, `copy_bytes:<table>`, `lag_bytes`, `lag_ms`,
    /// `shadow_compared` (and `_matched`, `_mismatched`, `_lag_explained`,
    /// `_skipped`), `verified_at_ms`, `verify_chunks`, `verify_mismatches`,
    /// `verify_rows`, `verify_pause_us`, `cutovers`, `cutover_failures`,
    /// `pause_us`, `hold_us`, `fence_us`, `catch_up_us`, `flip_us`,
    /// `rows_deleted` … A counter not recorded yet is absent.
    pub counters: std::collections::BTreeMap<String, u64>,
    /// The last verify found both copies equal (when: `counters.verified_at_ms`).
    #[serde(default)]
    pub verified_clean: bool,
    /// The cutover under way (or the last one) is a rollback.
    #[serde(default)]
    pub cutover_back: bool,
    /// Cleanup keeps the source (the move was cancelled).
    #[serde(default)]
    pub keep_source: bool,
    /// Why the move failed or was cancelled, what it waits for, or how its last
    /// step went.
    pub note: Option<String>,
    /// The operator's request the driver has not taken yet.
    pub request: Option<MoveRequest>,
    pub cutover_auto: bool,
    pub complete_auto: bool,
    /// Routers hold its statements right now (during a cutover or a verify's cut).
    pub holding: bool,
    /// The latest shadow reads whose answers differed, newest first (at most 5;
    /// the counts are in `counters` as `shadow_*`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shadow_samples: Vec<ShadowSample>,
    /// The phases it went through: `[phase, ms since the Unix epoch]`, oldest first.
    pub history: Vec<(MovePhase, u64)>,
    /// Its last holds (verify's cut, cutovers, rollbacks), newest first: how long
    /// statements waited on each, in all and per router.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pauses: Vec<PauseStatus>,
    pub created_ms: u64,
    pub updated_ms: u64,
}

/// One hold of a move: what the statements that met it waited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseStatus {
    /// `verify`, `cutover` or `rollback`.
    pub kind: String,
    /// When the hold started (ms since the Unix epoch; 0 if not recorded).
    pub at_ms: u64,
    /// Every router's statements together.
    pub held: HeldSummary,
    /// Per router (`router@started_ms`), for the routers whose statements met it.
    pub routers: Vec<(String, HeldSummary)>,
}

/// How many statements waited, and how long: p50, p99 and the longest, in µs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldSummary {
    pub statements: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl HeldSummary {
    pub fn of(s: &shardgate_directory::pause::HeldStats) -> HeldSummary {
        HeldSummary {
            statements: s.statements,
            p50_us: s.percentile_us(0.5),
            p99_us: s.percentile_us(0.99),
            max_us: s.max_us,
        }
    }
}

impl std::fmt::Display for HeldSummary {
    /// `57 statements held: p50 12.0 ms, p99 40.1 ms, max 46.0 ms`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |us: u64| us as f64 / 1e3;
        if self.statements == 0 {
            return write!(f, "no statement held");
        }
        write!(
            f,
            "{} statement(s) held: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            self.statements,
            ms(self.p50_us),
            ms(self.p99_us),
            ms(self.max_us)
        )
    }
}

impl MoveStatus {
    /// A counter, if the move recorded it.
    pub fn counter(&self, name: &str) -> Option<u64> {
        self.counters.get(name).copied()
    }

    /// Done, cancelled or failed.
    pub fn ended(&self) -> bool {
        !self.phase.active()
    }
}

/// `GET /health`: the node answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub ok: bool,
}

/// `GET /health/ready`: whether this node should get clients. Ready when its
/// directory lease is valid (it may route writes) and every shard answered its
/// last probe; otherwise `reasons` says what is missing (HTTP 503).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readiness {
    pub ready: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
}

/// `POST /moves`: move a bucket or a tenant (exactly one of them) to shard `to`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NewMove {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<u32>,
    /// The tenant's key as text (`42`, `acme`, a UUID); the cluster's key type
    /// decides how it is read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The target shard's name.
    pub to: String,
    /// Verify and cut over as soon as the copy is done.
    #[serde(default)]
    pub cutover_auto: bool,
    /// … and complete right after the cutover.
    #[serde(default)]
    pub complete_auto: bool,
}

/// `POST /moves/request`: ask something of move `id`; the driver acts on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveRequestBody {
    pub id: u64,
    pub request: MoveAction,
    /// With `cutover`: cut over even if the move has not verified clean.
    #[serde(default)]
    pub force: bool,
}

/// What an operator can ask of a move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MoveAction {
    Verify,
    Cutover,
    Rollback,
    Complete,
    Cancel,
}

impl MoveAction {
    pub fn name(self) -> &'static str {
        match self {
            MoveAction::Verify => "verify",
            MoveAction::Cutover => "cutover",
            MoveAction::Rollback => "rollback",
            MoveAction::Complete => "complete",
            MoveAction::Cancel => "cancel",
        }
    }

    /// The request as the directory records it.
    pub fn request(self, force: bool) -> MoveRequest {
        match self {
            MoveAction::Verify => MoveRequest::Verify,
            MoveAction::Cutover => MoveRequest::Cutover { force },
            MoveAction::Rollback => MoveRequest::Rollback,
            MoveAction::Complete => MoveRequest::Complete,
            MoveAction::Cancel => MoveRequest::Cancel,
        }
    }
}

/// `POST /shards`: add a Postgres server as a new, empty shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddShard {
    pub name: String,
    /// `postgres://user:password@host:port/db`; the directory keeps it without
    /// the password.
    pub url: String,
}

/// What `POST /shards` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardAdded {
    pub outcome: Outcome,
    pub setup: SchemaSetup,
}

/// Copying the schema onto a shard just added: a note when it was done, the
/// error when it failed (the shard is added either way), neither when this node
/// does not set shards up.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaSetup {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_error: Option<String>,
}

/// `POST /shards/drain` and `POST /shards/remove`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardName {
    pub name: String,
}

/// `POST /tenants/pin`: place a tenant with no rows yet on a shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinTenant {
    pub tenant: String,
    pub shard: String,
}

/// `POST /nodes`: add a directory node (a learner receives the log without
/// voting; adding an existing learner as a voter promotes it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddNode {
    pub id: u64,
    /// Its raft address, `host:port`.
    pub address: String,
    #[serde(default)]
    pub learner: bool,
}

/// `POST /nodes/remove`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeId {
    pub id: u64,
}

/// Every answer but a 200: what went wrong, for the operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

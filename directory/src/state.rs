//! The directory as a state machine: a pure, deterministic
//! `apply(command) -> outcome`, the function every replica runs on every committed
//! log entry, in the same order, to reach the same [`Directory`].
//!
//! Nothing here does I/O or reads a clock: times arrive inside commands (the
//! proposer's clock), so replaying a log gives the same state on every node.

use serde::{Deserialize, Serialize};

use crate::pause::{HeldReport, HoldKind, Pause, PAUSES_KEPT};
use crate::{Directory, ShardId, ShardState, TenantKey};

/// What moves: one bucket (logical shard) or one tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MoveSubject {
    Bucket(u32),
    Tenant(TenantKey),
}

/// `bucket 17` or `tenant 42`: how logs, notes, errors and `shardgate status`
/// name what a move moves.
impl std::fmt::Display for MoveSubject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MoveSubject::Bucket(b) => write!(f, "bucket {b}"),
            MoveSubject::Tenant(k) => write!(f, "tenant {k}"),
        }
    }
}

/// A move's phase, in the order a move goes through them (see DESIGN.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MovePhase {
    Plan,
    Copy,
    DualWrite,
    Shadow,
    Verify,
    Cutover,
    Reverse,
    Cleanup,
    Done,
    Cancelled,
    Failed,
}

/// The durable record of one move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    pub id: u64,
    pub subject: MoveSubject,
    pub source: ShardId,
    pub target: ShardId,
    pub phase: MovePhase,
    /// Progress counters by name (rows_copied, bytes_copied, lag_bytes …): counts,
    /// sizes, durations and times. Yes/no facts are the typed flags below.
    #[serde(default)]
    pub counters: std::collections::BTreeMap<String, u64>,
    /// The move is in cleanup because it was cancelled: cleanup keeps the
    /// source's rows and drops the target's copy (a completed move keeps the
    /// target's).
    #[serde(default)]
    pub keep_source: bool,
    /// The cutover under way (or the last one) is a rollback, target → source: a
    /// driver that finds the move in cutover after a restart knows which way it went.
    #[serde(default)]
    pub cutover_back: bool,
    /// The last verify found both copies equal (row counts and checksums of every
    /// chunk); when it ran is `counters["verified_at_ms"]`. A cutover needs it
    /// (unless forced).
    #[serde(default)]
    pub verified_clean: bool,
    /// Why the move failed or was cancelled, if it did, or what it waits for.
    #[serde(default)]
    pub note: Option<String>,
    #[serde(default)]
    pub options: MoveOptions,
    /// The operator's pending request, if any.
    #[serde(default)]
    pub request: Option<MoveRequest>,
    /// Milliseconds since the Unix epoch, from the proposer's clock.
    pub created_ms: u64,
    pub updated_ms: u64,
    /// What the routers' shadow reads of this move found, by router run
    /// (`router@started_ms`, so a restarted router's counts add to its earlier
    /// ones). Their sums are in `counters` as `shadow_*`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub shadow: std::collections::BTreeMap<String, ShadowCounts>,
    /// Every phase the move entered and when (proposer's clock), oldest first:
    /// the timeline of the move.
    #[serde(default)]
    pub history: Vec<(MovePhase, u64)>,
    /// Its last few holds (verify's cut, cutovers, rollbacks), oldest first, with
    /// how long each router's statements waited on them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pauses: Vec<Pause>,
}

/// Where a move's rows are. One rule, read from the placement (or the pin), never
/// from the phase: the cutover's flip changes the placement in the same entry that
/// ends the hold, so it is right in every phase, a cutover found half-done after a
/// restart included.
impl Directory {
    /// The shard that holds a bucket's or a tenant's rows now: a bucket's placement
    /// (the tenants of the bucket pinned elsewhere are not part of it), a tenant's
    /// pin or else its bucket's placement. For a bucket of this directory (every
    /// move's is: [`Command::CreateMove`] refuses any other).
    pub fn holder_of(&self, subject: &MoveSubject) -> ShardId {
        match subject {
            MoveSubject::Bucket(b) => self.placements[*b as usize],
            MoveSubject::Tenant(k) => self.shard_for(k),
        }
    }

    /// The shard that owns a move's rows right now, the one statements for them
    /// go to: the source until the cutover's flip commits, the target after it,
    /// the source again once a rollback's flip (the cutover backwards) commits.
    pub fn owner_of(&self, m: &Move) -> ShardId {
        self.holder_of(&m.subject)
    }

    /// The move's other end: the shard with a copy of its rows that does not own
    /// them (the copy being made, the one kept current for a rollback, or the one
    /// cleanup drops). Reads that count rows once leave them out there.
    pub fn other_end_of(&self, m: &Move) -> ShardId {
        if self.owner_of(m) == m.source {
            m.target
        } else {
            m.source
        }
    }
}

/// What one router's shadow reads of one move found since the router started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShadowCounts {
    /// Reads answered by the source and compared with the target's answer.
    pub compared: u64,
    pub matched: u64,
    /// Differences proven real: the source gave the same answer before and after
    /// a point the target had provably applied, and the target's answer differed
    /// (twice in a row). See docs/moves.md, "Shadow reads".
    pub mismatched: u64,
    /// Differences that went away once the target caught up (replication lag).
    pub lag_explained: u64,
    /// Differences that could not be judged: the rows kept changing on the source
    /// while they were re-checked, so no point existed to compare at. Not a
    /// mismatch; the consistent-point verify settles it.
    #[serde(default)]
    pub unsettled: u64,
    /// Reads not compared: the router was busy comparing others, or a shard
    /// could not be asked.
    pub skipped: u64,
    /// The last few mismatches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<ShadowSample>,
}

/// One read whose answers differed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShadowSample {
    /// The statement (cut to a few hundred characters).
    pub query: String,
    /// Digests of each side's answer (row count and a hash of the rows), or the
    /// error a side gave.
    pub source: String,
    pub target: String,
    pub at_ms: u64,
    /// The tenant keys the read asked for (`42`, `42, 43`), so the differing
    /// rows can be found on both shards.
    #[serde(default)]
    pub keys: String,
}

/// What one router counted since it started: per bucket (those with any
/// traffic) and for its busiest tenants (sampled).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadReport {
    pub buckets: Vec<LoadCount>,
    /// The tenants with the most time spent, from a sample of statements
    /// (counts are scaled to estimate all of them).
    #[serde(default)]
    pub tenants: Vec<TenantLoadCount>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadCount {
    pub bucket: u32,
    pub statements: u64,
    /// Rows inserted, updated, deleted or copied in.
    pub rows_written: u64,
    /// Time from sending statements to their answer, µs.
    pub micros: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantLoadCount {
    pub tenant: String,
    pub statements: u64,
    pub rows_written: u64,
    pub micros: u64,
}

/// A router's shadow counts of one move, sent with its heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShadowReport {
    pub move_id: u64,
    pub counts: ShadowCounts,
}

impl ShadowCounts {
    pub fn add(&mut self, o: &ShadowCounts) {
        self.compared += o.compared;
        self.matched += o.matched;
        self.mismatched += o.mismatched;
        self.lag_explained += o.lag_explained;
        self.unsettled += o.unsettled;
        self.skipped += o.skipped;
    }
}

/// What an operator asked of a move; the migrator acts on it and clears it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum MoveRequest {
    Verify,
    Cutover {
        #[serde(default)]
        force: bool,
    },
    Rollback,
    Complete,
    Cancel,
}

/// How a move goes on by itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveOptions {
    /// Verify and cut over as soon as the copy is done (cleanup stays manual).
    #[serde(default)]
    pub cutover_auto: bool,
    /// … and complete (drop the old copy) right after the cutover: what
    /// `rebalance --apply` and `shard drain` ask for, so that a move they started
    /// finishes even if the command is interrupted.
    #[serde(default)]
    pub complete_auto: bool,
}

/// A cutover hold: every router holds new statements for the move's rows until it
/// is released or the placement flips. `token` tells one attempt from the next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub move_id: u64,
    pub subject: MoveSubject,
    pub token: u64,
    /// After this (proposer's clock) routers let statements go on their own: a
    /// migrator that died mid-cutover cannot stall traffic for longer.
    pub deadline_ms: u64,
    /// Routers that hold and have no transaction on the rows in flight.
    #[serde(default)]
    pub acks: std::collections::BTreeSet<String>,
}

/// A router that serves from this directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterInfo {
    pub id: String,
    /// Where clients reach it.
    pub address: String,
    pub last_heartbeat_ms: u64,
    /// The directory epoch it has applied.
    pub applied_epoch: u64,
}

/// The flags a [`Command::UpdateMove`] sets on its move; `None` leaves a flag as
/// it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveFlagUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_source: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cutover_back: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_clean: Option<bool>,
}

impl MoveFlagUpdate {
    /// Sets nothing.
    pub fn is_empty(&self) -> bool {
        *self == MoveFlagUpdate::default()
    }
}

impl Move {
    fn set_flags(&mut self, update: &MoveFlagUpdate) {
        let MoveFlagUpdate { keep_source, cutover_back, verified_clean } = *update;
        for (flag, value) in [
            (&mut self.keep_source, keep_source),
            (&mut self.cutover_back, cutover_back),
            (&mut self.verified_clean, verified_clean),
        ] {
            if let Some(v) = value {
                *flag = v;
            }
        }
    }

    /// Moves the flags that versions before the typed flags kept in `counters`
    /// (`keep_source`, `cutover_back`, `verified_clean`, 1 for yes) into their
    /// fields. Applied to every move read from a snapshot and after every
    /// [`Command::UpdateMove`], so a log or snapshot written by an older version
    /// replays to the same moves, and the old entries do not linger in `counters`.
    pub(crate) fn adopt_counter_flags(&mut self) {
        for (key, flag) in [
            ("keep_source", &mut self.keep_source),
            ("cutover_back", &mut self.cutover_back),
            ("verified_clean", &mut self.verified_clean),
        ] {
            if let Some(v) = self.counters.remove(key) {
                *flag = v == 1;
            }
        }
    }
}

/// Reads the moves of a snapshot, from this version or an older one (see
/// [`Move::adopt_counter_flags`]). Moves are persisted only inside the directory.
pub(crate) fn moves_of_any_version<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<std::collections::BTreeMap<u64, Move>, D::Error> {
    let mut moves = std::collections::BTreeMap::<u64, Move>::deserialize(d)?;
    moves.values_mut().for_each(Move::adopt_counter_flags);
    Ok(moves)
}

/// A change to the directory: one log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    AddShard {
        name: String,
        url: String,
    },
    SetShardState {
        name: String,
        state: ShardState,
    },
    /// Place a bucket on a shard (the point of no return of a cutover).
    PlaceBucket {
        bucket: u32,
        shard: String,
    },
    PinTenant {
        tenant: TenantKey,
        shard: String,
    },
    UnpinTenant {
        tenant: TenantKey,
    },
    CreateMove {
        subject: MoveSubject,
        target: String,
        #[serde(default)]
        options: MoveOptions,
        at_ms: u64,
    },
    /// Record an operator's request (or with `None`, clear it: the migrator took it).
    RequestMove {
        id: u64,
        request: Option<MoveRequest>,
    },
    /// Start a cutover hold.
    HoldMove {
        id: u64,
        token: u64,
        deadline_ms: u64,
        /// When (proposer's clock); 0 from older proposers.
        #[serde(default)]
        at_ms: u64,
    },
    /// A router holds and has nothing in flight on the rows.
    AckHold {
        id: u64,
        token: u64,
        router: String,
    },
    /// End a hold without a flip: statements go on to the shard that owns the rows.
    ReleaseHold {
        id: u64,
        token: u64,
    },
    /// The point of no return of a cutover: the rows now belong to `shard`, and the
    /// hold ends in the same entry, so held statements go straight there.
    /// Applies only while the hold `token` is in force: once a hold is released, a
    /// late-committing flip of that attempt is refused, so a cutover that gave up
    /// can never flip behind the operator's back.
    FlipMove {
        id: u64,
        shard: String,
        token: u64,
    },
    UpdateMove {
        id: u64,
        phase: MovePhase,
        #[serde(default)]
        counters: std::collections::BTreeMap<String, u64>,
        #[serde(default, skip_serializing_if = "MoveFlagUpdate::is_empty")]
        flags: MoveFlagUpdate,
        #[serde(default)]
        note: Option<String>,
        at_ms: u64,
    },
    /// A router's periodic "I am here, at this epoch". Does not bump the epoch:
    /// the epoch counts changes to where data lives.
    Heartbeat {
        router: String,
        address: String,
        applied_epoch: u64,
        at_ms: u64,
        /// When this router process started (tells its runs apart).
        #[serde(default)]
        started_ms: u64,
        /// Its shadow-read counts, for moves in the shadow phase.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        shadow: Vec<ShadowReport>,
        /// How long its statements waited on the holds of moves under way.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        held: Vec<HeldReport>,
        /// Its load counts (every few heartbeats).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        load: Option<LoadReport>,
    },
    /// Forget routers not heard from since `before_ms`.
    ExpireRouters {
        before_ms: u64,
    },
    /// Where a directory node's raft traffic goes (so every node can reach a node
    /// that joins). Not a placement change: the epoch stays.
    SetNodeAddress {
        id: u64,
        address: String,
    },
}

/// What applying a command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Applied {
        epoch: u64,
    },
    MoveCreated {
        id: u64,
        epoch: u64,
    },
    /// Refused; the directory is unchanged. The reason is for the operator.
    Rejected {
        reason: String,
    },
}

fn rejected(reason: impl Into<String>) -> Outcome {
    Outcome::Rejected { reason: reason.into() }
}

impl Directory {
    fn shard_named(&self, name: &str) -> Result<ShardId, Outcome> {
        self.shard_by_name(name)
            .ok_or_else(|| rejected(format!("no shard named {name:?}; `shardgate shard list` shows the shards")))
    }

    /// Applies one command. Deterministic: same directory + same command → same
    /// result, on every replica.
    pub fn apply(&mut self, cmd: &Command) -> Outcome {
        match self.apply_inner(cmd) {
            Ok(Some(id)) => Outcome::MoveCreated { id, epoch: self.epoch },
            Ok(None) => Outcome::Applied { epoch: self.epoch },
            Err(o) => o,
        }
    }

    fn bump(&mut self) {
        self.epoch += 1;
    }

    fn apply_inner(&mut self, cmd: &Command) -> Result<Option<u64>, Outcome> {
        match cmd {
            Command::AddShard { name, url } => {
                if name.is_empty() || url.is_empty() {
                    return Err(rejected("a shard needs a name and a URL"));
                }
                if self.shard_by_name(name).is_some() {
                    return Err(rejected(format!("a shard named {name:?} exists already")));
                }
                // Added at run time: it gets the schema with its first move, not the
                // reference tables' rows.
                self.shards.push(crate::Shard { reference: false, ..crate::Shard::new(name.clone(), url.clone()) });
            }
            Command::SetShardState { name, state } => {
                let s = self.shard_named(name)?;
                let other_reference =
                    self.shards.iter().enumerate().any(|(i, x)| i != s && x.reference && x.state == ShardState::Active);
                if *state != ShardState::Active && self.shards[s].reference && !other_reference {
                    return Err(rejected(format!(
                        "shard {name} holds the only copy of the reference tables (tables without the key column); \
                         it cannot be drained or removed"
                    )));
                }
                if *state == ShardState::Removed {
                    if let Some(m) = self.moves.values().find(|m| m.phase.active() && (m.source == s || m.target == s))
                    {
                        return Err(rejected(format!(
                            "move {} ({}) of shard {name} is still under way ({}); wait for it to finish",
                            m.id,
                            m.subject,
                            m.phase.name()
                        )));
                    }
                    let holds = self.placements.iter().filter(|&&p| p == s).count();
                    let pins = self.pins.values().filter(|&&p| p == s).count();
                    if holds > 0 || pins > 0 {
                        return Err(rejected(format!(
                            "shard {name} still holds {holds} buckets and {pins} pinned tenants; drain it first"
                        )));
                    }
                }
                self.shards[s].state = *state;
            }
            Command::PlaceBucket { bucket, shard } => {
                let s = self.shard_named(shard)?;
                if *bucket >= self.bucket_count {
                    return Err(rejected(format!("bucket {bucket} does not exist (there are {})", self.bucket_count)));
                }
                if self.shards[s].state == ShardState::Removed {
                    return Err(rejected(format!("shard {shard} is removed")));
                }
                self.placements[*bucket as usize] = s;
            }
            Command::PinTenant { tenant, shard } => {
                let s = self.shard_named(shard)?;
                if self.shards[s].state != ShardState::Active {
                    return Err(rejected(format!("shard {shard} is not active")));
                }
                self.pins.insert(tenant.clone(), s);
            }
            Command::UnpinTenant { tenant } => {
                if self.pins.remove(tenant).is_none() {
                    return Err(rejected(format!("tenant {tenant} is not pinned")));
                }
            }
            Command::CreateMove { subject, target, options, at_ms } => {
                let t = self.shard_named(target)?;
                if let MoveSubject::Bucket(b) = subject {
                    if *b >= self.bucket_count {
                        return Err(rejected(format!("bucket {b} does not exist")));
                    }
                }
                let source = self.holder_of(subject);
                if source == t {
                    return Err(rejected(format!("{} is already on shard {target}", subject)));
                }
                if self.shards[t].state != ShardState::Active {
                    return Err(rejected(format!("shard {target} is not active")));
                }
                let busy = self.moves.values().find(|m| {
                    m.phase.active()
                        && (m.subject == *subject
                            || match (&m.subject, subject) {
                                (MoveSubject::Bucket(b), MoveSubject::Tenant(k))
                                | (MoveSubject::Tenant(k), MoveSubject::Bucket(b)) => self.bucket_of(k) == *b,
                                _ => false,
                            })
                });
                if let Some(m) = busy {
                    return Err(rejected(format!(
                        "{} is already moving (move {}, {}); wait for it or cancel it",
                        subject,
                        m.id,
                        m.phase.name()
                    )));
                }
                // A bucket moves around its pinned tenants: their rows are on
                // their pinned shard, not in the bucket's copy. A pin on either end
                // of the move would put them in it (or under its fence).
                if let MoveSubject::Bucket(b) = subject {
                    let pinned = self.pins.iter().find(|(k, s)| self.bucket_of(k) == *b && (**s == source || **s == t));
                    if let Some((k, s)) = pinned {
                        let end = if *s == source { "the shard the bucket is on" } else { "the move's target" };
                        return Err(rejected(format!(
                            "bucket {b} holds tenant {k}, which is pinned to shard {} ({end}); \
                             move the bucket to another shard, or move tenant {k} elsewhere first",
                            self.shards[*s].name
                        )));
                    }
                }
                let id = self.next_move_id.max(1);
                self.next_move_id = id + 1;
                self.moves.insert(
                    id,
                    Move {
                        id,
                        subject: subject.clone(),
                        source,
                        target: t,
                        phase: MovePhase::Plan,
                        counters: Default::default(),
                        keep_source: false,
                        cutover_back: false,
                        verified_clean: false,
                        note: None,
                        options: options.clone(),
                        request: None,
                        created_ms: *at_ms,
                        updated_ms: *at_ms,
                        shadow: Default::default(),
                        history: vec![(MovePhase::Plan, *at_ms)],
                        pauses: Vec::new(),
                    },
                );
                self.bump();
                return Ok(Some(id));
            }
            Command::UpdateMove { id, phase, counters, flags, note, at_ms } => {
                let m = self.moves.get_mut(id).ok_or_else(|| rejected(format!("no move {id}")))?;
                if matches!(m.phase, MovePhase::Done | MovePhase::Cancelled) && m.phase != *phase {
                    return Err(rejected(format!("move {id} has ended ({:?})", m.phase)));
                }
                if m.phase != *phase {
                    m.history.push((*phase, *at_ms));
                }
                m.phase = *phase;
                m.counters.extend(counters.iter().map(|(k, v)| (k.clone(), *v)));
                // An entry an older version wrote carries its flags in `counters`.
                m.adopt_counter_flags();
                m.set_flags(flags);
                if note.is_some() {
                    m.note = note.clone();
                }
                m.updated_ms = *at_ms;
            }
            Command::RequestMove { id, request } => {
                let m = self.moves.get_mut(id).ok_or_else(|| rejected(format!("no move {id}")))?;
                if request.is_some() && ended(m.phase) {
                    return Err(rejected(format!("move {id} has ended ({})", m.phase.name())));
                }
                m.request = request.clone();
                return Ok(None);
            }
            Command::HoldMove { id, token, deadline_ms, at_ms } => {
                let m = self.moves.get_mut(id).ok_or_else(|| rejected(format!("no move {id}")))?;
                if ended(m.phase) {
                    return Err(rejected(format!("move {id} has ended ({})", m.phase.name())));
                }
                let kind = match m.phase {
                    MovePhase::Verify => HoldKind::Verify,
                    _ if m.cutover_back => HoldKind::Rollback,
                    _ => HoldKind::Cutover,
                };
                if m.pauses.len() >= PAUSES_KEPT {
                    m.pauses.remove(0);
                }
                m.pauses.push(Pause { token: *token, kind, at_ms: *at_ms, routers: Default::default() });
                let hold = Hold {
                    move_id: *id,
                    subject: m.subject.clone(),
                    token: *token,
                    deadline_ms: *deadline_ms,
                    acks: Default::default(),
                };
                self.holds.insert(*id, hold);
            }
            Command::AckHold { id, token, router } => {
                match self.holds.get_mut(id) {
                    Some(h) if h.token == *token => {
                        h.acks.insert(router.clone());
                    }
                    _ => return Err(rejected(format!("move {id} has no hold {token}"))),
                }
                return Ok(None);
            }
            Command::ReleaseHold { id, token } => {
                if self.holds.get(id).is_none_or(|h| h.token != *token) {
                    return Ok(None);
                }
                self.holds.remove(id);
            }
            Command::FlipMove { id, shard, token } => {
                let s = self.shard_named(shard)?;
                if self.holds.get(id).is_none_or(|h| h.token != *token) {
                    return Err(rejected(format!("move {id} has no hold {token}; the cutover attempt was given up")));
                }
                let m = self.moves.get(id).ok_or_else(|| rejected(format!("no move {id}")))?;
                if s != m.source && s != m.target {
                    return Err(rejected(format!("shard {shard} is neither end of move {id}")));
                }
                match m.subject.clone() {
                    MoveSubject::Bucket(b) => self.placements[b as usize] = s,
                    MoveSubject::Tenant(k) => {
                        self.pins.insert(k, s);
                    }
                }
                self.holds.remove(id);
            }
            Command::Heartbeat { router, address, applied_epoch, at_ms, started_ms, shadow, held, load } => {
                if let Some(l) = load {
                    self.load.insert(format!("{router}@{started_ms}"), l.clone());
                }
                for r in held {
                    let pause =
                        self.moves.get_mut(&r.move_id).and_then(|m| m.pauses.iter_mut().find(|p| p.token == r.token));
                    if let Some(p) = pause {
                        p.routers.insert(format!("{router}@{started_ms}"), r.stats.clone());
                    }
                }
                for r in shadow {
                    let Some(m) = self.moves.get_mut(&r.move_id) else { continue };
                    if ended(m.phase) {
                        continue;
                    }
                    m.shadow.insert(format!("{router}@{started_ms}"), r.counts.clone());
                    let mut sum = ShadowCounts::default();
                    for c in m.shadow.values() {
                        sum.add(c);
                    }
                    for (k, v) in [
                        ("shadow_compared", sum.compared),
                        ("shadow_matched", sum.matched),
                        ("shadow_mismatched", sum.mismatched),
                        ("shadow_lag_explained", sum.lag_explained),
                        ("shadow_unsettled", sum.unsettled),
                        ("shadow_skipped", sum.skipped),
                    ] {
                        m.counters.insert(k.to_string(), v);
                    }
                }
                self.routers.insert(
                    router.clone(),
                    RouterInfo {
                        id: router.clone(),
                        address: address.clone(),
                        last_heartbeat_ms: *at_ms,
                        applied_epoch: *applied_epoch,
                    },
                );
                return Ok(None);
            }
            Command::ExpireRouters { before_ms } => {
                self.routers.retain(|_, r| r.last_heartbeat_ms >= *before_ms);
                let routers = &self.routers;
                self.load.retain(|run, _| run.rsplit_once('@').is_some_and(|(r, _)| routers.contains_key(r)));
                return Ok(None);
            }
            Command::SetNodeAddress { id, address } => {
                if *id == 0 || address.is_empty() {
                    return Err(rejected("a node needs a positive id and an address"));
                }
                self.nodes.insert(*id, address.clone());
                return Ok(None);
            }
        }
        self.bump();
        Ok(None)
    }
}

fn ended(p: MovePhase) -> bool {
    matches!(p, MovePhase::Done | MovePhase::Cancelled | MovePhase::Failed)
}

impl MovePhase {
    pub fn name(self) -> &'static str {
        match self {
            MovePhase::Plan => "plan",
            MovePhase::Copy => "copy",
            MovePhase::DualWrite => "dual_write",
            MovePhase::Shadow => "shadow",
            MovePhase::Verify => "verify",
            MovePhase::Cutover => "cutover",
            MovePhase::Reverse => "reverse",
            MovePhase::Cleanup => "cleanup",
            MovePhase::Done => "done",
            MovePhase::Cancelled => "cancelled",
            MovePhase::Failed => "failed",
        }
    }

    /// Still under way (not done, cancelled or failed).
    pub fn active(self) -> bool {
        !ended(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{KeyType, Shard};

    fn dir() -> Directory {
        let shards = (0..2).map(|i| Shard::new(format!("s{i}"), format!("postgres://h/{i}"))).collect();
        Directory::new("tenant_id", KeyType::Int, 8, shards).unwrap()
    }

    fn commands() -> Vec<Command> {
        vec![
            Command::AddShard { name: "s2".into(), url: "postgres://h/2".into() },
            Command::PlaceBucket { bucket: 3, shard: "s2".into() },
            Command::PinTenant { tenant: TenantKey::Int(42), shard: "s2".into() },
            Command::CreateMove {
                subject: MoveSubject::Bucket(0),
                target: "s1".into(),
                options: Default::default(),
                at_ms: 10,
            },
            Command::UpdateMove {
                id: 1,
                phase: MovePhase::Copy,
                counters: [("rows_copied".to_string(), 5)].into(),
                flags: Default::default(),
                note: None,
                at_ms: 11,
            },
            Command::Heartbeat {
                router: "r1".into(),
                address: "127.0.0.1:6432".into(),
                applied_epoch: 3,
                at_ms: 12,
                started_ms: 1,
                shadow: vec![],
                held: vec![],
                load: Some(LoadReport {
                    buckets: vec![LoadCount { bucket: 2, statements: 10, rows_written: 3, micros: 900 }],
                    tenants: vec![],
                }),
            },
            Command::SetShardState { name: "s0".into(), state: ShardState::Removed },
            Command::SetShardState { name: "s0".into(), state: ShardState::Draining },
            Command::UnpinTenant { tenant: TenantKey::Int(7) },
        ]
    }

    #[test]
    fn replaying_the_same_log_gives_the_same_directory() {
        let (mut a, mut b) = (dir(), dir());
        let outcomes_a: Vec<_> = commands().iter().map(|c| a.apply(c)).collect();
        let outcomes_b: Vec<_> = commands().iter().map(|c| b.apply(c)).collect();
        assert_eq!(a, b);
        assert_eq!(outcomes_a, outcomes_b);
    }

    #[test]
    fn changes_bump_the_epoch_and_rejections_change_nothing() {
        let mut d = dir();
        let before = d.clone();
        let out = d.apply(&Command::PlaceBucket { bucket: 99, shard: "s1".into() });
        assert!(matches!(out, Outcome::Rejected { .. }));
        assert_eq!(d, before);
        let out = d.apply(&Command::PlaceBucket { bucket: 0, shard: "s1".into() });
        assert_eq!(out, Outcome::Applied { epoch: before.epoch + 1 });
        assert_eq!(d.placements[0], 1);
        // Heartbeats are not placement changes.
        let e = d.epoch;
        d.apply(&Command::Heartbeat {
            router: "r".into(),
            address: "a".into(),
            applied_epoch: e,
            at_ms: 1,
            started_ms: 1,
            shadow: vec![],
            held: vec![],
            load: None,
        });
        assert_eq!(d.epoch, e);
    }

    #[test]
    fn a_shard_holding_data_cannot_be_removed_and_moves_are_not_doubled() {
        let mut d = dir();
        let out = d.apply(&Command::SetShardState { name: "s0".into(), state: ShardState::Removed });
        assert!(matches!(out, Outcome::Rejected { ref reason } if reason.contains("drain")));
        let first = d.apply(&Command::CreateMove {
            subject: MoveSubject::Bucket(1),
            target: "s1".into(),
            options: Default::default(),
            at_ms: 1,
        });
        assert!(matches!(first, Outcome::MoveCreated { id: 1, .. }));
        let again = d.apply(&Command::CreateMove {
            subject: MoveSubject::Bucket(1),
            target: "s1".into(),
            options: Default::default(),
            at_ms: 2,
        });
        assert!(matches!(again, Outcome::Rejected { ref reason } if reason.contains("already moving")));
        let home = d.apply(&Command::CreateMove {
            subject: MoveSubject::Bucket(7),
            target: "s1".into(),
            options: Default::default(),
            at_ms: 2,
        });
        assert!(matches!(home, Outcome::Rejected { ref reason } if reason.contains("already on")));
        // The move's target cannot be removed while the move runs, even once
        // nothing is placed there.
        d.apply(&Command::SetShardState { name: "s1".into(), state: ShardState::Draining });
        for b in 0..d.bucket_count {
            if d.placements[b as usize] == 1 {
                d.apply(&Command::PlaceBucket { bucket: b, shard: "s0".into() });
            }
        }
        d.pins.retain(|_, s| *s != 1);
        let out = d.apply(&Command::SetShardState { name: "s1".into(), state: ShardState::Removed });
        assert!(matches!(out, Outcome::Rejected { ref reason } if reason.contains("move 1 (bucket 1)")), "{out:?}");
    }

    #[test]
    fn snapshot_restores_an_identical_directory() {
        let mut d = dir();
        for c in commands() {
            d.apply(&c);
        }
        let snap = serde_json::to_vec(&d).unwrap();
        let back: Directory = serde_json::from_slice(&snap).unwrap();
        assert_eq!(back, d);
        // And commands keep applying identically after a restore.
        let (mut x, mut y) = (d.clone(), back);
        let c = Command::CreateMove {
            subject: MoveSubject::Bucket(2),
            target: "s2".into(),
            options: Default::default(),
            at_ms: 50,
        };
        assert_eq!(x.apply(&c), y.apply(&c));
        assert_eq!(x, y);
    }

    #[test]
    fn shadow_counts_from_heartbeats_add_up_across_routers_and_restarts() {
        let mut d = dir();
        d.apply(&Command::CreateMove {
            subject: MoveSubject::Bucket(1),
            target: "s1".into(),
            options: Default::default(),
            at_ms: 1,
        });
        let beat = |router: &str, started_ms: u64, compared: u64, mismatched: u64| Command::Heartbeat {
            router: router.into(),
            address: "a".into(),
            applied_epoch: 1,
            at_ms: 5,
            started_ms,
            load: None,
            shadow: vec![ShadowReport {
                move_id: 1,
                counts: ShadowCounts { compared, matched: compared - mismatched, mismatched, ..Default::default() },
            }],
            held: vec![],
        };
        let epoch = d.epoch;
        d.apply(&beat("r1", 100, 10, 1));
        d.apply(&beat("r2", 100, 5, 0));
        // The same router run reports cumulative counts: they replace, not add.
        d.apply(&beat("r1", 100, 12, 1));
        // A restarted r1 starts from zero; its first run's counts stay.
        d.apply(&beat("r1", 200, 3, 0));
        let m = &d.moves[&1];
        assert_eq!(m.counters["shadow_compared"], 12 + 5 + 3);
        assert_eq!(m.counters["shadow_mismatched"], 1);
        assert_eq!(m.counters["shadow_matched"], 11 + 5 + 3);
        assert_eq!(d.epoch, epoch, "shadow counts are not placement changes");
        // Reports for moves that ended or never existed change nothing.
        let before = d.clone();
        d.apply(&Command::Heartbeat {
            router: "r1".into(),
            address: "a".into(),
            applied_epoch: 1,
            at_ms: 5,
            started_ms: 200,
            load: None,
            shadow: vec![ShadowReport { move_id: 9, counts: ShadowCounts { compared: 1, ..Default::default() } }],
            held: vec![],
        });
        assert_eq!(d.moves, before.moves);
    }

    /// A move as the versions before the typed flags wrote it into a snapshot:
    /// its flags are counters (1 for yes) and the flag fields are missing.
    const OLD_MOVE: &str = r#"{
        "id": 1, "subject": {"bucket": 0}, "source": 0, "target": 1, "phase": "reverse",
        "counters": {"rows_copied": 5, "verified_at_ms": 9, "verified_clean": 1, "cutover_back": 0,
                     "keep_source": 1, "cutovers": 1},
        "note": "cut over in 4.0 ms", "options": {"cutover_auto": false, "complete_auto": false},
        "request": null, "created_ms": 1, "updated_ms": 9, "history": [["plan", 1], ["reverse", 9]]
    }"#;

    #[test]
    fn a_snapshot_written_before_the_typed_flags_loads_with_its_flags() {
        let mut snapshot = serde_json::to_value(dir()).unwrap();
        snapshot["moves"] = serde_json::json!({ "1": serde_json::from_str::<serde_json::Value>(OLD_MOVE).unwrap() });
        let d: Directory = serde_json::from_value(snapshot).unwrap();
        let m = &d.moves[&1];
        assert!(m.verified_clean && m.keep_source && !m.cutover_back, "{m:?}");
        let left: Vec<&str> = m.counters.keys().map(String::as_str).collect();
        assert_eq!(left, ["cutovers", "rows_copied", "verified_at_ms"], "the flags leave the counters");
        // Written again, it is in the new form, and reads back the same.
        let again: Directory = serde_json::from_slice(&serde_json::to_vec(&d).unwrap()).unwrap();
        assert_eq!(again, d);
    }

    #[test]
    fn a_log_entry_written_before_the_typed_flags_sets_them() {
        let mut d = dir();
        create(&mut d, MoveSubject::Bucket(1), "s1");
        let old = r#"{"op": "update_move", "id": 1, "phase": "shadow",
                      "counters": {"verified_clean": 1, "verified_at_ms": 5}, "note": "verified clean", "at_ms": 5}"#;
        d.apply(&serde_json::from_str::<Command>(old).unwrap());
        let m = &d.moves[&1];
        assert!(m.verified_clean);
        assert!(!m.counters.contains_key("verified_clean"));
        assert_eq!(m.counters["verified_at_ms"], 5);
        let old = r#"{"op": "update_move", "id": 1, "phase": "cleanup", "counters": {"keep_source": 1}, "at_ms": 6}"#;
        d.apply(&serde_json::from_str::<Command>(old).unwrap());
        assert!(d.moves[&1].keep_source && d.moves[&1].verified_clean);
    }

    #[test]
    fn an_update_sets_the_flags_it_names_and_leaves_the_others() {
        let mut d = dir();
        let id = create(&mut d, MoveSubject::Bucket(1), "s1");
        let update = |flags: MoveFlagUpdate| Command::UpdateMove {
            id,
            phase: MovePhase::Shadow,
            counters: Default::default(),
            flags,
            note: None,
            at_ms: 3,
        };
        d.apply(&update(MoveFlagUpdate { verified_clean: Some(true), ..Default::default() }));
        d.apply(&update(MoveFlagUpdate { cutover_back: Some(true), ..Default::default() }));
        let m = &d.moves[&id];
        assert!(m.verified_clean && m.cutover_back && !m.keep_source);
        d.apply(&update(MoveFlagUpdate { verified_clean: Some(false), ..Default::default() }));
        assert!(!d.moves[&id].verified_clean && d.moves[&id].cutover_back);
        // An update that sets no flag writes none into its log entry.
        let json = serde_json::to_string(&update(MoveFlagUpdate::default())).unwrap();
        assert!(!json.contains("flags"), "{json}");
    }

    #[test]
    fn a_move_subject_reads_as_the_cli_names_it() {
        assert_eq!(MoveSubject::Bucket(17).to_string(), "bucket 17");
        assert_eq!(MoveSubject::Tenant(TenantKey::Int(42)).to_string(), "tenant 42");
        assert_eq!(MoveSubject::Tenant(TenantKey::Text("acme".into())).to_string(), "tenant acme");
    }

    #[test]
    fn commands_have_a_readable_json_form() {
        let c = Command::PlaceBucket { bucket: 17, shard: "shard_b".into() };
        assert_eq!(serde_json::to_string(&c).unwrap(), r#"{"op":"place_bucket","bucket":17,"shard":"shard_b"}"#);
    }

    #[test]
    fn a_cutover_holds_then_flips_in_one_entry() {
        let mut d = dir();
        let Outcome::MoveCreated { id, .. } = d.apply(&Command::CreateMove {
            subject: MoveSubject::Bucket(1),
            target: "s1".into(),
            options: Default::default(),
            at_ms: 1,
        }) else {
            panic!("move not created")
        };
        let key = (0..).map(TenantKey::Int).find(|k| d.bucket_of(k) == 1).unwrap();
        let other = (0..).map(TenantKey::Int).find(|k| d.bucket_of(k) == 2).unwrap();
        assert_eq!(d.held(&key), None);
        d.apply(&Command::HoldMove { id, token: 7, deadline_ms: 100, at_ms: 0 });
        assert_eq!(d.held(&key), Some(id));
        assert_eq!(d.held(&other), None);
        // Acks count only for the current attempt.
        assert!(matches!(d.apply(&Command::AckHold { id, token: 6, router: "r1".into() }), Outcome::Rejected { .. }));
        d.apply(&Command::AckHold { id, token: 7, router: "r1".into() });
        assert!(d.holds[&id].acks.contains("r1"));
        // A stale release (an older attempt) leaves the hold alone.
        d.apply(&Command::ReleaseHold { id, token: 6 });
        assert_eq!(d.held(&key), Some(id));
        let before = d.shard_for(&key);
        let late = d.apply(&Command::FlipMove { id, shard: "s1".into(), token: 6 });
        assert!(matches!(late, Outcome::Rejected { .. }), "a flip of an older attempt is refused");
        d.apply(&Command::FlipMove { id, shard: "s1".into(), token: 7 });
        assert_eq!(d.held(&key), None);
        assert_ne!(d.shard_for(&key), before);
        assert_eq!(d.shard_for(&key), 1);
        // A tenant of a moving bucket cannot move on its own meanwhile.
        let out = d.apply(&Command::CreateMove {
            subject: MoveSubject::Tenant(key),
            target: "s0".into(),
            options: Default::default(),
            at_ms: 2,
        });
        assert!(matches!(out, Outcome::Rejected { ref reason } if reason.contains("already moving")), "{out:?}");
    }

    fn create(d: &mut Directory, subject: MoveSubject, target: &str) -> u64 {
        let out =
            d.apply(&Command::CreateMove { subject, target: target.into(), options: Default::default(), at_ms: 1 });
        let Outcome::MoveCreated { id, .. } = out else { panic!("move not created: {out:?}") };
        id
    }

    fn owner_and_other_end(d: &Directory, id: u64) -> (ShardId, ShardId) {
        (d.owner_of(&d.moves[&id]), d.other_end_of(&d.moves[&id]))
    }

    #[test]
    fn a_bucket_move_is_owned_by_its_source_until_the_flip_and_by_its_source_again_after_a_rollback() {
        let mut d = dir();
        let id = create(&mut d, MoveSubject::Bucket(1), "s1");
        assert_eq!(owner_and_other_end(&d, id), (0, 1), "planned: the source owns, the target gets a copy");
        for phase in [MovePhase::Copy, MovePhase::DualWrite, MovePhase::Shadow, MovePhase::Verify, MovePhase::Cutover] {
            d.apply(&Command::UpdateMove {
                id,
                phase,
                counters: Default::default(),
                flags: Default::default(),
                note: None,
                at_ms: 2,
            });
            assert_eq!(owner_and_other_end(&d, id), (0, 1), "{phase:?}: the phase alone moves nothing");
        }
        d.apply(&Command::HoldMove { id, token: 1, deadline_ms: 100, at_ms: 0 });
        assert_eq!(owner_and_other_end(&d, id), (0, 1), "held, not flipped");
        d.apply(&Command::FlipMove { id, shard: "s1".into(), token: 1 });
        assert_eq!(owner_and_other_end(&d, id), (1, 0), "flipped: the target owns");
        // A rollback is the same cutover backwards.
        d.apply(&Command::HoldMove { id, token: 2, deadline_ms: 100, at_ms: 0 });
        d.apply(&Command::FlipMove { id, shard: "s0".into(), token: 2 });
        assert_eq!(owner_and_other_end(&d, id), (0, 1), "rolled back: the source owns again");
        // A released hold (a cutover given up) flips nothing.
        d.apply(&Command::HoldMove { id, token: 3, deadline_ms: 100, at_ms: 0 });
        d.apply(&Command::ReleaseHold { id, token: 3 });
        assert_eq!(owner_and_other_end(&d, id), (0, 1));
    }

    #[test]
    fn a_tenant_move_is_owned_through_the_tenants_pin() {
        let mut d = dir();
        let key = (0..).map(TenantKey::Int).find(|k| d.bucket_of(k) == 2).unwrap();
        let home = d.shard_for(&key);
        let away = 1 - home;
        let id = create(&mut d, MoveSubject::Tenant(key.clone()), &format!("s{away}"));
        assert_eq!(d.moves[&id].source, home);
        assert_eq!(owner_and_other_end(&d, id), (home, away));
        d.apply(&Command::HoldMove { id, token: 1, deadline_ms: 100, at_ms: 0 });
        d.apply(&Command::FlipMove { id, shard: format!("s{away}"), token: 1 });
        assert_eq!(owner_and_other_end(&d, id), (away, home), "the flip pins the tenant to the target");
        assert_eq!(d.holder_of(&MoveSubject::Bucket(2)), home, "its bucket stays where it was");
        d.apply(&Command::HoldMove { id, token: 2, deadline_ms: 100, at_ms: 0 });
        d.apply(&Command::FlipMove { id, shard: format!("s{home}"), token: 2 });
        assert_eq!(owner_and_other_end(&d, id), (home, away), "rolled back: pinned to the source");
    }

    #[test]
    fn a_bucket_is_held_without_its_tenants_pinned_elsewhere() {
        let mut d = dir();
        let key = (0..).map(TenantKey::Int).find(|k| d.bucket_of(k) == 1).unwrap();
        d.apply(&Command::PinTenant { tenant: key.clone(), shard: "s1".into() });
        assert_eq!(d.holder_of(&MoveSubject::Bucket(1)), 0);
        assert_eq!(d.holder_of(&MoveSubject::Tenant(key)), 1);
    }

    #[test]
    fn a_shard_added_later_holds_no_reference_rows_and_the_last_reference_shard_stays() {
        let mut d = Directory::new(
            "tenant_id",
            KeyType::Int,
            4,
            (0..2).map(|i| Shard::new(format!("s{i}"), format!("postgres://h/{i}"))).collect(),
        )
        .unwrap();
        assert!(!matches!(
            d.apply(&Command::AddShard { name: "s2".into(), url: "postgres://h/2".into() }),
            Outcome::Rejected { .. }
        ));
        assert!(d.shards[0].reference && d.shards[1].reference && !d.shards[2].reference);
        assert_eq!(d.reference_shards(), vec![0, 1]);
        assert_eq!(d.owning_shards(), vec![0, 1], "s2 owns nothing yet");
        let drain = |name: &str| Command::SetShardState { name: name.into(), state: ShardState::Draining };
        assert!(!matches!(d.apply(&drain("s0")), Outcome::Rejected { .. }));
        let out = d.apply(&drain("s1"));
        assert!(format!("{out:?}").contains("only copy of the reference tables"), "{out:?}");
    }
}

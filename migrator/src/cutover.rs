//! The cutover: the moment the moving rows change owner.
//!
//! ```text
//!   routers hold new statements for the rows; in-flight transactions on them end
//!   old shard: take the move's lock (waits for direct writers), arm the fence
//!   old → new: marker row; wait until it is applied (everything before it is too)
//!   carry sequences forward; advance the idle new → old slot to "now"
//!   new shard: lift its fence
//!   directory: flip the placement (one Raft entry — the point of no return)
//!   routers release the held statements, which now go to the new shard
//!   afterwards: stop old → new, start new → old (the old shard stays current)
//! ```
//!
//! Anything that fails before the flip undoes the fences and releases the held
//! statements to the old shard: the move stays in dual-write and nobody sees an
//! error. A rollback is the same function in the other [`Direction`].

use std::future::Future;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::pg::rows;
use crate::schema::{self, FENCE_LOCK_CLASS};
use crate::{fault, replication, Endpoint, Error, MoveSpec};
use shardgate_router::moves::quote::literal;

/// What the cutover needs from the cluster: the routers' hold and the directory's
/// flip. The router cluster implements it over the directory; tests may implement
/// it directly.
pub trait Coordinator: Send + Sync {
    /// Returns once every router holds new statements for the move's rows and has
    /// no transaction touching them in flight, or fails at `deadline`.
    fn hold(&self, deadline: Instant) -> impl Future<Output = Result<(), Error>> + Send;
    /// Makes `shard` the owner of the move's rows in the directory. `Ok` only once
    /// the change is committed; `Err` only when it is certainly not (an unknown
    /// outcome must be resolved by the implementation, not returned).
    fn flip(&self, shard: &str) -> impl Future<Output = Result<(), Error>> + Send;
    /// Lets held statements go, to wherever the directory now says.
    fn release(&self) -> impl Future<Output = ()> + Send;
}

/// Which way a cutover goes: forward (source → target) or back (a rollback).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Forward,
    Back,
}

/// The two shards of a cutover and the streams between them.
pub struct Sides<'a> {
    pub old: &'a Endpoint,
    pub new: &'a Endpoint,
    /// Stream old → new: slot and publication on old, subscription on new.
    pub old_to_new: String,
    /// Stream new → old: slot and publication on new, subscription on old.
    pub new_to_old: String,
}

impl Direction {
    pub fn sides(self, spec: &MoveSpec) -> Sides<'_> {
        match self {
            Direction::Forward => Sides {
                old: &spec.source,
                new: &spec.target,
                old_to_new: spec.forward_name(),
                new_to_old: spec.reverse_name(),
            },
            Direction::Back => Sides {
                old: &spec.target,
                new: &spec.source,
                old_to_new: spec.reverse_name(),
                new_to_old: spec.forward_name(),
            },
        }
    }
}

/// How long the steps before the hold may take (waiting for a stream to start and
/// catch up); nothing is held meanwhile.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct CutoverOptions {
    /// Everything before the flip must finish within this, or the cutover is undone.
    pub timeout: Duration,
}

impl Default for CutoverOptions {
    fn default() -> Self {
        CutoverOptions { timeout: Duration::from_secs(5) }
    }
}

/// How long each step took; `pause` is hold to release, what held statements feel
/// at most (plus their own routing).
#[derive(Debug, Clone, Default)]
pub struct CutoverReport {
    pub pause: Duration,
    pub hold: Duration,
    pub fence: Duration,
    pub catch_up: Duration,
    pub flip: Duration,
}

/// Runs a cutover in `dir`. On `Err` the move is as it was before (dual-write in the
/// old direction); on `Ok` the new shard owns the rows and the reverse stream runs.
pub async fn cutover<C: Coordinator>(
    spec: &MoveSpec,
    dir: Direction,
    coord: &C,
    opts: &CutoverOptions,
) -> Result<CutoverReport, Error> {
    let s = dir.sides(spec);
    let old = s.old.connect(&format!("move {} cutover (old)", spec.id)).await?;
    let new = s.new.connect(&format!("move {} cutover (new)", spec.id)).await?;
    let tables =
        schema::sharded_tables(&old, &spec.key_column).await.map_err(|e| Error::pg(&s.old.name, "list tables", e))?;
    let sequences =
        schema::owned_sequences(&old, &tables).await.map_err(|e| Error::pg(&s.old.name, "find sequences", e))?;
    // Keep the critical path short: the stream old → new must be running (a stream
    // enabled moments ago starts within wal_retrieve_retry_interval) and caught
    // up, and most of the WAL the idle slot would skip is skipped now.
    replication::wait_slot_active(s.old, &old, &s.old_to_new, PREPARE_TIMEOUT).await?;
    wait_in_doubt_settled(s.old, &old).await?;
    replication::catch_up(spec, (s.old, &old), (s.new, &new), PREPARE_TIMEOUT).await?;
    replication::advance_idle_slot(s.new, &new, &s.new_to_old).await?;

    let started = Instant::now();
    let deadline = started + opts.timeout;
    let mut report = CutoverReport::default();
    let result = critical_path(spec, &s, coord, &old, &new, &sequences, deadline, &mut report).await;
    if let Err(e) = result {
        tracing::warn!(move_id = spec.id, error = %e, "cutover undone; the move stays in dual-write");
        let undo = undo(spec, &s, &old, &new).await;
        coord.release().await;
        return Err(match undo {
            Ok(()) => e,
            Err(u) => Error::Other(format!("{e}; and undoing the fences failed: {u} (the next attempt repairs them)")),
        });
    }
    coord.release().await;
    report.pause = started.elapsed();
    tracing::info!(move_id = spec.id, pause_ms = report.pause.as_secs_f64() * 1e3, "cutover done");
    settle_streams(spec, dir).await?;
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
async fn critical_path<C: Coordinator>(
    spec: &MoveSpec,
    s: &Sides<'_>,
    coord: &C,
    old: &Client,
    new: &Client,
    sequences: &[String],
    deadline: Instant,
    report: &mut CutoverReport,
) -> Result<(), Error> {
    let t = Instant::now();
    coord.hold(deadline).await?;
    report.hold = t.elapsed();
    fault::point("cutover.after_hold")?;

    // Arm the old shard's fence under the move's lock: writers of the moving rows
    // hold it shared until they commit, so taking it waits for each of them, and
    // a writer that comes later sees the fence armed.
    let t = Instant::now();
    let (kind, value) = spec.fence_key();
    let left = remaining(deadline)?;
    old.batch_execute(&format!(
        "BEGIN; SET LOCAL lock_timeout = '{}ms'; SELECT pg_advisory_xact_lock({FENCE_LOCK_CLASS}, {}); \
         UPDATE shardgate.fence SET armed = true, move_id = {}, changed_at = now() WHERE kind = '{kind}' AND value = {}; \
         COMMIT",
        left.as_millis().max(1),
        spec.id as i32,
        spec.id,
        literal(&value)
    ))
    .await
    .map_err(|e| Error::pg(&s.old.name, "arm the fence", e))?;
    report.fence = t.elapsed();
    fault::point("cutover.after_fence")?;

    let t = Instant::now();
    let values = if sequences.is_empty() { Vec::new() } else { read_sequences(s.old, old, sequences).await? };
    report.catch_up = replication::catch_up(spec, (s.old, old), (s.new, new), remaining(deadline)?).await?;
    if !values.is_empty() {
        let sets: Vec<String> = sequences
            .iter()
            .zip(&values)
            .map(|(seq, v)| {
                format!("setval({0}, greatest({v}, (SELECT last_value FROM {seq})), true)", literal(seq), seq = seq)
            })
            .collect();
        new.batch_execute(&format!("SELECT {}", sets.join(", ")))
            .await
            .map_err(|e| Error::pg(&s.new.name, "carry sequences forward", e))?;
    }
    let _ = t;
    fault::point("cutover.after_catch_up")?;

    replication::advance_idle_slot(s.new, new, &s.new_to_old).await?;
    fault::point("cutover.after_slot_advance")?;
    set_armed(s.new, new, spec, false).await?;
    remaining(deadline)?;

    let t = Instant::now();
    coord.flip(&s.new.name).await?;
    report.flip = t.elapsed();
    fault::point("cutover.after_flip").map_err(|e| Error::Other(format!("after the flip: {e}")))?;
    Ok(())
}

/// Before statements are held: waits until every transaction that shardgate
/// has prepared on the old shard, as of now, has ended. One whose router
/// stopped mid-commit may hold moving rows, and the fence would wait for it
/// (the recovery sweep settles it within seconds) with the tenant's
/// statements held; a commit in progress ends in milliseconds. Transactions
/// prepared later are not waited for. After [`IN_DOUBT_WAIT`] the cutover
/// goes on: the fence still waits for any part on the moving rows, or the
/// cutover is undone.
async fn wait_in_doubt_settled(shard: &Endpoint, client: &Client) -> Result<(), Error> {
    let sql = format!(
        "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() AND gid LIKE {}",
        literal(&format!("{}%", shardgate_router::twophase::GID_PREFIX.replace('_', "\\_")))
    );
    let started = Instant::now();
    let mut waiting: Option<Vec<String>> = None;
    loop {
        let listed =
            client.simple_query(&sql).await.map_err(|e| Error::pg(&shard.name, "list prepared transactions", e))?;
        let now: Vec<String> = listed
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .collect();
        let left: Vec<String> = match &waiting {
            None => now,
            Some(first) => first.iter().filter(|g| now.contains(g)).cloned().collect(),
        };
        if left.is_empty() {
            return Ok(());
        }
        if started.elapsed() >= IN_DOUBT_WAIT {
            tracing::warn!(shard = %shard.name, in_doubt = ?left, "cutover goes on with transactions still prepared on the old shard");
            return Ok(());
        }
        waiting = Some(left);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How long a cutover waits for in-doubt transactions before holding statements.
const IN_DOUBT_WAIT: Duration = Duration::from_secs(15);

fn remaining(deadline: Instant) -> Result<Duration, Error> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| Error::Timeout("the cutover ran out of time before the flip".into()))
}

async fn read_sequences(shard: &Endpoint, client: &Client, sequences: &[String]) -> Result<Vec<String>, Error> {
    let cols: Vec<String> = sequences.iter().map(|s| format!("(SELECT last_value FROM {s})")).collect();
    let r = rows(client, &format!("SELECT {}", cols.join(", ")))
        .await
        .map_err(|e| Error::pg(&shard.name, "read sequences", e))?;
    Ok(r.into_iter().next().unwrap_or_default().into_iter().map(|v| v.unwrap_or_else(|| "1".into())).collect())
}

async fn set_armed(shard: &Endpoint, client: &Client, spec: &MoveSpec, armed: bool) -> Result<(), Error> {
    crate::prepare::set_fence(shard, client, spec, armed).await
}

/// Puts the fences back as they were before a cutover in this direction started.
async fn undo(spec: &MoveSpec, s: &Sides<'_>, old: &Client, new: &Client) -> Result<(), Error> {
    set_armed(s.new, new, spec, true).await?;
    set_armed(s.old, old, spec, false).await
}

/// Repairs the fences after a cutover died before its flip (found by a restarted
/// migrator: the directory still names the old shard). Idempotent.
pub async fn repair_unflipped(spec: &MoveSpec, dir: Direction) -> Result<(), Error> {
    let s = dir.sides(spec);
    let old = s.old.connect(&format!("move {} repair (old)", spec.id)).await?;
    let new = s.new.connect(&format!("move {} repair (new)", spec.id)).await?;
    undo(spec, &s, &old, &new).await
}

/// After a flip in `dir`: stop the old → new stream and start new → old, so the old
/// shard stays current and a rollback loses nothing. Idempotent: a restarted
/// migrator that finds the flip done runs it again.
pub async fn settle_streams(spec: &MoveSpec, dir: Direction) -> Result<(), Error> {
    let s = dir.sides(spec);
    let old = s.old.connect(&format!("move {} settle (old)", spec.id)).await?;
    let new = s.new.connect(&format!("move {} settle (new)", spec.id)).await?;
    // The fences as the flip left them (a crash may have come between).
    set_armed(s.old, &old, spec, true).await?;
    set_armed(s.new, &new, spec, false).await?;
    new.batch_execute(&format!("ALTER SUBSCRIPTION {} DISABLE", s.old_to_new))
        .await
        .map_err(|e| Error::pg(&s.new.name, "stop the old stream", e))?;
    // Until its walsender is gone the old stream could carry the new stream's
    // changes straight back.
    replication::wait_slot_inactive(s.old, &old, &s.old_to_new, Duration::from_secs(60)).await?;
    old.batch_execute(&format!("ALTER SUBSCRIPTION {} ENABLE", s.new_to_old))
        .await
        .map_err(|e| Error::pg(&s.old.name, "start the reverse stream", e))?;
    Ok(())
}

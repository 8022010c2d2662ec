//! The copy phase: the moving rows, read from one consistent snapshot of the
//! source, written to the target at a rate the operator can cap, and the change
//! stream started exactly where that snapshot ends.
//!
//! Postgres's own subscription copy (`copy_data = true`) cannot be slowed down
//! from outside, so shardgate copies the rows itself, the way a table-sync
//! worker does:
//!
//! 1. On the target, one transaction takes the move's advisory lock (a second
//!    driver — a new leader while the old one is still copying — waits its turn)
//!    and returns at once if the move's subscription exists: the copy committed.
//! 2. On the source, a replication connection creates the move's slot with
//!    `EXPORT_SNAPSHOT`: the snapshot sees exactly the commits before the slot's
//!    first change. A read-only transaction imports it.
//! 3. Each table: `COPY (SELECT … WHERE <row filter>) TO STDOUT` on the source,
//!    streamed into `COPY … FROM STDIN` on the target (as a replica, past the
//!    target's armed fence), paced by the [`Throttle`].
//! 4. Still in the same target transaction: `CREATE SUBSCRIPTION … copy_data =
//!    false` on that slot, then COMMIT. The rows and the stream appear together
//!    or not at all; a driver that dies mid-copy leaves nothing on the target,
//!    and the next one starts over with a new slot.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use shardgate_router::moves::Backend;
use tokio_postgres::Client;

use crate::pg::scalar;
use crate::schema::{self, Table};
use crate::{fault, Error, MoveSpec};
use shardgate_router::moves::quote::{ident, literal};

/// Caps how fast the copies of one driver go, together (0: no cap). Pacing by
/// a virtual clock: each chunk copied pushes the clock forward by what it costs
/// at the cap, and the copy waits while the clock runs ahead of real time. Time
/// spent idle is not banked, so a copy never bursts after a pause.
pub struct Throttle {
    rows_per_s: u64,
    bytes_per_s: u64,
    clock: Mutex<Option<Instant>>,
}

/// How much copying one throttle check covers.
const CHUNK_ROWS: u64 = 256;
const CHUNK_BYTES: u64 = 64 * 1024;

impl Throttle {
    pub fn new(rows_per_s: u64, bytes_per_s: u64) -> Arc<Throttle> {
        Arc::new(Throttle { rows_per_s, bytes_per_s, clock: Mutex::new(None) })
    }

    pub fn unlimited() -> Arc<Throttle> {
        Self::new(0, 0)
    }

    fn limited(&self) -> bool {
        self.rows_per_s > 0 || self.bytes_per_s > 0
    }

    /// What copying `rows` and `bytes` costs at the caps.
    fn cost(&self, rows: u64, bytes: u64) -> Duration {
        let at = |n: u64, per_s: u64| if per_s == 0 { 0.0 } else { n as f64 / per_s as f64 };
        Duration::from_secs_f64(at(rows, self.rows_per_s).max(at(bytes, self.bytes_per_s)))
    }

    /// Charges `rows` and `bytes` copied at `now`; returns how long to wait
    /// before copying more.
    fn charge_at(&self, now: Instant, rows: u64, bytes: u64) -> Duration {
        let mut clock = self.clock.lock().unwrap_or_else(|p| p.into_inner());
        let start = clock.map_or(now, |c| c.max(now));
        let next = start + self.cost(rows, bytes);
        *clock = Some(next);
        next.saturating_duration_since(now)
    }

    /// Charges what was just copied and waits for the cap, if there is one.
    pub async fn charge(&self, rows: u64, bytes: u64) {
        if !self.limited() {
            return;
        }
        let wait = self.charge_at(Instant::now(), rows, bytes);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Copy progress of one table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableProgress {
    pub table: String,
    pub rows: u64,
    pub bytes: u64,
    /// All its moving rows are written (they show on the target at commit).
    pub done: bool,
}

/// Progress of a running copy, for the driver to report.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub tables: Vec<TableProgress>,
}

impl Progress {
    pub fn rows(&self) -> u64 {
        self.tables.iter().map(|t| t.rows).sum()
    }

    pub fn bytes(&self) -> u64 {
        self.tables.iter().map(|t| t.bytes).sum()
    }
}

/// How a copy attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Copied and committed, the stream running from the snapshot on.
    Copied { rows: u64, bytes: u64 },
    /// An earlier attempt committed already (the subscription exists).
    AlreadyCopied,
    /// Another driver holds the move's copy lock on the target: try again later.
    Busy,
}

/// Advisory lock class of move copies (`pg_try_advisory_xact_lock(class, move)`).
const LOCK_CLASS: i32 = 0x5347_4d56; // "SGMV"

/// Copies the moving rows and starts the forward stream; see the module comment.
/// `progress` is updated as rows flow. Dropping the future mid-copy rolls both
/// transactions back (their connections close).
pub async fn copy(
    spec: &MoveSpec,
    throttle: &Throttle,
    progress: &tokio::sync::watch::Sender<Progress>,
) -> Result<Outcome, Error> {
    let dst = spec.target.connect(&format!("move {} copy (target)", spec.id)).await?;
    let result = copy_to(spec, throttle, progress, &dst).await;
    if result.is_err() {
        // End the target's transaction now rather than when its server notices
        // the closed connection: the move's copy lock ends with it, so an
        // attempt right after this one is not told Busy.
        let _ = tokio::time::timeout(Duration::from_secs(5), dst.batch_execute("ROLLBACK")).await;
    }
    result
}

async fn copy_to(
    spec: &MoveSpec,
    throttle: &Throttle,
    progress: &tokio::sync::watch::Sender<Progress>,
    dst: &Client,
) -> Result<Outcome, Error> {
    let fwd = spec.forward_name();
    let dst_err = |what: &str| {
        let what = what.to_string();
        move |e| Error::pg(&spec.target.name, what, e)
    };
    dst.batch_execute("BEGIN").await.map_err(dst_err("begin the copy"))?;
    let locked = scalar(dst, &format!("SELECT pg_try_advisory_xact_lock({LOCK_CLASS}, {})", spec.id as i32))
        .await
        .map_err(dst_err("take the move's copy lock"))?;
    if locked.as_deref() != Some("t") {
        return Ok(Outcome::Busy);
    }
    let subscribed = scalar(dst, &format!("SELECT count(*) FROM pg_subscription WHERE subname = {}", literal(&fwd)))
        .await
        .map_err(dst_err("look up the subscription"))?;
    if subscribed.as_deref() != Some("0") {
        dst.batch_execute("ROLLBACK").await.map_err(dst_err("end the copy"))?;
        return Ok(Outcome::AlreadyCopied);
    }

    let src = spec.source.connect(&format!("move {} copy (source)", spec.id)).await?;
    let src_err = |what: &str| {
        let what = what.to_string();
        move |e| Error::pg(&spec.source.name, what, e)
    };
    let tables = schema::sharded_tables(&src, &spec.key_column).await.map_err(src_err("list tables"))?;
    // A slot left by an attempt that died: its snapshot is gone with it.
    crate::replication::wait_slot_inactive(&spec.source, &src, &fwd, Duration::from_secs(60)).await?;
    src.batch_execute(&format!(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = {}",
        literal(&fwd)
    ))
    .await
    .map_err(src_err("drop the replication slot of an earlier attempt"))?;
    let snapshot = create_slot_with_snapshot(spec, &fwd).await?;
    src.batch_execute(&format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT {}",
        literal(&snapshot.name)
    ))
    .await
    .map_err(src_err("open the copy's snapshot"))?;
    // The snapshot lives on in the transaction that imported it.
    drop(snapshot);
    fault::point("copy.after_slot")?;

    dst.batch_execute("SET LOCAL session_replication_role = replica")
        .await
        .map_err(dst_err("copy as a replica (past the fence)"))?;
    progress.send_replace(Progress {
        tables: tables.iter().map(|t| TableProgress { table: t.qualified(), ..Default::default() }).collect(),
    });
    for (i, t) in tables.iter().enumerate() {
        copy_table(spec, t, &src, dst, throttle, |rows, bytes| {
            progress.send_modify(|p| {
                p.tables[i].rows += rows;
                p.tables[i].bytes += bytes;
            })
        })
        .await?;
        progress.send_modify(|p| p.tables[i].done = true);
        if i == 0 {
            fault::point("copy.after_first_table")?;
        }
    }

    dst.batch_execute(&format!(
        "CREATE SUBSCRIPTION {fwd} CONNECTION {} PUBLICATION {fwd} \
         WITH (copy_data = false, create_slot = false, slot_name = {})",
        literal(&spec.source.conninfo()),
        literal(&fwd)
    ))
    .await
    .map_err(dst_err("create the subscription (start the stream)"))?;
    dst.batch_execute("COMMIT").await.map_err(dst_err("commit the copy"))?;
    src.batch_execute("COMMIT").await.map_err(src_err("end the copy's snapshot"))?;
    let p = progress.borrow().clone();
    Ok(Outcome::Copied { rows: p.rows(), bytes: p.bytes() })
}

/// A replication connection that just created a slot, holding its exported
/// snapshot until dropped.
struct ExportedSnapshot {
    name: String,
    _conn: Backend,
}

async fn create_slot_with_snapshot(spec: &MoveSpec, slot: &str) -> Result<ExportedSnapshot, Error> {
    let mut conn = Backend::connect_with(&spec.source.addr, Duration::from_secs(10), &[("replication", "database")])
        .await
        .map_err(|e| Error::Other(format!("shard {}: open a replication connection: {e}", spec.source.name)))?;
    // Waits for the source's running transactions to end, like any slot creation.
    let rows = conn
        .simple_query(&format!("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT", ident(slot)))
        .await
        .map_err(|(code, msg)| Error::Postgres {
            shard: spec.source.name.clone(),
            action: "create the replication slot".into(),
            message: format!("{msg} (SQLSTATE {code})"),
        })?;
    // slot_name, consistent_point, snapshot_name, output_plugin
    let name = rows.first().and_then(|r| r.get(2).cloned().flatten()).ok_or_else(|| {
        Error::Other(format!("shard {}: CREATE_REPLICATION_SLOT returned no snapshot", spec.source.name))
    })?;
    Ok(ExportedSnapshot { name, _conn: conn })
}

/// Streams one table's moving rows from the source's snapshot into the target.
async fn copy_table(
    spec: &MoveSpec,
    t: &Table,
    src: &Client,
    dst: &Client,
    throttle: &Throttle,
    mut progressed: impl FnMut(u64, u64),
) -> Result<(), Error> {
    let cols = t.columns.iter().map(|c| ident(c)).collect::<Vec<_>>().join(", ");
    let table = t.qualified();
    let src_err = |e| Error::pg(&spec.source.name, format!("copy {table} out"), e);
    let dst_err = |e| Error::pg(&spec.target.name, format!("copy {table} in"), e);
    // Nothing of the move is on the target (an attempt that died rolled back),
    // unless someone wrote there past the fence.
    dst.batch_execute(&format!("DELETE FROM {table} WHERE {}", spec.row_filter())).await.map_err(dst_err)?;
    let sink = dst.copy_in(&format!("COPY {table} ({cols}) FROM STDIN")).await.map_err(dst_err)?;
    futures::pin_mut!(sink);
    let out = src
        .copy_out(&format!("COPY (SELECT {cols} FROM ONLY {table} WHERE {}) TO STDOUT", spec.row_filter()))
        .await
        .map_err(src_err)?;
    futures::pin_mut!(out);
    let (mut rows, mut bytes) = (0u64, 0u64);
    // A text COPY sends one message per row; they go on to the target in chunks
    // of many rows (COPY data may be split anywhere).
    let mut pending = bytes::BytesMut::with_capacity(2 * CHUNK_BYTES as usize);
    while let Some(row) = out.next().await {
        let row = row.map_err(src_err)?;
        rows += 1;
        bytes += row.len() as u64;
        pending.extend_from_slice(&row);
        if rows >= CHUNK_ROWS || bytes >= CHUNK_BYTES {
            sink.feed(pending.split().freeze()).await.map_err(dst_err)?;
            progressed(rows, bytes);
            throttle.charge(rows, bytes).await;
            (rows, bytes) = (0, 0);
        }
    }
    if !pending.is_empty() {
        sink.feed(pending.split().freeze()).await.map_err(dst_err)?;
    }
    progressed(rows, bytes);
    throttle.charge(rows, bytes).await;
    sink.as_mut().finish().await.map_err(dst_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_throttle_paces_to_the_tighter_cap_and_banks_no_idle_time() {
        let t = Throttle::new(1000, 1 << 20);
        let t0 = Instant::now();
        // 100 rows of 10 bytes: the row cap binds (0.1 s), the byte cap would be ~1 ms.
        assert_eq!(t.charge_at(t0, 100, 1000), Duration::from_millis(100));
        // Charged again at once: the clock is 0.2 s ahead.
        assert_eq!(t.charge_at(t0, 100, 1000), Duration::from_millis(200));
        // Later than the clock: no debt, and the idle second is not banked.
        let later = t0 + Duration::from_secs(2);
        assert_eq!(t.charge_at(later, 100, 1000), Duration::from_millis(100));
        // Big rows: the byte cap binds.
        let bytes = Throttle::new(1000, 1000);
        assert_eq!(bytes.charge_at(t0, 1, 500), Duration::from_millis(500));
        // No caps: never waits.
        let free = Throttle::unlimited();
        assert!(!free.limited());
        assert_eq!(free.charge_at(t0, u64::MAX / 2, u64::MAX / 2), Duration::ZERO);
    }
}

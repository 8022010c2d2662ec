//! The router's half of a cutover.
//!
//! The migrator puts a *hold* for a move's rows into the directory. Every router
//! then (1) makes new statements for those rows wait — they are not refused — and
//! (2) once no transaction that touched the rows is still open in it, acknowledges
//! the hold through the directory. The migrator flips the placement only after
//! every live router acknowledged; the flip ends the hold in the same directory
//! entry, and the waiting statements go on to the new shard. A hold also ends by
//! release (the cutover was undone: statements go to the old shard) or by its
//! deadline (a migrator that died cannot stall traffic).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shardgate_directory::clock::now_ms;
use shardgate_directory::pause::{HeldReport, HeldStats};
use shardgate_directory::state::{Command, MoveSubject, Outcome};
use shardgate_directory::{Directory, DirectoryHandle};
use tokio::sync::{watch, Notify};

use crate::moves::DirectoryWriter;
use crate::sql::quote;

/// The directory of a router without replicas.
pub struct LocalWriter(pub DirectoryHandle);

impl DirectoryWriter for LocalWriter {
    fn propose(&self, cmd: Command) -> Pin<Box<dyn Future<Output = Result<Outcome, String>> + Send + '_>> {
        Box::pin(async move { Ok(self.0.apply_local(&cmd)) })
    }
    fn barrier(&self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async { Ok(()) })
    }
}

/// The replicated directory: commands go through Raft.
pub struct ReplicaWriter(pub shardgate_directory::replica::Node);

impl DirectoryWriter for ReplicaWriter {
    fn propose(&self, cmd: Command) -> Pin<Box<dyn Future<Output = Result<Outcome, String>> + Send + '_>> {
        Box::pin(async move { self.0.propose(cmd, Duration::from_secs(2)).await.map_err(|e| e.to_string()) })
    }
    fn barrier(&self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move { self.0.read_barrier(Duration::from_secs(2)).await.map_err(|e| e.to_string()) })
    }
}

/// Statements and transactions in progress in this router, counted by the buckets
/// they touched: what a cutover hold waits for before this router acknowledges.
/// Lock-free on the statement path (one atomic add and one subtract).
pub struct InFlight {
    counts: Box<[AtomicU32]>,
    /// Ackers waiting for a bucket to drain; sessions only notify when there are.
    waiting: AtomicUsize,
    drained: Notify,
}

impl InFlight {
    pub fn new(bucket_count: u32) -> InFlight {
        InFlight {
            counts: (0..bucket_count).map(|_| AtomicU32::new(0)).collect(),
            waiting: AtomicUsize::new(0),
            drained: Notify::new(),
        }
    }

    /// A statement or transaction touches `bucket`.
    pub fn enter(&self, bucket: u32) {
        if let Some(c) = self.counts.get(bucket as usize) {
            c.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// … and is finished with it.
    pub fn leave(&self, bucket: u32) {
        if let Some(c) = self.counts.get(bucket as usize) {
            if c.fetch_sub(1, Ordering::SeqCst) == 1 && self.waiting.load(Ordering::SeqCst) > 0 {
                self.drained.notify_waiters();
            }
        }
    }

    pub fn busy(&self, bucket: u32) -> bool {
        self.counts.get(bucket as usize).is_some_and(|c| c.load(Ordering::SeqCst) > 0)
    }

    /// Waits until nothing in progress touches `bucket`.
    pub async fn drained(&self, bucket: u32) {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.busy(bucket) {
                break;
            }
            notified.await;
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The buckets one session has registered as in flight; released when its
/// statement or transaction ends, and when the session goes away.
pub struct Flight {
    in_flight: Arc<InFlight>,
    buckets: Vec<u32>,
}

impl Flight {
    pub fn new(in_flight: Arc<InFlight>) -> Flight {
        Flight { in_flight, buckets: Vec::new() }
    }

    pub fn holds(&self, bucket: u32) -> bool {
        self.buckets.contains(&bucket)
    }

    /// Registers the buckets not registered yet; returns how many were new (they
    /// are the last ones in the list, for [`Flight::undo_last`]).
    pub fn enter(&mut self, buckets: &[u32]) -> usize {
        let before = self.buckets.len();
        for &b in buckets {
            if !self.buckets.contains(&b) {
                self.in_flight.enter(b);
                self.buckets.push(b);
            }
        }
        self.buckets.len() - before
    }

    /// The last `n` buckets registered.
    pub fn newest(&self, n: usize) -> &[u32] {
        &self.buckets[self.buckets.len().saturating_sub(n)..]
    }

    pub fn undo_last(&mut self, n: usize) {
        for _ in 0..n {
            if let Some(b) = self.buckets.pop() {
                self.in_flight.leave(b);
            }
        }
    }

    pub fn clear(&mut self) {
        for b in self.buckets.drain(..) {
            self.in_flight.leave(b);
        }
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        self.clear();
    }
}

/// The move holding any of `buckets`, if one does.
pub fn held_bucket(dir: &Directory, buckets: &[u32]) -> Option<u64> {
    if dir.holds.is_empty() {
        return None;
    }
    let now = now_ms();
    dir.holds
        .values()
        .find(|h| h.deadline_ms > now && buckets.contains(&bucket_of_subject(dir, &h.subject)))
        .map(|h| h.move_id)
}

/// The bucket whose transactions a hold on `subject` waits for (a tenant's bucket
/// for a tenant move: a little more than needed, never less).
pub fn bucket_of_subject(dir: &Directory, subject: &MoveSubject) -> u32 {
    match subject {
        MoveSubject::Bucket(b) => *b,
        MoveSubject::Tenant(k) => dir.bucket_of(k),
    }
}

/// Waits while move `move_id` holds statements: until the hold is released, the
/// placement flipped, or the hold's deadline passed. Returns how long it waited.
pub async fn wait_released(directory: &DirectoryHandle, move_id: u64) -> Duration {
    let started = std::time::Instant::now();
    let mut changes = directory.subscribe();
    loop {
        let deadline_ms = match directory.load().holds.get(&move_id) {
            None => return started.elapsed(),
            Some(h) => h.deadline_ms,
        };
        let now = now_ms();
        if now >= deadline_ms {
            return started.elapsed();
        }
        let _ = crate::timer::timeout(Duration::from_millis(deadline_ms - now), changes.changed()).await;
    }
}

/// How long this router's statements waited on each hold of a move, sent with
/// its heartbeat (see [`shardgate_directory::pause`]).
#[derive(Default)]
pub struct HeldWaits {
    by_hold: Mutex<BTreeMap<(u64, u64), HeldStats>>,
}

impl HeldWaits {
    /// A statement waited `waited` on hold `token` of move `move_id`.
    pub fn record(&self, move_id: u64, token: u64, waited: Duration) {
        let mut m = self.by_hold.lock().unwrap_or_else(|p| p.into_inner());
        m.entry((move_id, token)).or_default().record(waited.as_micros() as u64);
    }

    /// This router saw hold `token` of move `move_id` (and acknowledged it):
    /// it reports the hold even when none of its statements waited on it, so
    /// every router's pause is on record, zero included.
    pub fn saw(&self, move_id: u64, token: u64) {
        let mut m = self.by_hold.lock().unwrap_or_else(|p| p.into_inner());
        m.entry((move_id, token)).or_default();
    }

    /// The waits on holds the directory still keeps, for moves under way; the
    /// others are forgotten.
    pub fn reports(&self, dir: &Directory) -> Vec<HeldReport> {
        let mut m = self.by_hold.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|(id, token), _| {
            dir.moves.get(id).is_some_and(|mv| mv.phase.active() && mv.pauses.iter().any(|p| p.token == *token))
        });
        m.iter()
            .map(|((move_id, token), stats)| HeldReport { move_id: *move_id, token: *token, stats: stats.clone() })
            .collect()
    }
}

/// Acknowledges every hold this router sees, once its transactions on the held
/// rows have ended. Runs for the life of the router.
pub async fn acknowledge_holds(
    router_id: String,
    directory: DirectoryHandle,
    in_flight: Arc<InFlight>,
    writer: Arc<dyn DirectoryWriter>,
    saw: Arc<dyn Fn(u64, u64) + Send + Sync>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut changes = directory.subscribe();
    // (move, token) pairs already being acknowledged.
    let acking: Arc<Mutex<std::collections::HashSet<(u64, u64)>>> = Default::default();
    loop {
        let dir = directory.load();
        for h in dir.holds.values() {
            if h.acks.contains(&router_id) {
                continue;
            }
            let key = (h.move_id, h.token);
            if !acking.lock().unwrap_or_else(|p| p.into_inner()).insert(key) {
                continue;
            }
            let bucket = bucket_of_subject(&dir, &h.subject);
            let (in_flight, writer, router_id, saw) =
                (in_flight.clone(), writer.clone(), router_id.clone(), saw.clone());
            let deadline = Duration::from_millis(h.deadline_ms.saturating_sub(now_ms()));
            tokio::spawn(async move {
                if tokio::time::timeout(deadline, in_flight.drained(bucket)).await.is_ok() {
                    saw(key.0, key.1);
                    let ack = Command::AckHold { id: key.0, token: key.1, router: router_id };
                    if let Err(e) = writer.propose(ack).await {
                        tracing::warn!(move_id = key.0, error = %e, "could not acknowledge a cutover hold");
                    }
                } else {
                    tracing::warn!(move_id = key.0, "transactions on the held rows outlived the cutover deadline");
                }
            });
        }
        acking
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(m, t)| dir.holds.get(m).is_some_and(|h| h.token == *t));
        tokio::select! {
            _ = stopped.changed() => return,
            r = changes.changed() => if r.is_err() { return },
        }
    }
}

/// A cross-shard read sent to `shard` while moves are under way: a moving bucket's
/// rows exist on both of its shards until the move ends, and must be counted once.
/// On a shard that does not own them now, each sharded table the query names is
/// shadowed by a CTE of the same name that leaves the moving rows out (Postgres
/// resolves an unqualified name to a CTE first, and inlines a CTE used once, so
/// the filter reaches the scan). `None`: the text can go as it is.
pub fn without_moving_rows(
    dir: &Directory,
    shard: shardgate_directory::ShardId,
    sql: &str,
    sharded_tables: &[&str],
) -> Result<Option<String>, crate::error::SqlError> {
    let mut filters = Vec::new();
    for m in dir.moves.values().filter(|m| m.phase.active()) {
        if dir.other_end_of(m) != shard {
            continue;
        }
        let col = quote::ident(&dir.key_column);
        filters.push(match &m.subject {
            MoveSubject::Bucket(b) => format!(
                "({} = {b}) IS NOT TRUE",
                shardgate_directory::hash::bucket_sql(&col, dir.key_type, dir.bucket_count)
            ),
            MoveSubject::Tenant(k) => format!("({col} = {}) IS NOT TRUE", quote::key_literal(k, dir.key_type)),
        });
    }
    if filters.is_empty() || sharded_tables.is_empty() {
        return Ok(None);
    }
    let mut ctes = Vec::new();
    for t in sharded_tables {
        if t.contains('.') {
            return Err(crate::error::SqlError::new(
                "0A000",
                format!("a cross-shard read of {t} while rows of it are moving must name the table without its schema"),
            )
            .hint("write the table name unqualified, or name the tenant (WHERE tenant_id = …)"));
        }
        ctes.push(format!(
            "{} AS (SELECT * FROM {} WHERE {})",
            quote::ident(t),
            quote::qualified("public", t),
            filters.join(" AND ")
        ));
    }
    let body = sql.trim_start();
    let starts_with = |word: &str| {
        body.len() >= word.len()
            && body[..word.len()].eq_ignore_ascii_case(word)
            && !body[word.len()..].starts_with(|c: char| c.is_alphanumeric() || c == '_')
    };
    if body.starts_with("/*") || body.starts_with("--") {
        return Err(crate::error::SqlError::new(
            "0A000",
            "a cross-shard read that starts with a comment cannot run while rows of its tables are moving".into(),
        )
        .hint("put the comment after the statement's first word, or name the tenant"));
    }
    Ok(Some(if starts_with("WITH") {
        let rest = body[4..].trim_start();
        let (recursive, rest) = if rest.len() >= 9 && rest[..9].eq_ignore_ascii_case("RECURSIVE") {
            ("RECURSIVE ", &rest[9..])
        } else {
            ("", rest)
        };
        format!("WITH {recursive}{}, {}", ctes.join(", "), rest.trim_start())
    } else {
        format!("WITH {} {body}", ctes.join(", "))
    }))
}

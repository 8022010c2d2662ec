//! Shadow reads: while a move is in its shadow phase, reads of the moving rows
//! also run on the other shard, and the two answers are compared.
//!
//! The client always gets the owner's (the source's) answer, at the owner's
//! speed: the router digests the rows as it relays them, and the comparison runs
//! afterwards in a task of its own. A difference may be only replication lag (the
//! target had not applied the latest commits yet) or rows that keep changing, so
//! it counts as a mismatch only when it is proven (see [`recheck`]): the source
//! answers the same before and after a point the target has provably applied
//! (see [`CatchUp`]), and the target still differs. A difference that is never
//! settled enough to judge is counted as unsettled, not mismatched. Counts go to
//! the directory with the router's heartbeat; the last few mismatches are kept as
//! samples (query, keys and digests).
//!
//! What is compared: single `SELECT`s outside a transaction whose every tenant key
//! lies in the moving rows, sent with the simple or the extended protocol. Rows are
//! compared as a multiset (order-insensitive) unless the query has `ORDER BY`.
//! The target runs the statement in a `READ ONLY` transaction that is rolled back,
//! with the session's settings, so a shadow read can change nothing there. At most
//! `[router.moves] shadow_concurrency` comparisons run at once per router; reads
//! beyond that are counted as skipped, never delayed.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use shardgate_directory::clock::now_ms;
use shardgate_directory::state::{MovePhase, MoveSubject, ShadowCounts, ShadowReport, ShadowSample};
use shardgate_directory::{Directory, ShardId, TenantKey};
use tokio::sync::Semaphore;

use crate::context::RouterContext;
use crate::moves::CatchUp;
use crate::protocol::messages::{self, Message};

/// How many differing reads a router keeps per move.
const SAMPLES: usize = 3;
/// How many times a difference is re-checked before it is called unsettled.
const ROUNDS: usize = 6;
/// How many re-checks must prove a difference before it counts as a mismatch.
const PROOFS: usize = 2;
/// A statement's text in a sample is cut to this many bytes.
const SAMPLE_QUERY_BYTES: usize = 300;

/// A move whose reads are shadowed: reads for `subject` go to `owner` and are
/// compared on `other`.
#[derive(Debug, Clone)]
pub struct ShadowMove {
    pub id: u64,
    pub subject: MoveSubject,
    pub owner: ShardId,
    pub other: ShardId,
}

/// One router's shadow reads.
pub struct Shadow {
    /// Moves in the shadow phase; empty nearly always, and then one load and one
    /// emptiness check is all a statement pays.
    moves: ArcSwap<Vec<ShadowMove>>,
    counts: Mutex<BTreeMap<u64, ShadowCounts>>,
    permits: Arc<Semaphore>,
    catch_up: OnceLock<Arc<dyn CatchUp>>,
}

impl Shadow {
    pub fn new(concurrency: usize) -> Shadow {
        Shadow {
            moves: ArcSwap::from_pointee(Vec::new()),
            counts: Mutex::new(BTreeMap::new()),
            permits: Arc::new(Semaphore::new(concurrency)),
            catch_up: OnceLock::new(),
        }
    }

    /// Installs how differences are re-checked (once, at start-up). Without it a
    /// difference is re-checked by asking both sides again after a short wait.
    pub fn set_catch_up(&self, c: Arc<dyn CatchUp>) {
        let _ = self.catch_up.set(c);
    }

    /// Re-reads the moves in the shadow phase from a directory snapshot.
    pub fn refresh(&self, dir: &Directory) {
        let moves: Vec<ShadowMove> = dir
            .moves
            .values()
            .filter(|m| m.phase == MovePhase::Shadow)
            .map(|m| ShadowMove {
                id: m.id,
                subject: m.subject.clone(),
                owner: dir.owner_of(m),
                other: dir.other_end_of(m),
            })
            .collect();
        if moves.is_empty() && self.moves.load().is_empty() {
            return;
        }
        self.moves.store(Arc::new(moves));
    }

    pub fn is_idle(&self) -> bool {
        self.moves.load().is_empty()
    }

    /// The shadowed move that covers every one of `keys`, if the statement runs on
    /// its owner.
    pub fn covering(&self, dir: &Directory, shard: ShardId, keys: &[TenantKey]) -> Option<ShadowMove> {
        if keys.is_empty() {
            return None;
        }
        self.moves
            .load()
            .iter()
            .find(|m| m.owner == shard && keys.iter().all(|k| dir.subject_covers(&m.subject, k)))
            .cloned()
    }

    /// A permit to run one comparison now, or None (counted as skipped).
    pub fn permit(&self, move_id: u64) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let p = self.permits.clone().try_acquire_owned().ok();
        if p.is_none() {
            self.count(move_id, |c| c.skipped += 1);
        }
        p
    }

    fn count(&self, move_id: u64, f: impl FnOnce(&mut ShadowCounts)) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        f(counts.entry(move_id).or_default());
    }

    /// This router's counts of the moves under way, for its heartbeat (they are
    /// totals since the router started; a move can enter the shadow phase more
    /// than once). Counts of moves that ended are dropped.
    pub fn reports(&self, dir: &Directory) -> Vec<ShadowReport> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.retain(|id, _| dir.moves.get(id).is_some_and(|m| m.phase.active()));
        counts.iter().map(|(id, c)| ShadowReport { move_id: *id, counts: c.clone() }).collect()
    }

    /// This router's counts of one move (tests, the admin console).
    pub fn counts(&self, move_id: u64) -> ShadowCounts {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).get(&move_id).cloned().unwrap_or_default()
    }
}

/// Keeps the router's list of shadowed moves current with the directory.
pub async fn follow_directory(ctx: Arc<RouterContext>, mut stopped: tokio::sync::watch::Receiver<bool>) {
    let mut changes = ctx.directory.subscribe();
    loop {
        ctx.shadow.refresh(&ctx.directory.load());
        tokio::select! {
            _ = stopped.changed() => return,
            r = changes.changed() => if r.is_err() { return },
        }
    }
}

/// A running digest of the rows of one answer: their number, an
/// order-insensitive sum of row hashes and an order-sensitive chain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RowDigest {
    pub rows: u64,
    sum: u64,
    chain: u64,
}

impl RowDigest {
    /// Adds one DataRow message (its whole frame).
    pub fn add(&mut self, data_row: &[u8]) {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        data_row.hash(&mut h);
        let x = h.finish();
        self.rows += 1;
        self.sum = self.sum.wrapping_add(x);
        self.chain = self.chain.rotate_left(5) ^ x;
    }

    fn same(&self, o: &RowDigest, ordered: bool) -> bool {
        self.rows == o.rows && self.sum == o.sum && (!ordered || self.chain == o.chain)
    }

    fn describe(&self, ordered: bool) -> String {
        if ordered {
            format!("{} rows, hash {:016x}", self.rows, self.chain)
        } else {
            format!("{} rows, hash {:016x}", self.rows, self.sum)
        }
    }
}

/// A read to shadow: how to run it again on either shard.
pub struct ShadowRead {
    pub mv: ShadowMove,
    /// The tenant keys the read asked for (named in a mismatch's sample).
    pub keys: Vec<TenantKey>,
    /// The statement, for the simple protocol, or Parse/Bind/Execute messages for
    /// the extended one.
    pub query: ShadowQuery,
    /// `SET …` statements that give a server connection the session's settings.
    pub settings: Option<String>,
    /// What the client got from the owner.
    pub source: RowDigest,
}

pub enum ShadowQuery {
    Simple(String),
    /// The statement's text (for the sample and to tell ORDER BY) and the
    /// messages that run it once on an unnamed statement and portal.
    Extended {
        sql: String,
        messages: Vec<Bytes>,
    },
}

impl ShadowQuery {
    fn sql(&self) -> &str {
        match self {
            ShadowQuery::Simple(s) => s,
            ShadowQuery::Extended { sql, .. } => sql,
        }
    }
}

/// What the statement is, as far as shadowing cares.
struct Shape {
    ordered: bool,
    /// `FOR UPDATE`/`FOR SHARE`: takes row locks, not compared (it would lock the
    /// target's copy and stall its change stream).
    locking: bool,
}

fn shape(sql: &str) -> Option<Shape> {
    use pg_query::protobuf::node::Node as N;
    let parsed = pg_query::parse(sql, 0).ok()?;
    let stmts = &parsed.protobuf.stmts;
    if stmts.len() != 1 {
        return None;
    }
    let Some(N::SelectStmt(s)) = stmts[0].stmt.as_deref().and_then(|n| n.node.as_ref()) else {
        return None;
    };
    Some(Shape { ordered: !s.sort_clause.is_empty(), locking: !s.locking_clause.is_empty() })
}

/// Compares one read in the background (off the session's thread, whose event
/// loop has no timers: see [`crate::timer`]); `permit` bounds how many run at once.
pub fn spawn_compare(ctx: Arc<RouterContext>, read: ShadowRead, permit: tokio::sync::OwnedSemaphorePermit) {
    crate::timer::spawn_background(async move {
        let _permit = permit;
        let id = read.mv.id;
        match compare(&ctx, &read).await {
            Verdict::Matched => ctx.shadow.count(id, |c| {
                c.compared += 1;
                c.matched += 1;
            }),
            Verdict::Lag => ctx.shadow.count(id, |c| {
                c.compared += 1;
                c.matched += 1;
                c.lag_explained += 1;
            }),
            Verdict::Unsettled => ctx.shadow.count(id, |c| {
                c.compared += 1;
                c.unsettled += 1;
            }),
            Verdict::Mismatch(sample) => {
                tracing::warn!(move_id = id, keys = %sample.keys, query = %sample.query, source = %sample.source, target = %sample.target, "shadow read differs");
                ctx.shadow.count(id, |c| {
                    c.compared += 1;
                    c.mismatched += 1;
                    if c.samples.len() >= SAMPLES {
                        c.samples.remove(0);
                    }
                    c.samples.push(sample);
                })
            }
            Verdict::Skipped(why) => {
                tracing::debug!(move_id = id, reason = %why, "shadow read not compared");
                ctx.shadow.count(id, |c| c.skipped += 1)
            }
        }
    });
}

enum Verdict {
    Matched,
    /// Differed at first, matched once the target caught up.
    Lag,
    /// Differed, and the rows kept changing on the source through every
    /// re-check: there was no settled point to judge the target at.
    Unsettled,
    /// Proven different (see [`recheck`]), [`PROOFS`] times.
    Mismatch(ShadowSample),
    Skipped(String),
}

/// What one re-check of a difference showed.
enum Round {
    /// The target answered as the source did just before or just after it.
    Agrees,
    /// The source answered the same before and after a point the target had
    /// provably applied, and the target answered otherwise.
    Proven { source: RowDigest, target: Result<RowDigest, String> },
    /// The source's answer changed during the re-check.
    Moving,
}

async fn compare(ctx: &RouterContext, read: &ShadowRead) -> Verdict {
    let Some(shape) = shape(read.query.sql()) else {
        return Verdict::Skipped("not a single SELECT".into());
    };
    if shape.locking {
        return Verdict::Skipped("SELECT … FOR UPDATE/SHARE".into());
    }
    let ordered = shape.ordered;
    let target = run(ctx, read.mv.other, read).await;
    if matches!(&target, Ok(t) if t.same(&read.source, ordered)) {
        return Verdict::Matched;
    }
    let mut proofs = 0;
    for round in 0..ROUNDS {
        match recheck(ctx, read, ordered, round).await {
            Ok(Round::Agrees) => return Verdict::Lag,
            Ok(Round::Moving) => {}
            Ok(Round::Proven { source, target }) => {
                proofs += 1;
                if proofs == PROOFS {
                    return Verdict::Mismatch(sample(read, ordered, &source, &target));
                }
            }
            Err(why) => return Verdict::Skipped(why),
        }
    }
    Verdict::Unsettled
}

/// One re-check: the source's answer; then the target made to catch up with
/// everything the source had committed by then (a marker row, see [`CatchUp`]);
/// the target's answer; the source's answer again.
///
/// The target applies the source's commits in order, so when it is read it
/// shows the source's state at some moment between the marker and that read,
/// which lies between the source's two reads. If those two reads agree, the
/// rows held still across that whole span (short of a change undone within it,
/// which is why a mismatch takes [`PROOFS`] rounds), and a target that differs
/// from them differs for a reason other than lag.
async fn recheck(ctx: &RouterContext, read: &ShadowRead, ordered: bool, round: usize) -> Result<Round, String> {
    let before =
        run(ctx, read.mv.owner, read).await.map_err(|e| format!("the source could not be asked again: {e}"))?;
    match ctx.shadow.catch_up.get() {
        Some(c) => c.wait(read.mv.id).await.map_err(|e| format!("the target did not catch up: {e}"))?,
        None => tokio::time::sleep(Duration::from_millis(100 << round)).await,
    }
    let target = run(ctx, read.mv.other, read).await;
    if matches!(&target, Ok(t) if t.same(&before, ordered)) {
        return Ok(Round::Agrees);
    }
    let after = run(ctx, read.mv.owner, read).await.map_err(|e| format!("the source could not be asked again: {e}"))?;
    if matches!(&target, Ok(t) if t.same(&after, ordered)) {
        return Ok(Round::Agrees);
    }
    if before.same(&after, ordered) {
        return Ok(Round::Proven { source: after, target });
    }
    Ok(Round::Moving)
}

/// A proven difference as the router keeps and reports it.
fn sample(read: &ShadowRead, ordered: bool, source: &RowDigest, target: &Result<RowDigest, String>) -> ShadowSample {
    let mut query = read.query.sql().to_string();
    if query.len() > SAMPLE_QUERY_BYTES {
        let mut cut = SAMPLE_QUERY_BYTES;
        while !query.is_char_boundary(cut) {
            cut -= 1;
        }
        query.truncate(cut);
        query.push('…');
    }
    let keys = read.keys.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(", ");
    let target = match target {
        Ok(d) => d.describe(ordered),
        Err(e) => format!("error: {e}"),
    };
    ShadowSample { query, source: source.describe(ordered), target, at_ms: now_ms(), keys }
}

/// Runs the read on `shard` in a read-only transaction that is rolled back, with
/// the session's settings, and digests its rows.
async fn run(ctx: &RouterContext, shard: ShardId, read: &ShadowRead) -> Result<RowDigest, String> {
    let pool = ctx.pool(shard).ok_or_else(|| format!("no pool for shard {shard}"))?;
    let mut conn = pool.get().await.map_err(|e| e.to_string())?;
    let mut begin = String::from("BEGIN READ ONLY");
    if let Some(s) = &read.settings {
        begin.push_str("; ");
        begin.push_str(s);
    }
    conn.conn.queue(&messages::query(&begin));
    match &read.query {
        ShadowQuery::Simple(sql) => conn.conn.queue(&messages::query(sql)),
        ShadowQuery::Extended { messages, .. } => {
            for m in messages {
                conn.conn.queue(m);
            }
        }
    }
    conn.conn.queue(&messages::query("ROLLBACK"));
    if let Err(e) = conn.conn.flush().await {
        conn.broken = true;
        return Err(e.to_string());
    }
    // Three ReadyForQuery: after BEGIN, after the read, after ROLLBACK.
    let mut digest = RowDigest::default();
    let mut error = None;
    let mut ready = 0;
    let mut last_status = b'I';
    while ready < 3 {
        let m: Message = match conn.conn.read().await {
            Ok(m) => m,
            Err(e) => {
                conn.broken = true;
                return Err(e.to_string());
            }
        };
        match m.tag() {
            b'Z' => {
                ready += 1;
                last_status = m.body().first().copied().unwrap_or(b'I');
            }
            b'D' if ready == 1 => digest.add(m.raw()),
            b'E' => {
                error.get_or_insert_with(|| messages::error_summary(&m));
            }
            _ => {}
        }
    }
    if last_status != b'I' {
        conn.broken = true;
    }
    match error {
        Some((code, msg)) => Err(format!("{code}: {msg}")),
        None => Ok(digest),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(values: &[&str]) -> Vec<u8> {
        let mut b = messages::Builder::new(b'D');
        b.i16(values.len() as i16);
        for v in values {
            b.i32(v.len() as i32).bytes(v.as_bytes());
        }
        b.finish().to_vec()
    }

    #[test]
    fn digests_ignore_row_order_unless_ordered() {
        let (a, b) = (row(&["1", "x"]), row(&["2", "y"]));
        let mut one = RowDigest::default();
        one.add(&a);
        one.add(&b);
        let mut other = RowDigest::default();
        other.add(&b);
        other.add(&a);
        assert!(one.same(&other, false));
        assert!(!one.same(&other, true));
        let mut changed = RowDigest::default();
        changed.add(&a);
        changed.add(&row(&["2", "z"]));
        assert!(!one.same(&changed, false));
        let mut fewer = RowDigest::default();
        fewer.add(&a);
        assert!(!one.same(&fewer, false));
    }

    #[test]
    fn only_plain_selects_are_compared() {
        assert!(shape("select * from t where tenant_id = 1").is_some_and(|s| !s.ordered && !s.locking));
        assert!(shape("select * from t where tenant_id = 1 order by id").is_some_and(|s| s.ordered));
        assert!(shape("select * from t where tenant_id = 1 for update").is_some_and(|s| s.locking));
        assert!(shape("update t set x = 1 where tenant_id = 1").is_none());
        assert!(shape("select 1; select 2").is_none());
    }
}

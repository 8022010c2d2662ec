//! The move driver: takes each move in the directory through its phases.
//!
//! All of a move's state lives in the directory; the driver keeps none of its own.
//! It runs in every `shardgate serve` process and acts only where it is told to
//! (the directory leader), so when the process driving a move dies, the next one
//! picks the move up from its recorded phase: every step is idempotent, and a
//! cutover found half-done is finished (if the flip committed) or undone (if not).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shardgate_directory::clock::now_ms;
use shardgate_directory::state::{Command, Move, MoveFlagUpdate, MovePhase, MoveRequest, MoveSubject, Outcome};
use shardgate_directory::{Directory, DirectoryHandle};
use shardgate_router::moves::DirectoryWriter;

use crate::cleanup::{self, Keep};
use crate::coordinator::DirectoryCoordinator;
use crate::cutover::{self, CutoverOptions, Direction};
use crate::verify::{self, VerifyOptions};
use crate::{copy, prepare, replication, Endpoint, Error, MoveSpec};

/// How to reach a shard by name (with its password, which the directory does not
/// hold).
pub type Resolve = Arc<dyn Fn(&Directory, usize) -> Option<Endpoint> + Send + Sync>;

#[derive(Clone)]
pub struct DriverConfig {
    pub cutover: CutoverOptions,
    pub verify: VerifyOptions,
    pub router_timeout: Duration,
    /// How often progress counters are written to the directory.
    pub progress_every: Duration,
    /// Whether moves pass through the shadow phase (reads compared on both shards).
    pub shadow: bool,
    /// With `--cutover auto`, how long reads are shadowed before verify.
    pub shadow_for: Duration,
    /// Back off while a stream lags more than this (see [`throttled`]).
    pub max_lag_bytes: u64,
    /// Caps on how fast this driver's copies go, together (0: no cap).
    pub max_copy_rows_per_s: u64,
    pub max_copy_bytes_per_s: u64,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            cutover: CutoverOptions::default(),
            verify: VerifyOptions::default(),
            router_timeout: Duration::from_secs(3),
            progress_every: Duration::from_millis(500),
            shadow: true,
            shadow_for: Duration::from_secs(5),
            max_lag_bytes: 64 << 20,
            max_copy_rows_per_s: 0,
            max_copy_bytes_per_s: 0,
        }
    }
}

pub struct Driver {
    pub directory: DirectoryHandle,
    pub writer: Arc<dyn DirectoryWriter>,
    pub resolve: Resolve,
    pub config: DriverConfig,
    /// Whether this process should drive moves now (the directory leader).
    pub active: Arc<dyn Fn() -> bool + Send + Sync>,
    running: Mutex<HashSet<u64>>,
    /// Shared by every copy this driver runs: the caps hold for all of them together.
    throttle: Arc<copy::Throttle>,
}

impl Driver {
    pub fn new(
        directory: DirectoryHandle,
        writer: Arc<dyn DirectoryWriter>,
        resolve: Resolve,
        config: DriverConfig,
        active: Arc<dyn Fn() -> bool + Send + Sync>,
    ) -> Arc<Driver> {
        let throttle = copy::Throttle::new(config.max_copy_rows_per_s, config.max_copy_bytes_per_s);
        Arc::new(Driver { directory, writer, resolve, config, active, running: Mutex::new(HashSet::new()), throttle })
    }

    /// Runs until `stopped` fires: starts a task for every active move not being
    /// driven yet.
    pub async fn run(self: Arc<Self>, mut stopped: tokio::sync::watch::Receiver<bool>) {
        let mut changes = self.directory.subscribe();
        loop {
            if (self.active)() {
                let dir = self.directory.load();
                for m in dir.moves.values().filter(|m| m.phase.active()) {
                    if self.running.lock().unwrap_or_else(|p| p.into_inner()).insert(m.id) {
                        let me = self.clone();
                        let id = m.id;
                        tokio::spawn(async move {
                            me.drive(id).await;
                            me.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                        });
                    }
                }
            }
            tokio::select! {
                _ = stopped.changed() => return,
                _ = changes.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Drives one move until it ends or this process stops being the driver.
    async fn drive(&self, id: u64) {
        let mut backoff = Duration::from_millis(200);
        loop {
            if !(self.active)() {
                return;
            }
            // Act only on the committed state: a replica that just restarted may
            // still be catching up, and a stale phase would repeat or undo a step.
            if let Err(e) = self.writer.barrier().await {
                tracing::warn!(move_id = id, error = %e, "directory not readable yet; waiting");
                tokio::time::sleep(backoff).await;
                continue;
            }
            let dir = self.directory.load();
            let Some(m) = dir.moves.get(&id).cloned() else { return };
            if !m.phase.active() {
                return;
            }
            let Some(spec) = self.spec(&dir, &m) else {
                let _ = self.update(&m, MovePhase::Failed, BTreeMap::new(), Some("a shard of this move is gone")).await;
                return;
            };
            // Boxed: the step future is large (it holds every phase's work).
            match Box::pin(self.step(&dir, &m, &spec)).await {
                Ok(Step::Again) => backoff = Duration::from_millis(200),
                Ok(Step::Wait(d)) => {
                    backoff = Duration::from_millis(200);
                    let mut changes = self.directory.subscribe();
                    let _ = tokio::time::timeout(d, changes.changed()).await;
                }
                Err(Error::Refused(msg)) => {
                    tracing::warn!(move_id = id, reason = %msg, "move refused");
                    let _ = self.update(&m, MovePhase::Failed, BTreeMap::new(), Some(&msg)).await;
                    return;
                }
                Err(e) => {
                    tracing::warn!(move_id = id, error = %e, "move step failed; retrying");
                    let _ = self.note(&m, &e.to_string()).await;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    fn spec(&self, dir: &Directory, m: &Move) -> Option<MoveSpec> {
        spec_of(dir, m, &self.resolve)
    }

    /// Where a move rests between its copy and a cutover, and after a rollback:
    /// shadow (reads compared on both shards) or, with shadow reads off, dual-write.
    fn settled(&self) -> MovePhase {
        if self.config.shadow {
            MovePhase::Shadow
        } else {
            MovePhase::DualWrite
        }
    }

    fn coordinator(&self, id: u64) -> DirectoryCoordinator {
        DirectoryCoordinator::new(self.directory.clone(), self.writer.clone(), id, self.config.router_timeout)
    }

    async fn step(&self, dir: &Directory, m: &Move, spec: &MoveSpec) -> Result<Step, Error> {
        let owner_is_target = dir.owner_of(m) == m.target;
        match (m.phase, &m.request) {
            (MovePhase::Plan, Some(MoveRequest::Cancel))
            | (MovePhase::Copy | MovePhase::DualWrite | MovePhase::Shadow, Some(MoveRequest::Cancel)) => {
                let keep_source = MoveFlagUpdate { keep_source: Some(true), ..Default::default() };
                self.update_flags(m, MovePhase::Cleanup, keep_source, Some("cancelling")).await?;
                self.clear_request(m).await?;
                Ok(Step::Again)
            }
            (MovePhase::Plan, _) => {
                if let Some(why) = throttled(dir, m, &self.config) {
                    if m.note.as_deref() != Some(why.as_str()) {
                        self.note(m, &why).await?;
                    }
                    return Ok(Step::Wait(Duration::from_secs(1)));
                }
                let p = Box::pin(prepare::prepare(spec)).await?;
                let mut c = counters([("rows_total", p.rows_total), ("bytes_total", p.bytes_total)]);
                c.insert("tables".into(), p.tables.len() as u64);
                c.insert("copy_started_ms".into(), now_ms());
                self.update(m, MovePhase::Copy, c, None).await?;
                Ok(Step::Again)
            }
            (MovePhase::Copy, _) => self.copy(m, spec).await,
            (MovePhase::DualWrite | MovePhase::Shadow, Some(MoveRequest::Verify)) => {
                self.clear_request(m).await?;
                self.update(m, MovePhase::Verify, BTreeMap::new(), Some("verifying")).await?;
                Ok(Step::Again)
            }
            (MovePhase::Verify, _) => self.verify(m, spec).await,
            (MovePhase::DualWrite | MovePhase::Shadow, Some(MoveRequest::Cutover { force })) => {
                if !force && !verified_current(m) {
                    // A cutover verifies first; the request stays pending and
                    // the verify step answers it when it finds a difference.
                    self.update(m, MovePhase::Verify, BTreeMap::new(), Some("verifying before the cutover")).await?;
                    return Ok(Step::Again);
                }
                self.clear_request(m).await?;
                self.cutover(m, spec, Direction::Forward).await
            }
            (MovePhase::DualWrite, None) if self.config.shadow => {
                // The stream runs: shadow reads can start. (Lag is measured first, so
                // status shows it from the start.)
                let _ = self.report_lag(m, spec, Direction::Forward).await?;
                let c = counters([("shadow_started_ms", now_ms())]);
                self.update(m, MovePhase::Shadow, c, Some("comparing reads of the moving rows on both shards")).await?;
                Ok(Step::Again)
            }
            (MovePhase::DualWrite | MovePhase::Shadow, None) if m.options.cutover_auto => {
                // Verify decides; shadow reads inform it: a difference they prove
                // brings the verify forward, and a clean verify is taken again
                // after one.
                let proven = mismatches_since_verify(m);
                if m.phase == MovePhase::Shadow && proven == 0 {
                    let since = m.counters.get("shadow_started_ms").copied().unwrap_or(m.updated_ms);
                    let shadowed = Duration::from_millis(now_ms().saturating_sub(since));
                    if shadowed < self.config.shadow_for {
                        self.report_lag(m, spec, Direction::Forward).await?;
                        return Ok(Step::Wait((self.config.shadow_for - shadowed).min(Duration::from_secs(1))));
                    }
                }
                let lag = m.counters.get("lag_bytes").copied().unwrap_or(0);
                if lag > self.config.max_lag_bytes {
                    let why = format!(
                        "automatic cutover waits: the stream lags {lag} bytes, more than max_lag_bytes ({})",
                        self.config.max_lag_bytes
                    );
                    if m.note.as_deref() != Some(why.as_str()) {
                        self.note(m, &why).await?;
                    }
                    return self.report_lag(m, spec, Direction::Forward).await;
                }
                let verified = m.counters.contains_key("verified_at_ms");
                if !verified || (m.verified_clean && proven > 0) {
                    let why = if verified {
                        format!("verifying again: {proven} shadow read(s) proved a difference since the last verify")
                    } else {
                        "verifying (automatic cutover)".to_string()
                    };
                    self.update(m, MovePhase::Verify, BTreeMap::new(), Some(&why)).await?;
                    return Ok(Step::Again);
                }
                // A verify that found a difference stops the move here; its note
                // names the rows and the next step.
                let failures = m.counters.get("cutover_failures").copied().unwrap_or(0);
                if m.verified_clean && !m.counters.contains_key("cutovers") && failures < 3 {
                    return self.cutover(m, spec, Direction::Forward).await;
                }
                self.report_lag(m, spec, Direction::Forward).await
            }
            (MovePhase::DualWrite | MovePhase::Shadow, _) => {
                if m.request.is_some() {
                    self.refuse(m, &format!(
                        "refused: that request does not apply before a cutover; `shardgate cutover {id}` or `shardgate cancel {id}`",
                        id = m.id
                    ))
                    .await?;
                }
                self.report_lag(m, spec, Direction::Forward).await
            }
            (MovePhase::Cutover, _) => {
                // A cutover that was under way when its driver died.
                let back = m.cutover_back;
                let dir_ = if back { Direction::Back } else { Direction::Forward };
                let flipped = if back { !owner_is_target } else { owner_is_target };
                if flipped {
                    cutover::settle_streams(spec, dir_).await?;
                    let phase = if back { self.settled() } else { MovePhase::Reverse };
                    self.update(m, phase, BTreeMap::new(), Some("cutover finished after a restart")).await?;
                } else {
                    cutover::repair_unflipped(spec, dir_).await?;
                    if let Some(h) = dir.holds.get(&m.id) {
                        self.writer
                            .propose(Command::ReleaseHold { id: m.id, token: h.token })
                            .await
                            .map_err(Error::Other)?;
                    }
                    let phase = if back { MovePhase::Reverse } else { self.settled() };
                    self.update(m, phase, BTreeMap::new(), Some("cutover undone after a restart")).await?;
                }
                Ok(Step::Again)
            }
            (MovePhase::Reverse, Some(MoveRequest::Rollback)) => {
                self.clear_request(m).await?;
                self.cutover(m, spec, Direction::Back).await
            }
            (MovePhase::Reverse, Some(MoveRequest::Complete)) => {
                self.clear_request(m).await?;
                let keep_target = MoveFlagUpdate { keep_source: Some(false), ..Default::default() };
                self.update_flags(m, MovePhase::Cleanup, keep_target, Some("completing")).await?;
                Ok(Step::Again)
            }
            (MovePhase::Reverse, Some(_)) => {
                self.refuse(m, &format!(
                    "refused: after a cutover a move can only be rolled back or completed; `shardgate rollback {id}` or `shardgate complete {id}`",
                    id = m.id
                ))
                .await?;
                Ok(Step::Again)
            }
            (MovePhase::Reverse, None) if m.options.complete_auto => {
                let keep_target = MoveFlagUpdate { keep_source: Some(false), ..Default::default() };
                self.update_flags(m, MovePhase::Cleanup, keep_target, Some("completing (automatic)")).await?;
                Ok(Step::Again)
            }
            (MovePhase::Reverse, None) => self.report_lag(m, spec, Direction::Back).await,
            (MovePhase::Cleanup, _) => {
                let keep = if m.keep_source { Keep::Source } else { Keep::Target };
                let owner = if keep == Keep::Source { m.source } else { m.target };
                let home = matches!(&m.subject, MoveSubject::Tenant(k) if dir.pins.get(k) == Some(&owner));
                let deleted = cleanup::finish(spec, keep, home).await?;
                let phase = if keep == Keep::Source { MovePhase::Cancelled } else { MovePhase::Done };
                let note = match keep {
                    Keep::Source => format!("cancelled: the target's copy dropped ({deleted} rows)"),
                    Keep::Target => format!("done: the old copy dropped ({deleted} rows) and the replication removed"),
                };
                self.update(m, phase, counters([("rows_deleted", deleted)]), Some(&note)).await?;
                Ok(Step::Again)
            }
            (MovePhase::Done | MovePhase::Cancelled | MovePhase::Failed, _) => Ok(Step::Wait(Duration::from_secs(1))),
        }
    }

    /// Compares both copies at one consistent point (see [`verify`]) and records
    /// the result. A cutover waiting on it is refused when it finds a difference.
    async fn verify(&self, m: &Move, spec: &MoveSpec) -> Result<Step, Error> {
        let r = Box::pin(verify::verify(spec, &self.coordinator(m.id), &self.config.verify)).await?;
        let found = match r.mismatches.first() {
            None if r.clean() => {
                format!("verified clean: {} rows in {} chunk(s) equal on both shards", r.rows_source, r.chunks)
            }
            None => format!("row counts differ: {} on the source, {} on the target", r.rows_source, r.rows_target),
            Some(x) => format!("{} chunk(s) differ; first: {x}", r.mismatches.len()),
        };
        let mut c = counters([
            ("verify_chunks", r.chunks),
            ("verify_mismatches", r.mismatches.len() as u64),
            ("verify_rows", r.rows_source),
            ("verify_pause_us", r.pause.as_micros() as u64),
            ("verified_at_ms", now_ms()),
            ("verify_saw_mismatched", m.counters.get("shadow_mismatched").copied().unwrap_or(0)),
        ]);
        let clean = MoveFlagUpdate { verified_clean: Some(r.clean()), ..Default::default() };
        if r.clean() {
            self.update_with(m, self.settled(), c, clean, Some(&found)).await?;
            return Ok(Step::Again);
        }
        let next = format!(
            "The source still serves every read and write. Next: `shardgate verify {id}` checks again; \
             `shardgate cancel {id}` drops the target's copy (then move again); `shardgate cutover {id} --force` cuts over anyway",
            id = m.id
        );
        let waiting_cutover = matches!(m.request, Some(MoveRequest::Cutover { force: false }));
        let note = if waiting_cutover {
            c.insert("refusals".into(), m.counters.get("refusals").copied().unwrap_or(0) + 1);
            format!("cutover refused: verify found a difference: {found}. {next}")
        } else {
            format!("verify found a difference: {found}. {next}")
        };
        self.update_with(m, self.settled(), c, clean, Some(&note)).await?;
        if waiting_cutover {
            self.clear_request(m).await?;
        }
        Ok(Step::Again)
    }

    /// Answers the pending request with a refusal: the note says why and what
    /// clears it, and the `refusals` counter tells a waiting CLI it was answered.
    async fn refuse(&self, m: &Move, note: &str) -> Result<(), Error> {
        let current = self.directory.load().moves.get(&m.id).cloned();
        let (phase, n) = current.map_or((m.phase, 0), |x| (x.phase, x.counters.get("refusals").copied().unwrap_or(0)));
        self.update(m, phase, counters([("refusals", n + 1)]), Some(note)).await?;
        self.clear_request(m).await
    }

    /// Runs the copy (see [`copy`]), writing its progress to the directory as it
    /// goes. Gives up the copy (its transactions roll back) when the move is
    /// cancelled or this process stops driving; the next attempt starts over.
    async fn copy(&self, m: &Move, spec: &MoveSpec) -> Result<Step, Error> {
        let (tx, rx) = tokio::sync::watch::channel(copy::Progress::default());
        let work = copy::copy(spec, &self.throttle, &tx);
        tokio::pin!(work);
        let started = Instant::now();
        let total = m.counters.get("rows_total").copied().unwrap_or(0);
        let report = |p: &copy::Progress| {
            let rows = p.rows();
            let rate = rows as f64 / started.elapsed().as_secs_f64().max(0.001);
            let eta = if rate > 0.0 { (total.saturating_sub(rows) as f64 / rate) as u64 } else { 0 };
            let mut c = counters([
                ("rows_copied", rows),
                ("copy_bytes_in_progress", p.bytes()),
                ("copy_rows_per_s", rate as u64),
                ("eta_s", eta),
                ("tables_ready", p.tables.iter().filter(|t| t.done).count() as u64),
            ]);
            for t in &p.tables {
                c.insert(format!("copy_rows:{}", t.table), t.rows);
                c.insert(format!("copy_bytes:{}", t.table), t.bytes);
            }
            c
        };
        loop {
            tokio::select! {
                outcome = &mut work => {
                    return match outcome? {
                        copy::Outcome::Busy => {
                            let why = "waiting: another driver is copying this move (its lock is held on the target)";
                            if m.note.as_deref() != Some(why) {
                                self.note(m, why).await?;
                            }
                            Ok(Step::Wait(Duration::from_secs(1)))
                        }
                        copy::Outcome::Copied { .. } | copy::Outcome::AlreadyCopied => {
                            let mut c = report(&rx.borrow());
                            c.insert("eta_s".into(), 0);
                            if matches!(c.get("rows_copied"), Some(0)) {
                                // Copied by an earlier attempt: keep what it reported.
                                c.retain(|k, _| k == "eta_s");
                            }
                            self.update(m, MovePhase::DualWrite, c, None).await?;
                            Ok(Step::Again)
                        }
                    };
                }
                _ = tokio::time::sleep(self.config.progress_every) => {
                    let now = self.directory.load().moves.get(&m.id).cloned();
                    let cancelled = now.as_ref().is_none_or(|x| x.request == Some(MoveRequest::Cancel));
                    if cancelled || !(self.active)() {
                        return Ok(Step::Again);
                    }
                    let c = report(&rx.borrow());
                    self.update(m, MovePhase::Copy, c, None).await?;
                }
            }
        }
    }

    async fn cutover(&self, m: &Move, spec: &MoveSpec, dir: Direction) -> Result<Step, Error> {
        let back = dir == Direction::Back;
        let before = if back { MovePhase::Reverse } else { self.settled() };
        let after = if back { self.settled() } else { MovePhase::Reverse };
        let direction = MoveFlagUpdate { cutover_back: Some(back), ..Default::default() };
        self.update_flags(m, MovePhase::Cutover, direction, Some("cutting over")).await?;
        let coord = self.coordinator(m.id);
        let started = Instant::now();
        match Box::pin(cutover::cutover(spec, dir, &coord, &self.config.cutover)).await {
            Ok(r) => {
                shardgate_router::moves::record_cutover_pause(r.pause);
                let n = m.counters.get("cutovers").copied().unwrap_or(0) + 1;
                let c = counters([
                    ("cutovers", n),
                    ("pause_us", r.pause.as_micros() as u64),
                    ("hold_us", r.hold.as_micros() as u64),
                    ("fence_us", r.fence.as_micros() as u64),
                    ("catch_up_us", r.catch_up.as_micros() as u64),
                    ("flip_us", r.flip.as_micros() as u64),
                ]);
                let note = format!(
                    "{} in {:.1} ms (statements held {:.1} ms)",
                    if back { "rolled back" } else { "cut over" },
                    started.elapsed().as_secs_f64() * 1e3,
                    r.pause.as_secs_f64() * 1e3
                );
                self.update(m, after, c, Some(&note)).await?;
                Ok(Step::Again)
            }
            Err(e) => {
                let n = m.counters.get("cutover_failures").copied().unwrap_or(0) + 1;
                let note = format!("cutover undone, nothing failed for clients: {e}");
                self.update(m, before, counters([("cutover_failures", n)]), Some(&note)).await?;
                Ok(Step::Again)
            }
        }
    }

    async fn report_lag(&self, m: &Move, spec: &MoveSpec, dir: Direction) -> Result<Step, Error> {
        // The stream in use carries old → new; its slot is on the publisher.
        let (publisher, slot, idle_pub, idle_slot) = match dir {
            Direction::Forward => (&spec.source, spec.forward_name(), &spec.target, spec.reverse_name()),
            Direction::Back => (&spec.target, spec.reverse_name(), &spec.source, spec.forward_name()),
        };
        let c = publisher.connect(&format!("move {} lag", m.id)).await?;
        let lag = replication::lag(publisher, &c, &slot).await?;
        // Keep the idle stream's slot from pinning WAL (see advance_idle_slot).
        let idle = idle_pub.connect(&format!("move {} idle slot", m.id)).await?;
        replication::advance_idle_slot(idle_pub, &idle, &idle_slot).await?;
        let mut values = counters([("lag_bytes", lag.bytes)]);
        if let Some(ms) = lag.ms {
            values.insert("lag_ms".into(), ms);
        }
        let changed = values.iter().any(|(k, v)| m.counters.get(k) != Some(v));
        if changed {
            self.update(m, m.phase, values, None).await?;
        }
        Ok(Step::Wait(self.config.progress_every.max(Duration::from_millis(200)) * 2))
    }

    async fn update(
        &self,
        m: &Move,
        phase: MovePhase,
        counters: BTreeMap<String, u64>,
        note: Option<&str>,
    ) -> Result<(), Error> {
        self.update_with(m, phase, counters, MoveFlagUpdate::default(), note).await
    }

    async fn update_flags(
        &self,
        m: &Move,
        phase: MovePhase,
        flags: MoveFlagUpdate,
        note: Option<&str>,
    ) -> Result<(), Error> {
        self.update_with(m, phase, BTreeMap::new(), flags, note).await
    }

    async fn update_with(
        &self,
        m: &Move,
        phase: MovePhase,
        counters: BTreeMap<String, u64>,
        flags: MoveFlagUpdate,
        note: Option<&str>,
    ) -> Result<(), Error> {
        let note_text = note.map(str::to_string);
        let cmd = Command::UpdateMove { id: m.id, phase, counters, flags, note: note_text, at_ms: now_ms() };
        let was = self.directory.load().moves.get(&m.id).map(|x| x.phase).unwrap_or(m.phase);
        match self.writer.propose(cmd).await {
            Ok(Outcome::Rejected { reason }) => Err(Error::Other(reason)),
            Ok(_) => {
                if was != phase {
                    tracing::info!(
                        move_id = m.id,
                        subject = %m.subject,
                        from = was.name(),
                        phase = phase.name(),
                        note = note.unwrap_or(""),
                        "move phase changed"
                    );
                }
                Ok(())
            }
            Err(e) => Err(Error::Other(format!("directory: {e}"))),
        }
    }

    async fn note(&self, m: &Move, note: &str) -> Result<(), Error> {
        let current = self.directory.load().moves.get(&m.id).map(|x| x.phase).unwrap_or(m.phase);
        self.update(m, current, BTreeMap::new(), Some(note)).await
    }

    async fn clear_request(&self, m: &Move) -> Result<(), Error> {
        self.writer
            .propose(Command::RequestMove { id: m.id, request: None })
            .await
            .map(|_| ())
            .map_err(|e| Error::Other(format!("directory: {e}")))
    }
}

enum Step {
    /// Look at the move again now.
    Again,
    /// Nothing to do until the directory changes or this long passed.
    Wait(Duration),
}

/// Proven shadow differences reported since the last verify looked.
fn mismatches_since_verify(m: &Move) -> u64 {
    let now = m.counters.get("shadow_mismatched").copied().unwrap_or(0);
    now.saturating_sub(m.counters.get("verify_saw_mismatched").copied().unwrap_or(0))
}

/// A clean verify is on record and no shadow read has proven a difference since.
fn verified_current(m: &Move) -> bool {
    m.verified_clean && mismatches_since_verify(m) == 0
}

fn counters<const N: usize>(items: [(&str, u64); N]) -> BTreeMap<String, u64> {
    items.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// What the migrator works from for one move: its record and how to reach both
/// shards.
pub fn spec_of(dir: &Directory, m: &Move, resolve: &Resolve) -> Option<MoveSpec> {
    Some(MoveSpec {
        id: m.id,
        subject: m.subject.clone(),
        key_column: dir.key_column.clone(),
        key_type: dir.key_type,
        bucket_count: dir.bucket_count,
        source: resolve(dir, m.source)?,
        target: resolve(dir, m.target)?,
    })
}

/// Why a planned move should not start its copy yet, if it should not: another
/// move's stream lags more than `max_lag_bytes` (the source is already busy
/// feeding it). Live traffic comes first; the move starts when that passes.
/// (The copy rate caps are a brake on running copies: see [`copy::Throttle`].)
pub fn throttled(dir: &Directory, m: &Move, config: &DriverConfig) -> Option<String> {
    let others = || dir.moves.values().filter(|o| o.id != m.id && o.phase.active());
    if let Some(o) = others().find(|o| o.counters.get("lag_bytes").copied().unwrap_or(0) > config.max_lag_bytes) {
        return Some(format!(
            "waiting to start: move {} lags {} bytes, more than max_lag_bytes ({})",
            o.id,
            o.counters.get("lag_bytes").copied().unwrap_or(0),
            config.max_lag_bytes
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardgate_directory::{KeyType, Shard};

    fn dir_with_moves() -> Directory {
        let shards = (0..2).map(|i| Shard::new(format!("s{i}"), format!("postgres://h/{i}"))).collect();
        let mut d = Directory::new("tenant_id", KeyType::Int, 8, shards).unwrap();
        for b in [0, 1] {
            d.apply(&Command::CreateMove {
                subject: MoveSubject::Bucket(b),
                target: "s1".into(),
                options: Default::default(),
                at_ms: 1,
            });
        }
        d
    }

    fn set(d: &mut Directory, id: u64, phase: MovePhase, counters: &[(&str, u64)]) {
        let counters = counters.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        d.apply(&Command::UpdateMove { id, phase, counters, flags: Default::default(), note: None, at_ms: 2 });
    }

    #[test]
    fn a_new_copy_waits_while_another_stream_lags() {
        let mut d = dir_with_moves();
        let cfg = DriverConfig { max_lag_bytes: 1000, ..Default::default() };
        let second = d.moves[&2].clone();
        assert_eq!(throttled(&d, &second, &cfg), None, "nothing else is busy");
        set(&mut d, 1, MovePhase::Shadow, &[("lag_bytes", 5000)]);
        let why = throttled(&d, &second, &cfg).unwrap();
        assert!(why.contains("move 1 lags 5000 bytes"), "{why}");
        set(&mut d, 1, MovePhase::Shadow, &[("lag_bytes", 1000)]);
        assert_eq!(throttled(&d, &second, &cfg), None, "at the limit is not past it");
        set(&mut d, 1, MovePhase::Shadow, &[("lag_bytes", 5000)]);
        set(&mut d, 1, MovePhase::Done, &[]);
        assert_eq!(throttled(&d, &second, &cfg), None, "an ended move does not count");
    }
}

//! `shardgate move`, `verify`, `cutover`, `rollback`, `complete`, `cancel`: they
//! record the operator's intent in the directory through the admin API; the node
//! that leads the directory drives the move. Waiting means watching the move's
//! record and printing its progress.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use shardgate_directory::state::{MovePhase, Outcome};
use shardgate_router::admin::api::{MoveAction, MoveRequestBody, MoveStatus, NewMove};

use crate::admin_client::Api;

pub enum Subject {
    Bucket(u32),
    Tenant(String),
}

/// The id of the move a `POST /moves` created.
pub fn created_id(out: &Outcome) -> Result<u64> {
    match out {
        Outcome::MoveCreated { id, .. } => Ok(*id),
        other => bail!("the node answered {other:?} instead of a new move; `shardgate status` lists the moves"),
    }
}

pub fn start(api: &Api, subject: Subject, to: &str, cutover_auto: bool, wait: bool) -> Result<()> {
    let body = match subject {
        Subject::Bucket(b) => NewMove { bucket: Some(b), to: to.to_string(), cutover_auto, ..Default::default() },
        Subject::Tenant(t) => NewMove { tenant: Some(t), to: to.to_string(), cutover_auto, ..Default::default() },
    };
    let id = created_id(&api.post("/moves", &body)?)?;
    println!("move {id} planned");
    if !wait {
        println!(
            "follow it with `shardgate status`; when it reaches shadow (or dual_write): `shardgate verify {id}`, then `shardgate cutover {id}`"
        );
        return Ok(());
    }
    let done = |m: &MoveStatus| {
        let settled = matches!(m.phase, MovePhase::DualWrite | MovePhase::Shadow);
        if cutover_auto {
            matches!(m.phase, MovePhase::Reverse) || m.ended() || (settled && stopped_before_cutover(m))
        } else {
            settled || matches!(m.phase, MovePhase::Reverse) || m.ended()
        }
    };
    let m = watch(api, id, done)?;
    finish_message(&m, id)
}

/// An automatic cutover that will not go on by itself: its verify found a
/// difference, or the cutover was undone three times.
pub fn stopped_before_cutover(m: &MoveStatus) -> bool {
    m.counter("cutover_failures").unwrap_or(0) >= 3 || (m.counter("verified_at_ms").is_some() && !m.verified_clean)
}

/// Sends a request (verify, cutover, rollback, complete, cancel) and waits for its
/// effect unless `wait` is false. Exits non-zero when the request was refused,
/// the verify found a difference, the cutover was undone or the move failed.
pub fn request(api: &Api, id: u64, what: MoveAction, force: bool, wait: bool) -> Result<()> {
    let before = find(api, id)?;
    let _: Outcome = api.post("/moves/request", &MoveRequestBody { id, request: what, force })?;
    println!("move {id}: {} requested", what.name());
    if !wait {
        return Ok(());
    }
    let counter = |m: &MoveStatus, k: &str| m.counter(k).unwrap_or(0);
    let changed = |m: &MoveStatus, k: &str| counter(m, k) != counter(&before, k);
    // Every request ends in one of these, and the driver records which.
    let refused = |m: &MoveStatus| changed(m, "refusals");
    let failed = |m: &MoveStatus| m.phase == MovePhase::Failed;
    let m = match what {
        MoveAction::Verify => watch(api, id, |m| changed(m, "verified_at_ms") || refused(m) || failed(m))?,
        MoveAction::Cutover | MoveAction::Rollback => {
            watch(api, id, |m| changed(m, "cutovers") || changed(m, "cutover_failures") || refused(m) || failed(m))?
        }
        MoveAction::Complete | MoveAction::Cancel => watch(api, id, |m| m.ended() || refused(m))?,
    };
    let note = m.note.as_deref().unwrap_or("");
    println!("move {id}: {}{}", m.phase.name(), if note.is_empty() { String::new() } else { format!(" — {note}") });
    if failed(&m) {
        bail!("move {id} failed: {note}");
    }
    if refused(&m) {
        bail!("move {id}: {note}");
    }
    match what {
        MoveAction::Verify if !m.verified_clean => bail!("move {id}: verify found a difference (see above)"),
        MoveAction::Cutover | MoveAction::Rollback if changed(&m, "cutover_failures") => {
            bail!("move {id}: {note}")
        }
        _ => Ok(()),
    }
}

fn finish_message(m: &MoveStatus, id: u64) -> Result<()> {
    let note = m.note.as_deref().unwrap_or("");
    println!("move {id}: {}{}", m.phase.name(), if note.is_empty() { String::new() } else { format!(" — {note}") });
    match m.phase {
        MovePhase::Failed => bail!("move {id} failed: {note}"),
        _ if stopped_before_cutover(m) => bail!("move {id}: the automatic cutover stopped: {note}"),
        _ => Ok(()),
    }
}

fn find(api: &Api, id: u64) -> Result<MoveStatus> {
    let moves: Vec<MoveStatus> = api.get("/moves")?;
    match moves.into_iter().find(|m| m.id == id) {
        Some(m) => Ok(m),
        None => bail!("there is no move {id}; `shardgate status` lists the moves"),
    }
}

/// Polls the move until `done`, printing a progress line when it changes.
fn watch(api: &Api, id: u64, done: impl Fn(&MoveStatus) -> bool) -> Result<MoveStatus> {
    let started = Instant::now();
    let mut last = String::new();
    loop {
        let m = find(api, id)?;
        let line = progress_line(&m);
        if line != last {
            println!("[{:>6.1}s] {line}", started.elapsed().as_secs_f64());
            last = line;
        }
        if done(&m) {
            return Ok(m);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One line about a move: phase, then the numbers that matter in that phase.
pub fn progress_line(m: &MoveStatus) -> String {
    let n = |k: &str| m.counter(k).unwrap_or(0);
    let phase = m.phase.name();
    let mut s = format!("move {} {} {} → {}: {phase}", m.id, m.subject, m.source, m.target);
    match m.phase {
        MovePhase::Copy => {
            let total = n("rows_total").max(1);
            s.push_str(&format!(
                "  {}/{} rows ({:.0}%), {} rows/s, ETA {}s, {}/{} tables ready",
                n("rows_copied"),
                n("rows_total"),
                100.0 * n("rows_copied") as f64 / total as f64,
                n("copy_rows_per_s"),
                n("eta_s"),
                n("tables_ready"),
                n("tables")
            ));
        }
        MovePhase::DualWrite | MovePhase::Shadow | MovePhase::Reverse => {
            s.push_str(&format!("  lag {} bytes", n("lag_bytes")));
            if let Some(ms) = m.counter("lag_ms") {
                s.push_str(&format!(" / {ms} ms"));
            }
            if m.counter("shadow_compared").is_some() || m.phase == MovePhase::Shadow {
                s.push_str(&format!(
                    ", shadow reads {} compared, {} mismatched",
                    n("shadow_compared"),
                    n("shadow_mismatched")
                ));
            }
            if m.counter("verified_at_ms").is_some() {
                s.push_str(if m.verified_clean { ", verified clean" } else { ", verify found differences" });
            }
        }
        _ => {}
    }
    if let Some(x) = m.shadow_samples.first() {
        s.push_str(&format!(
            "\n      last proven difference: tenant {}: {}  source: {}  target: {}",
            x.keys, x.query, x.source, x.target
        ));
    }
    if m.holding {
        s.push_str("  [statements held]");
    }
    if let Some(note) = &m.note {
        s.push_str(&format!("  — {note}"));
    }
    s
}

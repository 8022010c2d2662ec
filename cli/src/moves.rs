//! `shardgate move`, `verify`, `cutover`, `rollback`, `complete`, `cancel`: they
//! record the operator's intent in the directory through the admin API; the node
//! that leads the directory drives the move. Waiting means watching the move's
//! record and printing its progress.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::{json, Value};

use crate::admin_client::Api;

pub enum Subject {
    Bucket(u32),
    Tenant(String),
}

/// Whether a move (as `/moves` lists it) has ended: done, cancelled or failed.
pub fn ended(m: &serde_json::Value) -> bool {
    matches!(m["phase"].as_str(), Some("done" | "cancelled" | "failed"))
}

pub fn start(api: &Api, subject: Subject, to: &str, cutover_auto: bool, wait: bool) -> Result<()> {
    let body = match &subject {
        Subject::Bucket(b) => json!({ "bucket": b, "to": to, "cutover_auto": cutover_auto }),
        Subject::Tenant(t) => json!({ "tenant": t, "to": to, "cutover_auto": cutover_auto }),
    };
    let out = api.post("/moves", &body)?;
    let id = out["id"].as_u64().unwrap_or(0);
    println!("move {id} planned");
    if !wait {
        println!(
            "follow it with `shardgate status`; when it reaches shadow (or dual_write): `shardgate verify {id}`, then `shardgate cutover {id}`"
        );
        return Ok(());
    }
    let done = |m: &Value| {
        let phase = m["phase"].as_str().unwrap_or("");
        if cutover_auto {
            matches!(phase, "reverse" | "done" | "cancelled" | "failed")
                || (matches!(phase, "dual_write" | "shadow")
                    && (m["counters"]["cutover_failures"].as_u64().unwrap_or(0) >= 3
                        || m["counters"]["shadow_mismatched"].as_u64().unwrap_or(0) > 0))
        } else {
            matches!(phase, "dual_write" | "shadow" | "reverse" | "done" | "cancelled" | "failed")
        }
    };
    let m = watch(api, id, done)?;
    finish_message(&m, id)
}

/// Sends a request (verify, cutover, rollback, complete, cancel) and waits for its
/// effect unless `wait` is false.
pub fn request(api: &Api, id: u64, what: &str, force: bool, wait: bool) -> Result<()> {
    let before = find(api, id)?;
    api.post("/moves/request", &json!({ "id": id, "request": what, "force": force }))?;
    println!("move {id}: {what} requested");
    if !wait {
        return Ok(());
    }
    let counter = |m: &Value, k: &str| m["counters"][k].as_u64().unwrap_or(0);
    let m = match what {
        "verify" => {
            let at = counter(&before, "verified_at_ms");
            watch(api, id, |m| counter(m, "verified_at_ms") != at || m["phase"] == "failed")?
        }
        "cutover" | "rollback" => {
            let (n, f) = (counter(&before, "cutovers"), counter(&before, "cutover_failures"));
            let note = before["note"].clone();
            watch(api, id, |m| {
                counter(m, "cutovers") != n
                    || counter(m, "cutover_failures") != f
                    || m["phase"] == "failed"
                    // A refusal (not verified, wrong phase) comes back as a note.
                    || (m["request"].is_null() && m["note"] != note && m["phase"] != "cutover")
            })?
        }
        _ => watch(api, id, ended)?,
    };
    finish_message(&m, id)
}

fn finish_message(m: &Value, id: u64) -> Result<()> {
    let note = m["note"].as_str().unwrap_or("");
    match m["phase"].as_str().unwrap_or("") {
        "failed" => bail!("move {id} failed: {note}"),
        phase => {
            println!("move {id}: {phase}{}", if note.is_empty() { String::new() } else { format!(" — {note}") });
            if note.contains("refused") || note.contains("differ") || note.contains("undone") {
                bail!("move {id}: {note}");
            }
            Ok(())
        }
    }
}

fn find(api: &Api, id: u64) -> Result<Value> {
    let moves = api.get("/moves")?;
    match moves.as_array().into_iter().flatten().find(|m| m["id"].as_u64() == Some(id)) {
        Some(m) => Ok(m.clone()),
        None => bail!("there is no move {id}; `shardgate status` lists the moves"),
    }
}

/// Polls the move until `done`, printing a progress line when it changes.
fn watch(api: &Api, id: u64, done: impl Fn(&Value) -> bool) -> Result<Value> {
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
pub fn progress_line(m: &Value) -> String {
    let c = &m["counters"];
    let n = |k: &str| c[k].as_u64().unwrap_or(0);
    let phase = m["phase"].as_str().unwrap_or("?");
    let mut s = format!(
        "move {} {} {} → {}: {phase}",
        m["id"],
        m["subject"].as_str().unwrap_or("?"),
        m["source"].as_str().unwrap_or("?"),
        m["target"].as_str().unwrap_or("?")
    );
    match phase {
        "copy" => {
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
        "dual_write" | "shadow" | "reverse" => {
            s.push_str(&format!("  lag {} bytes", n("lag_bytes")));
            if let Some(ms) = c["lag_ms"].as_u64() {
                s.push_str(&format!(" / {ms} ms"));
            }
            if c["shadow_compared"].is_u64() || phase == "shadow" {
                s.push_str(&format!(
                    ", shadow reads {} compared, {} mismatched",
                    n("shadow_compared"),
                    n("shadow_mismatched")
                ));
            }
            if c["verified_at_ms"].is_u64() {
                let clean = m["verified_clean"] == true;
                s.push_str(if clean { ", verified clean" } else { ", verify found differences" });
            }
        }
        _ => {}
    }
    if let Some(x) = m["shadow_samples"].as_array().and_then(|v| v.first()) {
        s.push_str(&format!(
            "\n      last difference: {}  source: {}  target: {}",
            x["query"].as_str().unwrap_or("?"),
            x["source"].as_str().unwrap_or("?"),
            x["target"].as_str().unwrap_or("?")
        ));
    }
    if m["holding"].as_bool() == Some(true) {
        s.push_str("  [statements held]");
    }
    if let Some(note) = m["note"].as_str() {
        s.push_str(&format!("  — {note}"));
    }
    s
}

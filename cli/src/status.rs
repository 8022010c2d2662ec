//! `shardgate status`: asks a node's admin API and prints what it says.

use std::path::Path;

use anyhow::Result;
use serde_json::Value;

use crate::admin_client::Api;

pub fn run(data_dir: &Path, admin: Option<&str>, json: bool) -> Result<()> {
    let api = Api::find(data_dir, admin)?;
    let status = api.get("/status")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    print_table(&status);
    Ok(())
}

pub fn shard_list(api: &Api, json: bool) -> Result<()> {
    let status = api.get("/status")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status["shards"])?);
        return Ok(());
    }
    print_shards(&status);
    Ok(())
}

pub fn directory_show(api: &Api, json: bool) -> Result<()> {
    let dir = api.get("/directory")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&dir)?);
        return Ok(());
    }
    println!(
        "epoch {}   buckets {}   key {} ({})",
        dir["epoch"],
        dir["bucket_count"],
        dir["key_column"].as_str().unwrap_or("?"),
        dir["key_type"].as_str().unwrap_or("?")
    );
    let shards: Vec<&str> = dir["shards"].as_array().into_iter().flatten().filter_map(|s| s["name"].as_str()).collect();
    for (i, s) in dir["shards"].as_array().into_iter().flatten().enumerate() {
        println!(
            "shard {i}: {} {} {}",
            s["name"].as_str().unwrap_or("?"),
            s["state"].as_str().unwrap_or("?"),
            s["url"].as_str().unwrap_or("?")
        );
    }
    let pins = dir["pins"].as_array().cloned().unwrap_or_default();
    println!(
        "pins: {}",
        if pins.is_empty() {
            "(none)".into()
        } else {
            pins.iter()
                .map(|p| format!("{} → {}", p[0], shards.get(p[1].as_u64().unwrap_or(0) as usize).unwrap_or(&"?")))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    let moves = dir["moves"].as_object().map(|m| m.len()).unwrap_or(0);
    println!("moves: {moves}");
    Ok(())
}

fn print_shards(s: &Value) {
    println!("{:<16} {:<8} {:>8}  URL", "SHARD", "STATE", "BUCKETS");
    for sh in s["shards"].as_array().into_iter().flatten() {
        println!(
            "{:<16} {:<8} {:>8}  {}",
            sh["name"].as_str().unwrap_or("?"),
            sh["state"].as_str().unwrap_or("?"),
            sh["buckets"].as_u64().unwrap_or(0),
            sh["url"].as_str().unwrap_or("?")
        );
    }
}

fn print_table(s: &Value) {
    println!(
        "epoch {}   buckets {}   key {} ({})   clients {}",
        s["epoch"],
        s["bucket_count"],
        s["key_column"].as_str().unwrap_or("?"),
        s["key_type"].as_str().unwrap_or("?"),
        s["clients"]
    );
    println!();
    print_shards(s);
    println!();
    println!("{:<16} SHARD", "BUCKETS");
    for r in s["placement_ranges"].as_array().into_iter().flatten() {
        println!(
            "{:<16} {}",
            format!("{}-{}", r["first_bucket"], r["last_bucket"]),
            r["shard"].as_str().unwrap_or("?")
        );
    }
    if let Some(r) = s["replica"].as_object() {
        println!();
        println!(
            "directory node {} ({}), leader {}, term {}, lease {}",
            r["node_id"],
            r["role"].as_str().unwrap_or("?"),
            r["leader"],
            r["term"],
            if r["lease_valid"].as_bool() == Some(true) { "valid" } else { "EXPIRED: writes refused" }
        );
    }
    let moves: Vec<&Value> = s["moves"].as_array().into_iter().flatten().collect();
    if !moves.is_empty() {
        println!();
        println!("moves:");
        for m in moves {
            println!("  {}", crate::moves::progress_line(m));
        }
    }
    let tables: Vec<&str> = s["sharded_tables"].as_array().into_iter().flatten().filter_map(|t| t.as_str()).collect();
    println!();
    println!("sharded tables: {}", if tables.is_empty() { "(none yet)".to_string() } else { tables.join(", ") });
}

/// `shardgate status --watch`: the status redrawn as it changes. On a terminal
/// the screen is cleared and redrawn; into a pipe or a file each changed frame is
/// printed after the last, without escape codes; with `--json`, one JSON status
/// per line. Ctrl-C ends it.
pub fn watch(data_dir: &Path, admin: Option<&str>, json: bool, interval: std::time::Duration) -> Result<()> {
    use std::io::{IsTerminal, Write};
    let api = Api::find(data_dir, admin)?;
    let tty = !json && std::io::stdout().is_terminal();
    let mut last = String::new();
    let mut sizes: Option<(std::time::Instant, Value)> = None;
    loop {
        let status = api.get("/status")?;
        let out = if json {
            format!("{}\n", serde_json::to_string(&status)?)
        } else {
            // Sizes scan the shards: refreshed every 30 s, not every frame.
            if sizes.as_ref().is_none_or(|(at, _)| at.elapsed() > std::time::Duration::from_secs(30)) {
                sizes = api.get("/sizes").ok().map(|v| (std::time::Instant::now(), v));
            }
            frame(&status, sizes.as_ref().map(|(_, v)| v))
        };
        if out != last {
            let mut stdout = std::io::stdout().lock();
            if tty {
                // Home, clear the screen, draw.
                write!(stdout, "\x1b[H\x1b[2J{out}")?;
            } else if json {
                write!(stdout, "{out}")?;
            } else {
                writeln!(stdout, "{out}")?;
            }
            stdout.flush()?;
            last = out;
        }
        std::thread::sleep(interval);
    }
}

/// One frame of the watch view.
pub fn frame(s: &Value, sizes: Option<&Value>) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let lease = match s["replica"]["lease_valid"].as_bool() {
        Some(true) | None => "lease valid",
        Some(false) => "LEASE EXPIRED: writes refused",
    };
    let _ = writeln!(
        out,
        "shardgate — epoch {}, {} buckets, {} clients, leader {}, {lease}",
        s["epoch"],
        s["bucket_count"],
        s["clients"],
        s["replica"]["leader"].as_u64().map(|l| l.to_string()).unwrap_or_else(|| "-".into())
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "{:<14} {:<9} {:>7} {:>11}  ", "SHARD", "STATE", "BUCKETS", "SIZE");
    let total_buckets = s["bucket_count"].as_u64().unwrap_or(1).max(1);
    for sh in s["shards"].as_array().into_iter().flatten() {
        let name = sh["name"].as_str().unwrap_or("?");
        let n = sh["buckets"].as_u64().unwrap_or(0);
        let size: Option<u64> = sizes.map(|z| {
            z["buckets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|b| b["shard"] == name)
                .map(|b| b["bytes"].as_u64().unwrap_or(0))
                .sum()
        });
        let _ = writeln!(
            out,
            "{:<14} {:<9} {:>7} {:>11}  {}",
            name,
            sh["state"].as_str().unwrap_or("?"),
            n,
            size.map(human_bytes).unwrap_or_else(|| "-".into()),
            bar(n as f64 / total_buckets as f64, 20)
        );
    }
    let moves: Vec<&Value> = s["moves"].as_array().into_iter().flatten().collect();
    let live: Vec<&&Value> = moves.iter().filter(|m| !crate::moves::ended(m)).collect();
    let _ = writeln!(out);
    let _ = writeln!(out, "moves: {} under way, {} in all", live.len(), moves.len());
    for m in moves.iter().rev().take(10) {
        let _ = writeln!(out, "{}", move_lines(m));
    }
    out
}

fn move_lines(m: &Value) -> String {
    let c = &m["counters"];
    let n = |k: &str| c[k].as_u64().unwrap_or(0);
    let phase = m["phase"].as_str().unwrap_or("?");
    let mut s = format!(
        "  #{:<4} {:<12} {} → {}  {}{}",
        m["id"],
        m["subject"].as_str().unwrap_or("?"),
        m["source"].as_str().unwrap_or("?"),
        m["target"].as_str().unwrap_or("?"),
        phase.to_uppercase(),
        if m["holding"].as_bool() == Some(true) { "  [statements held]" } else { "" }
    );
    let timeline: Vec<&str> = m["history"].as_array().into_iter().flatten().filter_map(|h| h[0].as_str()).collect();
    if !timeline.is_empty() {
        s.push_str(&format!("\n        timeline: {}", timeline.join(" → ")));
    }
    if phase == "copy" {
        let total = n("rows_total").max(1);
        let done = n("rows_copied");
        s.push_str(&format!(
            "\n        copy {} {}/{} rows, {} copying now, {} rows/s, ETA {} s",
            bar(done as f64 / total as f64, 24),
            done,
            n("rows_total"),
            human_bytes(n("copy_bytes_in_progress")),
            n("copy_rows_per_s"),
            n("eta_s")
        ));
    }
    if c["lag_bytes"].is_u64() && !matches!(phase, "done" | "cancelled" | "failed") {
        let ms = c["lag_ms"].as_u64().map(|v| format!(" / {v} ms")).unwrap_or_default();
        s.push_str(&format!("\n        lag {}{ms}", human_bytes(n("lag_bytes"))));
    }
    if c["shadow_compared"].is_u64() || phase == "shadow" {
        s.push_str(&format!(
            "\n        shadow reads {} compared, {} mismatched, {} explained by lag, {} skipped",
            n("shadow_compared"),
            n("shadow_mismatched"),
            n("shadow_lag_explained"),
            n("shadow_skipped")
        ));
    }
    if c["verified_at_ms"].is_u64() {
        s.push_str(&format!(
            "\n        verify {} ({} chunks, {} rows)",
            if m["verified_clean"] == true {
                "clean".to_string()
            } else {
                format!("{} chunk(s) differ", n("verify_mismatches"))
            },
            n("verify_chunks"),
            n("verify_rows")
        ));
    }
    if c["cutovers"].is_u64() {
        s.push_str(&format!(
            "\n        cutovers {}, last paused statements {:.1} ms (hold {:.1}, fence {:.1}, catch-up {:.1}, flip {:.1} ms)",
            n("cutovers"),
            n("pause_us") as f64 / 1e3,
            n("hold_us") as f64 / 1e3,
            n("fence_us") as f64 / 1e3,
            n("catch_up_us") as f64 / 1e3,
            n("flip_us") as f64 / 1e3
        ));
    }
    if let Some(note) = m["note"].as_str() {
        s.push_str(&format!("\n        {note}"));
    }
    s
}

fn bar(fraction: f64, width: usize) -> String {
    let full = ((fraction.clamp(0.0, 1.0)) * width as f64).round() as usize;
    format!("[{}{}] {:>3.0}%", "#".repeat(full), ".".repeat(width - full), fraction.clamp(0.0, 1.0) * 100.0)
}

pub fn human_bytes(v: u64) -> String {
    match v {
        v if v >= 1 << 30 => format!("{:.1} GiB", v as f64 / (1u64 << 30) as f64),
        v if v >= 1 << 20 => format!("{:.1} MiB", v as f64 / (1u64 << 20) as f64),
        v if v >= 1 << 10 => format!("{:.1} KiB", v as f64 / 1024.0),
        v => format!("{v} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_shows_each_phase_and_carries_no_escape_codes() {
        let s = serde_json::json!({
            "epoch": 7, "bucket_count": 16, "clients": 3,
            "replica": { "leader": 1, "lease_valid": true },
            "shards": [
                { "name": "shard_0", "state": "active", "buckets": 10 },
                { "name": "shard_1", "state": "active", "buckets": 6 }
            ],
            "moves": [{
                "id": 4, "subject": "bucket 3", "source": "shard_0", "target": "shard_1", "phase": "copy",
                "holding": false, "note": null,
                "history": [["plan", 1], ["copy", 2]],
                "counters": { "rows_total": 1000, "rows_copied": 250, "copy_rows_per_s": 50, "eta_s": 15 }
            }, {
                "id": 3, "subject": "tenant 42", "source": "shard_1", "target": "shard_0", "phase": "reverse",
                "holding": false, "note": "cut over in 40 ms",
                "history": [["plan", 1], ["copy", 2], ["shadow", 3], ["verify", 4], ["cutover", 5], ["reverse", 6]],
                "verified_clean": true,
                "counters": { "lag_bytes": 0, "shadow_compared": 90, "shadow_mismatched": 0,
                              "verified_at_ms": 9, "cutovers": 1, "pause_us": 12500 }
            }]
        });
        let sizes = serde_json::json!({ "buckets": [{ "shard": "shard_0", "bytes": 2048 }] });
        let f = frame(&s, Some(&sizes));
        assert!(!f.contains('\x1b'), "{f}");
        assert!(f.contains("[######..................]  25%"), "{f}");
        assert!(f.contains("plan → copy → shadow → verify → cutover → reverse"), "{f}");
        assert!(f.contains("shadow reads 90 compared, 0 mismatched"), "{f}");
        assert!(f.contains("verify clean"), "{f}");
        assert!(f.contains("last paused statements 12.5 ms"), "{f}");
        assert!(f.contains("2.0 KiB"), "{f}");
    }
}

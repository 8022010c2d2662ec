//! `shardgate status`: asks a node's admin API and prints what it says.

use std::fmt::Write as _;

use anyhow::Result;
use shardgate_directory::Directory;
use shardgate_router::admin::api::{MoveStatus, Sizes, Status};

use crate::admin_client::Api;

pub fn run(api: &Api, json: bool) -> Result<()> {
    let status: Status = api.get("/status")?;
    if json {
        println!("{}", as_json(&status, Layout::Pretty)?);
        return Ok(());
    }
    print!("{}", table(&status));
    Ok(())
}

pub fn shard_list(api: &Api, json: bool) -> Result<()> {
    let status: Status = api.get("/status")?;
    if json {
        println!("{}", as_json(&status.shards, Layout::Pretty)?);
        return Ok(());
    }
    print!("{}", shards(&status));
    Ok(())
}

pub fn directory_show(api: &Api, json: bool) -> Result<()> {
    let dir: Directory = api.get("/directory")?;
    if json {
        println!("{}", as_json(&dir, Layout::Pretty)?);
        return Ok(());
    }
    println!(
        "epoch {}   buckets {}   key {} ({})",
        dir.epoch,
        dir.bucket_count,
        dir.key_column,
        json_text(&dir.key_type)
    );
    let name = |s: usize| dir.shards.get(s).map(|x| x.name.as_str()).unwrap_or("?");
    for (i, s) in dir.shards.iter().enumerate() {
        println!("shard {i}: {} {} {}", s.name, s.state.name(), s.url);
    }
    let mut pins: Vec<_> = dir.pins.iter().collect();
    pins.sort();
    println!(
        "pins: {}",
        if pins.is_empty() {
            "(none)".into()
        } else {
            // A key as JSON: a text key in quotes, a number without.
            let key = |k: &shardgate_directory::TenantKey| serde_json::to_string(k).unwrap_or_default();
            pins.iter().map(|(k, s)| format!("{} → {}", key(k), name(**s))).collect::<Vec<_>>().join(", ")
        }
    );
    println!("moves: {}", dir.moves.len());
    Ok(())
}

enum Layout {
    Pretty,
    Line,
}

/// What `--json` prints: the API's answer with its keys in alphabetical order,
/// as this command has always printed them (a script that compares two runs as
/// text sees no reordering).
fn as_json<T: serde::Serialize>(v: &T, layout: Layout) -> Result<String> {
    let sorted = serde_json::to_value(v)?;
    Ok(match layout {
        Layout::Pretty => serde_json::to_string_pretty(&sorted)?,
        Layout::Line => serde_json::to_string(&sorted)?,
    })
}

/// A value's JSON text without the quotes of a string (`int`, not `"int"`).
fn json_text<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
}

fn shards(s: &Status) -> String {
    let mut out = format!("{:<16} {:<8} {:>8}  URL\n", "SHARD", "STATE", "BUCKETS");
    for sh in &s.shards {
        let _ = writeln!(out, "{:<16} {:<8} {:>8}  {}", sh.name, sh.state.name(), sh.buckets, sh.url);
    }
    out
}

/// What `shardgate status` prints.
fn table(s: &Status) -> String {
    let mut out = format!(
        "epoch {}   buckets {}   key {} ({})   clients {}\n\n",
        s.epoch, s.bucket_count, s.key_column, s.key_type, s.clients
    );
    out.push_str(&shards(s));
    let _ = writeln!(out);
    let _ = writeln!(out, "{:<16} SHARD", "BUCKETS");
    for r in &s.placement_ranges {
        let _ = writeln!(out, "{:<16} {}", format!("{}-{}", r.first_bucket, r.last_bucket), r.shard);
    }
    if let Some(r) = &s.replica {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "directory node {} ({}), leader {}, term {}, lease {}",
            r.node_id,
            r.role.name(),
            // `null` when it knows none: what this line has always said.
            r.leader.map_or_else(|| "null".to_string(), |l| l.to_string()),
            r.term,
            if r.lease_valid { "valid" } else { "EXPIRED: writes refused" }
        );
    }
    if !s.moves.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "moves:");
        for m in &s.moves {
            let _ = writeln!(out, "  {}", crate::moves::progress_line(m));
        }
    }
    if !s.in_doubt.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "in-doubt transactions (prepared, settled by the recovery sweep within seconds of their decider shard answering; docs/transactions.md):"
        );
        for t in &s.in_doubt {
            let _ = writeln!(out, "  {}  on {}  for {:.0} s", t.gid, t.shard, t.age_secs);
        }
    }
    let _ = writeln!(out);
    let tables = if s.sharded_tables.is_empty() { "(none yet)".to_string() } else { s.sharded_tables.join(", ") };
    let _ = writeln!(out, "sharded tables: {tables}");
    out
}

/// `shardgate status --watch`: the status redrawn as it changes. On a terminal
/// the screen is cleared and redrawn; into a pipe or a file each changed frame is
/// printed after the last, without escape codes; with `--json`, one JSON status
/// per line. Ctrl-C ends it.
pub fn watch(api: &Api, json: bool, interval: std::time::Duration) -> Result<()> {
    use std::io::{IsTerminal, Write};
    let tty = !json && std::io::stdout().is_terminal();
    let mut last = String::new();
    let mut sizes: Option<(std::time::Instant, Sizes)> = None;
    loop {
        let status: Status = api.get("/status")?;
        let out = if json {
            format!("{}\n", as_json(&status, Layout::Line)?)
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
pub fn frame(s: &Status, sizes: Option<&Sizes>) -> String {
    let mut out = String::new();
    let lease = match s.replica.as_ref().map(|r| r.lease_valid) {
        Some(true) | None => "lease valid",
        Some(false) => "LEASE EXPIRED: writes refused",
    };
    let _ = writeln!(
        out,
        "shardgate — epoch {}, {} buckets, {} clients, leader {}, {lease}",
        s.epoch,
        s.bucket_count,
        s.clients,
        s.replica.as_ref().and_then(|r| r.leader).map(|l| l.to_string()).unwrap_or_else(|| "-".into())
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "{:<14} {:<9} {:>7} {:>11}  ", "SHARD", "STATE", "BUCKETS", "SIZE");
    let total_buckets = u64::from(s.bucket_count).max(1);
    for sh in &s.shards {
        let n = sh.buckets as u64;
        let size: Option<u64> = sizes.map(|z| z.buckets.iter().filter(|b| b.shard == sh.name).map(|b| b.bytes).sum());
        let _ = writeln!(
            out,
            "{:<14} {:<9} {:>7} {:>11}  {}",
            sh.name,
            sh.state.name(),
            n,
            size.map(human_bytes).unwrap_or_else(|| "-".into()),
            bar(n as f64 / total_buckets as f64, 20)
        );
    }
    let live = s.moves.iter().filter(|m| !m.ended()).count();
    let _ = writeln!(out);
    let _ = writeln!(out, "moves: {} under way, {} in all", live, s.moves.len());
    for m in s.moves.iter().rev().take(10) {
        let _ = writeln!(out, "{}", move_lines(m));
    }
    out
}

fn move_lines(m: &MoveStatus) -> String {
    let n = |k: &str| m.counter(k).unwrap_or(0);
    let phase = m.phase.name();
    // The id unpadded: this line has always read `#1 bucket 0` (its width was
    // once asked of a JSON value, which ignores it).
    let mut s = format!(
        "  #{} {:<12} {} → {}  {}{}",
        m.id,
        m.subject,
        m.source,
        m.target,
        phase.to_uppercase(),
        if m.holding { "  [statements held]" } else { "" }
    );
    let timeline: Vec<&str> = m.history.iter().map(|(p, _)| p.name()).collect();
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
    if m.counter("lag_bytes").is_some() && !m.ended() {
        let ms = m.counter("lag_ms").map(|v| format!(" / {v} ms")).unwrap_or_default();
        s.push_str(&format!("\n        lag {}{ms}", human_bytes(n("lag_bytes"))));
    }
    if m.counter("shadow_compared").is_some() || phase == "shadow" {
        s.push_str(&format!(
            "\n        shadow reads {} compared, {} mismatched, {} explained by lag, {} unsettled, {} skipped",
            n("shadow_compared"),
            n("shadow_mismatched"),
            n("shadow_lag_explained"),
            n("shadow_unsettled"),
            n("shadow_skipped")
        ));
        if let Some(x) = m.shadow_samples.first() {
            s.push_str(&format!(
                "\n        last proven difference: tenant {}: {} (source {}, target {})",
                x.keys, x.query, x.source, x.target
            ));
        }
    }
    if m.counter("verified_at_ms").is_some() {
        s.push_str(&format!(
            "\n        verify {} ({} chunks, {} rows)",
            if m.verified_clean { "clean".to_string() } else { format!("{} chunk(s) differ", n("verify_mismatches")) },
            n("verify_chunks"),
            n("verify_rows")
        ));
    }
    if m.counter("cutovers").is_some() {
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
    for p in m.pauses.iter().take(3) {
        s.push_str(&format!("\n        {} hold: {}", p.kind, p.held));
        if p.routers.len() > 1 {
            for (router, held) in &p.routers {
                s.push_str(&format!("\n          {router}: {held}"));
            }
        }
    }
    if let Some(note) = &m.note {
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
    use shardgate_directory::state::{Command, MoveFlagUpdate, MovePhase, MoveSubject, Outcome};
    use shardgate_directory::{KeyType, Shard, TenantKey};
    use shardgate_router::admin::api::{BucketSize, ReplicaRole, ReplicaStatus};
    use shardgate_router::admin::status::{status_of, NodeFacts};

    fn update(d: &mut Directory, id: u64, phase: MovePhase, counters: &[(&str, u64)], flags: MoveFlagUpdate) {
        let counters = counters.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let out = d.apply(&Command::UpdateMove { id, phase, counters, flags, note: None, at_ms: 2 });
        assert!(!matches!(out, Outcome::Rejected { .. }), "{out:?}");
    }

    fn create(d: &mut Directory, subject: MoveSubject, target: &str) -> u64 {
        let out =
            d.apply(&Command::CreateMove { subject, target: target.into(), options: Default::default(), at_ms: 1 });
        let Outcome::MoveCreated { id, .. } = out else { panic!("move not created: {out:?}") };
        id
    }

    /// What a node's `GET /status` answers for a directory with two moves (a
    /// tenant moved, verified and cut over; a bucket in its copy), made by the
    /// server's own code and read back as the CLI reads it: through JSON.
    fn status_from_a_node() -> Status {
        let shards = (0..2).map(|i| Shard::new(format!("shard_{i}"), format!("postgres://h/{i}"))).collect();
        let mut d = Directory::new("tenant_id", KeyType::Int, 16, shards).unwrap();
        let tenant = (0..).map(TenantKey::Int).find(|k| d.shard_for(k) == 1 && d.bucket_of(k) != 3).unwrap();
        let id = create(&mut d, MoveSubject::Tenant(tenant), "shard_0");
        let none = MoveFlagUpdate::default();
        for phase in [MovePhase::Copy, MovePhase::Shadow, MovePhase::Verify] {
            update(&mut d, id, phase, &[], none);
        }
        let clean = MoveFlagUpdate { verified_clean: Some(true), ..Default::default() };
        let verified = [("shadow_compared", 90), ("shadow_mismatched", 0), ("verified_at_ms", 9), ("lag_bytes", 0)];
        update(&mut d, id, MovePhase::Shadow, &verified, clean);
        update(&mut d, id, MovePhase::Cutover, &[], MoveFlagUpdate { cutover_back: Some(false), ..Default::default() });
        d.apply(&Command::HoldMove { id, token: 1, deadline_ms: 100, at_ms: 0 });
        d.apply(&Command::FlipMove { id, shard: "shard_0".into(), token: 1 });
        update(&mut d, id, MovePhase::Reverse, &[("cutovers", 1), ("pause_us", 12500)], none);
        let id = create(&mut d, MoveSubject::Bucket(3), "shard_1");
        let copying = [("rows_total", 1000), ("rows_copied", 250), ("copy_rows_per_s", 50), ("eta_s", 15)];
        update(&mut d, id, MovePhase::Copy, &copying, none);
        let replica = ReplicaStatus {
            node_id: 1,
            leader: Some(1),
            term: 2,
            role: ReplicaRole::Leader,
            applied_index: 40,
            voters: vec![1],
            learners: vec![],
            lease_valid: true,
        };
        let facts = NodeFacts { now_ms: 10, replica: Some(replica), clients: 3, ..Default::default() };
        let served = status_of(&d, facts);
        let json = serde_json::to_string_pretty(&served).unwrap();
        let read: Status = serde_json::from_str(&json).unwrap();
        assert_eq!(read, served, "what a node sends reads back the same");
        read
    }

    #[test]
    fn a_frame_shows_each_phase_and_carries_no_escape_codes() {
        let s = status_from_a_node();
        let sizes = Sizes {
            buckets: vec![BucketSize { bucket: 0, shard: "shard_0".into(), rows: 9, bytes: 2048 }],
            ..Default::default()
        };
        let f = frame(&s, Some(&sizes));
        let epoch = s.epoch;
        assert!(!f.contains('\x1b'), "{f}");
        assert!(f.contains(&format!("epoch {epoch}, 16 buckets, 3 clients, leader 1, lease valid")), "{f}");
        assert!(f.contains("moves: 2 under way, 2 in all"), "{f}");
        assert!(f.contains("\n  #2 bucket 3     shard_0 → shard_1  COPY\n"), "{f}");
        assert!(f.contains("[######..................]  25%"), "{f}");
        assert!(f.contains("plan → copy → shadow → verify → shadow → cutover → reverse"), "{f}");
        assert!(f.contains("shadow reads 90 compared, 0 mismatched"), "{f}");
        assert!(f.contains("verify clean"), "{f}");
        assert!(f.contains("last paused statements 12.5 ms"), "{f}");
        assert!(f.contains("2.0 KiB"), "{f}");
    }

    #[test]
    fn the_table_shows_shards_ranges_the_replica_and_each_move() {
        let s = status_from_a_node();
        let t = table(&s);
        let first = format!("epoch {}   buckets 16   key tenant_id (bigint)   clients 3\n\nSHARD ", s.epoch);
        assert!(t.starts_with(&first), "{t}");
        assert!(t.contains("\nshard_0          active          8  postgres://h/0\n"), "{t}");
        assert!(t.contains("\n0-7              shard_0\n8-15             shard_1\n"), "{t}");
        assert!(t.contains("directory node 1 (leader), leader 1, term 2, lease valid"), "{t}");
        assert!(t.contains("shadow reads 90 compared, 0 mismatched, verified clean"), "{t}");
        assert!(t.contains("  move 2 bucket 3 shard_0 → shard_1: copy  250/1000 rows (25%)"), "{t}");
        assert!(t.ends_with("\nsharded tables: (none yet)\n"), "{t}");
    }
}

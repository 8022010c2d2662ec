//! Prometheus metrics: counters and histograms kept with atomics on the statement
//! path, and gauges read from the directory when `/metrics` is scraped. Every
//! metric is listed in docs/metrics.md.
//!
//! One registry per process ([`global`]): a node runs one router, and the move
//! driver in the same process records its cutovers here too.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::context::RouterContext;

/// Upper bounds of the latency histograms, in seconds.
const BOUNDS: [f64; 14] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A fixed-bucket histogram of durations.
pub struct Histogram {
    buckets: [AtomicU64; BOUNDS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = BOUNDS.iter().position(|b| s <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, b) in BOUNDS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

/// How a statement was routed.
#[derive(Debug, Clone, Copy)]
pub enum RouteKind {
    /// One shard, by its tenant.
    Shard,
    /// Any shard (reference-table reads, session commands).
    Any,
    /// Every shard (DDL, reference-table writes).
    All,
    /// A cross-shard read, merged.
    Fanout,
    /// A multi-row INSERT or COPY split by tenant.
    Split,
    /// Answered by the router itself (BEGIN held, SET shardgate.tenant …).
    Local,
}

const KINDS: [&str; 6] = ["shard", "any", "all", "fanout", "split", "local"];

pub struct Metrics {
    queries: [AtomicU64; 6],
    errors: Mutex<BTreeMap<String, u64>>,
    pool_wait: Histogram,
    /// Statement latency per shard, by shard name.
    shard_latency: Mutex<BTreeMap<String, std::sync::Arc<Histogram>>>,
    cutover_pause: Histogram,
    held: Histogram,
    /// Writes that found the directory lease expired and waited for it.
    lease_waits_started: AtomicU64,
    lease_wait: Histogram,
    /// Configuration reloads applied, and refused.
    reloads: [AtomicU64; 2],
}

/// The process's metrics.
pub fn global() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::new)
}

impl Metrics {
    fn new() -> Metrics {
        Metrics {
            queries: std::array::from_fn(|_| AtomicU64::new(0)),
            errors: Mutex::new(BTreeMap::new()),
            pool_wait: Histogram::default(),
            shard_latency: Mutex::new(BTreeMap::new()),
            cutover_pause: Histogram::default(),
            held: Histogram::default(),
            lease_waits_started: AtomicU64::new(0),
            lease_wait: Histogram::default(),
            reloads: [AtomicU64::new(0), AtomicU64::new(0)],
        }
    }

    pub fn query(&self, kind: RouteKind) {
        self.queries[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// An error a client was sent, by SQLSTATE (the router's own or a shard's).
    pub fn error(&self, sqlstate: &str) {
        let mut e = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        match e.get_mut(sqlstate) {
            Some(n) => *n += 1,
            None => {
                // Bounded: SQLSTATEs are five characters, a few hundred exist.
                if e.len() < 512 && sqlstate.len() == 5 {
                    e.insert(sqlstate.to_string(), 1);
                }
            }
        }
    }

    /// An ErrorResponse body relayed from a shard.
    pub fn error_message(&self, body: &[u8]) {
        // Fields: a type byte and a C string each; 'C' is the SQLSTATE.
        let mut rest = body;
        while let Some((&t, tail)) = rest.split_first() {
            if t == 0 {
                break;
            }
            let end = tail.iter().position(|b| *b == 0).unwrap_or(tail.len());
            if t == b'C' {
                if let Ok(code) = std::str::from_utf8(&tail[..end]) {
                    self.error(code);
                }
                return;
            }
            rest = tail.get(end + 1..).unwrap_or(&[]);
        }
    }

    pub fn pool_wait(&self, d: Duration) {
        self.pool_wait.observe(d);
    }

    /// The histogram of one shard's statement latency (keep it; cheap to observe).
    pub fn shard_latency(&self, shard: &str) -> std::sync::Arc<Histogram> {
        let mut m = self.shard_latency.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(shard.to_string()).or_default().clone()
    }

    /// How long a cutover held statements (the migrator records it).
    pub fn cutover_pause(&self, d: Duration) {
        self.cutover_pause.observe(d);
    }

    /// How long one statement waited for a cutover hold.
    pub fn held(&self, d: Duration) {
        self.held.observe(d);
    }

    /// A write begins to wait for the directory lease to come back.
    pub fn lease_wait_started(&self) {
        self.lease_waits_started.fetch_add(1, Ordering::Relaxed);
    }

    /// Writes that have begun to wait for the directory lease, in this process.
    pub fn lease_waits_started(&self) -> u64 {
        self.lease_waits_started.load(Ordering::Relaxed)
    }

    /// A configuration reload was applied (or refused).
    pub fn reloaded(&self, applied: bool) {
        self.reloads[usize::from(!applied)].fetch_add(1, Ordering::Relaxed);
    }

    /// How long one write waited for the directory lease (refused or not).
    pub fn lease_wait(&self, d: Duration) {
        self.lease_wait.observe(d);
    }
}

fn help(out: &mut String, name: &str, kind: &str, text: &str) {
    let _ = writeln!(out, "# HELP {name} {text}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The text exposition format (version 0.0.4).
pub fn render(ctx: &RouterContext) -> String {
    let m = global();
    let mut out = String::new();
    help(&mut out, "shardgate_queries_total", "counter", "Statements routed, by how they were routed.");
    for (i, k) in KINDS.iter().enumerate() {
        let _ = writeln!(out, "shardgate_queries_total{{route=\"{k}\"}} {}", m.queries[i].load(Ordering::Relaxed));
    }
    help(&mut out, "shardgate_errors_total", "counter", "Errors sent to clients, by SQLSTATE.");
    for (code, n) in m.errors.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        let _ = writeln!(out, "shardgate_errors_total{{sqlstate=\"{}\"}} {n}", label(code));
    }
    help(&mut out, "shardgate_pool_wait_seconds", "histogram", "Time a statement waited for a server connection.");
    m.pool_wait.render(&mut out, "shardgate_pool_wait_seconds", "");
    help(
        &mut out,
        "shardgate_shard_statement_seconds",
        "histogram",
        "Statement latency per shard, from sending it to the shard's ReadyForQuery.",
    );
    for (shard, h) in m.shard_latency.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        h.render(&mut out, "shardgate_shard_statement_seconds", &format!("shard=\"{}\"", label(shard)));
    }
    help(&mut out, "shardgate_cutover_pause_seconds", "histogram", "How long each cutover held statements.");
    m.cutover_pause.render(&mut out, "shardgate_cutover_pause_seconds", "");
    help(&mut out, "shardgate_held_statement_seconds", "histogram", "How long statements waited for a cutover hold.");
    m.held.render(&mut out, "shardgate_held_statement_seconds", "");
    help(
        &mut out,
        "shardgate_lease_wait_seconds",
        "histogram",
        "How long writes waited for the directory lease to come back (an election, a partition).",
    );
    m.lease_wait.render(&mut out, "shardgate_lease_wait_seconds", "");
    help(
        &mut out,
        "shardgate_lease_waits_started_total",
        "counter",
        "Writes that began to wait for the directory lease; minus shardgate_lease_wait_seconds_count, those waiting now.",
    );
    let _ = writeln!(out, "shardgate_lease_waits_started_total {}", m.lease_waits_started());

    let dir = ctx.directory.load();
    help(&mut out, "shardgate_clients", "gauge", "Client connections open.");
    let _ = writeln!(out, "shardgate_clients {}", ctx.clients.load(Ordering::Relaxed));
    help(&mut out, "shardgate_pool_connections", "gauge", "Server connections per shard, in use or idle.");
    for p in ctx.pools.read().unwrap_or_else(|p| p.into_inner()).iter() {
        let name = label(&p.name);
        let _ = writeln!(out, "shardgate_pool_connections{{shard=\"{name}\",state=\"active\"}} {}", p.active_count());
        let _ = writeln!(out, "shardgate_pool_connections{{shard=\"{name}\",state=\"idle\"}} {}", p.idle_count());
    }
    help(
        &mut out,
        "shardgate_pool_size",
        "gauge",
        "Server connections per shard at most ([router.pool] size in force).",
    );
    for p in ctx.pools.read().unwrap_or_else(|p| p.into_inner()).iter() {
        let _ = writeln!(out, "shardgate_pool_size{{shard=\"{}\"}} {}", label(&p.name), p.size());
    }
    help(
        &mut out,
        "shardgate_config_reloads_total",
        "counter",
        "Configuration reloads (SIGHUP, shardgate reload), by result: applied, or refused with the old configuration kept.",
    );
    for (result, n) in [("applied", &m.reloads[0]), ("refused", &m.reloads[1])] {
        let _ = writeln!(out, "shardgate_config_reloads_total{{result=\"{result}\"}} {}", n.load(Ordering::Relaxed));
    }
    help(&mut out, "shardgate_directory_epoch", "gauge", "The directory epoch this node has applied.");
    let _ = writeln!(out, "shardgate_directory_epoch {}", dir.epoch);
    if let Some((node, lease)) = &ctx.replica {
        let st = node.status();
        help(
            &mut out,
            "shardgate_directory_leader",
            "gauge",
            "The directory leader's node id as this node sees it (0: none).",
        );
        let _ = writeln!(out, "shardgate_directory_leader {}", st.leader.unwrap_or(0));
        help(&mut out, "shardgate_directory_is_leader", "gauge", "1 on the node leading the directory.");
        let _ = writeln!(out, "shardgate_directory_is_leader {}", st.is_leader as u8);
        help(
            &mut out,
            "shardgate_directory_lease_valid",
            "gauge",
            "1 while this router may route writes (lease rule).",
        );
        let _ = writeln!(out, "shardgate_directory_lease_valid {}", node.lease_valid(*lease) as u8);
    }
    help(&mut out, "shardgate_shard_buckets", "gauge", "Buckets placed on each shard.");
    for ((_, s), n) in dir.shards.iter().enumerate().zip(dir.bucket_counts()) {
        let _ = writeln!(out, "shardgate_shard_buckets{{shard=\"{}\",state=\"{:?}\"}} {n}", label(&s.name), s.state);
    }
    let pools: Vec<_> = ctx.pools.read().unwrap_or_else(|p| p.into_inner()).clone();
    help(
        &mut out,
        "shardgate_shard_up",
        "gauge",
        "1 while the shard answered this router's last probe (once a second).",
    );
    for (i, p) in pools.iter().enumerate() {
        let _ =
            writeln!(out, "shardgate_shard_up{{shard=\"{}\"}} {}", label(&p.name), ctx.shard_health(i).is_up() as u8);
    }
    help(&mut out, "shardgate_shard_probe_failures_total", "counter", "Probes of the shard that failed or timed out.");
    for (i, p) in pools.iter().enumerate() {
        let _ = writeln!(
            out,
            "shardgate_shard_probe_failures_total{{shard=\"{}\"}} {}",
            label(&p.name),
            ctx.shard_health(i).failures()
        );
    }
    let tp = crate::twophase::counters();
    for (name, text, value) in [
        ("shardgate_twophase_prepared_total", "Participants prepared by two-phase commits.", &tp.prepared),
        ("shardgate_twophase_committed_total", "Transactions across shards committed.", &tp.committed),
        ("shardgate_twophase_rolled_back_total", "Transactions across shards rolled back at COMMIT.", &tp.rolled_back),
        (
            "shardgate_twophase_recovered_commits_total",
            "In-doubt prepared transactions the recovery sweep committed.",
            &tp.recovered_commit,
        ),
        (
            "shardgate_twophase_recovered_rollbacks_total",
            "In-doubt prepared transactions the recovery sweep rolled back.",
            &tp.recovered_rollback,
        ),
    ] {
        help(&mut out, name, "counter", text);
        let _ = writeln!(out, "{name} {}", value.load(std::sync::atomic::Ordering::Relaxed));
    }
    let in_doubt = crate::twophase::recover::state().in_doubt.lock().unwrap_or_else(|p| p.into_inner()).len();
    help(
        &mut out,
        "shardgate_twophase_in_doubt",
        "gauge",
        "Prepared transactions shardgate left on the shards at the last sweep.",
    );
    let _ = writeln!(out, "shardgate_twophase_in_doubt {in_doubt}");
    // Moves under way (ended ones drop out of the per-move gauges).
    help(&mut out, "shardgate_move_phase", "gauge", "1 for the phase each move under way is in.");
    let live: Vec<_> = dir.moves.values().filter(|m| m.phase.active()).collect();
    for mv in &live {
        let _ = writeln!(out, "shardgate_move_phase{{move_id=\"{}\",phase=\"{}\"}} 1", mv.id, mv.phase.name());
    }
    let gauges = [
        ("shardgate_move_copy_rows", "rows_copied", "Rows of the move copied to the target so far."),
        ("shardgate_move_copy_bytes", "copy_bytes_in_progress", "Bytes the running copy has written so far."),
        ("shardgate_move_lag_bytes", "lag_bytes", "WAL the change stream's subscriber has not confirmed."),
        ("shardgate_move_lag_ms", "lag_ms", "Time since the last change applied was committed."),
        ("shardgate_move_shadow_compared", "shadow_compared", "Shadow reads compared, all routers."),
        ("shardgate_move_shadow_mismatches", "shadow_mismatched", "Shadow reads proven different, all routers."),
        ("shardgate_move_shadow_unsettled", "shadow_unsettled", "Shadow reads whose rows kept changing, all routers."),
        ("shardgate_move_cutovers", "cutovers", "Cutovers and rollbacks done."),
        ("shardgate_move_pause_us", "pause_us", "Statements held by the last cutover, µs."),
    ];
    for (name, key, text) in gauges {
        help(&mut out, name, "gauge", text);
        for mv in &live {
            if let Some(v) = mv.counters.get(key) {
                let _ = writeln!(out, "{name}{{move_id=\"{}\"}} {v}", mv.id);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_errors_read_the_sqlstate() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(20));
        let mut out = String::new();
        h.render(&mut out, "x", "a=\"b\"");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.0005\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count{a=\"b\"} 3\n"), "{out}");
        let m = Metrics::new();
        m.error_message(b"SERROR\0C23505\0Mduplicate key\0\0");
        m.error_message(b"SERROR\0Mno code\0\0");
        assert_eq!(m.errors.lock().unwrap().get("23505"), Some(&1));
        assert_eq!(m.errors.lock().unwrap().len(), 1);
    }
}

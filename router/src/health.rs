//! Shard health: each router asks every shard `SELECT pg_postmaster_start_time()`
//! once a second on a connection of its own, and keeps whether it answered in
//! time. That is `shardgate_shard_up{shard}`, the readiness endpoint
//! (`/health/ready`), and how a restarted server is noticed: when a shard
//! comes back, or answers with a new start time, its pool's idle connections
//! (all to the old server, all dead) are closed, so none is handed out broken.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shardgate_directory::clock::now_ms;
use tokio::sync::watch;

use crate::backend::Backend;
use crate::context::RouterContext;
use crate::pool::ShardPool;

/// The probe's `application_name` on the shards (pooled connections are
/// `shardgate`).
pub const PROBE_NAME: &str = "shardgate probe";

/// How often each shard is asked.
const EVERY: Duration = Duration::from_secs(1);

/// What this router last saw of one shard.
#[derive(Default)]
pub struct ShardHealth {
    /// The last probe answered in time.
    up: AtomicBool,
    /// A probe has run (a router that just started is not ready before).
    checked: AtomicBool,
    /// When the shard last answered (ms since the epoch).
    last_ok_ms: AtomicU64,
    /// Probes that failed (no connection, an error, no answer in time).
    failures: AtomicU64,
    /// Why the last probe failed, while the shard is down.
    error: Mutex<Option<String>>,
}

impl ShardHealth {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Why the shard is down (None when up or not probed yet).
    pub fn error(&self) -> Option<String> {
        if self.is_up() {
            return None;
        }
        let e = self.error.lock().unwrap_or_else(|p| p.into_inner()).clone();
        e.or_else(|| (!self.checked.load(Ordering::Relaxed)).then(|| "not probed yet".to_string()))
    }

    pub fn last_ok_ms(&self) -> u64 {
        self.last_ok_ms.load(Ordering::Relaxed)
    }
}

/// Probes every shard once a second, for the life of the router.
pub async fn watch_shards(ctx: Arc<RouterContext>, mut stopped: watch::Receiver<bool>) {
    let mut probes: Vec<Probe> = Vec::new();
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stopped.changed() => return,
            _ = tick.tick() => {}
        }
        let pools: Vec<Arc<ShardPool>> = ctx.pools.read().unwrap_or_else(|p| p.into_inner()).clone();
        while probes.len() < pools.len() {
            probes.push(Probe::default());
        }
        let timeout = ctx.config.load().pool.connect_timeout.max(Duration::from_secs(1));
        let rounds = probes.iter_mut().zip(pools.iter()).enumerate().map(|(i, (probe, pool))| {
            let health = ctx.shard_health(i);
            async move { probe.run(pool, &health, timeout).await }
        });
        futures::future::join_all(rounds).await;
        // Statements that may run anywhere avoid the shards that did not answer.
        let down =
            (0..pools.len().min(64)).filter(|&i| !ctx.shard_health(i).is_up()).fold(0u64, |mask, i| mask | 1 << i);
        ctx.down_shards.store(down, Ordering::Relaxed);
    }
}

/// One shard's probe: its connection, and the server start time it last saw.
#[derive(Default)]
struct Probe {
    conn: Option<Backend>,
    started: Option<String>,
    was_down: bool,
}

impl Probe {
    async fn run(&mut self, pool: &Arc<ShardPool>, health: &ShardHealth, timeout: Duration) {
        let answer = tokio::time::timeout(timeout, self.ask(pool, timeout)).await;
        let answer = answer.unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")));
        health.checked.store(true, Ordering::Relaxed);
        match answer {
            Ok(started) => {
                let restarted = self.started.as_ref().is_some_and(|s| *s != started);
                if restarted || self.was_down {
                    let closed = pool.close_idle();
                    tracing::info!(shard = %pool.name, closed, restarted, "shard answers again; idle connections to the old server closed");
                }
                self.started = Some(started);
                self.was_down = false;
                health.up.store(true, Ordering::Relaxed);
                health.last_ok_ms.store(now_ms(), Ordering::Relaxed);
                *health.error.lock().unwrap_or_else(|p| p.into_inner()) = None;
            }
            Err(e) => {
                self.conn = None;
                if !self.was_down {
                    tracing::warn!(shard = %pool.name, error = %e, "shard does not answer");
                }
                self.was_down = true;
                health.up.store(false, Ordering::Relaxed);
                health.failures.fetch_add(1, Ordering::Relaxed);
                *health.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            }
        }
    }

    /// The server's start time, on the probe's own connection (opened if need be).
    async fn ask(&mut self, pool: &ShardPool, timeout: Duration) -> Result<String, String> {
        if self.conn.is_none() {
            let name = [("application_name", PROBE_NAME)];
            let b = Backend::connect_with(&pool.address, timeout, &name).await.map_err(|e| e.to_string())?;
            self.conn = Some(b);
        }
        let conn = self.conn.as_mut().expect("connected above");
        let rows = conn.simple_query("SELECT pg_postmaster_start_time()::text").await;
        match rows {
            Ok(rows) => Ok(rows.into_iter().next().and_then(|r| r.into_iter().next().flatten()).unwrap_or_default()),
            Err((code, msg)) => {
                self.conn = None;
                Err(format!("{code}: {msg}"))
            }
        }
    }
}

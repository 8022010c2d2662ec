//! The recovery sweep: every router, once a second, lists the prepared
//! transactions shardgate left on each shard and settles those older than a
//! few seconds (a commit in flight finishes in milliseconds). Several
//! routers sweeping at once is safe: the decision row's primary key lets
//! only one outcome ever be written, and settling a transaction twice
//! finds it gone the second time.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shardgate_directory::ShardId;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{counters, parse_gid, GID_PREFIX, SETUP_SQL};
use crate::backend::Backend;
use crate::context::RouterContext;

/// How often each shard is swept.
const EVERY: Duration = Duration::from_secs(1);
/// A prepared transaction younger than this may still be committing.
const GRACE_SECS: f64 = 2.0;
/// Decision rows whose transactions left nothing prepared anywhere are
/// deleted after this long, in bulk, once a minute: deleting each one as its
/// transaction ends would cost every cross-shard commit another commit (and
/// fsync) on its decider. A commit whose decision insert answers later than
/// [`super::DECISION_DEADLINE`] is rolled back, so no decider can insert a row
/// that a settled transaction's deleted row would have refused.
pub const KEEP_DECISIONS: Duration = Duration::from_secs(300);
/// How long settling waits for a decider transaction still in flight.
const LOCK_TIMEOUT: &str = "2s";
/// How long any one statement of the sweep may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// A prepared transaction found on a shard, for `status` and the console.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InDoubt {
    pub shard: String,
    pub gid: String,
    pub age_secs: f64,
}

/// What the last sweep saw, per shard.
#[derive(Default)]
pub struct SweepState {
    /// Shards whose decisions table exists, by their place in the directory
    /// and address: a shard replaced at the same place is set up again.
    ready: Mutex<HashSet<(ShardId, String)>>,
    /// … and whose max_prepared_transactions the sweep has read.
    checked: Mutex<HashSet<(ShardId, String)>>,
    /// Prepared transactions the last sweep found, all shards.
    pub in_doubt: Mutex<Vec<InDoubt>>,
}

pub fn state() -> &'static SweepState {
    static S: std::sync::OnceLock<SweepState> = std::sync::OnceLock::new();
    S.get_or_init(SweepState::default)
}

/// The application_name of the sweep's connections on the shards.
pub const SWEEP_NAME: &str = "shardgate recovery";

/// Runs the sweep for the life of the router.
pub async fn sweep_forever(ctx: Arc<RouterContext>, mut stopped: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweeper = Sweeper::default();
    let mut round: u64 = 0;
    loop {
        tokio::select! {
            _ = stopped.changed() => return,
            _ = tick.tick() => {}
        }
        sweeper.sweep(&ctx, (round % 60 == 59).then_some(KEEP_DECISIONS)).await;
        round += 1;
    }
}

/// The sweep's own connection to each shard (not the pools': it must not
/// keep pooled connections from idling out, nor wait behind clients).
#[derive(Default)]
pub struct Sweeper {
    conns: HashMap<ShardId, Backend>,
}

impl Sweeper {
    async fn conn(&mut self, ctx: &RouterContext, shard: ShardId) -> Result<&mut Backend, String> {
        if self.conns.get(&shard).is_some_and(|c| c.broken || c.closed_by_server()) {
            self.conns.remove(&shard);
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = self.conns.entry(shard) {
            let pool = ctx.pool(shard).ok_or("no pool for the shard")?;
            let timeout = ctx.config.load().pool.connect_timeout.max(Duration::from_secs(1));
            let b = Backend::connect_with(&pool.address, timeout, &[("application_name", SWEEP_NAME)])
                .await
                .map_err(|e| e.to_string())?;
            slot.insert(b);
        }
        self.conns.get_mut(&shard).ok_or_else(|| "no connection".to_string())
    }

    /// Runs `sql` on the shard, the connection dropped if it fails.
    async fn query(&mut self, ctx: &RouterContext, shard: ShardId, sql: &str) -> Result<Rows, (String, String)> {
        let conn = self.conn(ctx, shard).await.map_err(|e| ("08006".to_string(), e))?;
        let r = tokio::time::timeout(STEP_TIMEOUT, conn.simple_query(sql)).await;
        let r = r.unwrap_or_else(|_| Err(("57014".to_string(), format!("no answer within {STEP_TIMEOUT:?}"))));
        if r.as_ref().is_err_and(|(code, _)| code.starts_with("08") || code == "57014") {
            self.conns.remove(&shard);
        }
        r
    }

    /// One pass over every shard. With `collect`, also deletes decision rows
    /// older than that which no prepared transaction needs any more (only
    /// when every shard answered).
    pub async fn sweep(&mut self, ctx: &RouterContext, collect: Option<Duration>) {
        let dir = ctx.directory.load();
        let shards: Vec<(ShardId, String)> = dir.live_shards().map(|(i, s)| (i, s.name.clone())).collect();
        let mut found = Vec::new();
        let mut all_answered = true;
        for (shard, name) in &shards {
            match self.list(ctx, *shard, name).await {
                Ok(rows) => found.extend(rows.into_iter().map(|(gid, age)| (*shard, name.clone(), gid, age))),
                Err(e) => {
                    all_answered = false;
                    tracing::debug!(shard = %name, error = %e, "two-phase sweep: shard not listed");
                }
            }
        }
        *state().in_doubt.lock().unwrap_or_else(|p| p.into_inner()) = found
            .iter()
            .map(|(_, name, gid, age)| InDoubt { shard: name.clone(), gid: gid.clone(), age_secs: *age })
            .collect();
        for (shard, name, gid, age) in &found {
            if *age < GRACE_SECS {
                continue;
            }
            let Some((txid, decider)) = parse_gid(gid) else { continue };
            let decided = match self.conn(ctx, decider).await {
                Ok(conn) => tokio::time::timeout(STEP_TIMEOUT, settle_on(conn, &txid))
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {STEP_TIMEOUT:?}"))),
                Err(e) => Err(e),
            };
            match decided {
                Ok(commit) => {
                    let verb = if commit { "COMMIT" } else { "ROLLBACK" };
                    match self.query(ctx, *shard, &format!("{verb} PREPARED '{gid}'")).await {
                        // 42704: another router settled it first.
                        Ok(_) => {
                            let c = counters();
                            if commit { &c.recovered_commit } else { &c.recovered_rollback }
                                .fetch_add(1, Ordering::Relaxed);
                            info!(shard = %name, gid, outcome = verb, "settled an in-doubt prepared transaction");
                        }
                        Err((code, _)) if code == "42704" => {}
                        Err((code, msg)) => {
                            warn!(shard = %name, gid, code, error = %msg, "could not settle a prepared transaction; retrying")
                        }
                    }
                }
                Err(e) => {
                    self.conns.remove(&decider);
                    warn!(shard = %name, gid, error = %e, "cannot settle a prepared transaction yet: its decider shard does not answer")
                }
            }
        }
        if let (Some(keep), true) = (collect, all_answered) {
            let txids: Vec<String> = found.iter().filter_map(|(_, _, gid, _)| parse_gid(gid).map(|(t, _)| t)).collect();
            let keep_txids = if txids.is_empty() {
                String::new()
            } else {
                format!(" AND txid NOT IN ({})", txids.iter().map(|t| format!("'{t}'")).collect::<Vec<_>>().join(", "))
            };
            for (shard, _) in &shards {
                let sql = format!(
                    "DELETE FROM shardgate.decisions WHERE at <= now() - interval '{} milliseconds'{keep_txids}",
                    keep.as_millis()
                );
                let _ = self.query(ctx, *shard, &sql).await;
            }
        }
    }

    /// The shard's prepared transactions shardgate made, with their ages.
    async fn list(&mut self, ctx: &RouterContext, shard: ShardId, name: &str) -> Result<Vec<(String, f64)>, String> {
        let key = ready_key(ctx, shard);
        if !state().checked.lock().unwrap_or_else(|p| p.into_inner()).contains(&key) {
            let conn = self.conn(ctx, shard).await?;
            set_up(conn).await?;
            let max = self.query(ctx, shard, "SHOW max_prepared_transactions").await.map_err(|(_, m)| m)?;
            let max: i64 =
                max.first().and_then(|r| r.first().cloned().flatten()).and_then(|v| v.parse().ok()).unwrap_or(0);
            if max == 0 {
                warn!(
                    shard = %name,
                    "max_prepared_transactions is 0 on this shard: transactions that write on it and on another shard will fail; set it (e.g. to max_connections) and restart the shard, or set cross_shard_transactions = \"refuse\""
                );
            }
            state().ready.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone());
            state().checked.lock().unwrap_or_else(|p| p.into_inner()).insert(key);
        }
        let rows = self
            .query(
                ctx,
                shard,
                &format!(
                    "SELECT gid, extract(epoch FROM now() - prepared)::float8 FROM pg_prepared_xacts \
                     WHERE gid LIKE '{}%' AND database = current_database()",
                    GID_PREFIX.replace('_', "\\_")
                ),
            )
            .await
            .map_err(|(_, m)| m)?;
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                let gid = r.first()?.clone()?;
                let age = r.get(1)?.as_deref()?.parse().ok()?;
                Some((gid, age))
            })
            .collect())
    }
}

type Rows = Vec<Vec<Option<String>>>;

fn ready_key(ctx: &RouterContext, shard: ShardId) -> (ShardId, String) {
    (shard, ctx.directory.load().shards.get(shard).map(|s| s.url.clone()).unwrap_or_default())
}

fn is_ready(ctx: &RouterContext, shard: ShardId) -> bool {
    state().ready.lock().unwrap_or_else(|p| p.into_inner()).contains(&ready_key(ctx, shard))
}

/// Creates the decisions table on a shard (idempotent). Two sessions
/// creating the schema at once can collide on the catalog's unique index
/// (23505) even with IF NOT EXISTS: the loser tries again.
async fn set_up(conn: &mut Backend) -> Result<(), String> {
    let mut last = String::new();
    for _ in 0..3 {
        match conn.simple_query(&format!("BEGIN; {SETUP_SQL}; COMMIT")).await {
            Ok(_) => return Ok(()),
            Err((code, m)) => {
                let _ = conn.simple_query("ROLLBACK").await;
                last = format!("creating shardgate.decisions: {m}");
                if code != "23505" && code != "42P07" {
                    break;
                }
            }
        }
    }
    Err(last)
}

/// Makes sure `shard` can be a transaction's decider (its decisions table
/// exists) before its first commit: the sweep may not have reached it yet
/// after the router started.
pub async fn ensure_ready(ctx: &RouterContext, shard: ShardId) -> Result<(), String> {
    if is_ready(ctx, shard) {
        return Ok(());
    }
    // A connection of its own: the transaction may hold the only one the
    // pool allows.
    let pool = ctx.pool(shard).ok_or("the shard is not in the directory")?;
    let timeout = ctx.config.load().pool.connect_timeout.max(Duration::from_secs(1));
    let mut conn = Backend::connect_with(&pool.address, timeout, &[("application_name", SWEEP_NAME)])
        .await
        .map_err(|e| e.to_string())?;
    set_up(&mut conn).await?;
    state().ready.lock().unwrap_or_else(|p| p.into_inner()).insert(ready_key(ctx, shard));
    Ok(())
}

/// What the decider of `txid` decided, on a pooled connection of its shard
/// (a session whose answer to COMMIT was lost): true for commit.
pub async fn settle(ctx: &RouterContext, decider: ShardId, txid: &str) -> Result<bool, String> {
    let pool = ctx.pool(decider).ok_or("the decider shard is not in the directory")?;
    let mut conn = pool.get().await.map_err(|e| e.to_string())?;
    let r = tokio::time::timeout(STEP_TIMEOUT, settle_on(&mut conn, txid)).await;
    r.unwrap_or_else(|_| {
        conn.broken = true;
        Err(format!("no answer within {STEP_TIMEOUT:?}"))
    })
}

/// What the decider of `txid` decided, settling it as rolled back when it
/// had not decided: true for commit.
async fn settle_on(conn: &mut Backend, txid: &str) -> Result<bool, String> {
    // The insert waits (up to the lock timeout) for a decider transaction
    // that inserted the same txid and has not ended yet.
    let inserted = conn
        .simple_query(&format!(
            "BEGIN; SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'; \
             INSERT INTO shardgate.decisions (txid, committed) VALUES ('{txid}', false) \
             ON CONFLICT (txid) DO NOTHING RETURNING committed; COMMIT"
        ))
        .await;
    match inserted {
        Ok(rows) if !rows.is_empty() => return Ok(false),
        Ok(_) => {}
        Err((_, m)) => {
            let _ = conn.simple_query("ROLLBACK").await;
            return Err(m);
        }
    }
    let rows = conn
        .simple_query(&format!("SELECT committed FROM shardgate.decisions WHERE txid = '{txid}'"))
        .await
        .map_err(|(_, m)| m)?;
    match rows.first().and_then(|r| r.first().cloned().flatten()).as_deref() {
        Some("t") => Ok(true),
        Some("f") => Ok(false),
        _ => Err(format!("decision row for {txid} vanished")),
    }
}

//! Two-phase commit: a transaction that wrote on several shards commits on all
//! of them or on none, whatever crashes when.
//!
//! One participant is the *decider*; every other one is a *prepared*
//! participant. At COMMIT:
//!
//! 1. every prepared participant runs `PREPARE TRANSACTION 'sg_<txid>_<d>_<p>'`
//!    while the decider inserts `(txid, committed = true)` into
//!    `shardgate.decisions` inside its own, still open, transaction;
//! 2. when every PREPARE succeeded the decider commits. That commit *is* the
//!    decision: the row exists exactly when the transaction committed;
//! 3. every prepared participant runs `COMMIT PREPARED`; the client gets
//!    its answer. Decision rows are deleted in bulk by [`recover`] after
//!    [`recover::KEEP_DECISIONS`].
//!
//! A failure before step 2 rolls every part back. A crash anywhere leaves
//! prepared transactions that [`recover`] settles within seconds: it asks the
//! decider's shard for the row by inserting `(txid, committed = false)`. The
//! primary key makes that insert wait for a decider transaction still in
//! flight; if the decider committed, the insert finds its row (commit);
//! otherwise the `false` row now stands and the decider can never commit
//! (roll back). No clock and no router's memory is trusted. See
//! docs/transactions.md.

pub mod recover;

use std::sync::atomic::{AtomicU64, Ordering};

use shardgate_directory::ShardId;

use crate::backend::Backend;
use crate::error::SqlError;
use crate::protocol::messages::{self, error_summary};
use crate::protocol::ProtocolError;

/// Every two-phase commit fault point, so tests can iterate over them.
pub const FAULT_POINTS: &[&str] = &["twophase.after_prepare", "twophase.after_decision", "twophase.after_first_commit"];

/// What makes a shard ready for two-phase commit (run by [`recover`] on
/// each shard before its first sweep).
pub const SETUP_SQL: &str = "DO $s$ BEGIN CREATE SCHEMA IF NOT EXISTS shardgate; \
     EXCEPTION WHEN unique_violation THEN NULL; END $s$; \
     CREATE TABLE IF NOT EXISTS shardgate.decisions (\
       txid text PRIMARY KEY, \
       committed boolean NOT NULL, \
       at timestamptz NOT NULL DEFAULT now()); \
     GRANT USAGE ON SCHEMA shardgate TO PUBLIC; \
     GRANT INSERT ON shardgate.decisions TO PUBLIC";

/// A decision insert answered later than this is not committed: the
/// transaction is rolled back (see [`recover::KEEP_DECISIONS`]).
pub const DECISION_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// The prefix of every prepared transaction's name shardgate makes.
pub const GID_PREFIX: &str = "sg_";

/// A new transaction id: unique across routers and restarts (random high
/// bits, a counter below).
pub fn new_txid() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static BASE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(rand::random::<u64>);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{:016x}{:08x}", base, n as u32)
}

/// The name of participant `shard`'s prepared transaction.
pub fn gid(txid: &str, decider: ShardId, shard: ShardId) -> String {
    format!("{GID_PREFIX}{txid}_{decider}_{shard}")
}

/// A prepared transaction's name read back: its txid and decider shard.
pub fn parse_gid(gid: &str) -> Option<(String, ShardId)> {
    let rest = gid.strip_prefix(GID_PREFIX)?;
    let mut parts = rest.split('_');
    let txid = parts.next()?;
    let decider = parts.next()?.parse().ok()?;
    let _participant: ShardId = parts.next()?.parse().ok()?;
    let hex = txid.len() == 24 && txid.bytes().all(|b| b.is_ascii_hexdigit());
    (hex && parts.next().is_none()).then(|| (txid.to_string(), decider))
}

/// Counts for `/metrics` and `status`.
#[derive(Default)]
pub struct Counters {
    pub prepared: AtomicU64,
    pub committed: AtomicU64,
    pub rolled_back: AtomicU64,
    /// Prepared transactions settled by [`recover`] (committed or rolled back).
    pub recovered_commit: AtomicU64,
    pub recovered_rollback: AtomicU64,
}

pub fn counters() -> &'static Counters {
    static C: std::sync::OnceLock<Counters> = std::sync::OnceLock::new();
    C.get_or_init(Counters::default)
}

/// One participant: its shard, its name for messages, its connection (a
/// transaction block open on it).
pub struct Part<'a> {
    pub shard: ShardId,
    pub name: String,
    pub conn: &'a mut Backend,
}

/// How a commit ended.
#[derive(Debug)]
pub enum Outcome {
    /// Committed everywhere, or decided and left for [`recover`] to finish on
    /// `in_doubt` participants that did not answer.
    Committed { in_doubt: usize },
    /// Nothing committed; the reason for the client.
    RolledBack(SqlError),
    /// The decider's answer was lost and its shard cannot be asked: the
    /// transaction committed or not, [`recover`] settles it when the shard is
    /// back.
    Unknown(SqlError),
    /// A test's fault point stopped the commit here, as a crash would: the
    /// caller closes every connection without another word.
    Abandoned,
}

/// The decision insert's name as a prepared statement on server connections.
const DECIDE: &str = "shardgate_decide";

/// Queues the decision insert on the decider, as a prepared statement (its
/// Parse first on a connection that lacks it): the decider's Postgres parses
/// and plans it once per connection, not once per commit. True when it
/// queued the Parse.
fn queue_decision(decider: &mut Backend, txid: &str) -> bool {
    let parse = !decider.prepared.contains(DECIDE);
    if parse {
        let sql = "INSERT INTO shardgate.decisions (txid, committed) VALUES ($1, true)";
        decider.conn.queue(&messages::parse(DECIDE, sql, &[25]));
        decider.prepared.insert(DECIDE.to_string());
    }
    let bind = messages::Builder::new(b'B')
        .cstr("")
        .cstr(DECIDE)
        .i16(0)
        .i16(1)
        .i32(txid.len() as i32)
        .bytes(txid.as_bytes())
        .i16(0)
        .finish();
    decider.conn.queue(&bind);
    decider.conn.queue(&messages::Builder::new(b'E').cstr("").i32(0).finish());
    decider.conn.queue(&messages::sync());
    parse
}

/// One query's reply: its last command tag, its first error, and whether a
/// Parse in it succeeded.
struct Reply {
    tag: Option<String>,
    error: Option<(String, String)>,
    parsed: bool,
}

async fn read_reply(conn: &mut Backend) -> Result<Reply, ProtocolError> {
    let mut reply = Reply { tag: None, error: None, parsed: false };
    loop {
        let m = conn.conn.read().await?;
        match m.tag() {
            b'1' => reply.parsed = true,
            b'C' => {
                let body = m.body();
                reply.tag = Some(String::from_utf8_lossy(&body[..body.len().saturating_sub(1)]).into_owned());
            }
            b'E' if reply.error.is_none() => reply.error = Some(error_summary(&m)),
            b'Z' => return Ok(reply),
            _ => {}
        }
    }
}

/// Sends one simple query to each connection, then reads every reply: the
/// servers work at the same time.
async fn on_each(conns: &mut [&mut Backend], sql: &[String]) -> Vec<Result<Reply, ProtocolError>> {
    let mut sent = Vec::with_capacity(conns.len());
    for (c, q) in conns.iter_mut().zip(sql) {
        c.conn.queue(&messages::query(q));
        sent.push(c.conn.flush().await);
    }
    let mut out = Vec::with_capacity(conns.len());
    for (c, s) in conns.iter_mut().zip(sent) {
        out.push(match s {
            Ok(()) => read_reply(c).await,
            Err(e) => Err(e),
        });
        if out.last().is_some_and(|r| r.is_err()) {
            c.broken = true;
        }
    }
    out
}

fn fault(point: &str) -> bool {
    shardgate_directory::fault::pass(point).is_err()
}

/// Commits a transaction open on `decider` and on every one of `others`.
pub async fn commit(
    ctx: &crate::context::RouterContext,
    txid: &str,
    decider: Part<'_>,
    others: Vec<Part<'_>>,
) -> Outcome {
    let c = counters();
    let gids: Vec<String> = others.iter().map(|p| gid(txid, decider.shard, p.shard)).collect();
    let names: Vec<String> = others.iter().map(|p| p.name.clone()).collect();
    let mut conns: Vec<&mut Backend> = others.into_iter().map(|p| p.conn).collect();
    let decider_name = decider.name;
    let decider_shard = decider.shard;
    let decider = decider.conn;
    if let Err(e) = recover::ensure_ready(ctx, decider_shard).await {
        let e = SqlError::new("55000", format!("shard {decider_name} cannot record a commit decision: {e}"))
            .hint("the router's shard user must be able to create the shardgate schema and its decisions table; nothing was committed");
        let none = vec![false; conns.len()];
        roll_back(decider, &mut conns, &gids, &none).await;
        c.rolled_back.fetch_add(1, Ordering::Relaxed);
        return Outcome::RolledBack(e);
    }

    // 1. Prepare everywhere else; the decision row waits, uncommitted, on the decider.
    let sent_at = std::time::Instant::now();
    let parsing = queue_decision(decider, txid);
    let decider_sent = decider.conn.flush().await;
    let prepares: Vec<String> = gids.iter().map(|g| format!("PREPARE TRANSACTION '{g}'")).collect();
    let replies = on_each(&mut conns, &prepares).await;
    let decided = match decider_sent {
        Ok(()) => read_reply(decider).await,
        Err(e) => Err(e),
    };
    if parsing && !decided.as_ref().is_ok_and(|r| r.parsed) {
        decider.prepared.remove(DECIDE);
    }
    let mut failure: Option<SqlError> = None;
    let mut prepared = vec![false; conns.len()];
    for (i, r) in replies.into_iter().enumerate() {
        match r {
            Ok(Reply { tag: Some(t), error: None, .. }) if t == "PREPARE TRANSACTION" => {
                prepared[i] = true;
                c.prepared.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Reply { error: Some((code, msg)), .. }) => {
                failure.get_or_insert_with(|| prepare_failed(&names[i], &code, &msg));
            }
            // PREPARE of a transaction that had failed answers ROLLBACK.
            Ok(_) => {
                failure.get_or_insert_with(|| {
                    SqlError::new(
                        "40000",
                        format!("the transaction's part on shard {} had failed; nothing was committed", names[i]),
                    )
                });
            }
            Err(e) => {
                failure.get_or_insert_with(|| {
                    SqlError::new(
                        "08006",
                        format!("lost the connection to shard {} while preparing the commit: {e}", names[i]),
                    )
                    .hint("nothing was committed; run the transaction again")
                });
            }
        }
    }
    match decided {
        Ok(Reply { error: None, .. }) if sent_at.elapsed() > DECISION_DEADLINE => {
            failure.get_or_insert_with(|| {
                SqlError::new(
                    "57014",
                    format!("the commit decision on shard {decider_name} took longer than {DECISION_DEADLINE:?}"),
                )
                .hint("nothing was committed; run the transaction again")
            });
        }
        Ok(Reply { error: None, .. }) => {}
        Ok(Reply { error: Some((code, msg)), .. }) => {
            failure.get_or_insert_with(|| prepare_failed(&decider_name, &code, &msg));
        }
        Err(e) => {
            decider.broken = true;
            failure.get_or_insert_with(|| {
                SqlError::new("08006", format!("lost the connection to shard {decider_name} while committing: {e}"))
                    .hint("nothing was committed; run the transaction again")
            });
        }
    }
    if fault("twophase.after_prepare") {
        return Outcome::Abandoned;
    }
    if let Some(e) = failure {
        roll_back(decider, &mut conns, &gids, &prepared).await;
        c.rolled_back.fetch_add(1, Ordering::Relaxed);
        return Outcome::RolledBack(e);
    }

    // 2. The decision: the decider's own commit.
    decider.conn.queue(&messages::query("COMMIT"));
    let committed = match decider.conn.flush().await {
        Ok(()) => read_reply(decider).await,
        Err(e) => Err(e),
    };
    let committed = match committed {
        Ok(Reply { tag: Some(t), error: None, .. }) if t == "COMMIT" => true,
        Ok(Reply { error, .. }) => {
            // A deferred constraint failed at commit, say: nothing committed.
            let e = match error {
                Some((code, msg)) => prepare_failed(&decider_name, &code, &msg),
                None => SqlError::new("40000", format!("shard {decider_name} rolled the transaction back")),
            };
            roll_back_prepared(&mut conns, &gids, &prepared).await;
            c.rolled_back.fetch_add(1, Ordering::Relaxed);
            return Outcome::RolledBack(e);
        }
        Err(e) => {
            decider.broken = true;
            // The answer was lost: ask the decider's shard what it decided.
            match recover::settle(ctx, decider_shard, txid).await {
                Ok(true) => true,
                Ok(false) => {
                    roll_back_prepared(&mut conns, &gids, &prepared).await;
                    c.rolled_back.fetch_add(1, Ordering::Relaxed);
                    return Outcome::RolledBack(
                        SqlError::new(
                            "08006",
                            format!("lost the connection to shard {decider_name} while committing: {e}"),
                        )
                        .hint("nothing was committed; run the transaction again"),
                    );
                }
                Err(why) => {
                    return Outcome::Unknown(
                        SqlError::new(
                            "08006",
                            format!("lost the connection to shard {decider_name} while committing, and cannot ask it what it decided: {why}"),
                        )
                        .hint("the transaction committed on every shard or on none; shardgate settles it when the shard answers again (docs/transactions.md)"),
                    );
                }
            }
        }
    };
    debug_assert!(committed);
    if fault("twophase.after_decision") {
        return Outcome::Abandoned;
    }

    // 3. Commit the prepared parts.
    let mut in_doubt = 0;
    let mut first = true;
    for (i, conn) in conns.iter_mut().enumerate() {
        let done = match conn.simple_query(&format!("COMMIT PREPARED '{}'", gids[i])).await {
            Ok(_) => true,
            Err((code, msg)) => {
                tracing::warn!(shard = %names[i], code, error = %msg, "COMMIT PREPARED failed; the recovery sweep finishes it");
                false
            }
        };
        in_doubt += usize::from(!done);
        if first && fault("twophase.after_first_commit") {
            return Outcome::Abandoned;
        }
        first = false;
    }
    c.committed.fetch_add(1, Ordering::Relaxed);
    Outcome::Committed { in_doubt }
}

fn prepare_failed(shard: &str, code: &str, msg: &str) -> SqlError {
    let e = SqlError::from_server(code, format!("shard {shard}: {msg}"));
    if code == "55000" && msg.contains("prepared transactions are disabled") {
        return e.hint(format!(
            "set max_prepared_transactions (e.g. to max_connections) on shard {shard} and restart it, or set cross_shard_transactions = \"refuse\""
        ));
    }
    e.hint("nothing was committed on any shard")
}

/// Rolls back every part: the decider's open transaction, the prepared ones
/// by name. A part that does not answer is left to [`recover`], which rolls
/// it back since no decision was made.
async fn roll_back(decider: &mut Backend, conns: &mut [&mut Backend], gids: &[String], prepared: &[bool]) {
    if !decider.broken && decider.simple_query("ROLLBACK").await.is_err() {
        decider.broken = true;
    }
    roll_back_prepared(conns, gids, prepared).await;
}

async fn roll_back_prepared(conns: &mut [&mut Backend], gids: &[String], prepared: &[bool]) {
    for (i, conn) in conns.iter_mut().enumerate() {
        if conn.broken {
            continue;
        }
        let sql = if prepared[i] { format!("ROLLBACK PREPARED '{}'", gids[i]) } else { "ROLLBACK".to_string() };
        if conn.simple_query(&sql).await.is_err() {
            conn.broken = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gids_read_back() {
        let t = new_txid();
        assert_ne!(t, new_txid());
        let g = gid(&t, 2, 7);
        assert!(g.len() < 200, "Postgres allows 200 bytes");
        assert_eq!(parse_gid(&g), Some((t.clone(), 2)));
        assert_eq!(parse_gid("sg_zz_1_2"), None);
        assert_eq!(parse_gid(&format!("{g}_3")), None);
        assert_eq!(parse_gid("other"), None);
    }
}

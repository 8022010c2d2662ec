//! The session's transaction: the one server connection it holds while a
//! transaction is open (checked out of the shard's pool, returned when the server
//! is idle), the `BEGIN` held back until a statement names a shard, and a
//! transaction that failed in the router.

use std::sync::Arc;

use shardgate_directory::ShardId;
use tokio::io::{AsyncRead, AsyncWrite};

use super::prepared::unknown_statement;
use super::{Session, SessionError};
use crate::context::CancelTarget;
use crate::error::SqlError;
use crate::pool::Pooled;
use crate::protocol::messages::{self, Severity};
use crate::sql::{Analysis, SettingChange, SqlPrepared, Statement, StatementKind, TxnControl};

/// Where the session's transaction stands, as the router sees it.
#[derive(Default)]
pub(super) struct Transaction {
    /// The server connection held while the server reports a transaction
    /// open (and for the length of one statement or batch).
    pub(super) held: Option<Held>,
    /// Transaction-control statements answered here, to send before the first
    /// statement that names a shard.
    pub(super) pending_begin: Option<Vec<String>>,
    /// The transaction failed in the router (a routing error inside it): like
    /// Postgres, refuse everything until ROLLBACK.
    pub(super) aborted: bool,
    /// A Flush left a batch open on `held` until the next Sync.
    pub(super) open_batch: bool,
    /// Tables this block's DDL created with the key column (or may have):
    /// refused until it commits (`route::check_fresh_tables`).
    pub(super) fresh_tables: Vec<String>,
    /// An Execute with a row limit ran in the server's transaction: the
    /// rows a DELETE, UPDATE or INSERT … RETURNING suspended so wrote are
    /// seen by later statements only once the server parses one (see
    /// `rewrite_batch`).
    pub(super) limited_execute: bool,
    /// The server of `held` failed a Flush-ended part of the pipeline: it
    /// skips the rest up to the client's Sync, and so does the router.
    pub(super) skipping: bool,
    /// The other shards a transaction block has written on (two-phase
    /// commit, `twophase.rs`): their connections, each with the block open.
    pub(super) parked: Vec<Held>,
    /// The BEGIN the block started with, to open it on the shards it reaches later.
    pub(super) begin_sql: Option<String>,
    /// The held connection's status at its last ReadyForQuery.
    pub(super) last_status: u8,
    /// The block's savepoints, to open on each shard it reaches later.
    pub(super) savepoints: Savepoints,
    /// A portal of a merged cross-shard read that an Execute's row limit
    /// suspended inside the block: its other rows are not kept, and an
    /// Execute that asks for them is refused.
    pub(super) suspended_portal: Option<String>,
}

/// The savepoints a transaction block has open, as its shards have them.
///
/// A shard the block reaches later gets them all (`BEGIN; SAVEPOINT a;
/// SAVEPOINT b`) before its first statement: it holds no work from before
/// them, so rolling back to one undoes on it what rolling back undoes on the
/// others, and every shard keeps the same list, so the same savepoint
/// statement succeeds or fails on each alike. The list follows each savepoint
/// statement sent alone in its query string (or pipeline) the way Postgres
/// keeps its own; one sent beside other statements, whose effect depends on
/// which of them ran, makes it `unknown`, and the block then stays on its shards.
#[derive(Default, Clone, Debug, PartialEq, Eq)]
pub(super) struct Savepoints {
    names: Vec<String>,
    unknown: bool,
}

/// A savepoint statement: which, and the savepoint it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum SavepointOp {
    Savepoint(String),
    Release(String),
    RollbackTo(String),
}

impl SavepointOp {
    /// The savepoint statement `sql` is, if it is one (its name as Postgres
    /// folds it).
    pub(super) fn of(sql: &str) -> Option<SavepointOp> {
        use pg_query::protobuf::{node::Node as N, TransactionStmtKind as K};
        let parsed = pg_query::parse(sql, 0).ok()?;
        let [raw] = &parsed.protobuf.stmts[..] else { return None };
        let Some(N::TransactionStmt(t)) = raw.stmt.as_ref().and_then(|n| n.node.as_ref()) else { return None };
        let name = t.savepoint_name.clone();
        match K::try_from(t.kind).ok()? {
            K::TransStmtSavepoint => Some(SavepointOp::Savepoint(name)),
            K::TransStmtRelease => Some(SavepointOp::Release(name)),
            K::TransStmtRollbackTo => Some(SavepointOp::RollbackTo(name)),
            _ => None,
        }
    }

    /// The command tag Postgres answers it with.
    pub(super) fn tag(&self) -> &'static str {
        match self {
            SavepointOp::Savepoint(_) => "SAVEPOINT",
            SavepointOp::Release(_) => "RELEASE",
            SavepointOp::RollbackTo(_) => "ROLLBACK",
        }
    }
}

impl Savepoints {
    /// Whether the list is not known, or not empty: a shard that joins then
    /// needs savepoints it cannot be given, or must be given them.
    pub(super) fn unknown(&self) -> bool {
        self.unknown
    }

    pub(super) fn names(&self) -> &[String] {
        &self.names
    }

    /// A savepoint statement beside others: what it did is not known.
    pub(super) fn lose_track(&mut self) {
        self.unknown = true;
    }

    /// What `op` does to the list when it runs alone, as Postgres does it:
    /// in a failed transaction only ROLLBACK TO runs; RELEASE and ROLLBACK TO
    /// of a name not in the list fail and change nothing.
    pub(super) fn apply(&mut self, op: &SavepointOp, failed: bool) {
        match op {
            SavepointOp::Savepoint(n) if !failed => self.names.push(n.clone()),
            SavepointOp::Release(n) if !failed => {
                if let Some(i) = self.names.iter().rposition(|x| x == n) {
                    self.names.truncate(i);
                }
            }
            SavepointOp::RollbackTo(n) => {
                if let Some(i) = self.names.iter().rposition(|x| x == n) {
                    self.names.truncate(i + 1);
                }
            }
            _ => {}
        }
    }
}

impl Transaction {
    /// A transaction block is open: BEGIN held back, or a connection held.
    pub(super) fn in_block(&self) -> bool {
        self.held.is_some() || self.pending_begin.is_some()
    }
}

/// A transaction block's connections, taken for a read of every shard.
pub(super) struct BlockParts {
    /// The shard of the held connection.
    held: Option<ShardId>,
    pub(super) parts: Vec<Held>,
}

impl BlockParts {
    /// The block's connection to `shard`, if it reached it.
    pub(super) fn take(&mut self, shard: ShardId) -> Option<Held> {
        let i = self.parts.iter().position(|h| h.shard == shard)?;
        Some(self.parts.swap_remove(i))
    }
}

/// A server connection checked out of a shard's pool.
pub(super) struct Held {
    pub(super) shard: ShardId,
    pub(super) conn: Pooled,
}

/// Whether a query string opens a transaction block it does not close.
pub(super) fn leaves_transaction_open(analysis: &Analysis) -> bool {
    let mut open = false;
    for s in &analysis.statements {
        match s.kind {
            StatementKind::Txn(TxnControl::Begin) => open = true,
            StatementKind::Txn(TxnControl::Commit | TxnControl::Rollback) => open = false,
            _ => {}
        }
    }
    open
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// A shard for a statement that can run anywhere: the held one if any.
    pub(super) fn any_shard(&self) -> ShardId {
        match &self.txn.held {
            Some(b) => b.shard,
            None => {
                let dir = self.ctx.directory.load();
                match self.pooling {
                    // State the session keeps lives on its home shard.
                    Some(_) => super::pooling::home_shard(&dir),
                    None => self.ctx.any_shard(&dir),
                }
            }
        }
    }

    /// Statements the router answers itself. Returns the command tag (or an error
    /// to report) when handled, None when the statement must go to a shard.
    #[allow(clippy::type_complexity)]
    pub(super) fn local_statement(
        &mut self,
        stmt: &Statement,
    ) -> Result<Option<Result<String, SqlError>>, SessionError> {
        Ok(match &stmt.kind {
            StatementKind::SetTenant(value) => {
                let dir = self.ctx.directory.load();
                match value {
                    None => {
                        self.tenant = None;
                        Some(Ok(
                            if stmt.text.to_ascii_lowercase().starts_with("reset") { "RESET" } else { "SET" }.into()
                        ))
                    }
                    Some(v) => match dir.key_type.parse_text(v) {
                        Ok(k) => {
                            self.tenant = Some(k);
                            Some(Ok("SET".into()))
                        }
                        Err(e) => Some(Err(SqlError::new("22023", format!("invalid value for shardgate.tenant: {e}")))),
                    },
                }
            }
            // The session starts over: what it set and prepared is forgotten.
            // Not sent to a shard, where it would drop the statements the
            // router prepared on that pooled connection for every session.
            StatementKind::SetVar(SettingChange::DiscardAll) => Some(if self.txn.in_block() || self.multi.is_some() {
                self.txn.aborted = self.txn.in_block();
                Err(SqlError::new("25001", "DISCARD ALL cannot run inside a transaction block".into()))
            } else {
                self.settings.clear();
                self.prepared.clear();
                self.sql_prepared = None;
                Ok("DISCARD ALL".into())
            }),
            // A client's prepared statements live in the router (their server
            // copies are shared): DEALLOCATE closes them as a Close message does,
            // those prepared with SQL PREPARE too (sql_prepared.rs).
            StatementKind::SqlPrepared(SqlPrepared::Deallocate { name }) => Some(match name {
                None => {
                    self.prepared.clear();
                    self.sql_prepared = None;
                    Ok("DEALLOCATE ALL".into())
                }
                Some(name) => {
                    let sql = self.sql_prepared.as_mut().is_some_and(|s| s.remove(name));
                    match sql || self.prepared.remove(name).is_some() {
                        true => Ok("DEALLOCATE".into()),
                        false => Err(unknown_statement(name)),
                    }
                }
            }),
            StatementKind::Txn(TxnControl::Begin) if self.txn.held.is_none() => {
                match &mut self.txn.pending_begin {
                    Some(_) => {
                        self.client.queue(&messages::error_response(
                            Severity::Warning,
                            "25001",
                            "there is already a transaction in progress",
                            None,
                        ));
                    }
                    None => self.txn.pending_begin = Some(vec![stmt.text.clone()]),
                }
                Some(Ok("BEGIN".into()))
            }
            StatementKind::Txn(TxnControl::Savepoint)
                if self.txn.held.is_none() && self.txn.pending_begin.is_some() =>
            {
                if let Some(p) = &mut self.txn.pending_begin {
                    p.push(stmt.text.clone());
                }
                let first = stmt.text.split_whitespace().next().unwrap_or("SAVEPOINT").to_ascii_uppercase();
                Some(Ok(first))
            }
            StatementKind::Txn(TxnControl::Commit | TxnControl::Rollback)
                if self.txn.held.is_none() && self.txn.pending_begin.is_some() =>
            {
                self.txn.pending_begin = None;
                let commit = matches!(stmt.kind, StatementKind::Txn(TxnControl::Commit));
                Some(Ok(if commit { "COMMIT" } else { "ROLLBACK" }.into()))
            }
            _ => None,
        })
    }

    /// In a transaction that failed in the router: only its end is accepted.
    pub(super) async fn in_aborted_txn(&mut self, stmt: &Statement, alone: bool) -> Result<(), SessionError> {
        // ROLLBACK TO a savepoint the block has: the refused statement never
        // reached a shard, and the block goes on from the savepoint.
        let to_savepoint = match SavepointOp::of(&stmt.text) {
            Some(SavepointOp::RollbackTo(name))
                if alone && !self.txn.savepoints.unknown() && self.txn.savepoints.names().contains(&name) =>
            {
                Some(SavepointOp::RollbackTo(name))
            }
            _ => None,
        };
        if let Some(op) = to_savepoint.filter(|_| matches!(stmt.kind, StatementKind::Txn(TxnControl::Savepoint))) {
            let done = match &mut self.txn.pending_begin {
                Some(pending) if self.txn.held.is_none() => {
                    pending.push(stmt.text.clone());
                    self.txn.savepoints.apply(&op, true);
                    self.txn.aborted = false;
                    Ok(op.tag())
                }
                _ => self.savepoint_everywhere(&op, &stmt.text).await,
            };
            match done {
                Ok(tag) => self.client.queue(&messages::command_complete(tag)),
                Err(e) => self.client.queue(&e.to_message(Severity::Error)),
            }
            let status = if self.txn.aborted || self.txn.last_status == b'E' { b'E' } else { self.status() };
            self.client.queue(&messages::ready_for_query_bytes(status));
            self.client.flush().await?;
            return Ok(());
        }
        if matches!(stmt.kind, StatementKind::Txn(TxnControl::Commit | TxnControl::Rollback)) {
            self.txn.aborted = false;
            self.txn.pending_begin = None;
            self.roll_back_all().await;
            self.client.queue(&messages::command_complete("ROLLBACK"));
        } else {
            self.client.queue(
                &SqlError::new(
                    "25P02",
                    "current transaction is aborted, commands ignored until end of transaction block".into(),
                )
                .to_message(Severity::Error),
            );
        }
        self.ready().await
    }

    /// The connections of the transaction block (the held one, and those
    /// parked on the other shards it wrote), taken for a read of every shard,
    /// so that the shards it reached read inside it. Empty outside a block.
    /// Given back with [`Self::return_block_parts`].
    pub(super) fn take_block_parts(&mut self) -> BlockParts {
        let held = self.txn.held.as_ref().map(|h| h.shard);
        if !self.txn.in_block() || held.is_none() {
            return BlockParts { held, parts: Vec::new() };
        }
        let mut parts: Vec<Held> = self.txn.held.take().into_iter().collect();
        parts.append(&mut self.txn.parked);
        // The read ends in a Sync on the held connection, which closes a
        // pipeline a Flush left open there.
        self.txn.open_batch = false;
        BlockParts { held, parts }
    }

    /// Puts back what [`Self::take_block_parts`] took. `failed`: a part's
    /// read failed or its connection broke, so the block failed as a whole,
    /// as in Postgres: everything is refused until it ends.
    pub(super) fn return_block_parts(&mut self, taken: BlockParts, failed: bool) {
        for h in taken.parts {
            if Some(h.shard) == taken.held && self.txn.held.is_none() {
                self.txn.held = Some(h);
            } else {
                self.txn.parked.push(h);
            }
        }
        if failed {
            self.txn.aborted = true;
        }
    }

    /// Checks a server connection out of `shard`'s pool unless one is held; sends any
    /// pending BEGIN ahead. Returns how many ReadyForQuery replies to swallow.
    pub(super) async fn checkout(&mut self, shard: ShardId) -> Result<usize, SqlError> {
        if let Some(b) = &self.txn.held {
            if b.shard == shard {
                return Ok(0);
            }
            return self.join_shard(shard).await;
        }
        let pool = self.pool(shard)?;
        let mut conn = self.borrow(&pool).await?;
        *self.cancel.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(CancelTarget { pool, pid: conn.pid, secret: conn.secret });
        let mut swallow = 0;
        if let Some(sql) = self.settings.prelude(&mut conn) {
            conn.conn.queue(&messages::query(&sql));
            swallow += 1;
        }
        if let Some(prelude) = self.txn.pending_begin.take() {
            conn.conn.queue(&messages::query(&prelude.join("; ")));
            swallow += 1;
            self.txn.begin_sql = prelude.into_iter().next();
        }
        self.txn.held = Some(Held { shard, conn });
        Ok(swallow)
    }

    /// A server connection of `pool` for the session's transaction: the one
    /// the client keeps in session pooling.
    pub(super) async fn borrow(&self, pool: &Arc<crate::pool::ShardPool>) -> Result<Pooled, SqlError> {
        let conn = match &self.pooling {
            Some(p) => pool.get_kept(&p.kept).await,
            None => pool.get().await,
        };
        conn.map_err(|e| SqlError::new(e.sqlstate(), e.to_string()))
    }

    /// The pool of `shard`, from this session's own list when it has used it.
    pub(super) fn pool(&mut self, shard: ShardId) -> Result<Arc<crate::pool::ShardPool>, SqlError> {
        if let Some(Some(p)) = self.pools.get(shard) {
            return Ok(p.clone());
        }
        let pool = self.role_pool(shard).ok_or_else(|| SqlError::new("XX000", format!("no pool for shard {shard}")))?;
        if self.pools.len() <= shard {
            self.pools.resize(shard + 1, None);
        }
        self.pools[shard] = Some(pool.clone());
        Ok(pool)
    }

    /// The pool of `shard` for this session's role, not cached in the
    /// session's own list.
    pub(super) fn role_pool(&self, shard: ShardId) -> Option<Arc<crate::pool::ShardPool>> {
        self.ctx.pool_as(self.role.as_deref(), shard)
    }

    pub(super) fn clear_cancel(&self) {
        *self.cancel.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// After a ReadyForQuery from the server: keep the connection while a
    /// transaction is open, return it to the pool when idle.
    pub(super) fn after_ready(&mut self, status: u8) {
        if self.leave_if_idle(status).is_some() {
            self.admission.flight.clear();
        }
    }

    /// The first half of [`Self::after_ready`]: when the server is idle, the
    /// connection leaves the session (a cancel request no longer reaches it)
    /// and is returned; dropping it hands it back to the pool.
    pub(super) fn leave_if_idle(&mut self, status: u8) -> Option<Held> {
        self.txn.last_status = status;
        if status == b'I' && !self.txn.open_batch {
            // A transaction that spans shards ended on the held one behind
            // the router's back: its other parts must not go back to the
            // pool open. Closing their connections rolls them back.
            for mut b in std::mem::take(&mut self.txn.parked) {
                tracing::warn!(shard = b.shard, "a transaction's part on another shard was left open; closing it");
                b.conn.broken = true;
            }
            self.txn.begin_sql = None;
            self.txn.savepoints = Savepoints::default();
            self.txn.suspended_portal = None;
            self.txn.limited_execute = false;
            self.txn.fresh_tables.clear();
            self.clear_cancel();
            self.txn.held.take()
        } else {
            None
        }
    }
}

//! A transaction block that writes on several shards: each shard it reaches
//! gets the block's BEGIN and keeps its connection (parked while another
//! shard's statements run), and COMMIT commits them all or none with
//! two-phase commit ([`crate::twophase`]). A block on one shard never comes
//! here and costs nothing more.

use shardgate_directory::ShardId;
use tokio::io::{AsyncRead, AsyncWrite};

use super::relay::RelayError;
use super::transaction::{Held, SavepointOp};
use super::{Session, SessionError};
use crate::context::CancelTarget;
use crate::error::SqlError;
use crate::protocol::messages::{self, Severity};
use crate::protocol::{Message, ProtocolError};
use crate::sql::{Analysis, StatementKind, TxnControl};
use crate::twophase::{self, Outcome, Part};

/// What ending a transaction that spans shards tells the client: its
/// command tag, or why nothing was committed.
pub(super) type Ended = Result<&'static str, SqlError>;

/// Rolls back each part's open transaction; a connection that does not
/// answer cleanly is closed (its server rolls back).
async fn roll_back_each(parts: &mut [Held]) {
    for b in parts.iter_mut() {
        if b.conn.broken || b.conn.simple_query("ROLLBACK").await.is_err() {
            b.conn.broken = true;
        }
    }
}

/// Each shard's statement as one simple query that opens a transaction
/// first. The session's settings go in a query of their own: inside the
/// transaction, a rollback would undo them behind the pool's back.
fn begin_and(texts: Vec<(ShardId, String)>) -> Vec<(ShardId, bytes::Bytes)> {
    texts.into_iter().map(|(s, sql)| (s, messages::query(&format!("BEGIN; {sql}")))).collect()
}

/// How the answers of a statement run on several shards become one.
#[derive(Clone, Copy)]
pub(super) enum Combine {
    /// Every shard's rows, and the rows written summed under this verb
    /// (`UPDATE`, `DELETE`): each shard wrote rows of its own.
    Sum(&'static str),
    /// The first shard's answer: every shard ran the same write on the same
    /// rows (DDL, a reference table); `ddl` refreshes the table catalog.
    First { ddl: bool },
}

/// What a statement does to a transaction block that spans shards.
pub(super) enum Control {
    /// COMMIT (true) or ROLLBACK on every shard.
    End { commit: bool },
    /// SAVEPOINT, RELEASE or ROLLBACK TO on every shard.
    Savepoint(SavepointOp),
}

/// A write naming tenants on several shards inside a transaction block.
fn several_shards_in_block() -> SqlError {
    SqlError::new(
        "0A000",
        "a statement that writes tenants on several shards cannot run inside a transaction block yet".into(),
    )
    .hint("write one tenant per statement inside the transaction: the transaction then commits on every shard together")
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    pub(super) fn shard_name(&self, shard: ShardId) -> String {
        let dir = self.ctx.directory.load();
        dir.shards.get(shard).map(|x| x.name.clone()).unwrap_or_default()
    }

    /// The transaction holds a connection on another shard and now needs
    /// `shard`: the held one is parked and `shard` joins the transaction.
    /// Returns how many ReadyForQuery replies to swallow.
    pub(super) async fn join_shard(&mut self, shard: ShardId) -> Result<usize, SqlError> {
        let Some(current) = self.txn.held.as_ref().map(|b| b.shard) else {
            return Ok(0);
        };
        let cannot = |why: String| {
            SqlError::new(
                "0A000",
                format!(
                    "this transaction runs on shard {} and cannot touch shard {}: {why}",
                    self.shard_name(current),
                    self.shard_name(shard)
                ),
            )
        };
        if !self.ctx.two_phase() {
            return Err(cannot("cross_shard_transactions = \"refuse\"".into())
                .hint("keep each transaction (and each query string) to one tenant's shard, or set cross_shard_transactions = \"two_phase\""));
        }
        let explicit = self.txn.begin_sql.is_some() || self.txn.last_status == b'T';
        if self.txn.open_batch && !explicit {
            return Err(cannot("a pipeline without BEGIN runs on one shard".into())
                .hint("send BEGIN first to make the pipeline one transaction across shards, or send a Sync between statements for different tenants"));
        }
        if !explicit {
            return Err(cannot("one query string runs on one shard".into()).hint(
                "send the statements one by one inside BEGIN … COMMIT to make them one transaction across shards",
            ));
        }
        if self.txn.last_status == b'E' {
            return Err(SqlError::new(
                "25P02",
                "current transaction is aborted, commands ignored until end of transaction block".into(),
            ));
        }
        if self.txn.savepoints.unknown() {
            return Err(cannot("the transaction sent SAVEPOINT, RELEASE or ROLLBACK TO beside other statements in one query string, so which savepoints it has is not known".into())
                .hint("send each savepoint statement as a statement of its own; savepoints then work across shards"));
        }
        if let Some(at) = self.txn.parked.iter().position(|p| p.shard == shard) {
            let back = self.txn.parked.swap_remove(at);
            self.set_cancel_target(&back);
            if let Some(previous) = self.txn.held.replace(back) {
                self.txn.parked.push(previous);
            }
            return Ok(0);
        }
        // The new shard's connection first: when the shard cannot be reached
        // the transaction stays as it was, its connection held, and the
        // caller's refusal fails it. Parked without a held connection, the
        // session would look idle: its parts would be dropped at ROLLBACK
        // without one, back into the pool inside their open transaction, and
        // the next transaction on that connection would commit them.
        let pool = self.pool(shard)?;
        let mut conn = self.borrow(&pool).await?;
        if let Some(previous) = self.txn.held.take() {
            self.txn.parked.push(previous);
        }
        let mut swallow = 0;
        if let Some(sql) = self.settings.prelude(&mut conn) {
            conn.conn.queue(&messages::query(&sql));
            swallow += 1;
        }
        // The block's savepoints too: this shard has done nothing before
        // them, so rolling back to one undoes all its work since, as it does
        // on the others.
        let mut begin = self.txn.begin_sql.clone().unwrap_or_else(|| "BEGIN".into());
        for name in self.txn.savepoints.names() {
            begin.push_str("; SAVEPOINT ");
            begin.push_str(&crate::sql::quote::ident(name));
        }
        conn.conn.queue(&messages::query(&begin));
        swallow += 1;
        let joined = Held { shard, conn };
        self.set_cancel_target(&joined);
        self.txn.held = Some(joined);
        Ok(swallow)
    }

    fn set_cancel_target(&self, b: &Held) {
        if let Some(pool) = self.pools.get(b.shard).cloned().flatten() {
            *self.cancel.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(CancelTarget { pool, pid: b.conn.pid, secret: b.conn.secret });
        }
    }

    /// Statements for a transaction block that spans shards: COMMIT and
    /// ROLLBACK alone end it here, and a savepoint statement alone runs on
    /// every shard it reached; with others in one query string they are
    /// refused. Keeps the block's savepoints (`transaction::Savepoints`) as they change.
    /// `alone`: the query string or pipeline holds nothing else. None: route
    /// the statements as usual.
    pub(super) fn cross_shard_control(
        &mut self,
        analysis: &Analysis,
        alone: bool,
    ) -> Option<Result<Control, SqlError>> {
        let spans = !self.txn.parked.is_empty();
        let alone = alone && analysis.statements.len() == 1;
        let mut control = None;
        for s in &analysis.statements {
            match s.kind {
                StatementKind::Txn(TxnControl::Savepoint)
                    if self.txn.held.is_some() || self.txn.pending_begin.is_some() =>
                {
                    match SavepointOp::of(&s.text).filter(|_| alone) {
                        Some(op) if spans => return Some(Ok(Control::Savepoint(op))),
                        Some(op) => self.txn.savepoints.apply(&op, self.txn.last_status == b'E'),
                        None if spans => {
                            return Some(Err(SqlError::new(
                                "0A000",
                                "in a transaction that has written on several shards, SAVEPOINT, RELEASE and ROLLBACK TO must each be sent alone".into(),
                            )
                            .hint("send the savepoint statement as a query of its own")))
                        }
                        None => self.txn.savepoints.lose_track(),
                    }
                }
                // The client's own PREPARE TRANSACTION would end one shard's
                // part and leave the others open.
                StatementKind::Txn(TxnControl::TwoPhase) if spans => {
                    return Some(Err(SqlError::new(
                        "0A000",
                        "PREPARE TRANSACTION is not supported in a transaction that has written on several shards: shardgate commits it with two-phase commit itself".into(),
                    )
                    .hint("send COMMIT")));
                }
                StatementKind::Txn(TxnControl::Commit | TxnControl::Rollback | TxnControl::Begin) if spans => {
                    control = Some(matches!(s.kind, StatementKind::Txn(TxnControl::Commit)));
                }
                _ => {}
            }
        }
        let control = control?;
        if analysis.statements.len() != 1 {
            return Some(Err(SqlError::new(
                "0A000",
                "a transaction that has written on several shards ends with COMMIT or ROLLBACK sent on its own".into(),
            )
            .hint("send COMMIT (or ROLLBACK) as a statement of its own")));
        }
        if matches!(analysis.statements[0].kind, StatementKind::Txn(TxnControl::Begin)) {
            return None;
        }
        Some(Ok(Control::End { commit: control }))
    }

    /// A savepoint statement sent alone while the block spans shards: run on
    /// every shard the block reached, so that each keeps the same savepoints.
    /// In a failed block only ROLLBACK TO runs, as in Postgres (the others
    /// fail without being sent, and the block stays failed); after it, the
    /// block goes on. Returns the command tag, or the error, with the block's
    /// status set.
    pub(super) async fn savepoint_everywhere(&mut self, op: &SavepointOp, sql: &str) -> Result<&'static str, SqlError> {
        let failed = self.txn.last_status == b'E' || self.txn.aborted;
        if failed && !matches!(op, SavepointOp::RollbackTo(_)) {
            return Err(SqlError::new(
                "25P02",
                "current transaction is aborted, commands ignored until end of transaction block".into(),
            ));
        }
        let mut error = None;
        for b in self.txn.held.iter_mut().chain(self.txn.parked.iter_mut()) {
            if let Err((code, message)) = b.conn.simple_query(sql).await {
                let name = b.conn.shard_name().to_string();
                error.get_or_insert_with(|| SqlError::from_server(&code, format!("{message} (on shard {name})")));
            }
        }
        // Each shard has the same savepoints, so the statement failed on all
        // of them or on none (a lost connection aside, which fails the block).
        self.txn.savepoints.apply(op, failed);
        match error {
            None => {
                self.txn.last_status = b'T';
                self.txn.aborted = false;
                Ok(op.tag())
            }
            Some(e) => {
                self.txn.last_status = b'E';
                Err(e)
            }
        }
    }

    /// Ends a transaction block that spans shards: commits it on every shard
    /// or on none (`commit`), or rolls it back everywhere.
    pub(super) async fn end_cross_shard(&mut self, commit: bool) -> Result<Ended, SessionError> {
        self.clear_cancel();
        let held = self.txn.held.take();
        let parked = std::mem::take(&mut self.txn.parked);
        let failed = self.txn.last_status == b'E';
        self.txn.begin_sql = None;
        self.txn.savepoints = Default::default();
        self.txn.last_status = b'I';
        let mut parked = parked;
        let Some(mut decider) = held else {
            // Nothing to commit without the held part, but what is parked
            // must not go back to the pool inside its open transaction.
            roll_back_each(&mut parked).await;
            return Ok(Ok("ROLLBACK"));
        };
        if !commit || failed {
            roll_back_each(std::slice::from_mut(&mut decider)).await;
            roll_back_each(&mut parked).await;
            if commit {
                twophase::counters().rolled_back.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            return Ok(Ok("ROLLBACK"));
        }
        Ok(self.commit_parts(&mut decider, &mut parked).await?.map(|()| "COMMIT"))
    }

    /// Commits the transactions open on `decider` and `others` together
    /// ([`twophase::commit`]): Ok(Err) when nothing was committed (or the
    /// outcome is unknown), with the reason for the client.
    pub(super) async fn commit_parts(
        &self,
        decider: &mut Held,
        others: &mut [Held],
    ) -> Result<Result<(), SqlError>, SessionError> {
        let txid = twophase::new_txid();
        let names: Vec<String> = others.iter().map(|p| self.shard_name(p.shard)).collect();
        let parts: Vec<Part<'_>> =
            others.iter_mut().zip(names).map(|(p, name)| Part { shard: p.shard, name, conn: &mut p.conn }).collect();
        let part = Part { shard: decider.shard, name: self.shard_name(decider.shard), conn: &mut decider.conn };
        match twophase::commit(&self.ctx, &txid, part, parts).await {
            Outcome::Committed { .. } => Ok(Ok(())),
            Outcome::RolledBack(e) | Outcome::Unknown(e) => Ok(Err(e)),
            Outcome::Abandoned => {
                // As if this router had died here: every connection closes
                // without another word, the client's too.
                for b in std::iter::once(decider).chain(others.iter_mut()) {
                    b.conn.broken = true;
                }
                Err(SessionError::Protocol(ProtocolError::Io(std::io::Error::other(
                    "two-phase commit fault point (test)",
                ))))
            }
        }
    }

    /// Rolls back whatever the transaction holds, on every shard it reached.
    pub(super) async fn roll_back_all(&mut self) {
        let held = self.txn.held.take();
        let parked = std::mem::take(&mut self.txn.parked);
        self.txn.begin_sql = None;
        self.txn.savepoints = Default::default();
        self.txn.last_status = b'I';
        if held.is_some() {
            self.clear_cancel();
        }
        let mut all: Vec<Held> = held.into_iter().chain(parked).collect();
        roll_back_each(&mut all).await;
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// A multi-row INSERT whose rows are for several shards, outside a
    /// transaction block: each shard's rows in a transaction of its own on
    /// that shard, committed together (two-phase commit), as one Postgres
    /// would commit the statement: all rows or none.
    pub(super) async fn run_split_insert_atomically(
        &mut self,
        texts: Vec<(ShardId, String)>,
        gathered: super::split::Gathered,
    ) -> Result<(), SessionError> {
        self.run_parts_atomically(texts, gathered).await
    }

    /// An UPDATE or DELETE naming tenants on several shards (`tenant_id IN
    /// (…)`, `= ANY(…)`), outside a transaction block: run on each of those
    /// shards, committed together.
    pub(super) async fn run_write_atomically(
        &mut self,
        stmt: &crate::sql::Statement,
        shards: Vec<ShardId>,
    ) -> Result<(), SessionError> {
        // Rows under a move are written where they are owned only.
        let texts = match self.shard_texts(&shards, &stmt.text, stmt) {
            Ok(t) => t,
            Err(e) => return self.fail_simple(e).await,
        };
        let parts = shards.into_iter().zip(texts).map(|(s, t)| (s, t.unwrap_or_else(|| stmt.text.clone()))).collect();
        let gathered =
            super::split::Gathered::new(if stmt.kind == StatementKind::Update { "UPDATE" } else { "DELETE" });
        if self.txn.in_block() {
            return self.run_parts_in_block(parts, gathered).await;
        }
        self.run_parts_atomically(parts, gathered).await
    }

    /// A write naming tenants on several shards inside a transaction block:
    /// each shard's part runs in the block on that shard, which joins the
    /// block as it would for a statement of one of its tenants, and the parts'
    /// answers become one (every shard's rows, the tag with the rows written
    /// summed). The block's COMMIT then commits every shard together. A part
    /// that fails fails the statement and the block, as one failed statement
    /// fails a block on one Postgres: its error is the answer, and the block's
    /// end rolls every shard back.
    pub(super) async fn run_parts_in_block(
        &mut self,
        parts: Vec<(ShardId, String)>,
        mut gathered: super::split::Gathered,
    ) -> Result<(), SessionError> {
        for (shard, text) in parts {
            let swallow = match self.checkout(shard).await {
                Ok(n) => n,
                Err(e) => return self.fail_simple(e).await,
            };
            let Some(b) = self.txn.held.as_mut() else {
                return self.fail_simple(SqlError::new("XX000", "no connection held in the block".into())).await;
            };
            b.conn.conn.queue(&messages::query(&text));
            let (replies, error) = match self.run_part(swallow).await {
                Ok(r) => r,
                Err(e) => return self.lost_backend(e).await,
            };
            if let Some(e) = error {
                let name = self.shard_name(shard);
                self.client.queue(&super::reply::prefix_error(&e, &name));
                self.txn.aborted = true;
                return self.ready().await;
            }
            gathered.add(replies);
        }
        gathered.answer(&mut self.client);
        self.ready().await
    }

    /// Sends what is queued on the held connection and reads its replies up
    /// to ReadyForQuery, past `swallow` replies of what the checkout queued
    /// before it (their errors go to the client): the replies, and the first
    /// error. Records the block's status.
    pub(super) async fn run_part(
        &mut self,
        mut swallow: usize,
    ) -> Result<(Vec<bytes::Bytes>, Option<bytes::Bytes>), ProtocolError> {
        let Some(b) = self.txn.held.as_mut() else { return Ok((Vec::new(), None)) };
        b.conn.conn.flush().await?;
        let mut replies = Vec::new();
        let mut error: Option<bytes::Bytes> = None;
        let status = loop {
            let m = b.conn.conn.read().await?;
            match m.tag() {
                b'Z' if swallow > 0 => swallow -= 1,
                b'Z' => break m.body().first().copied().unwrap_or(b'E'),
                b'E' => {
                    error.get_or_insert_with(|| m.raw().clone());
                }
                _ if swallow > 0 => {}
                _ => replies.push(m.raw().clone()),
            }
        };
        self.txn.last_status = status;
        Ok((replies, error))
    }

    /// Runs each shard's statement in a transaction of its own on that shard
    /// and commits them together; answers with the rows they returned and
    /// the tag followed by the rows they wrote.
    async fn run_parts_atomically(
        &mut self,
        texts: Vec<(ShardId, String)>,
        mut gathered: super::split::Gathered,
    ) -> Result<(), SessionError> {
        let (mut open, replies) = match self.open_parts(begin_and(texts)).await {
            Ok(opened) => opened,
            Err(err) => return self.refused_part(&err).await,
        };
        for r in replies {
            gathered.add(r);
        }
        let Some(mut decider) = open.pop() else {
            return self.ready().await;
        };
        match self.commit_parts(&mut decider, &mut open).await? {
            Ok(()) => {
                gathered.answer(&mut self.client);
                self.ready().await
            }
            Err(e) => self.fail_simple(e).await,
        }
    }

    /// A statement that must land on every shard (DDL, a reference-table
    /// write), outside a transaction block: run in a transaction on each
    /// shard and committed on all of them or on none, answered as the first
    /// shard answered. `Ok(false)`: the statement cannot run inside a
    /// transaction block (`CREATE INDEX CONCURRENTLY`, `VACUUM`): nothing
    /// ran, and the caller runs it shard by shard.
    pub(super) async fn run_everywhere_atomically(
        &mut self,
        sql: &str,
        shards: &[ShardId],
        ddl: bool,
    ) -> Result<bool, SessionError> {
        let texts = shards.iter().map(|&s| (s, sql.to_string())).collect();
        let (mut open, mut replies) = match self.open_parts(begin_and(texts)).await {
            Ok(opened) => opened,
            Err(err) if messages::error_summary(&Message::from_raw(err.clone())).0 == "25001" => return Ok(false),
            Err(err) => {
                self.refused_part(&err).await?;
                return Ok(true);
            }
        };
        let Some(mut decider) = open.pop() else {
            self.ready().await?;
            return Ok(true);
        };
        match self.commit_parts(&mut decider, &mut open).await? {
            Ok(()) => {
                for m in replies.swap_remove(0) {
                    self.client.queue(&m);
                }
                // Back to their pools first: the refresh takes a connection.
                drop(decider);
                drop(open);
                // Before the client hears of it: its other sessions may
                // write to a new table at once, and must see it sharded.
                if ddl {
                    if let Err(e) = self.ctx.refresh_catalog().await {
                        tracing::warn!(error = %e, "could not refresh the table catalog after DDL");
                    }
                }
                self.ready().await?;
            }
            Err(e) => self.fail_simple(e).await?,
        }
        Ok(true)
    }

    /// Runs each shard's messages (which open a transaction, then run its
    /// statement, and end in one ReadyForQuery) on that shard, one shard
    /// after another. Ok: the open parts and each one's replies after the
    /// BEGIN's (in order); Err: the first error, every part rolled back.
    pub(super) async fn open_parts(
        &mut self,
        runs: Vec<(ShardId, bytes::Bytes)>,
    ) -> Result<(Vec<Held>, Vec<Vec<bytes::Bytes>>), bytes::Bytes> {
        let mut open: Vec<Held> = Vec::with_capacity(runs.len());
        let mut replies = Vec::with_capacity(runs.len());
        let mut failure: Option<bytes::Bytes> = None;
        for (shard, run) in runs {
            let name = self.shard_name(shard);
            let conn = match self.pool(shard) {
                Ok(pool) => pool.get().await.map_err(|e| SqlError::new(e.sqlstate(), e.to_string())),
                Err(e) => Err(e),
            };
            let mut conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    failure = Some(e.to_message(Severity::Error));
                    break;
                }
            };
            let settings = self.settings.prelude(&mut conn);
            let answer = super::everywhere::collect_messages(&mut conn, &run, settings, true).await;
            open.push(Held { shard, conn });
            match answer {
                Err(e) => {
                    failure = Some(e.to_message(Severity::Error));
                    break;
                }
                Ok((_, Some(err))) => {
                    failure = Some(super::reply::prefix_error(&err, &name));
                    break;
                }
                Ok((mut r, None)) => {
                    // Not the BEGIN's own replies.
                    let begun = r.iter().position(|m| m.first() == Some(&b'C')).map_or(0, |i| i + 1);
                    r.drain(..begun);
                    replies.push(r);
                }
            }
        }
        match failure {
            Some(err) => {
                roll_back_each(&mut open).await;
                Err(err)
            }
            None => Ok((open, replies)),
        }
    }

    /// Answers a statement one of whose parts failed (and was rolled back).
    async fn refused_part(&mut self, err: &bytes::Bytes) -> Result<(), SessionError> {
        crate::metrics::global().error_message(&err[5..]);
        self.client.queue(err);
        self.ready().await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// A pipeline (up to its Sync) that writes on several shards, outside a
    /// transaction block: an UPDATE or DELETE naming tenants on several shards
    /// (`WHERE tenant_id = ANY($1)`), or DDL and reference-table writes on
    /// every shard. The client's pipeline runs on each of those shards inside
    /// a transaction, and they commit together; the answers combine as
    /// `combine` says.
    pub(super) async fn run_write_across_extended(
        &mut self,
        batch: &[Message],
        shards: Vec<ShardId>,
        combine: Combine,
    ) -> Result<(), SessionError> {
        // Inside a transaction block, an UPDATE or DELETE of tenants on several
        // shards: each shard joins the block and the block's COMMIT commits
        // them (as `run_parts_in_block` for the simple protocol).
        // A batch left open by a Flush (asyncpg prepares with Parse, Describe
        // and Flush) is closed by this batch's Sync on its connection.
        let in_block = self.txn.in_block();
        if (self.txn.open_batch && !in_block) || (in_block && !matches!(combine, Combine::Sum(_))) {
            return self.fail_batch(several_shards_in_block(), true).await;
        }
        if !in_block {
            self.txn.pending_begin = Some(vec!["BEGIN".into()]);
        }
        let mut replies: Vec<Vec<bytes::Bytes>> = Vec::with_capacity(shards.len());
        let mut failure: Vec<bytes::Bytes> = Vec::new();
        for &shard in &shards {
            let swallow = match self.checkout(shard).await {
                Ok(n) => n,
                Err(e) => {
                    failure.push(e.to_message(Severity::Error));
                    break;
                }
            };
            let expects = self.rewrite_batch(batch, swallow);
            let Some(b) = self.txn.held.as_mut() else { break };
            if let Err(e) = b.conn.conn.flush().await {
                if !in_block {
                    self.txn.pending_begin = None;
                }
                return self.lost_backend(e).await;
            }
            let mut buf = Vec::new();
            match self.relay_batch(expects, Some(&mut buf)).await {
                Ok(Some(status)) => {
                    self.txn.last_status = status;
                    if status != b'T' || buf.iter().any(|m| m.first() == Some(&b'E')) {
                        let name = self.shard_name(shard);
                        failure = buf
                            .iter()
                            .filter(|m| m.first() == Some(&b'E'))
                            .map(|m| super::reply::prefix_error(m, &name))
                            .collect();
                        break;
                    }
                }
                Ok(None) => break,
                Err(RelayError::Client(e)) => return Err(e),
                Err(RelayError::Backend(e)) => {
                    if !in_block {
                        self.txn.pending_begin = None;
                    }
                    return self.lost_backend(e).await;
                }
            }
            replies.push(buf);
        }
        if !in_block {
            self.txn.pending_begin = None;
        }
        self.txn.open_batch = false;
        let outside_block = |m: &bytes::Bytes| messages::error_summary(&Message::from_raw(m.clone())).0 == "25001";
        if matches!(combine, Combine::First { .. }) && failure.iter().any(outside_block) {
            // CREATE INDEX CONCURRENTLY and the like: shard by shard.
            self.roll_back_all().await;
            return Box::pin(self.run_batch_on_shards(batch, shards, false)).await;
        }
        if !failure.is_empty() || replies.len() != shards.len() {
            if in_block {
                // The block fails, as after any failed statement; its end
                // rolls back every shard.
                self.txn.aborted = true;
            } else {
                self.roll_back_all().await;
            }
            for m in &failure {
                crate::metrics::global().error_message(m.get(5..).unwrap_or_default());
                self.client.queue(m);
            }
            self.client.queue(&messages::ready_for_query_bytes(self.status()));
            self.client.flush().await?;
            return Ok(());
        }
        let ended = if in_block { Ok("") } else { self.end_cross_shard(true).await? };
        match (&ended, combine) {
            (Ok(_), Combine::First { ddl }) => {
                for m in replies.swap_remove(0) {
                    self.client.queue(&m);
                }
                if ddl {
                    if let Err(e) = self.ctx.refresh_catalog().await {
                        tracing::warn!(error = %e, "could not refresh the table catalog after DDL");
                    }
                }
            }
            (Ok(_), Combine::Sum(verb)) => {
                // The first shard's replies, with every shard's rows and
                // counts where its own stood.
                let total: u64 = replies
                    .iter()
                    .flatten()
                    .filter(|m| m.first() == Some(&b'C'))
                    .map(|m| super::split::command_count(m))
                    .sum();
                let mut rows_sent = false;
                for m in replies.first().map(Vec::as_slice).unwrap_or_default() {
                    match m.first() {
                        Some(b'D') | Some(b'C') if !rows_sent => {
                            rows_sent = true;
                            for row in replies.iter().flatten().filter(|x| x.first() == Some(&b'D')) {
                                self.client.queue(row);
                            }
                            self.client.queue(&messages::command_complete(&format!("{verb} {total}")));
                        }
                        Some(b'D') | Some(b'C') => {}
                        _ => self.client.queue(m),
                    }
                }
            }
            (Err(e), _) => {
                crate::metrics::global().error(e.code);
                self.client.queue(&e.to_message(Severity::Error));
            }
        }
        self.client.queue(&messages::ready_for_query_bytes(self.status()));
        self.client.flush().await?;
        Ok(())
    }
}

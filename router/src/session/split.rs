//! Statements whose rows are split between shards or gathered from all of them:
//! a multi-row INSERT of several tenants, `COPY … FROM STDIN` into a sharded
//! table, and `COPY … TO STDOUT` without a tenant.

use bytes::Bytes;
use shardgate_directory::ShardId;
use tokio::io::{AsyncRead, AsyncWrite};

use super::reply::prefix_error;
use super::{Session, SessionError};
use crate::copy_binary::BinaryJoin;
use crate::error::SqlError;
use crate::protocol::messages::{self, Severity};
use crate::protocol::{Message, ProtocolError};
use crate::sql::{CopyFormat, Statement, StatementKind};

/// The answers of one statement run on several shards, gathered: the first
/// RowDescription, every shard's rows, and the rows written, summed.
pub(super) struct Gathered {
    /// The command tag, before the count (`UPDATE`, `INSERT 0`).
    tag: &'static str,
    header: Option<Bytes>,
    /// Each shard's rows, in the order the shards answered.
    rows: Vec<Vec<Bytes>>,
    pub(super) total: u64,
    /// A split INSERT's rows by shard, in the order `add` gets their answers:
    /// the RETURNING rows are answered in the order of the VALUES rows.
    values_order: Option<Vec<(ShardId, Vec<usize>)>>,
}

impl Gathered {
    pub(super) fn new(tag: &'static str) -> Gathered {
        Gathered { tag, header: None, rows: Vec::new(), total: 0, values_order: None }
    }

    /// The answers to a split INSERT's `parts`, to be added in that order.
    pub(super) fn split_insert(parts: &[(ShardId, Vec<usize>)]) -> Gathered {
        Gathered { values_order: Some(parts.to_vec()), ..Gathered::new("INSERT 0") }
    }

    /// One shard's replies.
    pub(super) fn add(&mut self, replies: Vec<Bytes>) {
        let mut rows = Vec::new();
        for r in replies {
            match r.first() {
                Some(b'T') => {
                    self.header.get_or_insert(r);
                }
                Some(b'D') => rows.push(r),
                Some(b'C') => self.total += command_count(&r),
                _ => {}
            }
        }
        self.rows.push(rows);
    }

    /// Queues the answer: the rows, then the tag with the count.
    pub(super) fn answer<S: AsyncRead + AsyncWrite + Unpin>(self, client: &mut crate::protocol::Connection<S>) {
        if let Some(h) = &self.header {
            client.queue(h);
        }
        let rows = match &self.values_order {
            Some(parts) => crate::split::in_values_order(parts, self.rows),
            None => self.rows.into_iter().flatten().collect(),
        };
        for r in &rows {
            client.queue(r);
        }
        client.queue(&messages::command_complete(&format!("{} {}", self.tag, self.total)));
    }
}

fn copy_data(data: &[u8]) -> Bytes {
    let mut b = messages::Builder::new(b'd');
    b.bytes(data);
    b.finish()
}

/// The row count at the end of a CommandComplete (`UPDATE 3`, `INSERT 0 3`).
pub(super) fn command_count(complete: &[u8]) -> u64 {
    let tag = String::from_utf8_lossy(&complete[5.min(complete.len())..complete.len().saturating_sub(1)]).to_string();
    tag.rsplit(' ').next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0)
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// `COPY … FROM STDIN` into a sharded table sent with the extended protocol
    /// (Bind, Execute, Sync, then the data). As in Postgres, the Sync sent before
    /// the data is ignored; the client's Sync after CopyDone gets ReadyForQuery.
    pub(super) async fn copy_split_extended(
        &mut self,
        batch: &[Message],
        stmt: &Statement,
    ) -> Result<(), SessionError> {
        for m in batch {
            match m.tag() {
                b'E' => {
                    self.client.flush().await?;
                    let dir = self.ctx.directory.load();
                    match crate::copy_in::copy_in_split(&self.ctx, self.role.as_deref(), &dir, stmt, &mut self.client)
                        .await
                    {
                        Ok(tag) => self.client.queue(&messages::command_complete(&tag)),
                        Err(crate::copy_in::CopyError::Client(e)) => return Err(e.into()),
                        Err(crate::copy_in::CopyError::Sql(e)) => self.client.queue(&e.to_message(Severity::Error)),
                    }
                    break;
                }
                _ => self.reply_for_statement_message(m),
            }
        }
        self.client.flush().await?;
        Ok(())
    }

    /// `COPY … TO STDOUT` without a tenant, as a simple query.
    pub(super) async fn run_copy_out_fanout(
        &mut self,
        stmt: &Statement,
        shards: Vec<ShardId>,
    ) -> Result<(), SessionError> {
        match self.copy_out_across(stmt, &shards).await? {
            CopyOutEnd::Done => self.ready().await,
            CopyOutEnd::Refused(e) => self.fail_simple(e).await,
            CopyOutEnd::ShardError => self.ready().await,
        }
    }

    /// `COPY … TO STDOUT` without a tenant through the extended protocol
    /// (tokio-postgres's `copy_out`: Parse, Describe and Sync to prepare it,
    /// then Bind, Execute and Sync): answered as Postgres answers a COPY's
    /// Parse, Bind and Describe, and each Execute runs it on every shard.
    pub(super) async fn copy_out_fanout_extended(
        &mut self,
        batch: &[Message],
        stmt: &Statement,
        shards: Vec<ShardId>,
    ) -> Result<(), SessionError> {
        for m in batch {
            match m.tag() {
                b'E' => match self.copy_out_across(stmt, &shards).await? {
                    CopyOutEnd::Done => {}
                    CopyOutEnd::Refused(e) => return self.fail_batch(e, true).await,
                    // As after any error, the rest of the batch is skipped.
                    CopyOutEnd::ShardError => break,
                },
                _ => self.reply_for_statement_message(m),
            }
        }
        self.ready().await
    }

    /// Every shard's rows of a `COPY … TO STDOUT`, one shard after another,
    /// as one copy (a CSV header only once; one binary header and trailer,
    /// see [`BinaryJoin`]). Queues the client's messages up to CommandComplete
    /// or a shard's error, not ReadyForQuery.
    async fn copy_out_across(&mut self, stmt: &Statement, shards: &[ShardId]) -> Result<CopyOutEnd, SessionError> {
        if let Err(e) = self.refuse_during_moves(shards, stmt) {
            return Ok(CopyOutEnd::Refused(e));
        }
        let header = matches!(&stmt.kind, StatementKind::Copy(c) if c.header);
        let binary = matches!(&stmt.kind, StatementKind::Copy(c) if c.format == CopyFormat::Binary);
        let dir = self.ctx.directory.load();
        let mut total = 0u64;
        let mut started = false;
        // Binary streams are joined at byte level: one header, one trailer.
        let mut join = binary.then(BinaryJoin::new);
        // Once the client is in copy mode, an error ends the copy first.
        let fail = |client: &mut crate::protocol::Connection<S>, started: bool, e: SqlError| {
            if started {
                client.queue(&messages::simple(b'c'));
            }
            CopyOutEnd::Refused(e)
        };
        for (i, &shard) in shards.iter().enumerate() {
            let name = dir.shards.get(shard).map(|s| s.name.clone()).unwrap_or_default();
            let Some(pool) = self.role_pool(shard) else {
                let e = SqlError::new("XX000", format!("no pool for shard {shard}"));
                return Ok(fail(&mut self.client, started, e));
            };
            let mut conn = match pool.get().await {
                Ok(c) => c,
                Err(e) => return Ok(fail(&mut self.client, started, SqlError::new(e.sqlstate(), e.to_string()))),
            };
            let lost = |e: ProtocolError| SqlError::new("08006", format!("lost the connection to shard {name}: {e}"));
            if let Err(e) = conn.conn.send(&messages::query(&stmt.text)).await {
                conn.broken = true;
                return Ok(fail(&mut self.client, started, lost(e)));
            }
            let mut first_data = true;
            if let Some(j) = join.as_mut() {
                j.start_shard(i == 0, i + 1 == shards.len());
            }
            loop {
                let m = match conn.conn.read().await {
                    Ok(m) => m,
                    Err(e) => {
                        conn.broken = true;
                        return Ok(fail(&mut self.client, started, lost(e)));
                    }
                };
                match m.tag() {
                    b'H' if !started => {
                        self.client.queue(m.raw());
                        started = true;
                    }
                    b'd' => {
                        let body = m.body();
                        match join.as_mut().map(|j| j.data(body)) {
                            Some(out) if out.len() == body.len() => self.client.queue(m.raw()),
                            Some(out) if !out.is_empty() => self.client.queue(&copy_data(&out)),
                            Some(_) => {}
                            None => {
                                let skip = header && i > 0 && first_data;
                                first_data = false;
                                if !skip {
                                    self.client.queue(m.raw());
                                }
                            }
                        }
                        if self.client.queued() > 256 * 1024 {
                            if let Err(e) = self.client.flush().await {
                                // The shard is mid-copy: its connection cannot be reused.
                                conn.broken = true;
                                return Err(e.into());
                            }
                        }
                    }
                    b'C' => {
                        let tag = String::from_utf8_lossy(m.body()).trim_end_matches('\0').to_string();
                        total += tag.rsplit(' ').next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
                    }
                    b'E' => {
                        let err = prefix_error(m.raw(), &name);
                        // Drain to ReadyForQuery so the connection can be reused.
                        while let Ok(m) = conn.conn.read().await {
                            if m.tag() == b'Z' {
                                break;
                            }
                        }
                        if started {
                            self.client.queue(&messages::simple(b'c'));
                        }
                        self.client.queue(&err);
                        return Ok(CopyOutEnd::ShardError);
                    }
                    b'Z' => break,
                    _ => {}
                }
            }
        }
        if started {
            self.client.queue(&messages::simple(b'c'));
        }
        self.client.queue(&messages::command_complete(&format!("COPY {total}")));
        Ok(CopyOutEnd::Done)
    }

    pub(super) async fn run_split_insert(
        &mut self,
        stmt: &Statement,
        parts: Vec<(ShardId, Vec<usize>)>,
    ) -> Result<(), SessionError> {
        let texts = match crate::split::insert_per_shard(&stmt.text, &parts) {
            Ok(t) => t,
            Err(e) => return self.fail_simple(e).await,
        };
        let two_phase = self.ctx.two_phase();
        if two_phase && self.txn.in_block() {
            // Each shard's rows join the block; its COMMIT commits them all.
            return self.run_parts_in_block(texts, Gathered::split_insert(&parts)).await;
        }
        if two_phase && texts.len() > 1 {
            return self.run_split_insert_atomically(texts, Gathered::split_insert(&parts)).await;
        }
        // cross_shard_transactions = "refuse": each shard's part commits on its own.
        let mut gathered = Gathered::split_insert(&parts);
        for (shard, sql) in texts {
            match self.collect_on(shard, &sql).await {
                Err(e) => return self.fail_simple(e).await,
                Ok((_, Some(err))) => {
                    let dir = self.ctx.directory.load();
                    let name = dir.shards.get(shard).map(|x| x.name.clone()).unwrap_or_default();
                    self.client.queue(&prefix_error(&err, &name));
                    return self.ready().await;
                }
                Ok((replies, None)) => gathered.add(replies),
            }
        }
        gathered.answer(&mut self.client);
        self.ready().await
    }

    pub(super) async fn run_copy_split(&mut self, stmt: &Statement, _query: Bytes) -> Result<(), SessionError> {
        let dir = self.ctx.directory.load();
        let result = crate::copy_in::copy_in_split(&self.ctx, self.role.as_deref(), &dir, stmt, &mut self.client).await;
        match result {
            Ok(tag) => {
                self.client.queue(&messages::command_complete(&tag));
                self.ready().await
            }
            Err(crate::copy_in::CopyError::Client(e)) => Err(e.into()),
            Err(crate::copy_in::CopyError::Sql(e)) => self.fail_simple(e).await,
        }
    }
}

/// How a fanned-out `COPY … TO STDOUT` ended.
enum CopyOutEnd {
    /// Every shard's rows and CommandComplete were queued.
    Done,
    /// Refused by the router: the error is still to be answered.
    Refused(SqlError),
    /// A shard's ErrorResponse was queued.
    ShardError,
}

/// How a split INSERT's execution inside a pipeline went.
pub(super) enum SplitRun {
    /// Every shard ran its rows; the replies are queued.
    Ran,
    /// A shard failed its part, or the router refused it: the error is
    /// queued, and the pipeline's transaction fails.
    Failed,
    /// A shard's connection was lost: the client has had its error and
    /// ReadyForQuery.
    Answered,
}

/// One shard's replies to a split INSERT's part (after its BEGIN's): what a
/// Describe of the portal answered, the rows, the rows written, and (first
/// shard only) what a Describe of the client's statement answered.
#[derive(Default)]
struct PartReply {
    portal: Option<Bytes>,
    rows: Vec<Bytes>,
    written: u64,
    statement: Vec<Bytes>,
}

impl PartReply {
    fn read(replies: Vec<Bytes>) -> PartReply {
        let mut part = PartReply::default();
        let mut done = false;
        for r in replies {
            match r.first() {
                Some(b'T' | b'n') if !done && part.portal.is_none() => part.portal = Some(r),
                Some(b'D') if !done => part.rows.push(r),
                Some(b'C') if !done => {
                    part.written = command_count(&r);
                    done = true;
                }
                Some(b't' | b'T' | b'n') if done => part.statement.push(r),
                _ => {}
            }
        }
        part
    }
}

/// A Bind of the unnamed statement to the unnamed portal, with the client's
/// parameters `kept` (in that order), their formats, and its result formats.
fn bind_kept(bind: &messages::Bind<'_>, kept: &[usize]) -> Bytes {
    let mut b = messages::Builder::new(b'B');
    b.cstr("").cstr("").i16(kept.len() as i16);
    for &k in kept {
        b.i16(bind.format_of(k));
    }
    b.i16(kept.len() as i16);
    for &k in kept {
        match bind.params.get(k).copied().flatten() {
            Some(v) => {
                b.i32(v.len() as i32).bytes(v);
            }
            None => {
                b.i32(-1);
            }
        }
    }
    b.bytes(bind.tail);
    b.finish()
}

/// Whether an Execute among `msgs` asks for a limited number of the
/// statement's RETURNING rows: a split INSERT runs each shard's part whole,
/// so it cannot stop after N of them and suspend the portal as Postgres
/// would. Without RETURNING there are no rows to limit (pgjdbc asks for one
/// row of every statement of a batch).
fn row_limited(msgs: &[Message], stmt: &Statement) -> bool {
    stmt.insert.as_ref().is_some_and(|i| i.has_returning)
        && msgs.iter().filter(|m| m.tag() == b'E').any(|m| {
            let mut r = messages::Reader::new(m.body(), "Execute");
            r.cstr().and_then(|_| r.i32()).unwrap_or(0) > 0
        })
}

fn row_limit_refused() -> SqlError {
    SqlError::new("0A000", "a row limit on a multi-row INSERT whose rows are for several shards".into())
        .hint("execute it without a row limit (fetch size), or send one tenant's rows per statement")
}

fn execute_unnamed() -> Bytes {
    messages::Builder::new(b'E').cstr("").i32(0).finish()
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// A multi-row INSERT whose rows are for several shards, sent with the
    /// extended protocol (pgjdbc's `reWriteBatchedInserts`, an ORM's bulk
    /// insert), outside a transaction block: each shard's rows with their own
    /// parameters (renumbered, formats kept) in a transaction on that shard,
    /// committed together (two-phase commit): all rows or none.
    pub(super) async fn run_split_insert_extended(
        &mut self,
        batch: &[Message],
        stmt: &Statement,
        parts: Vec<(ShardId, Vec<usize>)>,
    ) -> Result<(), SessionError> {
        let in_block = self.txn.in_block();
        let binds: Vec<&Message> = batch.iter().filter(|m| m.tag() == b'B').collect();
        if binds.len() != 1 || batch.iter().filter(|m| m.tag() == b'E').count() != 1 {
            // Several executions before one Sync go through the pipeline
            // across shards; this is what is left: one portal run twice.
            let e = SqlError::new(
                "0A000",
                "a multi-row INSERT whose rows are for several shards runs once per portal".into(),
            )
            .hint("bind the statement again for each execution");
            return self.fail_batch(e, true).await;
        }
        if row_limited(batch, stmt) {
            return self.fail_batch(row_limit_refused(), true).await;
        }
        let describe_statement =
            batch.iter().any(|m| m.tag() == b'D' && matches!(messages::target_and_name(m), Ok((b'S', _))));
        let runs = match self.split_insert_runs(binds[0], stmt, &parts, !in_block, describe_statement) {
            Ok(r) => r,
            Err(e) => return self.fail_batch(e, true).await,
        };
        if in_block {
            return self.run_split_insert_in_block(batch, runs, &parts).await;
        }
        let (mut open, replies) = match self.open_parts(runs).await {
            Ok(o) => o,
            Err(err) => {
                crate::metrics::global().error_message(&err[5..]);
                self.client.queue(&err);
                self.client.queue(&messages::ready_for_query_bytes(self.status()));
                self.client.flush().await?;
                return Ok(());
            }
        };
        let replies: Vec<PartReply> = replies.into_iter().map(PartReply::read).collect();
        let Some(mut decider) = open.pop() else {
            return self.fail_batch(SqlError::new("XX000", "no shard took the INSERT".into()), true).await;
        };
        if let Err(e) = self.commit_parts(&mut decider, &mut open).await? {
            return self.fail_batch(e, true).await;
        }
        self.answer_split_insert(batch, &replies, &parts).await
    }

    /// Each shard's part of a split INSERT's execution, as extended-protocol
    /// messages ending in Sync: the statement's rows for that shard with
    /// their own parameters (renumbered, formats kept), described and run on
    /// the unnamed portal. `begin` opens a transaction first (in the same
    /// pipeline: one ReadyForQuery for the lot); `describe_statement` has the
    /// first shard describe the client's statement as the client prepared it.
    fn split_insert_runs(
        &self,
        bind: &Message,
        stmt: &Statement,
        parts: &[(ShardId, Vec<usize>)],
        begin: bool,
        describe_statement: bool,
    ) -> Result<Vec<(ShardId, Bytes)>, SqlError> {
        let bind = messages::Bind::parse(bind).map_err(|e| SqlError::new("08P01", e.to_string()))?;
        let p = self.prepared.get(bind.statement).ok_or_else(|| super::prepared::unknown_statement(bind.statement))?;
        let texts = crate::split::insert_per_shard(&stmt.text, parts)?;
        let mut runs = Vec::with_capacity(texts.len());
        for (i, (shard, text)) in texts.into_iter().enumerate() {
            let (text, kept) = crate::split::renumber_params(&text)?;
            let types: Vec<i32> = kept.iter().map(|&k| p.param_types.get(k).copied().unwrap_or(0)).collect();
            let mut run = bytes::BytesMut::new();
            if begin {
                run.extend_from_slice(&messages::parse("", "BEGIN", &[]));
                run.extend_from_slice(&messages::Builder::new(b'B').cstr("").cstr("").i16(0).i16(0).i16(0).finish());
                run.extend_from_slice(&execute_unnamed());
            }
            run.extend_from_slice(&messages::parse("", &text, &types));
            run.extend_from_slice(&bind_kept(&bind, &kept));
            run.extend_from_slice(&messages::describe(b'P', ""));
            run.extend_from_slice(&execute_unnamed());
            if i == 0 && describe_statement {
                run.extend_from_slice(&messages::parse("", &p.sql, &p.param_types));
                run.extend_from_slice(&messages::describe(b'S', ""));
            }
            run.extend_from_slice(&messages::sync());
            runs.push((shard, run.freeze()));
        }
        Ok(runs)
    }

    /// Inside a transaction block: each shard's rows join the block on that
    /// shard (two-phase commit at the block's COMMIT); a part that fails
    /// fails the block, whose end rolls back every shard.
    async fn run_split_insert_in_block(
        &mut self,
        batch: &[Message],
        runs: Vec<(ShardId, Bytes)>,
        parts: &[(ShardId, Vec<usize>)],
    ) -> Result<(), SessionError> {
        let mut replies = Vec::with_capacity(runs.len());
        for (shard, run) in runs {
            let swallow = match self.checkout(shard).await {
                Ok(n) => n,
                Err(e) => return self.fail_batch(e, true).await,
            };
            let Some(b) = self.txn.held.as_mut() else {
                return self.fail_batch(SqlError::new("XX000", "no connection held in the block".into()), true).await;
            };
            b.conn.conn.queue(&run);
            let (answer, error) = match self.run_part(swallow).await {
                Ok(r) => r,
                Err(e) => return self.lost_backend(e).await,
            };
            if let Some(e) = error {
                let name = self.shard_name(shard);
                crate::metrics::global().error_message(e.get(5..).unwrap_or_default());
                self.client.queue(&prefix_error(&e, &name));
                self.txn.aborted = true;
                self.client.queue(&messages::ready_for_query_bytes(self.status()));
                self.client.flush().await?;
                return Ok(());
            }
            replies.push(PartReply::read(answer));
        }
        self.answer_split_insert(batch, &replies, parts).await
    }

    /// The client's replies to a split INSERT: the first part's descriptions,
    /// every part's rows (in VALUES order), and the rows written summed.
    async fn answer_split_insert(
        &mut self,
        batch: &[Message],
        replies: &[PartReply],
        parts: &[(ShardId, Vec<usize>)],
    ) -> Result<(), SessionError> {
        self.queue_split_answer(batch, replies, Some(parts));
        self.client.queue(&messages::ready_for_query_bytes(self.status()));
        self.client.flush().await?;
        Ok(())
    }

    /// One execution of a split INSERT inside a pipeline across shards (its
    /// messages from Bind to Execute): each shard's rows run on that shard in
    /// the pipeline's transaction, and the client is answered as for one
    /// statement.
    pub(super) async fn run_split_in_pipeline(
        &mut self,
        msgs: &[Message],
        bind: &Message,
        stmt: &Statement,
        parts: &[(ShardId, Vec<usize>)],
    ) -> Result<SplitRun, SessionError> {
        let runs = match self.split_insert_runs(bind, stmt, parts, false, false) {
            Ok(_) if row_limited(msgs, stmt) => Err(row_limit_refused()),
            other => other,
        };
        let runs = match runs {
            Ok(r) => r,
            Err(e) => {
                crate::metrics::global().error(e.code);
                self.client.queue(&e.to_message(Severity::Error));
                return Ok(SplitRun::Failed);
            }
        };
        let mut replies = Vec::with_capacity(runs.len());
        for (shard, run) in runs {
            let swallow = match self.checkout(shard).await {
                Ok(n) => n,
                Err(e) => {
                    crate::metrics::global().error(e.code);
                    self.client.queue(&e.to_message(Severity::Error));
                    return Ok(SplitRun::Failed);
                }
            };
            let Some(b) = self.txn.held.as_mut() else { return Ok(SplitRun::Failed) };
            b.conn.conn.queue(&run);
            let (part, error) = match self.run_part(swallow).await {
                Ok(r) => r,
                Err(e) => return self.lost_backend(e).await.map(|()| SplitRun::Answered),
            };
            if let Some(e) = error {
                // As on one Postgres: the Bind (and a Describe) answered,
                // then the Execute's error.
                replies.push(PartReply::read(part));
                let before = msgs.iter().position(|m| m.tag() == b'E').unwrap_or(msgs.len());
                self.queue_split_answer(&msgs[..before], &replies, None);
                let name = self.shard_name(shard);
                crate::metrics::global().error_message(e.get(5..).unwrap_or_default());
                self.client.queue(&prefix_error(&e, &name));
                return Ok(SplitRun::Failed);
            }
            replies.push(PartReply::read(part));
        }
        self.queue_split_answer(msgs, &replies, Some(parts));
        Ok(SplitRun::Ran)
    }

    /// Queues the client's replies to a split INSERT's messages, without
    /// ReadyForQuery; the rows in the order of the VALUES rows when `order`
    /// gives each reply's rows (see [`crate::split::in_values_order`]).
    fn queue_split_answer(&mut self, batch: &[Message], parts: &[PartReply], order: Option<&[(ShardId, Vec<usize>)]>) {
        let first = parts.first();
        for m in batch {
            match m.tag() {
                b'D' if matches!(messages::target_and_name(m), Ok((b'S', _))) => {
                    for r in first.map(|f| f.statement.as_slice()).unwrap_or_default() {
                        self.client.queue(r);
                    }
                }
                b'D' => match first.and_then(|f| f.portal.as_ref()) {
                    Some(r) => self.client.queue(r),
                    None => self.client.queue(&messages::no_data()),
                },
                b'E' => {
                    let rows: Vec<Vec<&Bytes>> = parts.iter().map(|p| p.rows.iter().collect()).collect();
                    let rows = match order {
                        Some(order) => crate::split::in_values_order(order, rows),
                        None => rows.into_iter().flatten().collect(),
                    };
                    for r in rows {
                        self.client.queue(r);
                    }
                    let total: u64 = parts.iter().map(|p| p.written).sum();
                    self.client.queue(&messages::command_complete(&format!("INSERT 0 {total}")));
                }
                _ => self.reply_for_statement_message(m),
            }
        }
    }
}

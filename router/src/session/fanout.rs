//! Cross-shard reads: the fan-out plan, the statement as each shard runs it
//! (moving rows counted once), and answers gathered whole and merged (grouped
//! reads, aggregates).

use bytes::Bytes;
use shardgate_directory::ShardId;
use tokio::io::{AsyncRead, AsyncWrite};

use super::prepared::unknown_statement;
use super::reply::prefix_error;
use super::{Session, SessionError};
use crate::error::SqlError;
use crate::protocol::messages::{self, Bind, Parse};
use crate::protocol::Message;
use crate::sql::Statement;

/// How a streamed cross-shard read answers: as a simple query, or as the
/// client's extended-protocol pipeline (its messages, and the result formats
/// its Bind asked for).
pub(super) enum Answer<'a> {
    Simple,
    /// `relayed`: the shards answer in the client's formats (rows only passed
    /// on), else in text, converted row by row.
    Extended {
        batch: &'a [Message],
        formats: &'a [i16],
        relayed: bool,
        /// The Execute's row limit (0: none): that many rows, then
        /// PortalSuspended.
        max_rows: usize,
    },
}

/// A shard's collected answer: its ParameterDescription, RowDescription and
/// DataRows (the last of each description).
pub(super) fn split_answer(replies: Vec<Bytes>) -> (Option<Bytes>, Option<Bytes>, Vec<Bytes>) {
    let (mut params, mut rd, mut rows) = (None, None, Vec::new());
    for r in replies {
        match r.first() {
            Some(b't') => params = Some(r),
            Some(b'T') => rd = Some(r),
            Some(b'D') => rows.push(r),
            _ => {}
        }
    }
    (params, rd, rows)
}

/// The portal a Bind creates.
pub(super) fn portal_name(bind: &Message) -> &[u8] {
    let body = bind.body();
    &body[..body.iter().position(|&b| b == 0).unwrap_or(0)]
}

/// The result format codes at the start of a Bind's tail.
pub(super) fn result_formats(tail: &[u8]) -> Option<Vec<i16>> {
    let mut r = messages::Reader::new(tail, "Bind");
    let n = r.i16().ok()?;
    (0..n.max(0)).map(|_| r.i16().ok()).collect()
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Runs `runs[i]` (messages ending in one ReadyForQuery) on `shards[i]`,
    /// all at once, and collects each answer. Inside a transaction block the
    /// shards it reached run theirs on its connections, seeing its writes.
    async fn collect_from(
        &mut self,
        shards: &[ShardId],
        runs: &[Vec<u8>],
    ) -> Vec<Result<(Vec<Bytes>, Option<Bytes>), SqlError>> {
        let mut block = self.take_block_parts();
        let own: Vec<Option<super::transaction::Held>> = shards.iter().map(|&s| block.take(s)).collect();
        let this = &*self;
        let parts = shards.iter().zip(runs).zip(own).map(|((&s, run), own)| async move {
            match own {
                None => (this.collect_messages_on(s, run).await, None),
                Some(mut h) => {
                    let prelude = this.settings.prelude(&mut h.conn);
                    (super::everywhere::collect_messages(&mut h.conn, run, prelude, true).await, Some(h))
                }
            }
        });
        let answers = futures::future::join_all(parts).await;
        let mut failed = false;
        let mut out = Vec::with_capacity(answers.len());
        for (answer, own) in answers {
            if let Some(h) = own {
                // An error fails the block on that shard, as a broken connection does.
                failed |= h.conn.broken || !matches!(&answer, Ok((_, None)));
                block.parts.push(h);
            }
            out.push(answer);
        }
        self.return_block_parts(block, failed);
        out
    }

    /// A read without a tenant: every shard (concurrently), results merged.
    pub(super) async fn run_fanout(&mut self, stmt: &Statement, shards: Vec<ShardId>) -> Result<(), SessionError> {
        let plan = match self.plan_fanout(&stmt.text) {
            Ok(p) => p,
            Err(e) => return self.fail_simple(SqlError::new("0A000", e.to_string())).await,
        };
        let texts = match self.shard_texts(&shards, &plan.shard_sql, stmt) {
            Ok(t) => t,
            Err(e) => return self.fail_simple(e).await,
        };
        let streamed = plan.merge.streamed();
        if let Some(merge) = streamed {
            let read = |sql: &str| messages::query(sql).to_vec();
            return self.stream_fanout(Answer::Simple, &shards, &plan.shard_sql, texts, read, &merge).await;
        }
        let runs: Vec<Vec<u8>> = texts
            .iter()
            .map(|sql| messages::query(sql.as_deref().unwrap_or(plan.shard_sql.as_str())).to_vec())
            .collect();
        let answers = self.collect_from(&shards, &runs).await;
        let dir = self.ctx.directory.load();
        let mut results = Vec::with_capacity(answers.len());
        for (answer, &s) in answers.into_iter().zip(&shards) {
            match answer {
                Err(e) => return self.fail_simple(e).await,
                Ok((_, Some(err))) => {
                    let name = dir.shards.get(s).map(|x| x.name.as_str()).unwrap_or("?");
                    self.client.queue(&prefix_error(&err, name));
                    return self.ready().await;
                }
                Ok((replies, None)) => {
                    let (_, rd, rows) = split_answer(replies);
                    let Some(row_description) = rd else {
                        return self
                            .fail_simple(SqlError::new("0A000", "a cross-shard statement must return rows".into()))
                            .await;
                    };
                    results.push(crate::fanout::ShardResult { row_description, rows });
                }
            }
        }
        match crate::fanout::merge(
            &plan.merge,
            results,
            self.ctx.c_collation.load(std::sync::atomic::Ordering::Relaxed),
        ) {
            Ok(merged) => {
                self.client.queue(&merged.row_description);
                for r in &merged.rows {
                    self.client.queue(r);
                    if self.client.queued() > 256 * 1024 {
                        self.client.flush().await?;
                    }
                }
                self.client.queue(&messages::command_complete(&merged.command_tag));
                self.ready().await
            }
            Err(e) => self.fail_simple(SqlError::new("0A000", e.to_string())).await,
        }
    }

    /// A read without a tenant, sent with the extended protocol, whose answers
    /// must be merged (sorting, limits, aggregates). Each shard runs the planned
    /// text as an unnamed statement with the client's parameters and text results;
    /// the merged rows go back in the formats the client's Bind asked for, with a
    /// reply for each of the client's messages as Postgres would give them.
    pub(super) async fn run_fanout_extended(
        &mut self,
        batch: &[Message],
        shards: Vec<ShardId>,
        plan: crate::fanout::FanoutPlan,
        stmt: &Statement,
    ) -> Result<(), SessionError> {
        let Some(bind_msg) = batch.iter().find(|m| m.tag() == b'B') else {
            return self.fail_batch(SqlError::new("08P01", "a batch to run has no Bind".into()), true).await;
        };
        let bind = match Bind::parse(bind_msg) {
            Ok(b) => b,
            Err(e) => return self.fail_batch(SqlError::new("08P01", e.to_string()), true).await,
        };
        let Some(param_types) = self.prepared.get(bind.statement).map(|p| p.param_types.clone()) else {
            return self.fail_batch(unknown_statement(bind.statement), true).await;
        };
        let result_formats = match result_formats(bind.tail) {
            Some(f) => f,
            None => return self.fail_batch(SqlError::new("08P01", "malformed Bind message".into()), true).await,
        };
        let in_parts = || {
            SqlError::new(
                "0A000",
                "a cross-shard query whose rows are merged cannot be fetched in parts (several Executes with a row limit)".into(),
            )
            .hint("fetch every row at once (no fetch size), or add a tenant_id condition so the query runs on one shard")
        };
        // A row limit (asyncpg's fetchrow and fetchval ask for 1 row): the
        // first rows, then PortalSuspended. Outside a transaction block the
        // portal ends at the Sync, so no one can ask for the rest.
        let mut max_rows = 0usize;
        let executes = batch.iter().filter(|m| m.tag() == b'E').count();
        for m in batch.iter().filter(|m| m.tag() == b'E') {
            let mut r = messages::Reader::new(m.body(), "Execute");
            let limit = r.cstr().and_then(|_| r.i32()).unwrap_or(0);
            if limit > 0 {
                if executes != 1 {
                    return self.fail_batch(in_parts(), true).await;
                }
                max_rows = limit as usize;
            }
        }
        let texts = match self.shard_texts(&shards, &plan.shard_sql, stmt) {
            Ok(t) => t,
            Err(e) => return self.fail_batch(e, true).await,
        };
        // Rows that are only relayed come in the client's formats, any type;
        // rows the router compares or combines come in text.
        let relayed = plan.merge == crate::fanout::MergeSpec::Concat;
        let shard_formats: &[i16] = if relayed { &result_formats } else { &[0] };
        let read = |sql: &str| -> Vec<u8> {
            let mut b = messages::Builder::new(b'B');
            b.cstr("").cstr("").i16(bind.param_formats.len() as i16);
            for &f in &bind.param_formats {
                b.i16(f);
            }
            b.i16(bind.params.len() as i16);
            for p in &bind.params {
                match p {
                    Some(v) => b.i32(v.len() as i32).bytes(v),
                    None => b.i32(-1),
                };
            }
            b.i16(shard_formats.len() as i16);
            for &f in shard_formats {
                b.i16(f);
            }
            [
                messages::parse("", sql, &param_types),
                messages::describe(b'S', ""),
                b.finish(),
                messages::Builder::new(b'E').cstr("").i32(0).finish(),
                messages::sync(),
            ]
            .concat()
        };
        let streamed = plan.merge.streamed();
        if let (Some(merge), 1) = (streamed, executes) {
            let answer = Answer::Extended { batch, formats: &result_formats, relayed, max_rows };
            return self.stream_fanout(answer, &shards, &plan.shard_sql, texts, read, &merge).await;
        }
        let runs: Vec<Vec<u8>> =
            texts.iter().map(|sql| read(sql.as_deref().unwrap_or(plan.shard_sql.as_str()))).collect();
        let answers = self.collect_from(&shards, &runs).await;
        let dir = self.ctx.directory.load();
        let mut results = Vec::with_capacity(answers.len());
        let mut params_description = None;
        for (answer, &s) in answers.into_iter().zip(&shards) {
            match answer {
                Err(e) => return self.fail_batch(e, true).await,
                Ok((replies, Some(err))) => {
                    // As in Postgres: a statement whose Parse failed does not exist.
                    if !replies.iter().any(|r| r.first() == Some(&b'1')) {
                        for m in batch.iter().filter(|m| m.tag() == b'P') {
                            if let Ok(p) = Parse::parse(m) {
                                self.prepared.remove(p.name);
                            }
                        }
                    }
                    let name = dir.shards.get(s).map(|x| x.name.as_str()).unwrap_or("?");
                    self.client.queue(&prefix_error(&err, name));
                    return self.ready().await;
                }
                Ok((replies, None)) => {
                    let (params, rd, rows) = split_answer(replies);
                    if params.is_some() {
                        params_description = params;
                    }
                    let Some(row_description) = rd else {
                        let e = SqlError::new("0A000", "a cross-shard statement must return rows".into());
                        return self.fail_batch(e, true).await;
                    };
                    results.push(crate::fanout::ShardResult { row_description, rows });
                }
            }
        }
        let c_collation = self.ctx.c_collation.load(std::sync::atomic::Ordering::Relaxed);
        let merged = crate::fanout::merge(&plan.merge, results, c_collation).and_then(|m| {
            if relayed {
                // Already in the client's formats.
                let mut m = m;
                let f = crate::fanout::ClientFormats::as_sent(&m.row_description, &result_formats)?;
                let rows = std::mem::take(&mut m.rows);
                Ok((m, f.row_description, rows))
            } else {
                crate::fanout::in_formats(&m, &result_formats).map(|(rd, rows)| (m, rd, rows))
            }
        });
        let (merged, client_rd, rows) = match merged {
            Ok(m) => m,
            Err(e) => return self.fail_batch(SqlError::new(e.sqlstate(), e.to_string()), true).await,
        };
        // As in Postgres, a limit the rows reach suspends the portal (more
        // may follow).
        let suspended = max_rows > 0 && rows.len() >= max_rows;
        if suspended && self.txn.in_block() {
            // The portal outlives the Sync here; what follows it is not kept.
            self.txn.suspended_portal = Some(String::from_utf8_lossy(portal_name(bind_msg)).into_owned());
        }
        let sent = if suspended { &rows[..max_rows] } else { &rows[..] };
        for m in batch {
            if m.tag() != b'E' {
                let described = &merged.row_description;
                self.reply_around_execute(std::slice::from_ref(m), params_description.as_ref(), described, &client_rd);
                continue;
            }
            for r in sent {
                self.client.queue(r);
                if self.client.queued() > 256 * 1024 {
                    self.client.flush().await?;
                }
            }
            if suspended {
                self.client.queue(&messages::simple(b's'));
            } else {
                self.client.queue(&messages::command_complete(&merged.command_tag));
            }
        }
        self.ready().await
    }

    /// The fan-out plan of `sql`, with the cluster's key column and the
    /// catalog's tables.
    pub(super) fn plan_fanout(&self, sql: &str) -> Result<crate::fanout::FanoutPlan, crate::fanout::FanoutError> {
        let key_column = self.ctx.directory.load().key_column.clone();
        crate::fanout::plan(sql, &key_column, &|t| self.ctx.catalog.columns(t))
    }

    /// Per shard, the text of a cross-shard read with rows under a move left out
    /// where they are not owned (see [`crate::hold::without_moving_rows`]).
    pub(super) fn shard_texts(
        &self,
        shards: &[ShardId],
        sql: &str,
        stmt: &Statement,
    ) -> Result<Vec<Option<String>>, SqlError> {
        let dir = self.ctx.directory.load();
        if dir.moves.values().all(|m| !m.phase.active()) {
            return Ok(vec![None; shards.len()]);
        }
        let tables: Vec<&str> =
            stmt.tables.iter().filter(|t| self.ctx.catalog.is_sharded(t)).map(|t| t.as_str()).collect();
        shards.iter().map(|&s| crate::hold::without_moving_rows(&dir, s, sql, &tables)).collect()
    }

    /// Cross-shard statements the router cannot rewrite per shard (COPY):
    /// refused while a move keeps a second copy of their rows.
    pub(super) fn refuse_during_moves(&self, shards: &[ShardId], stmt: &Statement) -> Result<(), SqlError> {
        if self.shard_texts(shards, &stmt.text, stmt)?.iter().any(Option::is_some) {
            return Err(SqlError::new(
                "55000",
                "this cross-shard read cannot run while rows of its tables are being moved between shards".into(),
            )
            .hint("send it as a SELECT, name the tenant (WHERE tenant_id = …), or retry after the move"));
        }
        Ok(())
    }
}

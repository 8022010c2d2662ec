//! The extended query protocol: Parse/Bind/Describe/Execute/Close collected up
//! to Sync (or Flush), routed as one batch, and run on one shard, on every
//! shard, or merged across shards. `bind_execute` is the fast path for the
//! batch a client with prepared statements sends most.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use super::admission::route_kind;
use super::everywhere::everywhere;
use super::prepared::{ensure_prepared, unknown_statement};
use super::relay::{Expect, RelayError};
use super::shadow::ShadowedBatch;
use super::twophase::{Combine, Control};
use super::{Session, SessionError};
use crate::error::SqlError;
use crate::protocol::messages::{self, target_and_name, Bind, Parse, Severity};
use crate::protocol::Message;
use crate::route::{self, Params, Target};
use crate::shadow::RowDigest;
use crate::sql::{Analysis, SettingChange, SqlPrepared, StatementKind, TxnControl};
use shardgate_directory::ShardId;

/// A batch's statements and where they run, from its Parse and Bind messages.
struct RoutedBatch {
    /// Where the pipeline runs (None: it binds nothing).
    target: Option<Target>,
    /// The first reason the batch cannot run.
    error: Option<SqlError>,
    /// The statements its Binds run: nearly always one, kept inline.
    statements: smallvec::SmallVec<[Arc<Analysis>; 2]>,
    /// The first error is that its Binds name tenants on different shards.
    several_shards: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Runs the collected Parse/Bind/Describe/Execute/Close messages, ending with
    /// Sync (`sync`) or Flush.
    pub(super) async fn run_batch(&mut self, sync: bool) -> Result<(), SessionError> {
        if !sync && self.batch.is_empty() {
            // A Flush with nothing collected since the last Sync or Flush
            // (psycopg 3 sends Sync, Flush after each pipeline): every reply
            // has gone out already, and there is nothing to run. Run as an
            // empty batch, it would take a connection and mark the session as
            // mid-pipeline, and the next pipeline across shards be refused.
            self.client.flush().await?;
            return Ok(());
        }
        // The messages run from a Vec of their own while the next batch collects
        // into the spare one: no allocation per batch once both have grown.
        let spare = std::mem::take(&mut self.spare_batch);
        let mut batch = std::mem::replace(&mut self.batch, spare);
        let result = match self.bind_execute(sync, &batch).await {
            Ok(true) => Ok(()),
            Ok(false) => self.run_batch_of(sync, &mut batch).await,
            Err(e) => Err(e),
        };
        batch.clear();
        self.spare_batch = batch;
        if !self.batch_aliases.is_empty() {
            self.drop_aliases();
        }
        self.batch_before = super::prepared::Remembered::Nothing;
        result?;
        if self.txn.skipping {
            // As Postgres after an error: the client's messages up to its
            // Sync are skipped, and the Sync ends the pipeline.
            self.skip_to_sync().await?;
            return self.end_skipped_pipeline().await;
        }
        Ok(())
    }

    /// Ends, at the client's Sync, a pipeline whose server failed a
    /// Flush-ended part: the server skipped what came after the error, and
    /// answers the Sync with its ReadyForQuery.
    pub(super) async fn end_skipped_pipeline(&mut self) -> Result<(), SessionError> {
        self.txn.skipping = false;
        let Some(b) = self.txn.held.as_mut() else {
            return self.ready().await;
        };
        b.conn.conn.queue(&messages::sync());
        if let Err(e) = b.conn.conn.flush().await {
            return self.lost_backend(e).await;
        }
        let mut expects = std::mem::take(&mut self.spare_expects);
        expects.clear();
        expects.push_back(Expect::Sync);
        let started = crate::clock::Stamp::now();
        let relayed = self.relay_batch(expects, None).await;
        self.batch_relayed(relayed, started, &[], &[], None).await
    }

    /// The general path for a batch: admitted, routed as one, then answered by
    /// the router, run on one shard, or run across shards.
    pub(super) async fn run_batch_of(&mut self, sync: bool, batch: &mut Vec<Message>) -> Result<(), SessionError> {
        if self.multi.is_some() {
            return self
                .fail_batch(
                    SqlError::new(
                        "0A000",
                        "a transaction open on every shard (one that began with DDL) takes simple queries only".into(),
                    )
                    .hint("send the migration's statements as simple queries"),
                    sync,
                )
                .await;
        }
        if sync && batch.len() == 1 && self.txn.held.is_none() {
            // A lone Sync (e.g. after COPY, or an empty pipeline): nothing to run.
            return self.ready().await;
        }
        if let Some(e) = self.admit_batch(batch).await {
            return self.fail_batch(e, sync).await;
        }
        let mut sync = sync;
        // The server's transaction block failed (an error on the shard): it
        // answers each message as Postgres does, Parse included.
        let server_failed = self.txn.held.is_some() && self.txn.last_status == b'E';
        // The Binds' routes, found looking for the first refusal and used
        // again by `route_batch`.
        let mut routes = None;
        if self.txn.aborted && !server_failed {
            if let Some(done) = self.in_failed_transaction(batch, sync).await {
                return done;
            }
        } else {
            let mut touched = std::mem::take(&mut self.admission.touched);
            touched.clear();
            let mut found = Vec::new();
            let refused = self.first_refused(batch, server_failed, &mut found, &mut touched);
            self.admission.touched = touched;
            routes = Some(found);
            match refused {
                None => {}
                Some((0, e)) => return self.fail_batch(e, sync).await,
                Some((at, _)) => {
                    // As in Postgres, the messages before the one refused run
                    // (a part ended by Flush), and the refusal comes in its
                    // place: the rest goes back to be read again, from the
                    // refused message to the Sync (or the Flush).
                    let mut rest = batch.split_off(at);
                    if !sync {
                        rest.push(Message::from_raw(messages::simple(b'H')));
                    }
                    self.pushback.extend(rest);
                    sync = false;
                }
            }
        }
        self.remember_statements(batch, self.txn.aborted || server_failed);
        self.separate_redefinitions(batch);
        if let Some(portal) = &self.txn.suspended_portal {
            // Bound again in this batch: a new portal of that name.
            let rebound = batch.iter().any(|m| m.tag() == b'B' && super::fanout::portal_name(m) == portal.as_bytes());
            let resumed =
                batch.iter().any(|m| m.tag() == b'E' && m.body().split(|&b| b == 0).next() == Some(portal.as_bytes()));
            if rebound {
                self.txn.suspended_portal = None;
            } else if resumed {
                let e = SqlError::new(
                    "0A000",
                    "the rest of a merged cross-shard result suspended by a row limit is not kept".into(),
                )
                .hint("fetch every row of a cross-shard query at once (no fetch size), or name the tenant");
                return self.fail_batch(e, sync).await;
            }
        }
        let RoutedBatch { target, mut error, statements, several_shards } = self.route_batch(batch, routes);
        if sync && (self.txn.in_block() || self.txn.aborted) && rolls_back_then_deallocates(&statements) {
            return Box::pin(self.roll_back_then_deallocate(batch, &statements)).await;
        }
        if several_shards && sync && !self.txn.aborted && self.ctx.two_phase() {
            // One transaction across shards (asyncpg's executemany, a JDBC batch).
            return Box::pin(self.run_pipeline_across(batch, &statements)).await;
        }
        if error.is_none() && !self.pass_holds().await {
            // A cutover held the rows: the placement may have changed, route again.
            self.batch = std::mem::take(batch);
            return Box::pin(self.run_batch(sync)).await;
        }
        if self.txn.aborted {
            let ends = |a: &Analysis| {
                a.statements.len() == 1
                    && matches!(a.statements[0].kind, StatementKind::Txn(TxnControl::Commit | TxnControl::Rollback))
            };
            let all_end = !statements.is_empty() && statements.iter().all(|a| ends(a));
            if all_end {
                // As in Postgres, a failed transaction's COMMIT rolls it back:
                // on every shard it reached, whatever the server thinks.
                self.txn.aborted = false;
                self.txn.pending_begin = None;
                self.roll_back_all().await;
                return self.answer_batch_locally(batch, sync, "ROLLBACK").await;
            }
            // Preparing COMMIT or ROLLBACK is allowed in a failed transaction
            // (tokio-postgres prepares every statement first), as in Postgres.
            let parses: Vec<Option<Arc<Analysis>>> = batch
                .iter()
                .filter(|m| m.tag() == b'P')
                .map(|m| Parse::parse(m).ok().and_then(|p| self.ctx.cache.get(p.query).ok()))
                .collect();
            let prepares_an_end = statements.is_empty()
                && !parses.is_empty()
                && parses.iter().all(|a| a.as_deref().is_some_and(ends))
                && batch.iter().all(|m| matches!(m.tag(), b'P' | b'D' | b'S' | b'H'));
            if prepares_an_end {
                return self.answer_batch_locally(batch, sync, "").await;
            }
            if !server_failed {
                // Refused at its first message: nothing it parsed is defined
                // (but a Parse of the unnamed statement drops it first, as in
                // Postgres). A shard whose block failed too answers for
                // itself, message by message.
                self.statements_as_at(0, batch);
                error = Some(SqlError::new(
                    "25P02",
                    "current transaction is aborted, commands ignored until end of transaction block".into(),
                ));
            }
        }
        if let Some(e) = error {
            // Refused whole, in place of its first message's answer.
            self.statements_as_at(0, batch);
            return self.fail_batch(e, sync).await;
        }
        let alone = statements.len() == 1;
        for a in &statements {
            match self.cross_shard_control(a, alone) {
                None => {}
                Some(Err(e)) => return self.fail_batch(e, sync).await,
                Some(Ok(Control::Savepoint(op))) => {
                    let text = a.statements[0].text.clone();
                    return match self.savepoint_everywhere(&op, &text).await {
                        Ok(tag) => self.answer_batch_locally(batch, sync, tag).await,
                        Err(e) => {
                            // Failed on the shards, not refused here: the
                            // block can still roll back to a savepoint.
                            self.client.queue(&e.to_message(Severity::Error));
                            if !sync {
                                self.skip_to_sync().await?;
                            }
                            self.client.queue(&messages::ready_for_query_bytes(b'E'));
                            self.client.flush().await?;
                            Ok(())
                        }
                    };
                }
                Some(Ok(_)) if statements.len() != 1 => {
                    let e = SqlError::new(
                        "0A000",
                        "a transaction that has written on several shards ends with COMMIT or ROLLBACK sent on its own"
                            .into(),
                    )
                    .hint("send COMMIT (or ROLLBACK) in a pipeline of its own");
                    return self.fail_batch(e, sync).await;
                }
                Some(Ok(Control::End { commit })) => {
                    let ended = Box::pin(self.end_cross_shard(commit)).await?;
                    match ended {
                        Ok(tag) => self.answer_batch_locally(batch, sync, tag).await?,
                        Err(e) => self.fail_batch(e, sync).await?,
                    }
                    return Ok(());
                }
            }
        }
        // pgjdbc sends a transaction's BEGIN in the pipeline of its first
        // statement. When that statement reads every shard, BEGIN is held back
        // as a BEGIN sent alone is, and the rest runs as a read in the block.
        if let (true, Some(Target::Fanout(_)), None, None) = (sync, &target, &self.txn.held, &self.txn.pending_begin) {
            if let Some(end) = begin_prefix(batch, &statements) {
                // The rest is run (and its statements learnt) again.
                self.statements_as_at(end, batch);
                let rest = batch.split_off(end);
                match self.local_statement(&statements[0].statements[0])? {
                    Some(Ok(tag)) => self.answer_batch_locally(batch, false, &tag).await?,
                    Some(Err(e)) => return self.fail_batch(e, sync).await,
                    None => {}
                }
                *batch = rest;
                return Box::pin(self.run_batch_of(sync, batch)).await;
            }
        }
        // Statements the router answers itself: transaction control before a
        // shard is reached, SET shardgate.tenant, DISCARD ALL and DEALLOCATE.
        if let [a] = &statements[..] {
            if let [stmt] = &a.statements[..] {
                let local = match &stmt.kind {
                    StatementKind::Txn(TxnControl::Begin | TxnControl::Commit | TxnControl::Rollback)
                    | StatementKind::SetTenant(_) => self.txn.held.is_none(),
                    StatementKind::SetVar(SettingChange::DiscardAll)
                    | StatementKind::SqlPrepared(SqlPrepared::Deallocate { .. }) => true,
                    _ => false,
                };
                if local {
                    match self.local_statement(stmt)? {
                        Some(Ok(tag)) => return self.answer_batch_locally(batch, sync, &tag).await,
                        Some(Err(e)) => return self.fail_batch(e, sync).await,
                        None => {}
                    }
                }
            }
        }
        if let Some(t) = &target {
            crate::metrics::global().query(route_kind(t));
        }
        match target.unwrap_or(Target::Any) {
            Target::Shard(s) => self.run_batch_on(s, sync, batch, &statements).await,
            Target::Any => {
                let s = self.any_shard();
                self.run_batch_on(s, sync, batch, &statements).await
            }
            target => Box::pin(self.run_batch_across(target, sync, batch, &statements)).await,
        }
    }

    /// ROLLBACK, then DEALLOCATE, in one pipeline: psycopg 3 in pipeline mode
    /// ends a transaction that rolls back so (its statements prepared in the
    /// transaction are forgotten with it), failed or not. Every shard the
    /// transaction reached rolls back, and the DEALLOCATEs close the session's
    /// statements in the router, as each does sent alone.
    async fn roll_back_then_deallocate(
        &mut self,
        batch: &[Message],
        statements: &[Arc<Analysis>],
    ) -> Result<(), SessionError> {
        self.txn.aborted = false;
        self.txn.pending_begin = None;
        self.roll_back_all().await;
        let mut bound = statements.iter();
        let (mut current, mut failed) = (None, false);
        for m in batch {
            if failed {
                // After an error, nothing more is answered up to the Sync.
                break;
            }
            match m.tag() {
                b'B' => {
                    current = bound.next();
                    self.reply_for_statement_message(m);
                }
                b'E' => {
                    let Some(stmt) = current.and_then(|a| a.statements.first()) else { continue };
                    if matches!(stmt.kind, StatementKind::Txn(_)) {
                        self.client.queue(&messages::command_complete("ROLLBACK"));
                        continue;
                    }
                    match self.local_statement(stmt)? {
                        Some(Ok(tag)) => self.client.queue(&messages::command_complete(&tag)),
                        Some(Err(e)) => {
                            crate::metrics::global().error(e.code);
                            self.client.queue(&e.to_message(crate::protocol::messages::Severity::Error));
                            failed = true;
                        }
                        None => {}
                    }
                }
                _ => self.reply_for_statement_message(m),
            }
        }
        self.client.queue(&messages::ready_for_query_bytes(self.status()));
        self.client.flush().await?;
        Ok(())
    }

    /// Before a batch is routed: the tables its Parses name are known, and the
    /// directory lease allows what its Binds run.
    async fn admit_batch(&mut self, batch: &[Message]) -> Option<SqlError> {
        for m in batch.iter().filter(|m| m.tag() == b'P') {
            let Ok(p) = Parse::parse(m) else { continue };
            let analysis = match self.prepared.get(p.name).filter(|old| *old.sql == *p.query) {
                // Parsed again with the same text: the same analysis.
                Some(old) => old.analysis.clone(),
                None => self.ctx.cache.get(p.query).ok(),
            };
            if let Some(a) = analysis {
                self.ensure_catalog(&a).await;
            }
        }
        // Only a router with a directory replica has a lease to check.
        let replicated = self.ctx.replica.is_some();
        for m in batch.iter().filter(|m| replicated && m.tag() == b'B') {
            let analysis =
                Bind::parse(m).ok().and_then(|b| self.prepared.get(b.statement)).and_then(|p| p.analysis.clone());
            if let Some(a) = analysis {
                if let Some(e) = self.lease_check(&a).await {
                    return Some(e);
                }
            }
        }
        None
    }

    /// The first pass over a batch: its Parses learnt, its Binds routed, and
    /// where the whole pipeline runs.
    /// `routes`: the Binds' routes when [`Self::first_refused`] found them
    /// (with the buckets they touch in `admission.touched`).
    fn route_batch(&mut self, batch: &[Message], routes: Option<Vec<Result<Target, SqlError>>>) -> RoutedBatch {
        let mut touched = std::mem::take(&mut self.admission.touched);
        let mut routes = routes.map(Vec::into_iter);
        if routes.is_none() {
            touched.clear();
        }
        let mut routed =
            RoutedBatch { target: None, error: None, statements: smallvec::SmallVec::new(), several_shards: false };
        for m in batch.iter() {
            match m.tag() {
                b'P' => match Parse::parse(m) {
                    Ok(p) => self.learn(&p),
                    Err(e) => {
                        routed.error.get_or_insert(SqlError::new("08P01", e.to_string()));
                    }
                },
                b'B' => {
                    let t = match Bind::parse(m) {
                        Err(e) => Err(SqlError::new("08P01", e.to_string())),
                        Ok(bind) => match self.prepared.get(bind.statement) {
                            None => Err(unknown_statement(bind.statement)),
                            Some(p) => match &p.analysis {
                                None => Ok(Target::Any),
                                Some(a) => {
                                    routed.statements.push(a.clone());
                                    forget_logins_if_roles_change(&self.ctx, a, &p.sql);
                                    match routes.as_mut().and_then(Iterator::next) {
                                        Some(route) => route,
                                        None => {
                                            let params = Params {
                                                values: &bind.params,
                                                formats: &bind.param_formats,
                                                types: &p.param_types,
                                            };
                                            self.route_all(a, Some(&params), &mut touched)
                                        }
                                    }
                                }
                            },
                        },
                    };
                    let before = routed.target.take();
                    // Statements for different shards, or a split INSERT with
                    // other executions: one transaction across shards.
                    let spans = matches!((&before, &t), (Some(Target::Shard(a)), Ok(Target::Shard(b))) if a != b)
                        || (before.is_some()
                            && (matches!(before, Some(Target::SplitInsert(_)))
                                || matches!(t, Ok(Target::SplitInsert(_)))));
                    routed.several_shards |= spans && routed.error.is_none();
                    match t.and_then(|t| route::combine_pipeline(before, t)) {
                        Ok(t) => routed.target = Some(t),
                        Err(e) => {
                            routed.error.get_or_insert(e);
                        }
                    }
                }
                b'D' | b'C' => {
                    if let Ok((b'S', name)) = target_and_name(m) {
                        if m.tag() == b'D' && !self.prepared.contains_key(name) {
                            routed.error.get_or_insert(unknown_statement(name));
                        }
                    }
                }
                _ => {}
            }
        }
        self.admission.touched = touched;
        if routed.error.is_none() && routed.statements.len() > 1 {
            // A table a Bind's DDL creates, used by a later Bind.
            let fresh = self.fresh_tables();
            let statements = routed.statements.iter().flat_map(|a| a.statements.iter());
            if let Err(e) = route::check_fresh_tables(statements, fresh) {
                routed.error = Some(e);
            }
        }
        if routed.error.is_none() {
            for a in &routed.statements {
                self.note_fresh_tables(a);
            }
        }
        if let (None, Some(t)) = (&routed.error, &routed.target) {
            // The pipeline's statements run together on its target.
            let dir = self.ctx.directory.load();
            let statements = routed.statements.iter().flat_map(|a| a.statements.iter());
            routed.error = route::check_reference_reads(statements, t, &dir, &self.ctx.catalog).err();
        }
        routed
    }

    /// A batch whose statements need several shards: COPY into a sharded
    /// table, a write on every shard, or a cross-shard read.
    async fn run_batch_across(
        &mut self,
        target: Target,
        sync: bool,
        batch: &[Message],
        statements: &[Arc<Analysis>],
    ) -> Result<(), SessionError> {
        match target {
            Target::CopySplit if !statements.is_empty() => {
                self.copy_split_extended(batch, &statements[0].statements[0]).await
            }
            Target::All if sync && !self.txn.in_block() => {
                let dir = self.ctx.directory.load();
                let shards = everywhere(&dir, statements.iter().flat_map(|a| a.statements.iter()));
                let all = || statements.iter().flat_map(|a| a.statements.iter());
                let two_phase = self.ctx.two_phase();
                let keyless_write = |s: &crate::sql::Statement| {
                    matches!(s.kind, StatementKind::Update | StatementKind::Delete)
                        && s.tables.iter().any(|t| self.ctx.catalog.is_sharded(t))
                };
                let flat: Vec<&crate::sql::Statement> = all().collect();
                if !two_phase || shards.len() < 2 || flat.iter().any(|s| matches!(s.kind, StatementKind::Txn(_))) {
                    self.run_batch_on_shards(batch, shards, false).await
                } else if flat.len() == 1 && keyless_write(flat[0]) {
                    // A keyless UPDATE or DELETE (allow_cross_shard_writes):
                    // every shard's rows, counted together.
                    let verb = if flat[0].kind == StatementKind::Update { "UPDATE" } else { "DELETE" };
                    self.run_write_across_extended(batch, shards, Combine::Sum(verb)).await
                } else if flat.iter().any(|s| keyless_write(s)) {
                    self.run_batch_on_shards(batch, shards, false).await
                } else {
                    let ddl = all().any(|s| s.kind == StatementKind::Ddl);
                    self.run_write_across_extended(batch, shards, Combine::First { ddl }).await
                }
            }
            Target::SplitInsert(parts)
                if sync && statements.len() == 1 && statements[0].statements.len() == 1 && self.ctx.two_phase() =>
            {
                self.run_split_insert_extended(batch, &statements[0].statements[0], parts).await
            }
            Target::Fanout(shards)
                if sync
                    && statements.len() == 1
                    && matches!(&statements[0].statements[..], [s] if matches!(s.kind, StatementKind::Update | StatementKind::Delete))
                    && self.ctx.two_phase() =>
            {
                let verb = if statements[0].statements[0].kind == StatementKind::Update { "UPDATE" } else { "DELETE" };
                self.run_write_across_extended(batch, shards, Combine::Sum(verb)).await
            }
            // COPY … TO STDOUT without a tenant: every shard's rows as one copy.
            Target::Fanout(shards)
                if sync
                    && (self.txn.held.is_none() || !self.txn.open_batch || self.txn.last_status == b'T')
                    && statements.len() == 1
                    && matches!(&statements[0].statements[..], [s] if matches!(&s.kind, StatementKind::Copy(c) if !c.from_stdin)) =>
            {
                self.copy_out_fanout_extended(batch, &statements[0].statements[0], shards).await
            }
            // Outside a pipeline left open by Flush, or inside a transaction
            // block, where the block's shards read on its connections (the
            // read's Sync ends what the Flush left open: asyncpg prepares
            // with Parse, Describe and Flush).
            Target::Fanout(shards)
                if sync
                    && (self.txn.held.is_none() || !self.txn.open_batch || self.txn.last_status == b'T')
                    && statements.len() == 1
                    && statements[0].statements.len() == 1 =>
            {
                let stmt = &statements[0].statements[0];
                let text = &stmt.text;
                let executes = batch.iter().filter(|m| m.tag() == b'E').count();
                if executes > 1 && self.txn.held.is_some() {
                    let e = SqlError::new(
                        "0A000",
                        "a read of every shard inside a transaction block runs once per pipeline".into(),
                    )
                    .hint("send a Sync after each Execute of it");
                    return self.fail_batch(e, sync).await;
                }
                match self.plan_fanout(text) {
                    Ok(plan)
                        if plan.merge == crate::fanout::MergeSpec::Concat
                            && plan.shard_sql == *text
                            && batch.iter().filter(|m| m.tag() == b'E').count() != 1
                            && self.shard_texts(&shards, text, stmt).is_ok_and(|t| t.iter().all(Option::is_none)) =>
                    {
                        // The client's own messages on every shard, and every
                        // shard's rows where the first one's stood: for a batch
                        // that describes without executing, or executes twice.
                        self.run_batch_on_shards(batch, shards, true).await
                    }
                    // Streamed (merged, or relayed shard after shard), or
                    // rewritten per shard to count moving rows once.
                    Ok(plan) => self.run_fanout_extended(batch, shards, plan, stmt).await,
                    Err(e) => self.fail_batch(SqlError::new("0A000", e.to_string()), sync).await,
                }
            }
            _ => {
                self.fail_batch(
                    SqlError::new(
                        "0A000",
                        "this statement needs several shards, which the extended query protocol does not support yet"
                            .into(),
                    )
                    .hint("name the tenant (WHERE tenant_id = …) or send the statement as a simple query"),
                    sync,
                )
                .await
            }
        }
    }

    /// A batch on one shard: its messages rewritten onto the held connection
    /// and the replies relayed.
    async fn run_batch_on(
        &mut self,
        shard: ShardId,
        sync: bool,
        batch: &[Message],
        statements: &[Arc<Analysis>],
    ) -> Result<(), SessionError> {
        // Parse/Describe without Execute (a driver preparing a statement) inside a
        // transaction that has not reached a shard yet must not pin it to one:
        // run it on a connection of its own and keep BEGIN pending.
        let shadow = if sync { self.shadow_extended(batch, shard) } else { None };
        // A Bind makes a portal, a Close of a portal ends one: they are the
        // transaction's, and run in its block. (A Close of a statement is
        // answered by the router.) Ended by Flush, only Parse and Describe
        // run aside: the connection is given back then
        // (`release_after_describe`), never left open with the pipeline.
        let prepares_only = batch.iter().all(|m| match m.tag() {
            b'P' | b'D' | b'S' => true,
            b'C' => sync && matches!(target_and_name(m), Ok((b'S', _))),
            _ => false,
        });
        let held_begin = if prepares_only && self.txn.held.is_none() { self.txn.pending_begin.take() } else { None };
        // A driver preparing ahead of a Flush (asyncpg: Parse, Describe,
        // Flush; Bind, Execute, Sync next) has only asked for descriptions: the
        // connection that gave them must not pin the pipeline's rows to it.
        let describe_only =
            !sync && self.txn.held.is_none() && batch.iter().all(|m| matches!(m.tag(), b'P' | b'D' | b'H'));
        let swallow = match self.checkout(shard).await {
            Ok(n) => n,
            Err(e) => {
                if held_begin.is_some() {
                    self.txn.pending_begin = held_begin;
                }
                return self.fail_batch(e, sync).await;
            }
        };
        self.txn.open_batch = !sync;
        let expects = self.rewrite_batch(batch, swallow);
        let Some(b) = self.txn.held.as_mut() else {
            return Ok(());
        };
        if let Err(e) = b.conn.conn.flush().await {
            return self.lost_backend(e).await;
        }
        if shadow.is_some() {
            self.shadow_digest = Some(RowDigest::default());
        }
        let started = crate::clock::Stamp::now();
        let relayed = self.relay_batch(expects, None).await;
        if held_begin.is_some() {
            self.txn.pending_begin = held_begin;
            if self.saw_error {
                // Run aside, but in the client's transaction block: an error
                // fails the block, as in Postgres.
                self.txn.aborted = true;
            }
        }
        if let Some(at) = self.batch_failed_at.take() {
            // The server skipped what came after the error: the statements
            // those messages parsed or closed are as they were.
            self.statements_as_at(at, batch);
        }
        if !sync && matches!(relayed, Ok(None)) && self.saw_error {
            self.txn.skipping = true;
        }
        if describe_only && matches!(relayed, Ok(None)) && !self.saw_error {
            return self.release_after_describe().await;
        }
        self.batch_relayed(relayed, started, statements, batch, shadow).await
    }

    /// Ends, on the server, a Flush-ended batch that only parsed and described
    /// statements, and returns its connection to the pool: the rows the
    /// pipeline goes on to bind are routed by their own keys. (After an error
    /// the connection stays: the server skips to the client's Sync.)
    async fn release_after_describe(&mut self) -> Result<(), SessionError> {
        let Some(b) = self.txn.held.as_mut() else {
            return Ok(());
        };
        b.conn.conn.queue(&messages::simple(b'S'));
        let status = async {
            b.conn.conn.flush().await?;
            loop {
                let m = b.conn.conn.read().await?;
                if m.tag() == b'Z' {
                    return Ok(m.body().first().copied().unwrap_or(b'I'));
                }
            }
        }
        .await;
        match status {
            Ok(status) => {
                self.txn.open_batch = false;
                drop(self.leave_if_idle(status));
                Ok(())
            }
            Err(e) => self.lost_backend(e).await,
        }
    }

    /// The batch a client that prepared its statements sends for each of them:
    /// Bind, Execute, Sync, for one shard, with a Describe of the portal
    /// between Bind and Execute as libpq sends it. Runs with the Bind parsed
    /// once and none of the general path's passes (Parse, Describe of a
    /// statement, Close, transaction control, shadow reads, several shards).
    /// `Ok(false)`, having changed nothing the general path depends on, hands
    /// any other batch to it.
    pub(super) async fn bind_execute(&mut self, sync: bool, batch: &[Message]) -> Result<bool, SessionError> {
        if !sync || self.multi.is_some() || self.txn.suspended_portal.is_some() {
            return Ok(false);
        }
        if let Some((node, lease)) = &self.ctx.replica {
            // A directory not loaded yet or out of touch: the general path
            // refuses or warns.
            if node.applied() == 0 || !node.lease_valid(*lease) {
                return Ok(false);
            }
        }
        // A Parse of the unnamed statement with the text, types and schema
        // it has (pgbench -M extended, most drivers' one-off statements)
        // changes nothing: the router answers it, as the general path does.
        let (parse, rest) = match batch {
            [p, rest @ ..] if p.tag() == b'P' => (Some(p), rest),
            _ => (None, batch),
        };
        let (b, describe, e, s) = match rest {
            [b, e, s] => (b, None, e, s),
            [b, d, e, s] if d.tag() == b'D' && d.body().first() == Some(&b'P') => (b, Some(d), e, s),
            _ => return Ok(false),
        };
        if (b.tag(), e.tag(), s.tag()) != (b'B', b'E', b'S') || self.txn.aborted || !self.ctx.shadow.is_idle() {
            return Ok(false);
        }
        let Ok(bind) = Bind::parse(b) else { return Ok(false) };
        let Some(p) = self.prepared.get(bind.statement) else { return Ok(false) };
        if let Some(m) = parse {
            // Not when the server must see the Parse (`rewrite_batch`): its
            // block failed (it refuses the Parse), or an Execute with a row
            // limit ran before it.
            let Ok(parse) = Parse::parse(m) else { return Ok(false) };
            let same = parse.name.is_empty()
                && bind.statement.is_empty()
                && !self.txn.limited_execute
                && self.txn.last_status != b'E'
                && p.generation == self.ctx.catalog.generation()
                && *p.sql == *parse.query
                && p.param_types == parse.param_types;
            if !same {
                return Ok(false);
            }
        }
        let Some(analysis) = p.analysis.clone() else { return Ok(false) };
        let plain = |k: &StatementKind| {
            matches!(k, StatementKind::Select | StatementKind::Insert | StatementKind::Update | StatementKind::Delete)
        };
        // currval() and lastval() are checked on the general path.
        if !matches!(&analysis.statements[..], [stmt] if plain(&stmt.kind) && !stmt.reads_last_value) {
            return Ok(false);
        }
        let mut touched = std::mem::take(&mut self.admission.touched);
        touched.clear();
        let params = Params { values: &bind.params, formats: &bind.param_formats, types: &p.param_types };
        let routed = self.route_all(&analysis, Some(&params), &mut touched);
        self.admission.touched = touched;
        let target = match routed {
            Ok(t @ (Target::Shard(_) | Target::Any)) => t,
            // Errors and several shards: the general path says or does what is right.
            _ => return Ok(false),
        };
        if !self.pass_holds().await {
            // Held by a cutover, and released: the placement may have changed.
            return Ok(false);
        }
        crate::metrics::global().query(route_kind(&target));
        let shard = match target {
            Target::Shard(s) => s,
            _ => self.any_shard(),
        };
        let swallow = match self.checkout(shard).await {
            Ok(n) => n,
            Err(e) => {
                self.fail_batch(e, true).await?;
                return Ok(true);
            }
        };
        self.txn.open_batch = false;
        let mut expects = self.start_expects(swallow);
        if parse.is_some() {
            expects.push_back(Expect::Synth(messages::parse_complete()));
        }
        let (Some(conn), Some(p)) = (self.txn.held.as_mut(), self.prepared.get(bind.statement)) else {
            return Ok(true);
        };
        let backend = &mut conn.conn;
        ensure_prepared(backend, p, &mut expects);
        bind.put_with_statement(backend.conn.write_buf(), &p.server_name);
        expects.push_back(Expect::Bind);
        if let Some(d) = describe {
            backend.conn.queue(d.raw());
            expects.push_back(Expect::Describe);
        }
        backend.conn.queue(e.raw());
        expects.push_back(Expect::Execute);
        backend.conn.queue(s.raw());
        expects.push_back(Expect::Sync);
        if let Err(e) = backend.conn.flush().await {
            self.lost_backend(e).await?;
            return Ok(true);
        }
        let started = crate::clock::Stamp::now();
        let relayed = self.relay_batch(expects, None).await;
        self.batch_relayed(relayed, started, std::slice::from_ref(&analysis), batch, None).await?;
        Ok(true)
    }

    /// Ends a batch whose replies were relayed. The client gets its
    /// ReadyForQuery first; returning the server connection to the pool and the
    /// bookkeeping follow, off the client's wait.
    pub(super) async fn batch_relayed(
        &mut self,
        relayed: Result<Option<u8>, RelayError>,
        started: crate::clock::Stamp,
        statements: &[Arc<Analysis>],
        batch: &[Message],
        shadow: Option<ShadowedBatch>,
    ) -> Result<(), SessionError> {
        let status = match relayed {
            Ok(Some(status)) => status,
            Ok(None) => {
                self.shadow_digest = None;
                return Ok(());
            }
            Err(RelayError::Client(e)) => return Err(e),
            Err(RelayError::Backend(e)) => return self.lost_backend(e).await,
        };
        let elapsed = started.elapsed();
        for a in statements {
            self.record_settings(a, status);
        }
        // after_ready in two halves: the connection leaves the session now, and
        // goes back to the pool once the answer is on its way.
        let released = self.leave_if_idle(status);
        let client_status = if self.txn.held.is_none() { self.status() } else { status };
        self.client.queue(&messages::ready_for_query_bytes(client_status));
        let flushed = self.client.flush().await;
        if let Some(b) = released.as_ref().or(self.txn.held.as_ref()) {
            b.conn.latency().observe(elapsed);
        }
        if released.is_some() {
            drop(released);
            self.admission.flight.clear();
        }
        flushed?;
        self.account(elapsed, statements.first().map(|a| &**a), Some(batch));
        if let Some(ShadowedBatch { mv, keys, query, permit }) = shadow {
            self.shadow_done(mv, keys, query, permit);
        }
        Ok(())
    }
}

/// Where a batch's leading `BEGIN` ends (just after its Execute), when the
/// batch starts with one (its Parse, Bind, Execute) and has more to run.
fn begin_prefix(batch: &[Message], statements: &[Arc<Analysis>]) -> Option<usize> {
    let [first, _, ..] = statements else { return None };
    if !matches!(&first.statements[..], [s] if s.kind == StatementKind::Txn(TxnControl::Begin)) {
        return None;
    }
    let execute = batch.iter().position(|m| m.tag() == b'E')?;
    let binds = batch[..execute].iter().filter(|m| m.tag() == b'B').count();
    let only_begin = batch[..execute].iter().all(|m| matches!(m.tag(), b'P' | b'B' | b'D'));
    (binds == 1 && only_begin).then_some(execute + 1)
}

/// A pipeline of ROLLBACK followed by DEALLOCATEs only (psycopg 3's rollback
/// in pipeline mode).
fn rolls_back_then_deallocates(statements: &[Arc<Analysis>]) -> bool {
    let one = |a: &Analysis, f: &dyn Fn(&StatementKind) -> bool| matches!(&a.statements[..], [s] if f(&s.kind));
    statements.len() >= 2
        && one(&statements[0], &|k| matches!(k, StatementKind::Txn(TxnControl::Rollback)))
        && statements[1..]
            .iter()
            .all(|a| one(a, &|k| matches!(k, StatementKind::SqlPrepared(SqlPrepared::Deallocate { .. }))))
}

/// Before a statement that changes roles runs: the router looks every login
/// up again from now on (`crate::roles`), so that a client who logs in once
/// the statement has answered is checked against what it wrote.
pub(super) fn forget_logins_if_roles_change(ctx: &crate::context::RouterContext, analysis: &Analysis, sql: &str) {
    if analysis.statements.iter().any(|s| s.kind == StatementKind::Ddl) && crate::sql::roles::changes_roles(sql) {
        ctx.roles.forget_all();
    }
}

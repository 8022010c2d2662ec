//! One client connection: startup, then a loop over its messages.
//!
//! The session holds at most one server connection at a time: checked out of
//! the shard's pool when a statement needs it, kept while the server reports a
//! transaction open, and returned when the server is idle again. `BEGIN` is not
//! sent anywhere until a statement names a shard: it is answered here, remembered
//! and sent ahead of that statement.
//!
//! Extended-protocol messages are collected until `Sync` (or `Flush`), routed as a
//! batch, and rewritten on the way: client statement names map to server names
//! derived from the statement text, so a statement prepared once by the client is
//! prepared lazily on whichever pooled server connection runs it.
//!
//! This file holds the [`Session`], its message loop and the simple-query entry;
//! each other file one part of what a session does:
//!
//! | file | what it holds |
//! |---|---|
//! | `settings.rs` | session settings, replayed on each borrowed connection |
//! | `transaction.rs` | the held connection, `BEGIN` held back, a transaction failed in the router |
//! | `multi.rs` | a transaction open on every shard (schema migrations) |
//! | `admission.rs` | lease, catalog, routing, cutover holds; load accounting |
//! | `forward.rs` | one simple-protocol statement to one shard |
//! | `idle.rs` | a client quiet past its idle timeout |
//! | `pooling.rs` | session pooling: the client's own server connections |
//! | `relay.rs` | server replies to the client, COPY data to the server |
//! | `extended.rs` | the extended protocol: batches up to Sync |
//! | `prepared.rs` | the client's prepared statements and their server names |
//! | `sql_prepared.rs` | statements prepared with SQL `PREPARE`, and `EXECUTE` |
//! | `shadow.rs` | reads compared on a move's target |
//! | `everywhere.rs` | statements on every shard; collecting one shard's answer |
//! | `fanout.rs` | cross-shard reads gathered and merged |
//! | `streaming.rs` | cross-shard reads streamed (relayed or k-way merged) |
//! | `split.rs` | multi-tenant INSERT, COPY in and out across shards |
//! | `reply.rs` | the router's own answers and errors |

mod admission;
mod everywhere;
mod extended;
mod fanout;
mod forward;
mod idle;
mod multi;
mod pipeline_across;
mod pooling;
mod prepared;
mod refusals;
mod relay;
mod reply;
mod settings;
mod shadow;
mod split;
mod sql_prepared;
mod streaming;
mod string_across;
mod transaction;
mod twophase;

use std::collections::VecDeque;
use std::sync::Arc;

use shardgate_directory::TenantKey;
use tokio::io::{AsyncRead, AsyncWrite};

use self::admission::route_kind;
use self::admission::Admission;
use self::multi::AllShards;
use self::prepared::Prepared;
use self::relay::Expect;
use self::settings::Settings;
use self::transaction::{leaves_transaction_open, Transaction};
use self::twophase::Control;
use crate::context::RouterContext;
use crate::error::SqlError;
use crate::protocol::messages::{self, query_text, Severity};
use crate::protocol::{Connection, Message, ProtocolError};
use crate::route::Target;
use crate::shadow::RowDigest;
use crate::sql::{SqlPrepared, StatementKind};

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

pub struct Session<S> {
    ctx: Arc<RouterContext>,
    client: Connection<S>,
    cancel_key: (i32, i32),
    /// This session's entry in the cancel registry.
    cancel: crate::context::CancelSlot,
    /// `SET shardgate.tenant`: the tenant of statements that name none.
    tenant: Option<TenantKey>,
    /// The transaction and the server connection it holds (`transaction.rs`).
    txn: Transaction,
    /// A transaction open on every shard at once (`multi.rs`).
    multi: Option<AllShards>,
    /// The client's statements by name (`prepared.rs`). Looked up on every
    /// Bind; a session can only slow down its own lookups with colliding names.
    prepared: rustc_hash::FxHashMap<String, Prepared>,
    /// Names the router gave the earlier definitions of a statement parsed
    /// again in the same batch (`prepared.rs`), dropped at the next batch.
    batch_aliases: Vec<String>,
    /// The statements the batch being run parses or closes, as they were
    /// before it (`prepared.rs`).
    batch_before: prepared::Remembered,
    /// The batch's message the server failed (counted from 0), from the
    /// relay.
    batch_failed_at: Option<usize>,
    /// Statements prepared with SQL `PREPARE` (`sql_prepared.rs`); None until
    /// the first.
    sql_prepared: Option<Box<sql_prepared::SqlPreparedState>>,
    /// The extended-protocol messages collected up to Sync or Flush.
    batch: Vec<Message>,
    /// Client messages to read again before the client's next: the rest of a
    /// pipeline after the part that runs before a message the router refuses.
    pushback: VecDeque<Message>,
    spare_batch: Vec<Message>,
    /// The replies a batch expects, kept between batches (no allocation each time).
    spare_expects: VecDeque<Expect>,
    /// Session settings, replayed on each server connection (`settings.rs`).
    settings: Settings,
    /// Routing, holds and load of the statements in flight (`admission.rs`).
    admission: Admission,
    /// Set when the last relay forwarded an ErrorResponse.
    saw_error: bool,
    /// While a shadowed read is relayed: the digest of the rows the client gets.
    shadow_digest: Option<RowDigest>,
    /// Rows the statements being relayed reported written (CommandComplete).
    rows_written: u64,
    /// The shards' pools this session used, by shard: the router's list is
    /// behind a lock every session shares (and only ever grows).
    pools: Vec<Option<Arc<crate::pool::ShardPool>>>,
    /// When the client goes quiet, for the idle timeouts (`idle.rs`); None
    /// when both are off.
    idle: Option<Arc<crate::idle::IdleWatch>>,
    /// The client's own role on the shards (`crate::roles`); None: the shard
    /// URL's user.
    role: Option<Arc<crate::roles::RolePools>>,
    /// Session pooling (`pooling.rs`); None in transaction pooling.
    pooling: Option<pooling::SessionPooling>,
    /// A statement set `search_path` (SET LOCAL, inside a block, or
    /// `set_config`, which the settings do not carry): for the rest of the
    /// session, bare table names may mean another schema's tables.
    search_path_set: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    pub fn new(ctx: Arc<RouterContext>, client: Connection<S>, cancel_key: (i32, i32)) -> Self {
        let admission = Admission::new(ctx.in_flight.clone());
        let cancel = ctx.cancel_slot(cancel_key);
        let idle = ctx.idle_timeouts().then(|| ctx.idle.register());
        Session {
            ctx,
            client,
            cancel_key,
            cancel,
            tenant: None,
            txn: Transaction::default(),
            multi: None,
            prepared: Default::default(),
            batch_aliases: Vec::new(),
            batch_before: prepared::Remembered::Nothing,
            batch_failed_at: None,
            sql_prepared: None,
            batch: Vec::new(),
            pushback: VecDeque::new(),
            spare_batch: Vec::new(),
            spare_expects: VecDeque::new(),
            settings: Settings::default(),
            admission,
            saw_error: false,
            shadow_digest: None,
            rows_written: 0,
            pools: Vec::new(),
            idle,
            role: None,
            pooling: None,
            search_path_set: false,
        }
    }

    /// Runs the session's statements on the shards as `role` (None: as the
    /// shard URL's user).
    pub fn with_role(mut self, role: Option<Arc<crate::roles::RolePools>>) -> Self {
        self.role = role;
        self
    }

    /// Keeps the client's server connections for its whole session
    /// (`pool_mode = "session"`, `pooling.rs`).
    pub fn with_pool_mode(mut self, mode: crate::config::PoolMode) -> Self {
        if mode == crate::config::PoolMode::Session {
            self.pooling = Some(Default::default());
        }
        self
    }

    /// The transaction status to report in ReadyForQuery.
    fn status(&self) -> u8 {
        if let Some(all) = &self.multi {
            return if all.failed { b'E' } else { b'T' };
        }
        if self.txn.aborted {
            b'E'
        } else if self.txn.in_block() {
            b'T'
        } else {
            b'I'
        }
    }

    /// Serves the client until it leaves or its connection breaks.
    pub async fn run(mut self) -> Result<(), SessionError> {
        let result = self.serve().await;
        // Leaving mid-transaction: the server connections' state is unknown to the
        // pool, so they are closed (the servers roll back).
        if let Some(b) = self.txn.held.as_mut() {
            b.conn.broken = true;
        }
        for b in self.txn.parked.iter_mut() {
            b.conn.broken = true;
        }
        for b in self.multi.iter_mut().flat_map(|all| all.held.iter_mut()) {
            b.conn.broken = true;
        }
        self.release_kept().await;
        self.ctx.remove_cancel(self.cancel_key);
        result
    }

    async fn serve(&mut self) -> Result<(), SessionError> {
        loop {
            if self.idle.is_none() && self.ctx.idle_timeouts() {
                // A reload turned an idle timeout on.
                self.idle = Some(self.ctx.idle.register());
            }
            let read = match &self.idle {
                _ if !self.pushback.is_empty() => Ok(self.pushback.pop_front().expect("not empty")),
                None if self.pooling.is_some() => self.read_client().await,
                None => self.client.read().await,
                Some(watch) => {
                    let watch = watch.clone();
                    watch.waiting(self.ctx.idle.epoch, self.status() != b'I' || self.txn.open_batch);
                    let read = tokio::select! {
                        biased;
                        read = self.read_client() => Ok(read),
                        why = watch.expired() => Err(why),
                    };
                    watch.busy();
                    match read {
                        Ok(read) => read,
                        Err(why) => return Box::pin(self.end_idle(why)).await,
                    }
                }
            };
            let m = match read {
                Ok(m) => m,
                Err(ProtocolError::Closed) => return Ok(()),
                Err(e @ ProtocolError::Io(_)) => return Err(e.into()),
                Err(e) => {
                    let code = if matches!(e, ProtocolError::TooLarge { .. }) { "54000" } else { "08P01" };
                    let msg = messages::error_response(Severity::Fatal, code, &e.to_string(), None);
                    let _ = self.client.send(&msg).await;
                    return Err(e.into());
                }
            };
            if !self.txn.in_block() && self.multi.is_none() {
                // Idle between statements: nothing of this session is in flight.
                self.admission.flight.clear();
            }
            match m.tag() {
                b'Q' => self.simple_query(&m).await?,
                b'P' | b'B' | b'D' | b'E' | b'C' => self.batch.push(m),
                b'H' => self.run_batch(false).await?,
                b'S' => {
                    self.batch.push(m);
                    self.run_batch(true).await?;
                }
                b'X' => return Ok(()),
                // CopyData/CopyDone/CopyFail after a COPY already ended: ignored, as
                // Postgres does.
                b'd' | b'c' | b'f' => {}
                other => {
                    let msg = messages::error_response(
                        Severity::Fatal,
                        "08P01",
                        &format!("invalid frontend message type {}", other),
                        None,
                    );
                    let _ = self.client.send(&msg).await;
                    return Err(ProtocolError::Malformed { what: "frontend message" }.into());
                }
            }
        }
    }

    async fn simple_query(&mut self, m: &Message) -> Result<(), SessionError> {
        // A simple query drops the unnamed statement, as in Postgres (it
        // runs as if it used the unnamed statement and portal).
        self.prepared.remove("");
        let sql = match query_text(m) {
            Ok(s) => s,
            Err(e) => return self.fail_simple(SqlError::new("08P01", e.to_string())).await,
        };
        // A role's password given in plain: hashed here, once, so that every
        // shard stores the same verifier (crate::sql::roles).
        let hashed =
            crate::sql::roles::mentions_password(sql).then(|| crate::sql::roles::hash_passwords(sql)).flatten();
        let hashed = hashed.map(|text| (Message::from_raw(messages::query(&text)), text));
        let (m, sql) = match &hashed {
            Some((m, text)) => (m, text.as_str()),
            None => (m, sql),
        };
        // Outside a transaction block a simple query may run as its shape's
        // prepared statement (see crate::sql::lift).
        let lookup = if self.ctx.prepare_simple_queries()
            && self.txn.held.is_none()
            && self.txn.pending_begin.is_none()
            && self.multi.is_none()
            && !self.txn.aborted
        {
            self.ctx.cache.get_simple(sql)
        } else {
            self.ctx.cache.get(sql).map(|a| (a, None))
        };
        let (analysis, form) = match lookup {
            Ok(a) => a,
            Err(_) => {
                // Not valid SQL: let a shard say so, exactly as Postgres would.
                let shard = self.txn.held.as_ref().map(|b| b.shard).unwrap_or_else(|| {
                    let dir = self.ctx.directory.load();
                    self.ctx.any_shard(&dir)
                });
                return self.forward_simple(shard, m.raw().clone(), None).await;
            }
        };
        if analysis.statements.is_empty() {
            self.client.queue(&messages::empty_query_response());
            return self.ready().await;
        }
        extended::forget_logins_if_roles_change(&self.ctx, &analysis, sql);
        if let Some(e) = self.lease_check(&analysis).await {
            return self.fail_simple(e).await;
        }
        if self.multi.is_some() {
            return Box::pin(self.multi_query(sql, &analysis)).await;
        }
        if self.txn.aborted {
            return self.in_aborted_txn(&analysis.statements[0], analysis.statements.len() == 1).await;
        }
        match self.cross_shard_control(&analysis, true) {
            None => {}
            Some(Err(e)) => return self.fail_simple(e).await,
            Some(Ok(Control::End { commit })) => {
                let ended = Box::pin(self.end_cross_shard(commit)).await?;
                match ended {
                    Ok(tag) => self.client.queue(&messages::command_complete(tag)),
                    Err(e) => self.client.queue(&e.to_message(Severity::Error)),
                }
                self.ready().await?;
                return Ok(());
            }
            Some(Ok(Control::Savepoint(op))) => {
                match self.savepoint_everywhere(&op, sql).await {
                    Ok(tag) => self.client.queue(&messages::command_complete(tag)),
                    Err(e) => self.client.queue(&e.to_message(Severity::Error)),
                }
                let status = if self.txn.last_status == b'E' { b'E' } else { self.status() };
                self.client.queue(&messages::ready_for_query_bytes(status));
                self.client.flush().await?;
                return Ok(());
            }
        }
        if analysis.statements.len() == 1 {
            // SQL PREPARE and EXECUTE alone in their query string are the
            // session's to carry (sql_prepared.rs); under EXPLAIN or beside
            // other statements routing refuses them.
            match &analysis.statements[0].kind {
                StatementKind::SqlPrepared(SqlPrepared::Prepare { .. }) => {
                    return Box::pin(self.sql_prepare(sql)).await
                }
                StatementKind::SqlPrepared(SqlPrepared::Execute { .. })
                    if crate::sql::prepare_text::parse_execute(sql).is_ok() =>
                {
                    return Box::pin(self.sql_execute(sql)).await
                }
                _ => {}
            }
            if let Some(tag) = self.local_statement(&analysis.statements[0])? {
                crate::metrics::global().query(crate::metrics::RouteKind::Local);
                match tag {
                    Ok(tag) => self.client.queue(&messages::command_complete(&tag)),
                    Err(e) => self.client.queue(&e.to_message(Severity::Error)),
                }
                return self.ready().await;
            }
        }
        if self.runs_statement_by_statement(&analysis) {
            return Box::pin(self.run_statement_by_statement(&analysis)).await;
        }
        let target = match self.route_simple(&analysis).await {
            Ok(t) => t,
            Err(e) => return self.fail_simple(e).await,
        };
        crate::metrics::global().query(route_kind(&target));
        match target {
            Target::Shard(s) => match self.shadow_candidate(&analysis, s, None) {
                None => self.forward(s, m.raw().clone(), &analysis, form).await,
                Some(read) => {
                    Box::pin(self.forward_shadowed(s, m.raw().clone(), &analysis, read, sql.to_string())).await
                }
            },
            Target::Any => {
                let s = self.any_shard();
                self.forward(s, m.raw().clone(), &analysis, form).await
            }
            Target::All if self.txn.pending_begin.is_some() || leaves_transaction_open(&analysis) => {
                Box::pin(self.open_multi(sql, &analysis)).await
            }
            // A keyless UPDATE or DELETE of a sharded table (allow_cross_shard_writes):
            // every shard's part committed together, the rows written summed.
            Target::All
                if self.ctx.two_phase()
                    && matches!(&analysis.statements[..], [s] if matches!(s.kind, StatementKind::Update | StatementKind::Delete)
                        && s.tables.iter().any(|t| self.ctx.catalog.is_sharded(t))) =>
            {
                let dir = self.ctx.directory.load();
                let shards = everywhere::everywhere(&dir, analysis.statements.iter());
                Box::pin(self.run_write_atomically(&analysis.statements[0], shards)).await
            }
            Target::All => Box::pin(self.run_everywhere(sql, &analysis)).await,
            Target::Fanout(shards) if matches!(analysis.statements[0].kind, StatementKind::Copy(_)) => {
                Box::pin(self.run_copy_out_fanout(&analysis.statements[0], shards)).await
            }
            Target::Fanout(shards)
                if matches!(analysis.statements[0].kind, StatementKind::Update | StatementKind::Delete)
                    && self.ctx.two_phase() =>
            {
                Box::pin(self.run_write_atomically(&analysis.statements[0], shards)).await
            }
            Target::Fanout(shards) => Box::pin(self.run_fanout(&analysis.statements[0], shards)).await,
            Target::SplitInsert(parts) => Box::pin(self.run_split_insert(&analysis.statements[0], parts)).await,
            Target::CopySplit => Box::pin(self.run_copy_split(&analysis.statements[0], m.raw().clone())).await,
        }
    }
}

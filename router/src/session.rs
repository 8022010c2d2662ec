//! One client connection: startup, then a loop over its messages.
//!
//! The session owns at most one server connection at a time (`bound`): borrowed
//! from the shard's pool when a statement needs it, kept while the server reports
//! a transaction open, and returned when the server is idle again. `BEGIN` is not
//! sent anywhere until a statement names a shard: it is answered here, remembered
//! (`pending_begin`) and sent ahead of that statement.
//!
//! Extended-protocol messages are collected until `Sync` (or `Flush`), routed as a
//! batch, and rewritten on the way: client statement names map to server names
//! derived from the statement text, so a statement prepared once by the client is
//! prepared lazily on whichever pooled server connection runs it.

use std::collections::hash_map::DefaultHasher;
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::Arc;

use bytes::Bytes;
use shardgate_directory::{ShardId, TenantKey};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};

use crate::context::{CancelTarget, RouterContext};
use crate::error::SqlError;
use crate::pool::Pooled;
use crate::protocol::messages::{self, error_summary, query_text, target_and_name, Bind, Parse, Severity};
use crate::protocol::{Connection, Message, ProtocolError};
use crate::route::{self, Params, Rules, Target};
use crate::shadow::{RowDigest, ShadowMove, ShadowQuery, ShadowRead};
use crate::sql::{Analysis, SettingChange, SimpleForm, Statement, StatementKind, TxnControl};

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// A statement the client prepared (named or unnamed).
struct Prepared {
    sql: Arc<str>,
    param_types: Vec<i32>,
    /// The name it has on server connections: `sg_` and a hash of text and types.
    server_name: String,
    /// None when the text does not parse: it then goes to a shard, which reports
    /// the syntax error in Postgres's own words.
    analysis: Option<Arc<Analysis>>,
}

struct Bound {
    shard: ShardId,
    conn: Pooled,
}

/// Statements a server connection keeps prepared before its cache starts over.
const MAX_PREPARED_PER_CONNECTION: usize = 1000;

/// How a streamed cross-shard read answers: as a simple query, or as the
/// client's extended-protocol pipeline (its messages, and the result formats
/// its Bind asked for).
enum Answer<'a> {
    Simple,
    /// `relayed`: the shards answer in the client's formats (rows only passed
    /// on), else in text, converted row by row.
    Extended {
        batch: &'a [Message],
        formats: &'a [i16],
        relayed: bool,
    },
}

/// How the reply to one forwarded statement ended.
enum Relayed {
    /// ReadyForQuery, with the transaction status.
    Ready(u8),
    /// The server refused a statement's prepared form before running it; at
    /// Parse (the form will not do for this shape) or at Bind.
    Refused { at_parse: bool },
}

/// What the relay expects next from the server, in order, for one batch.
enum Expect {
    Parse {
        forward: bool,
        server_name: String,
        client_name: Option<String>,
    },
    Bind,
    /// `forward` false for a Close the router sent to trim a connection's
    /// statement cache.
    Close {
        forward: bool,
    },
    Describe,
    Execute,
    Sync,
    /// A reply the router makes itself, released in order with the server's.
    Synth(Bytes),
}

pub struct Session<S> {
    ctx: Arc<RouterContext>,
    client: Connection<S>,
    cancel_key: (i32, i32),
    /// This session's entry in the cancel registry.
    cancel: crate::context::CancelSlot,
    /// `SET shardgate.tenant`: the tenant of statements that name none.
    tenant: Option<TenantKey>,
    bound: Option<Bound>,
    /// Transaction-control statements answered here, to send before the first
    /// statement that names a shard.
    pending_begin: Option<Vec<String>>,
    /// The transaction failed in the router (a routing error inside it): like
    /// Postgres, refuse everything until ROLLBACK.
    aborted_locally: bool,
    /// A Flush left a batch open on `bound` until the next Sync.
    open_batch: bool,
    /// The client's statements by name. Looked up on every Bind; a session can
    /// only slow down its own lookups with colliding names.
    prepared: rustc_hash::FxHashMap<String, Prepared>,
    batch: Vec<Message>,
    spare_batch: Vec<Message>,
    /// The replies a batch expects, kept between batches (no allocation each time).
    spare_expects: VecDeque<Expect>,
    /// Session settings (`SET name …` outside a transaction, and the startup
    /// packet's parameters), replayed on each server connection the session uses.
    settings: std::collections::BTreeMap<String, String>,
    /// A hash of `settings` (0 for none), kept up to date with them: a server
    /// connection that last served the same signature needs no `RESET ALL; SET …`.
    settings_signature: u64,
    /// Set when the last relay forwarded an ErrorResponse.
    saw_error: bool,
    /// A transaction open on every shard at once: one that began with DDL or a
    /// reference-table write (a schema migration). `multi_failed` once a shard
    /// reported an error: COMMIT then rolls back everywhere.
    multi: Option<Vec<Bound>>,
    multi_failed: bool,
    /// Buckets the statements being routed touch (filled by routing).
    touched: Vec<u32>,
    /// The directory epoch the statements being routed were routed by (0: not
    /// routed yet; u64::MAX: by several), checked once they are in flight.
    routed_epoch: std::sync::atomic::AtomicU64,
    /// Buckets this session's statement or transaction has in flight.
    flight: crate::hold::Flight,
    /// While a shadowed read is relayed: the digest of the rows the client gets.
    shadow_digest: Option<RowDigest>,
    /// Rows the statements being relayed reported written (CommandComplete).
    rows_written: u64,
    /// The shards' pools this session used, by shard: the router's list is
    /// behind a lock every session shares (and only ever grows).
    pools: Vec<Option<Arc<crate::pool::ShardPool>>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    pub fn new(ctx: Arc<RouterContext>, client: Connection<S>, cancel_key: (i32, i32)) -> Self {
        let ctx_in_flight = ctx.in_flight.clone();
        let cancel = ctx.cancel_slot(cancel_key);
        Session {
            ctx,
            client,
            cancel_key,
            cancel,
            tenant: None,
            bound: None,
            pending_begin: None,
            aborted_locally: false,
            open_batch: false,
            prepared: Default::default(),
            batch: Vec::new(),
            spare_batch: Vec::new(),
            spare_expects: VecDeque::new(),
            settings: std::collections::BTreeMap::new(),
            settings_signature: 0,
            saw_error: false,
            multi: None,
            multi_failed: false,
            touched: Default::default(),
            routed_epoch: Default::default(),
            pools: Vec::new(),
            flight: crate::hold::Flight::new(ctx_in_flight),
            shadow_digest: None,
            rows_written: 0,
        }
    }

    /// Startup parameters the client asked for (`application_name`, `DateStyle`,
    /// `options=-c name=value` …), kept as session settings.
    pub fn with_startup_settings(mut self, params: &[(String, String)]) -> Self {
        for (k, v) in params {
            match k.as_str() {
                // client_encoding: the router talks UTF8 to every shard and passes
                // text through; replaying a client's encoding would make the shard
                // convert what the router has already parsed as UTF-8.
                "user" | "database" | "replication" | "client_encoding" => {}
                "options" => {
                    let mut words = v.split_whitespace();
                    while let Some(w) = words.next() {
                        let kv = match w {
                            "-c" => words.next(),
                            w => w.strip_prefix("-c").or_else(|| w.strip_prefix("--")),
                        };
                        if let Some((name, value)) = kv.and_then(|kv| kv.split_once('=')) {
                            self.set_startup(name, value);
                        }
                    }
                }
                name => self.set_startup(name, v),
            }
        }
        self
    }

    fn set_startup(&mut self, name: &str, value: &str) {
        let name = name.to_ascii_lowercase();
        if name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') && !name.is_empty() {
            let text = format!("SET {name} TO '{}'", value.replace('\'', "''"));
            self.settings.insert(name, text);
            self.settings_changed();
        }
    }

    /// Recomputes the settings' signature; called whenever they change, so that
    /// borrowing a connection costs no hashing.
    fn settings_changed(&mut self) {
        self.settings_signature = if self.settings.is_empty() {
            0
        } else {
            let mut h = DefaultHasher::new();
            self.settings.hash(&mut h);
            h.finish() | 1
        };
    }

    /// Records the session-setting statements of `analysis` after they ran on the
    /// bound connection (`status` is the server's transaction status after them).
    fn record_settings(&mut self, analysis: &Analysis, status: u8) {
        let changes: Vec<&SettingChange> = analysis
            .statements
            .iter()
            .filter_map(|s| match &s.kind {
                StatementKind::SetVar(c) => Some(c),
                _ => None,
            })
            .collect();
        if changes.is_empty() {
            return;
        }
        if status != b'I' || self.saw_error {
            // Inside a transaction (or failed): what the connection now has is
            // unknown; the next session to use it starts from RESET ALL.
            if let Some(b) = self.bound.as_mut() {
                b.conn.settings = None;
            }
            return;
        }
        for (stmt, change) in analysis.statements.iter().filter_map(|s| match &s.kind {
            StatementKind::SetVar(c) => Some((s, c)),
            _ => None,
        }) {
            match change {
                SettingChange::Set { name } => {
                    self.settings.insert(name.clone(), stmt.text.clone());
                }
                SettingChange::Reset { name } => {
                    self.settings.remove(name);
                }
                SettingChange::ResetAll => self.settings.clear(),
            }
        }
        self.settings_changed();
        let sig = self.settings_signature;
        if let Some(b) = self.bound.as_mut() {
            b.conn.settings = Some(sig);
        }
    }

    /// The transaction status to report in ReadyForQuery.
    fn status(&self) -> u8 {
        if self.multi.is_some() {
            return if self.multi_failed { b'E' } else { b'T' };
        }
        if self.aborted_locally {
            b'E'
        } else if self.bound.is_some() || self.pending_begin.is_some() {
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
        if let Some(b) = self.bound.as_mut() {
            b.conn.broken = true;
        }
        for b in self.multi.iter_mut().flatten() {
            b.conn.broken = true;
        }
        self.ctx.remove_cancel(self.cancel_key);
        result
    }

    async fn serve(&mut self) -> Result<(), SessionError> {
        loop {
            let m = match self.client.read().await {
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
            if self.bound.is_none() && self.pending_begin.is_none() && self.multi.is_none() {
                // Idle between statements: nothing of this session is in flight.
                self.flight.clear();
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

    // ----- simple query protocol -------------------------------------------------

    async fn simple_query(&mut self, m: &Message) -> Result<(), SessionError> {
        let sql = match query_text(m) {
            Ok(s) => s,
            Err(e) => return self.fail_simple(SqlError::new("08P01", e.to_string())).await,
        };
        // Outside a transaction block a simple query may run as its shape's
        // prepared statement (see crate::sql::lift).
        let lookup = if self.ctx.config.prepare_simple_queries
            && self.bound.is_none()
            && self.pending_begin.is_none()
            && self.multi.is_none()
            && !self.aborted_locally
        {
            self.ctx.cache.get_simple(sql)
        } else {
            self.ctx.cache.get(sql).map(|a| (a, None))
        };
        let (analysis, form) = match lookup {
            Ok(a) => a,
            Err(_) => {
                // Not valid SQL: let a shard say so, exactly as Postgres would.
                let shard = self.bound.as_ref().map(|b| b.shard).unwrap_or_else(|| {
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
        if let Some(e) = self.lease_check(&analysis).await {
            return self.fail_simple(e).await;
        }
        if self.multi.is_some() {
            return self.multi_query(sql, &analysis).await;
        }
        if self.aborted_locally {
            return self.in_aborted_txn(&analysis.statements[0]).await;
        }
        if analysis.statements.len() == 1 {
            if let Some(tag) = self.local_statement(&analysis.statements[0])? {
                crate::metrics::global().query(crate::metrics::RouteKind::Local);
                match tag {
                    Ok(tag) => self.client.queue(&messages::command_complete(&tag)),
                    Err(e) => self.client.queue(&e.to_message(Severity::Error)),
                }
                return self.ready().await;
            }
        }
        self.ensure_catalog(&analysis).await;
        let target = loop {
            let mut touched = std::mem::take(&mut self.touched);
            touched.clear();
            let routed = self.route_all(&analysis, None, &mut touched);
            self.touched = touched;
            let target = match routed {
                Ok(t) => t,
                Err(e) => return self.fail_simple(e).await,
            };
            if self.pass_holds().await {
                break target;
            }
        };
        crate::metrics::global().query(route_kind(&target));
        match target {
            Target::Shard(s) => match self.shadow_candidate(&analysis, s, None) {
                None => self.forward(s, m.raw().clone(), &analysis, form).await,
                Some(mv) => self.forward_shadowed(s, m.raw().clone(), &analysis, mv, sql.to_string()).await,
            },
            Target::Any => {
                let s = self.any_shard();
                self.forward(s, m.raw().clone(), &analysis, form).await
            }
            Target::All if self.pending_begin.is_some() || leaves_transaction_open(&analysis) => {
                self.open_multi(sql, &analysis).await
            }
            Target::All => self.run_everywhere(sql, &analysis).await,
            Target::Fanout(shards) if matches!(analysis.statements[0].kind, StatementKind::Copy(_)) => {
                self.run_copy_out_fanout(&analysis.statements[0], shards).await
            }
            Target::Fanout(shards) => self.run_fanout(&analysis.statements[0], shards).await,
            Target::SplitInsert(parts) => self.run_split_insert(&analysis.statements[0], parts).await,
            Target::CopySplit => self.run_copy_split(&analysis.statements[0], m.raw().clone()).await,
        }
    }

    /// With the directory out of reach past the lease, a write waits up to
    /// `lease_wait` for contact to come back (a leader election takes about a
    /// second) and is refused if it does not (the bucket may have moved); reads go
    /// on from the last known placement, with a NOTICE saying so.
    async fn lease_check(&mut self, analysis: &Analysis) -> Option<SqlError> {
        if let Some((node, _)) = &self.ctx.replica {
            if node.applied() == 0 {
                // A replica that joined but has not received the directory yet
                // knows no placement at all: nothing may be routed.
                return Some(
                    SqlError::new("57P03", "directory not loaded yet: this router's replica is still joining".into())
                        .hint("try again in a moment; `shardgate status` shows the replica's progress"),
                );
            }
        }
        let why = self.ctx.lease_expired()?;
        let writes = analysis.statements.iter().any(|s| {
            !matches!(
                s.kind,
                StatementKind::Select
                    | StatementKind::Txn(_)
                    | StatementKind::Session
                    | StatementKind::SetVar(_)
                    | StatementKind::SetTenant(_)
            ) && !matches!(&s.kind, StatementKind::Copy(c) if !c.from_stdin)
        });
        if writes {
            let why = self.wait_for_lease().await?;
            let why = format!("{why}; this write waited {:?} for it", self.ctx.config.lease_wait);
            return Some(
                SqlError::new("57P03", why)
                    .hint("writes resume by themselves when the directory is reachable again; check `shardgate status` and the network between the nodes"),
            );
        }
        self.client.queue(&messages::error_response(
            Severity::Notice,
            "01000",
            &format!("{why}; this read uses the last known placement"),
            None,
        ));
        None
    }

    /// Waits up to `lease_wait` for this router's replica to hear from the
    /// directory quorum again; None once it has, or why writes are still refused.
    async fn wait_for_lease(&self) -> Option<String> {
        let (node, lease) = self.ctx.replica.as_ref()?;
        let lease = *lease;
        let wait = self.ctx.config.lease_wait;
        if !wait.is_zero() {
            let metrics = crate::metrics::global();
            metrics.lease_wait_started();
            let started = std::time::Instant::now();
            let mut status = node.watch_status();
            let _ = crate::timer::timeout(wait, async move {
                loop {
                    if status.borrow_and_update().within_lease(lease) {
                        return;
                    }
                    if status.changed().await.is_err() {
                        // The replica stopped: contact cannot come back.
                        std::future::pending::<()>().await;
                    }
                }
            })
            .await;
            metrics.lease_wait(started.elapsed());
        }
        self.ctx.lease_expired()
    }

    /// Reloads the table catalog when a statement names a table it has not seen
    /// (created by another router, or straight on the shards).
    async fn ensure_catalog(&self, analysis: &Analysis) {
        for s in &analysis.statements {
            self.ctx.learn_tables(&s.tables).await;
        }
    }

    /// A shard for a statement that can run anywhere: the bound one if any.
    fn any_shard(&self) -> ShardId {
        match &self.bound {
            Some(b) => b.shard,
            None => {
                let dir = self.ctx.directory.load();
                self.ctx.any_shard(&dir)
            }
        }
    }

    /// Statements the router answers itself. Returns the command tag (or an error
    /// to report) when handled, None when the statement must go to a shard.
    #[allow(clippy::type_complexity)]
    fn local_statement(&mut self, stmt: &Statement) -> Result<Option<Result<String, SqlError>>, SessionError> {
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
            StatementKind::Txn(TxnControl::Begin) if self.bound.is_none() => {
                match &mut self.pending_begin {
                    Some(_) => {
                        self.client.queue(&messages::error_response(
                            Severity::Warning,
                            "25001",
                            "there is already a transaction in progress",
                            None,
                        ));
                    }
                    None => self.pending_begin = Some(vec![stmt.text.clone()]),
                }
                Some(Ok("BEGIN".into()))
            }
            StatementKind::Txn(TxnControl::Savepoint) if self.bound.is_none() && self.pending_begin.is_some() => {
                if let Some(p) = &mut self.pending_begin {
                    p.push(stmt.text.clone());
                }
                let first = stmt.text.split_whitespace().next().unwrap_or("SAVEPOINT").to_ascii_uppercase();
                Some(Ok(first))
            }
            StatementKind::Txn(TxnControl::Commit | TxnControl::Rollback)
                if self.bound.is_none() && self.pending_begin.is_some() =>
            {
                self.pending_begin = None;
                let commit = matches!(stmt.kind, StatementKind::Txn(TxnControl::Commit));
                Some(Ok(if commit { "COMMIT" } else { "ROLLBACK" }.into()))
            }
            _ => None,
        })
    }

    /// In a transaction that failed in the router: only its end is accepted.
    async fn in_aborted_txn(&mut self, stmt: &Statement) -> Result<(), SessionError> {
        if matches!(stmt.kind, StatementKind::Txn(TxnControl::Commit | TxnControl::Rollback)) {
            self.aborted_locally = false;
            self.pending_begin = None;
            if let Some(mut b) = self.bound.take() {
                if b.conn.simple_query("ROLLBACK").await.is_err() {
                    b.conn.broken = true;
                }
                self.clear_cancel();
            }
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

    /// Routes every statement of a query string (or a batch) to one target.
    /// Where the statements of `analysis` run; the buckets they touch are added
    /// to `touched`.
    fn route_all(
        &self,
        analysis: &Analysis,
        params: Option<&Params<'_>>,
        touched: &mut Vec<u32>,
    ) -> Result<Target, SqlError> {
        let dir = self.ctx.directory.load();
        let epoch = dir.epoch;
        let _ = self.routed_epoch.fetch_update(AtomicOrdering::Relaxed, AtomicOrdering::Relaxed, |e| {
            Some(if e == 0 || e == epoch { epoch } else { u64::MAX })
        });
        let rules = Rules {
            strict_tenant: self.ctx.config.strict_tenant,
            allow_cross_shard_writes: self.ctx.config.allow_cross_shard_writes,
        };
        let comment_key = match &analysis.comment_key {
            Some(v) => Some(dir.key_type.parse_text(v).map_err(|e| SqlError::new("22P02", e.to_string()))?),
            None => None,
        };
        let fallback = comment_key.as_ref().or(self.tenant.as_ref());
        let mut combined: Option<Target> = self.bound.as_ref().map(|b| Target::Shard(b.shard));
        let several = analysis.statements.len() > 1;
        for stmt in &analysis.statements {
            let t = route::route(stmt, params, fallback, &dir, &self.ctx.catalog, &rules, touched)?;
            combined = Some(match (combined, t) {
                (None, t) => t,
                (Some(c), Target::Any) => c,
                (Some(Target::Any), t) => t,
                (Some(Target::Shard(a)), Target::Shard(b)) if a == b => Target::Shard(a),
                (Some(Target::All), Target::All) => Target::All,
                (Some(Target::Shard(a)), Target::Shard(b)) => {
                    let name = |s: ShardId| dir.shards.get(s).map(|x| x.name.clone()).unwrap_or_default();
                    return Err(SqlError::new(
                        "0A000",
                        if self.bound.is_some() {
                            format!("this transaction runs on shard {} and cannot touch shard {}", name(a), name(b))
                        } else {
                            format!("these statements touch shards {} and {}", name(a), name(b))
                        },
                    )
                    .hint("keep each transaction (and each query string) to one tenant's shard"));
                }
                (Some(Target::Shard(_)), Target::Fanout(_)) if self.bound.is_some() => {
                    return Err(SqlError::new(
                        "0A000",
                        "a transaction is bound to one shard; this read would need every shard".into(),
                    )
                    .hint("name the tenant in the query, or run it outside the transaction"));
                }
                (Some(_), _) => {
                    return Err(SqlError::new(
                        "0A000",
                        if self.bound.is_some() || self.pending_begin.is_some() {
                            "statements for several shards (DDL, cross-shard reads or writes) cannot run inside a transaction block".to_string()
                        } else {
                            "this query string mixes statements for different shards".to_string()
                        },
                    )
                    .hint("send them one at a time, outside BEGIN … COMMIT"));
                }
            });
            if several && !matches!(combined, Some(Target::Shard(_) | Target::Any | Target::All)) {
                return Err(SqlError::new(
                    "0A000",
                    "a query string of several statements cannot include a cross-shard statement".into(),
                )
                .hint("send the cross-shard statement on its own"));
            }
        }
        let target = combined.unwrap_or(Target::Any);
        route::check_reference_reads(&analysis.statements, &target, &dir, &self.ctx.catalog)?;
        if self.pending_begin.is_some() && matches!(target, Target::SplitInsert(_) | Target::CopySplit) {
            return Err(SqlError::new(
                "0A000",
                "statements for several shards (DDL, cross-shard writes) cannot run inside a transaction block".into(),
            )
            .hint("run them outside BEGIN … COMMIT"));
        }
        Ok(target)
    }

    /// A transaction whose first statement must run on every shard (DDL, a
    /// reference-table write): BEGIN on every live shard, then the statement.
    async fn open_multi(&mut self, sql: &str, analysis: &Analysis) -> Result<(), SessionError> {
        let dir = self.ctx.directory.load();
        // BEGIN was either held (pending) or is part of `sql` itself.
        let prelude = self.pending_begin.take().map(|p| p.join("; "));
        let mut bounds = Vec::new();
        for shard in everywhere(&dir, analysis.statements.iter()) {
            let Some(pool) = self.ctx.pool(shard) else {
                continue;
            };
            match pool.get().await {
                Ok(mut conn) => {
                    let settings = self.settings_prelude(&mut conn);
                    let begun = match &prelude {
                        None => match settings {
                            Some(set) => collect(&mut conn, &set, None, true).await,
                            None => Ok((Vec::new(), None)),
                        },
                        Some(begin) => collect(&mut conn, begin, settings, true).await,
                    };
                    let begun = match begun {
                        Ok((_, None)) => Ok(()),
                        Ok((_, Some(err))) => {
                            Err(SqlError::new("XX000", messages::error_summary(&Message::from_raw(err)).1))
                        }
                        Err(e) => Err(e),
                    };
                    if let Err(e) = begun {
                        for b in bounds.iter_mut() {
                            let b: &mut Bound = b;
                            b.conn.broken = true;
                        }
                        self.aborted_locally = true;
                        return self.fail_simple(e).await;
                    }
                    bounds.push(Bound { shard, conn });
                }
                Err(e) => {
                    for b in bounds.iter_mut() {
                        let b: &mut Bound = b;
                        b.conn.broken = true;
                    }
                    self.aborted_locally = true;
                    return self.fail_simple(SqlError::new(e.sqlstate(), e.to_string())).await;
                }
            }
        }
        self.multi = Some(bounds);
        self.multi_failed = false;
        self.multi_query(sql, analysis).await
    }

    /// A statement inside a transaction open on every shard.
    async fn multi_query(&mut self, sql: &str, analysis: &Analysis) -> Result<(), SessionError> {
        let first = &analysis.statements[0];
        let single = analysis.statements.len() == 1;
        if single {
            match &first.kind {
                StatementKind::Txn(TxnControl::Commit | TxnControl::Rollback) => {
                    let commit = matches!(first.kind, StatementKind::Txn(TxnControl::Commit)) && !self.multi_failed;
                    return self.end_multi(commit).await;
                }
                StatementKind::Txn(TxnControl::Begin) => {
                    self.client.queue(&messages::error_response(
                        Severity::Warning,
                        "25001",
                        "there is already a transaction in progress",
                        None,
                    ));
                    self.client.queue(&messages::command_complete("BEGIN"));
                    return self.ready().await;
                }
                StatementKind::SetTenant(_) => {
                    if let Some(Ok(tag)) = self.local_statement(first)? {
                        self.client.queue(&messages::command_complete(&tag));
                    }
                    return self.ready().await;
                }
                _ => {}
            }
        }
        if self.multi_failed {
            self.client.queue(
                &SqlError::new(
                    "25P02",
                    "current transaction is aborted, commands ignored until end of transaction block".into(),
                )
                .to_message(Severity::Error),
            );
            return self.ready().await;
        }
        // Fan-out reads, split inserts and COPY need connections of their own.
        let dir = self.ctx.directory.load();
        let bound_shards: Vec<ShardId> = self.multi.iter().flatten().map(|b| b.shard).collect();
        let target = self.route_multi(analysis, &dir);
        let run_on: Vec<usize> = match target {
            Ok(Target::Shard(s)) => bound_shards.iter().position(|&x| x == s).into_iter().collect(),
            // A shard that holds the reference rows, if the statement reads any.
            Ok(Target::Any) => {
                let holds_rows = |s: &ShardId| dir.shards.get(*s).is_some_and(|x| x.reference);
                vec![bound_shards.iter().position(holds_rows).unwrap_or(0)]
            }
            Ok(Target::All) => (0..bound_shards.len()).collect(),
            Ok(_) => {
                self.multi_failed = true;
                return self
                    .fail_simple(
                        SqlError::new(
                            "0A000",
                            "cross-shard reads, split inserts and COPY cannot run inside a transaction open on every shard".into(),
                        )
                        .hint("run them after COMMIT"),
                    )
                    .await;
            }
            Err(e) => {
                self.multi_failed = true;
                return self.fail_simple(e).await;
            }
        };
        let mut first_reply = None;
        let mut failure = None;
        let Some(bounds) = self.multi.as_mut() else {
            return self.ready().await;
        };
        for i in run_on {
            let b = &mut bounds[i];
            let name = dir.shards.get(b.shard).map(|s| s.name.clone()).unwrap_or_default();
            match collect(&mut b.conn, sql, None, true).await {
                Ok((reply, None)) => {
                    first_reply.get_or_insert(reply);
                }
                Ok((_, Some(err))) => {
                    failure.get_or_insert(prefix_error(&err, &name));
                }
                Err(e) => {
                    failure.get_or_insert(e.to_message(Severity::Error));
                }
            }
        }
        match failure {
            Some(e) => {
                self.multi_failed = true;
                self.client.queue(&e);
            }
            None => {
                for m in first_reply.unwrap_or_default() {
                    self.client.queue(&m);
                }
            }
        }
        self.ready().await
    }

    fn route_multi(&self, analysis: &Analysis, dir: &shardgate_directory::Directory) -> Result<Target, SqlError> {
        let rules = Rules {
            strict_tenant: self.ctx.config.strict_tenant,
            allow_cross_shard_writes: self.ctx.config.allow_cross_shard_writes,
        };
        let mut target = Target::Any;
        for stmt in &analysis.statements {
            let t = route::route(stmt, None, self.tenant.as_ref(), dir, &self.ctx.catalog, &rules, &mut Vec::new())?;
            target = match (target, t) {
                (Target::Any, t) | (t, Target::Any) => t,
                (Target::Shard(a), Target::Shard(b)) if a == b => Target::Shard(a),
                _ => Target::All,
            };
        }
        route::check_reference_reads(&analysis.statements, &target, dir, &self.ctx.catalog)?;
        Ok(target)
    }

    /// COMMIT (or ROLLBACK) on every shard of a transaction open on all of them.
    /// Shards commit one after another: if one fails after others committed, the
    /// error says which committed, since that cannot be undone.
    async fn end_multi(&mut self, commit: bool) -> Result<(), SessionError> {
        let bounds = self.multi.take().unwrap_or_default();
        self.multi_failed = false;
        let dir = self.ctx.directory.load();
        let sql = if commit { "COMMIT" } else { "ROLLBACK" };
        let mut committed: Vec<String> = Vec::new();
        let mut failure: Option<Bytes> = None;
        let mut ddl = false;
        for mut b in bounds {
            let name = dir.shards.get(b.shard).map(|s| s.name.clone()).unwrap_or_default();
            let sql = if failure.is_some() { "ROLLBACK" } else { sql };
            match collect(&mut b.conn, sql, None, true).await {
                Ok((reply, None)) => {
                    // A failed transaction answers COMMIT with ROLLBACK.
                    let rolled_back =
                        reply.iter().any(|m| m.first() == Some(&b'C') && m.windows(8).any(|w| w == b"ROLLBACK"));
                    if commit && sql == "COMMIT" && !rolled_back {
                        committed.push(name);
                        ddl = true;
                    } else if commit && sql == "COMMIT" && failure.is_none() {
                        failure = Some(
                            SqlError::new("40000", format!("the transaction was rolled back on shard {name}"))
                                .to_message(Severity::Error),
                        );
                    }
                }
                Ok((_, Some(err))) => {
                    failure.get_or_insert(prefix_error(&err, &name));
                }
                Err(e) => {
                    failure.get_or_insert(e.to_message(Severity::Error));
                }
            }
            b.conn.settings = None;
        }
        match failure {
            Some(e) if commit => {
                if committed.is_empty() {
                    self.client.queue(&e);
                } else {
                    let (code, msg) = messages::error_summary(&Message::from_raw(e));
                    warn!(%code, %msg, committed = ?committed, "COMMIT failed on a shard after others committed");
                    self.client.queue(
                        &SqlError::new(
                            "XX000",
                            format!("COMMIT failed ({msg}) after shards {} had committed", committed.join(", ")),
                        )
                        .hint("the committed shards keep the change; repair the others by hand or re-run an idempotent migration")
                        .to_message(Severity::Error),
                    );
                }
            }
            _ => self.client.queue(&messages::command_complete(if commit { "COMMIT" } else { "ROLLBACK" })),
        }
        if ddl {
            if let Err(e) = self.ctx.refresh_catalog().await {
                warn!(error = %e, "could not refresh the table catalog after DDL");
            }
        }
        self.ready().await
    }

    /// Reports an error of the router's own, then ReadyForQuery.
    async fn fail_simple(&mut self, e: SqlError) -> Result<(), SessionError> {
        debug!(code = e.code, message = %e.message, "statement refused");
        crate::metrics::global().error(e.code);
        self.client.queue(&e.to_message(Severity::Error));
        if self.bound.is_some() || self.pending_begin.is_some() {
            self.aborted_locally = true;
        }
        self.ready().await
    }

    async fn ready(&mut self) -> Result<(), SessionError> {
        self.client.queue(&messages::ready_for_query_bytes(self.status()));
        self.client.flush().await?;
        Ok(())
    }

    /// Borrows a server connection on `shard` unless one is bound; sends any
    /// pending BEGIN ahead. Returns how many ReadyForQuery replies to swallow.
    async fn bind(&mut self, shard: ShardId) -> Result<usize, SqlError> {
        if let Some(b) = &self.bound {
            if b.shard == shard {
                return Ok(0);
            }
            let dir = self.ctx.directory.load();
            let name = |s: ShardId| dir.shards.get(s).map(|x| x.name.clone()).unwrap_or_default();
            return Err(SqlError::new(
                "0A000",
                format!("this transaction runs on shard {} and cannot touch shard {}", name(b.shard), name(shard)),
            ));
        }
        let pool = self.pool(shard)?;
        let mut conn = pool.get().await.map_err(|e| SqlError::new(e.sqlstate(), e.to_string()))?;
        *self.cancel.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(CancelTarget { pool, pid: conn.pid, secret: conn.secret });
        let mut swallow = 0;
        if let Some(sql) = self.settings_prelude(&mut conn) {
            conn.conn.queue(&messages::query(&sql));
            swallow += 1;
        }
        if let Some(prelude) = self.pending_begin.take() {
            conn.conn.queue(&messages::query(&prelude.join("; ")));
            swallow += 1;
        }
        self.bound = Some(Bound { shard, conn });
        Ok(swallow)
    }

    /// The pool of `shard`, from this session's own list when it has used it.
    fn pool(&mut self, shard: ShardId) -> Result<Arc<crate::pool::ShardPool>, SqlError> {
        if let Some(Some(p)) = self.pools.get(shard) {
            return Ok(p.clone());
        }
        let pool = self.ctx.pool(shard).ok_or_else(|| SqlError::new("XX000", format!("no pool for shard {shard}")))?;
        if self.pools.len() <= shard {
            self.pools.resize(shard + 1, None);
        }
        self.pools[shard] = Some(pool.clone());
        Ok(pool)
    }

    fn clear_cancel(&self) {
        *self.cancel.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// After a ReadyForQuery from the server: keep the connection while a
    /// transaction is open, return it to the pool when idle.
    fn after_ready(&mut self, status: u8) {
        if self.leave_if_idle(status).is_some() {
            self.flight.clear();
        }
    }

    /// The first half of [`Self::after_ready`]: when the server is idle, the
    /// connection leaves the session (a cancel request no longer reaches it)
    /// and is returned; dropping it hands it back to the pool.
    fn leave_if_idle(&mut self, status: u8) -> Option<Bound> {
        if status == b'I' && !self.open_batch {
            self.clear_cancel();
            self.bound.take()
        } else {
            None
        }
    }

    /// Registers the buckets just routed as in flight, unless a cutover holds one
    /// this transaction had not touched yet: then waits for the hold to end and
    /// returns false (route again, the placement may have changed).
    async fn pass_holds(&mut self) -> bool {
        let routed_epoch = self.routed_epoch.swap(0, AtomicOrdering::Relaxed);
        let n = self.flight.enter(&self.touched);
        if n == 0 {
            return true;
        }
        let dir = self.ctx.directory.load();
        if routed_epoch != 0 && routed_epoch != dir.epoch {
            // The directory changed between routing and now: a whole cutover
            // may have passed (hold, acknowledgements, flip) while the rows were
            // not yet in flight, so the route may name the old shard. Route again;
            // from here on, a hold waits for these rows.
            self.flight.undo_last(n);
            tracing::debug!(routed_epoch, epoch = dir.epoch, "the directory changed while routing: routing again");
            return false;
        }
        let Some(move_id) = crate::hold::held_bucket(&dir, self.flight.newest(n)) else {
            return true;
        };
        self.flight.undo_last(n);
        let waited = crate::hold::wait_released(&self.ctx.directory, move_id).await;
        crate::metrics::global().held(waited);
        tracing::debug!(move_id, waited_us = waited.as_micros() as u64, "statement held for a cutover");
        false
    }

    /// Counts what the statements just relayed cost, for their buckets and (one
    /// in a few) their tenant. `batch` holds the extended-protocol messages, for
    /// the Bind's parameters.
    fn account(&mut self, elapsed: std::time::Duration, analysis: Option<&Analysis>, batch: Option<&[Message]>) {
        let rows = std::mem::take(&mut self.rows_written);
        if self.touched.is_empty() {
            return;
        }
        self.ctx.load.record(&self.touched, elapsed, rows);
        let Some(stmt) = analysis.and_then(|a| a.statements.first()) else { return };
        if !self.ctx.load.sample_tenant() {
            return;
        }
        let key_type = self.ctx.directory.load().key_type;
        let keys = match batch.and_then(|b| b.iter().find(|m| m.tag() == b'B')) {
            None => route::statement_keys(stmt, None, self.tenant.as_ref(), key_type),
            Some(m) => {
                let Ok(bind) = Bind::parse(m) else { return };
                let Some(p) = self.prepared.get(bind.statement) else { return };
                let params = Params { values: &bind.params, formats: &bind.param_formats, types: &p.param_types };
                route::statement_keys(stmt, Some(&params), self.tenant.as_ref(), key_type)
            }
        };
        if let Some([k]) = keys.as_deref() {
            self.ctx.load.record_tenant(k.to_string(), elapsed, rows);
        }
    }

    /// The move in its shadow phase whose moving rows hold every key of this
    /// read, when the read is one to compare: a single SELECT outside a
    /// transaction (see [`crate::shadow`]). One emptiness check when no move is
    /// shadowed.
    fn shadow_candidate(&self, analysis: &Analysis, shard: ShardId, params: Option<&Params<'_>>) -> Option<ShadowMove> {
        if self.ctx.shadow.is_idle()
            || self.bound.is_some()
            || self.pending_begin.is_some()
            || self.open_batch
            || analysis.statements.len() != 1
        {
            return None;
        }
        let stmt = &analysis.statements[0];
        if !matches!(stmt.kind, StatementKind::Select) {
            return None;
        }
        let dir = self.ctx.directory.load();
        let comment_key = analysis.comment_key.as_ref().and_then(|v| dir.key_type.parse_text(v).ok());
        let fallback = comment_key.as_ref().or(self.tenant.as_ref());
        let keys = route::statement_keys(stmt, params, fallback, dir.key_type)?;
        self.ctx.shadow.covering(&dir, shard, &keys)
    }

    /// A batch that is one read of shadowed rows (Parse, Bind, Describe, Execute,
    /// Sync), with the messages that run it once more on an unnamed statement.
    fn shadow_extended(
        &self,
        batch: &[Message],
        shard: ShardId,
    ) -> Option<(ShadowMove, ShadowQuery, tokio::sync::OwnedSemaphorePermit)> {
        if self.ctx.shadow.is_idle() {
            return None;
        }
        let mut binds = batch.iter().filter(|m| m.tag() == b'B');
        let mut executes = batch.iter().filter(|m| m.tag() == b'E');
        let (bind, execute) = (binds.next()?, executes.next()?);
        if binds.next().is_some() || executes.next().is_some() {
            return None;
        }
        // An Execute with a row limit answers part of the rows: not comparable.
        if execute.body().len() < 4 || execute.body()[execute.body().len() - 4..] != [0, 0, 0, 0] {
            return None;
        }
        let bind = Bind::parse(bind).ok()?;
        let p = self.prepared.get(bind.statement)?;
        let analysis = p.analysis.as_ref()?;
        let params = Params { values: &bind.params, formats: &bind.param_formats, types: &p.param_types };
        let mv = self.shadow_candidate(analysis, shard, Some(&params))?;
        let permit = self.ctx.shadow.permit(mv.id)?;
        let mut exec = messages::Builder::new(b'E');
        exec.cstr(bind.portal).i32(0);
        let messages =
            vec![messages::parse("", &p.sql, &p.param_types), bind.with_statement(""), exec.finish(), messages::sync()];
        Some((mv, ShadowQuery::Extended { sql: p.sql.to_string(), messages }, permit))
    }

    /// The session's settings as statements, for a connection of the shadow
    /// reads (which runs them inside a transaction it rolls back).
    fn settings_sql(&self) -> String {
        let mut sql = String::from("RESET ALL");
        for text in self.settings.values() {
            sql.push_str("; ");
            sql.push_str(text);
        }
        sql
    }

    /// Forwards a read to its shard like [`Self::forward_simple`], digesting the
    /// rows on the way, then has the read compared on the move's other shard.
    async fn forward_shadowed(
        &mut self,
        shard: ShardId,
        query: Bytes,
        analysis: &Analysis,
        mv: ShadowMove,
        sql: String,
    ) -> Result<(), SessionError> {
        let Some(permit) = self.ctx.shadow.permit(mv.id) else {
            return self.forward_simple(shard, query, Some(analysis)).await;
        };
        self.shadow_digest = Some(RowDigest::default());
        let r = self.forward_simple(shard, query, Some(analysis)).await;
        self.shadow_done(mv, ShadowQuery::Simple(sql), permit);
        r
    }

    /// After a shadowed read was relayed: compare it, unless it failed.
    fn shadow_done(&mut self, mv: ShadowMove, query: ShadowQuery, permit: tokio::sync::OwnedSemaphorePermit) {
        let Some(source) = self.shadow_digest.take() else { return };
        if self.saw_error || self.bound.is_some() {
            return;
        }
        let read = ShadowRead { mv, query, settings: Some(self.settings_sql()), source };
        crate::shadow::spawn_compare(self.ctx.clone(), read, permit);
    }

    /// Sends one statement to one shard, as its prepared form when it has one.
    async fn forward(
        &mut self,
        shard: ShardId,
        query: Bytes,
        analysis: &Analysis,
        form: Option<SimpleForm>,
    ) -> Result<(), SessionError> {
        match form {
            Some(form) => self.forward_prepared(shard, query, analysis, form).await,
            None => self.forward_simple(shard, query, Some(analysis)).await,
        }
    }

    /// Sends one simple Query to one shard and relays the answer.
    async fn forward_simple(
        &mut self,
        shard: ShardId,
        query: Bytes,
        analysis: Option<&Analysis>,
    ) -> Result<(), SessionError> {
        let swallow = match self.bind(shard).await {
            Ok(n) => n,
            Err(e) => return self.fail_simple(e).await,
        };
        let Some(b) = self.bound.as_mut() else {
            return Ok(());
        };
        b.conn.conn.queue(&query);
        let started = crate::clock::Stamp::now();
        if let Err(e) = b.conn.conn.flush().await {
            return self.lost_backend(e).await;
        }
        let relayed = self.relay_until_ready(swallow, None).await.map(|r| match r {
            Relayed::Ready(status) => status,
            Relayed::Refused { .. } => unreachable!("a simple query's reply is never refused"),
        });
        self.finish_forward(relayed, started, analysis).await
    }

    /// Runs a simple query as its shape's prepared statement: Parse (once per
    /// server connection), then Bind, Describe, Execute and Sync, the replies
    /// only a simple query has passed on. If the server refuses it before it
    /// runs, the original text is sent instead.
    async fn forward_prepared(
        &mut self,
        shard: ShardId,
        query: Bytes,
        analysis: &Analysis,
        simple: SimpleForm,
    ) -> Result<(), SessionError> {
        let swallow = match self.bind(shard).await {
            Ok(n) => n,
            Err(e) => return self.fail_simple(e).await,
        };
        let Some(b) = self.bound.as_mut() else {
            return Ok(());
        };
        let form = &simple.form;
        let parse = !b.conn.prepared.contains(&form.name);
        if parse && b.conn.prepared.len() >= MAX_PREPARED_PER_CONNECTION {
            // This connection's statement cache is full: run the text.
            b.conn.conn.queue(&query);
        } else {
            if parse {
                b.conn.prepared.insert(form.name.clone());
                b.conn.conn.queue(&messages::parse(&form.name, &form.text, &form.types));
            }
            messages::put_bind_execute_sync(b.conn.conn.write_buf(), &form.name, &simple.values);
        }
        let started = crate::clock::Stamp::now();
        if let Err(e) = b.conn.conn.flush().await {
            return self.lost_backend(e).await;
        }
        let relayed = match self.relay_until_ready(swallow, Some(parse)).await {
            Ok(Relayed::Ready(status)) => Ok(status),
            Ok(Relayed::Refused { at_parse }) => {
                if at_parse {
                    debug!(statement = %form.text, "the server refused the prepared form; this shape runs as text");
                    form.refuse();
                }
                // Nothing ran. Drop the server's copy (a Bind refusal may mean
                // its cached plan went stale) and run the original text.
                let Some(b) = self.bound.as_mut() else {
                    return Ok(());
                };
                b.conn.prepared.remove(&form.name);
                b.conn.conn.queue(&messages::close(b'S', &form.name));
                b.conn.conn.queue(&messages::sync());
                b.conn.conn.queue(&query);
                if let Err(e) = b.conn.conn.flush().await {
                    return self.lost_backend(e).await;
                }
                self.relay_until_ready(1, None).await.map(|r| match r {
                    Relayed::Ready(status) => status,
                    Relayed::Refused { .. } => unreachable!("a simple query's reply is never refused"),
                })
            }
            Err(e) => Err(e),
        };
        self.finish_forward(relayed, started, Some(analysis)).await
    }

    /// After the reply to one forwarded statement was relayed.
    async fn finish_forward(
        &mut self,
        relayed: Result<u8, RelayError>,
        started: crate::clock::Stamp,
        analysis: Option<&Analysis>,
    ) -> Result<(), SessionError> {
        match relayed {
            Ok(status) => {
                let elapsed = started.elapsed();
                if let Some(b) = &self.bound {
                    b.conn.latency().observe(elapsed);
                }
                self.account(elapsed, analysis, None);
                if let Some(a) = analysis {
                    self.record_settings(a, status);
                }
                self.after_ready(status);
                Ok(())
            }
            Err(RelayError::Client(e)) => Err(e),
            Err(RelayError::Backend(e)) => self.lost_backend(e).await,
        }
    }

    /// The bound server connection failed mid-statement: tell the client, drop the
    /// connection, keep the session.
    async fn lost_backend(&mut self, e: ProtocolError) -> Result<(), SessionError> {
        let name = self.bound.as_ref().map(|b| b.conn.shard_name().to_string()).unwrap_or_default();
        warn!(shard = %name, error = %e, "lost server connection");
        if let Some(mut b) = self.bound.take() {
            b.conn.broken = true;
        }
        self.clear_cancel();
        self.pending_begin = None;
        self.aborted_locally = false;
        self.open_batch = false;
        self.shadow_digest = None;
        crate::metrics::global().error("08006");
        self.client.queue(
            &SqlError::new("08006", format!("lost the connection to shard {name}: {e}"))
                .hint("the statement may or may not have been applied; if it was in a transaction, the transaction was rolled back")
                .to_message(Severity::Error),
        );
        self.ready().await
    }

    /// Relays server messages to the client until ReadyForQuery, swallowing the
    /// first `swallow` ReadyForQuery (and what precedes them, errors aside) that
    /// answer statements the router sent on its own.
    ///
    /// `prepared` is set when the statement went as a prepared form (and says
    /// whether its Parse went too): the replies a simple query has no counterpart
    /// for are dropped, and an error before BindComplete — nothing has run — is
    /// not passed on but returned as [`Relayed::Refused`].
    async fn relay_until_ready(&mut self, mut swallow: usize, prepared: Option<bool>) -> Result<Relayed, RelayError> {
        self.saw_error = false;
        let Some(b) = self.bound.as_mut() else {
            return Ok(Relayed::Ready(b'I'));
        };
        let (mut parsed, mut bound, mut refused) = (false, false, None);
        loop {
            let m = b.conn.conn.read().await.map_err(RelayError::Backend)?;
            let tag = m.tag();
            if swallow > 0 {
                if tag == b'Z' {
                    swallow -= 1;
                } else if tag == b'E' {
                    self.client.queue(m.raw());
                }
                continue;
            }
            if let Some(parse_sent) = prepared {
                let dropped = match tag {
                    b'1' => {
                        parsed = true;
                        true
                    }
                    b'2' => {
                        bound = true;
                        true
                    }
                    b'n' | b'3' => true,
                    b'E' if !bound => {
                        refused = Some(parse_sent && !parsed);
                        true
                    }
                    b'Z' if refused.is_some() => {
                        return Ok(Relayed::Refused { at_parse: refused.unwrap_or(false) });
                    }
                    _ => false,
                };
                if dropped {
                    continue;
                }
            }
            self.client.queue(m.raw());
            match tag {
                b'D' if self.shadow_digest.is_some() => {
                    if let Some(d) = self.shadow_digest.as_mut() {
                        d.add(m.raw());
                    }
                    if !b.conn.conn.has_buffered() || self.client.queued() > 256 * 1024 {
                        self.client.flush().await.map_err(client_err)?;
                    }
                }
                b'E' => {
                    self.saw_error = true;
                    crate::metrics::global().error_message(m.body());
                }
                b'C' => self.rows_written += crate::load::rows_written(m.body()),
                b'Z' => {
                    self.client.flush().await.map_err(client_err)?;
                    return Ok(Relayed::Ready(m.body().first().copied().unwrap_or(b'I')));
                }
                b'G' => {
                    // CopyInResponse: the client streams rows to this server.
                    self.client.flush().await.map_err(client_err)?;
                    copy_in_passthrough(&mut self.client, &mut b.conn.conn).await?;
                }
                _ => {
                    if !b.conn.conn.has_buffered() || self.client.queued() > 256 * 1024 {
                        self.client.flush().await.map_err(client_err)?;
                    }
                }
            }
        }
    }

    // ----- extended query protocol -----------------------------------------------

    /// Runs the collected Parse/Bind/Describe/Execute/Close messages, ending with
    /// Sync (`sync`) or Flush.
    async fn run_batch(&mut self, sync: bool) -> Result<(), SessionError> {
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
        result
    }

    async fn run_batch_of(&mut self, sync: bool, batch: &mut Vec<Message>) -> Result<(), SessionError> {
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
        if sync && batch.len() == 1 && self.bound.is_none() {
            // A lone Sync (e.g. after COPY, or an empty pipeline): nothing to run.
            return self.ready().await;
        }
        for m in batch.iter() {
            if m.tag() == b'P' {
                if let Some(a) = Parse::parse(m).ok().and_then(|p| self.ctx.cache.get(p.query).ok()) {
                    self.ensure_catalog(&a).await;
                }
            }
        }
        let replicated = self.ctx.replica.is_some();
        for m in batch.iter().filter(|_| replicated) {
            if m.tag() != b'B' {
                continue;
            }
            let analysis =
                Bind::parse(m).ok().and_then(|b| self.prepared.get(b.statement)).and_then(|p| p.analysis.clone());
            if let Some(a) = analysis {
                if let Some(e) = self.lease_check(&a).await {
                    return self.fail_batch(e, sync).await;
                }
            }
        }
        // First pass: learn statements, find where the batch must run.
        let mut touched = std::mem::take(&mut self.touched);
        touched.clear();
        let mut target: Option<Target> = None;
        let mut routing_error: Option<SqlError> = None;
        // Nearly always one statement: kept inline, not allocated.
        let mut statements_seen: smallvec::SmallVec<[Arc<Analysis>; 2]> = smallvec::SmallVec::new();
        for m in batch.iter() {
            match m.tag() {
                b'P' => match Parse::parse(m) {
                    Ok(p) => {
                        let analysis = self.ctx.cache.get(p.query).ok();
                        let prepared = Prepared {
                            sql: Arc::from(p.query),
                            server_name: crate::sql::statement_name(p.query, &p.param_types),
                            param_types: p.param_types.clone(),
                            analysis,
                        };
                        self.prepared.insert(p.name.to_string(), prepared);
                    }
                    Err(e) => {
                        routing_error.get_or_insert(SqlError::new("08P01", e.to_string()));
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
                                    statements_seen.push(a.clone());
                                    let params = Params {
                                        values: &bind.params,
                                        formats: &bind.param_formats,
                                        types: &p.param_types,
                                    };
                                    self.route_all(a, Some(&params), &mut touched)
                                }
                            },
                        },
                    };
                    match t {
                        Ok(t) => {
                            target = Some(match (target.take(), t) {
                                (None, t) | (Some(Target::Any), t) => t,
                                (Some(c), Target::Any) => c,
                                (Some(Target::Shard(a)), Target::Shard(b)) if a == b => Target::Shard(a),
                                (Some(_), _) => {
                                    routing_error.get_or_insert(
                                        SqlError::new(
                                            "0A000",
                                            "statements of one pipeline (up to Sync) touch different shards".into(),
                                        )
                                        .hint("send a Sync between statements for different tenants"),
                                    );
                                    Target::Any
                                }
                            })
                        }
                        Err(e) => {
                            routing_error.get_or_insert(e);
                        }
                    }
                }
                b'D' | b'C' => {
                    if let Ok((b'S', name)) = target_and_name(m) {
                        if m.tag() == b'D' && !self.prepared.contains_key(name) {
                            routing_error.get_or_insert(unknown_statement(name));
                        }
                    }
                }
                _ => {}
            }
        }
        self.touched = touched;
        if let (None, Some(t)) = (&routing_error, &target) {
            // The pipeline's statements run together on its target.
            let dir = self.ctx.directory.load();
            let statements = statements_seen.iter().flat_map(|a| a.statements.iter());
            routing_error = route::check_reference_reads(statements, t, &dir, &self.ctx.catalog).err();
        }
        if routing_error.is_none() && !self.pass_holds().await {
            // A cutover held the rows: the placement may have changed, route again.
            self.batch = std::mem::take(batch);
            return Box::pin(self.run_batch(sync)).await;
        }
        if self.aborted_locally {
            let all_end = !statements_seen.is_empty()
                && statements_seen.iter().all(|a| {
                    a.statements.len() == 1
                        && matches!(a.statements[0].kind, StatementKind::Txn(TxnControl::Commit | TxnControl::Rollback))
                });
            if all_end && self.bound.is_none() {
                self.aborted_locally = false;
                self.pending_begin = None;
                return self.answer_batch_locally(batch, sync, "ROLLBACK").await;
            }
            if !all_end {
                routing_error = Some(SqlError::new(
                    "25P02",
                    "current transaction is aborted, commands ignored until end of transaction block".into(),
                ));
            }
        }
        if let Some(e) = routing_error {
            return self.fail_batch(e, sync).await;
        }
        // Transaction control that the router answers itself.
        if self.bound.is_none() && !statements_seen.is_empty() {
            let statements: usize = statements_seen.iter().map(|a| a.statements.len()).sum();
            if statements == 1 {
                let stmt = &statements_seen[0].statements[0];
                if let StatementKind::Txn(TxnControl::Begin | TxnControl::Commit | TxnControl::Rollback)
                | StatementKind::SetTenant(_) = stmt.kind
                {
                    match self.local_statement(stmt)? {
                        Some(Ok(tag)) => return self.answer_batch_locally(batch, sync, &tag).await,
                        Some(Err(e)) => return self.fail_batch(e, sync).await,
                        None => {}
                    }
                }
            }
        }
        if matches!(target, Some(Target::CopySplit)) {
            if let Some(a) = statements_seen.first().cloned() {
                return self.copy_split_extended(batch, &a.statements[0]).await;
            }
        }
        if let Some(t) = &target {
            crate::metrics::global().query(route_kind(t));
        }
        let shard = match target.unwrap_or(Target::Any) {
            Target::Shard(s) => s,
            Target::Any => self.any_shard(),
            Target::All if sync && self.bound.is_none() && self.pending_begin.is_none() => {
                let dir = self.ctx.directory.load();
                let shards = everywhere(&dir, statements_seen.iter().flat_map(|a| a.statements.iter()));
                return self.run_batch_on_shards(batch, shards, false).await;
            }
            Target::Fanout(shards)
                if sync
                    && self.bound.is_none()
                    && statements_seen.len() == 1
                    && statements_seen[0].statements.len() == 1 =>
            {
                let text = &statements_seen[0].statements[0].text;
                match crate::fanout::plan(text) {
                    Ok(plan)
                        if plan.merge == crate::fanout::MergeSpec::Concat
                            && plan.shard_sql == *text
                            && batch.iter().filter(|m| m.tag() == b'E').count() != 1
                            && self
                                .shard_texts(&shards, text, &statements_seen[0].statements[0])
                                .is_ok_and(|t| t.iter().all(Option::is_none)) =>
                    {
                        // The client's own messages on every shard, and every
                        // shard's rows where the first one's stood: for a batch
                        // that describes without executing, or executes twice.
                        return self.run_batch_on_shards(batch, shards, true).await;
                    }
                    // Streamed (merged, or relayed shard after shard), or
                    // rewritten per shard to count moving rows once.
                    Ok(plan) => {
                        let analysis = statements_seen[0].clone();
                        return self.run_fanout_extended(batch, shards, plan, &analysis.statements[0]).await;
                    }
                    Err(e) => return self.fail_batch(SqlError::new("0A000", e.to_string()), sync).await,
                }
            }
            _ => return self
                .fail_batch(
                    SqlError::new(
                        "0A000",
                        "this statement needs several shards, which the extended query protocol does not support yet"
                            .into(),
                    )
                    .hint("name the tenant (WHERE tenant_id = …) or send the statement as a simple query"),
                    sync,
                )
                .await,
        };
        // Parse/Describe without Execute (a driver preparing a statement) inside a
        // transaction that has not reached a shard yet must not pin it to one:
        // run it on a connection of its own and keep BEGIN pending.
        let shadow = if sync { self.shadow_extended(batch, shard) } else { None };
        let has_execute = batch.iter().any(|m| m.tag() == b'E');
        let held_begin = if !has_execute && self.bound.is_none() { self.pending_begin.take() } else { None };
        let swallow = match self.bind(shard).await {
            Ok(n) => n,
            Err(e) => {
                if held_begin.is_some() {
                    self.pending_begin = held_begin;
                }
                return self.fail_batch(e, sync).await;
            }
        };
        self.open_batch = !sync;
        let expects = self.rewrite_batch(batch, swallow);
        let Some(b) = self.bound.as_mut() else {
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
            self.pending_begin = held_begin;
        }
        self.batch_relayed(relayed, started, &statements_seen, batch, shadow).await
    }

    /// The batch a client that prepared its statements sends for each of them:
    /// Bind, Execute, Sync, for one shard, with a Describe of the portal
    /// between Bind and Execute as libpq sends it. Runs with the Bind parsed
    /// once and none of the general path's passes (Parse, Describe of a
    /// statement, Close, transaction control, shadow reads, several shards).
    /// `Ok(false)`, having changed nothing the general path depends on, hands
    /// any other batch to it.
    async fn bind_execute(&mut self, sync: bool, batch: &[Message]) -> Result<bool, SessionError> {
        if !sync || self.multi.is_some() {
            return Ok(false);
        }
        if let Some((node, lease)) = &self.ctx.replica {
            // A directory not loaded yet or out of touch: the general path
            // refuses or warns.
            if node.applied() == 0 || !node.lease_valid(*lease) {
                return Ok(false);
            }
        }
        let (b, describe, e, s) = match batch {
            [b, e, s] => (b, None, e, s),
            [b, d, e, s] if d.tag() == b'D' && d.body().first() == Some(&b'P') => (b, Some(d), e, s),
            _ => return Ok(false),
        };
        if (b.tag(), e.tag(), s.tag()) != (b'B', b'E', b'S') || self.aborted_locally || !self.ctx.shadow.is_idle() {
            return Ok(false);
        }
        let Ok(bind) = Bind::parse(b) else { return Ok(false) };
        let Some(p) = self.prepared.get(bind.statement) else { return Ok(false) };
        let Some(analysis) = p.analysis.clone() else { return Ok(false) };
        let plain = |k: &StatementKind| {
            matches!(k, StatementKind::Select | StatementKind::Insert | StatementKind::Update | StatementKind::Delete)
        };
        if !matches!(&analysis.statements[..], [stmt] if plain(&stmt.kind)) {
            return Ok(false);
        }
        let mut touched = std::mem::take(&mut self.touched);
        touched.clear();
        let params = Params { values: &bind.params, formats: &bind.param_formats, types: &p.param_types };
        let routed = self.route_all(&analysis, Some(&params), &mut touched);
        self.touched = touched;
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
        let swallow = match self.bind(shard).await {
            Ok(n) => n,
            Err(e) => {
                self.fail_batch(e, true).await?;
                return Ok(true);
            }
        };
        self.open_batch = false;
        let mut expects = self.start_expects(swallow);
        let (Some(conn), Some(p)) = (self.bound.as_mut(), self.prepared.get(bind.statement)) else {
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
    async fn batch_relayed(
        &mut self,
        relayed: Result<Option<u8>, RelayError>,
        started: crate::clock::Stamp,
        statements: &[Arc<Analysis>],
        batch: &[Message],
        shadow: Option<(ShadowMove, ShadowQuery, tokio::sync::OwnedSemaphorePermit)>,
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
        let client_status = if self.bound.is_none() { self.status() } else { status };
        self.client.queue(&messages::ready_for_query_bytes(client_status));
        let flushed = self.client.flush().await;
        if let Some(b) = released.as_ref().or(self.bound.as_ref()) {
            b.conn.latency().observe(elapsed);
        }
        if released.is_some() {
            drop(released);
            self.flight.clear();
        }
        flushed?;
        self.account(elapsed, statements.first().map(|a| &**a), Some(batch));
        if let Some((mv, query, permit)) = shadow {
            self.shadow_done(mv, query, permit);
        }
        Ok(())
    }

    /// The replies to expect on the bound connection before a batch's own:
    /// ReadyForQuery for each statement `bind` sent ahead (`swallow`), and the
    /// CloseComplete of a statement cache started over.
    fn start_expects(&mut self, swallow: usize) -> VecDeque<Expect> {
        let mut expects = std::mem::take(&mut self.spare_expects);
        expects.clear();
        let Some(b) = self.bound.as_mut() else {
            return expects;
        };
        let backend = &mut b.conn;
        for _ in 0..swallow {
            expects.push_back(Expect::Sync);
        }
        if backend.prepared.len() >= MAX_PREPARED_PER_CONNECTION {
            // Bound the memory each server connection spends on statements that
            // clients prepared: start its cache over (statements are prepared
            // again, lazily, when next used).
            let names: Vec<String> = backend.prepared.drain().collect();
            for name in names {
                backend.conn.queue(&messages::close(b'S', &name));
                expects.push_back(Expect::Close { forward: false });
            }
        }
        expects
    }

    /// Queues the batch on the bound connection with statement names rewritten,
    /// and returns the replies to expect.
    fn rewrite_batch(&mut self, batch: &[Message], swallow: usize) -> VecDeque<Expect> {
        let mut expects = self.start_expects(swallow);
        let Some(b) = self.bound.as_mut() else {
            return expects;
        };
        let backend = &mut b.conn;
        for m in batch {
            match m.tag() {
                b'P' => {
                    let Ok(parse) = Parse::parse(m) else { continue };
                    let Some(p) = self.prepared.get(parse.name) else {
                        continue;
                    };
                    if !backend.prepared.contains(&p.server_name) && backend.prepared.insert(p.server_name.clone()) {
                        backend.conn.queue(&messages::parse(&p.server_name, &p.sql, &p.param_types));
                        expects.push_back(Expect::Parse {
                            forward: true,
                            server_name: p.server_name.clone(),
                            client_name: Some(parse.name.to_string()),
                        });
                    } else {
                        expects.push_back(Expect::Synth(messages::parse_complete()));
                    }
                }
                b'B' => {
                    let Ok(bind) = Bind::parse(m) else { continue };
                    let Some(p) = self.prepared.get(bind.statement) else {
                        continue;
                    };
                    ensure_prepared(backend, p, &mut expects);
                    bind.put_with_statement(backend.conn.write_buf(), &p.server_name);
                    expects.push_back(Expect::Bind);
                }
                b'D' => match target_and_name(m) {
                    Ok((b'S', name)) => {
                        let Some(p) = self.prepared.get(name) else {
                            continue;
                        };
                        ensure_prepared(backend, p, &mut expects);
                        backend.conn.queue(&messages::describe(b'S', &p.server_name));
                        expects.push_back(Expect::Describe);
                    }
                    _ => {
                        backend.conn.queue(m.raw());
                        expects.push_back(Expect::Describe);
                    }
                },
                b'C' => match target_and_name(m) {
                    Ok((b'S', name)) => {
                        // The server keeps its copy for the next client that needs it.
                        self.prepared.remove(name);
                        expects.push_back(Expect::Synth(messages::close_complete()));
                    }
                    _ => {
                        backend.conn.queue(m.raw());
                        expects.push_back(Expect::Close { forward: true });
                    }
                },
                b'E' => {
                    backend.conn.queue(m.raw());
                    expects.push_back(Expect::Execute);
                }
                b'S' => {
                    backend.conn.queue(m.raw());
                    expects.push_back(Expect::Sync);
                }
                _ => {}
            }
        }
        if !matches!(expects.back(), Some(Expect::Sync)) {
            // A Flush: make the server send what it has.
            backend.conn.queue(&messages::simple(b'H'));
        }
        expects
    }

    /// Relays the server's replies to a rewritten batch. Returns the transaction
    /// status if the batch ended with Sync; the replies are then left queued for
    /// the caller to add ReadyForQuery and flush.
    async fn relay_batch(
        &mut self,
        mut expects: VecDeque<Expect>,
        mut sink: Option<&mut Vec<Bytes>>,
    ) -> Result<Option<u8>, RelayError> {
        // Replies go to the client, or into `sink` when the batch runs on several
        // shards and the answers are combined afterwards.
        macro_rules! emit {
            ($bytes:expr) => {
                match sink.as_deref_mut() {
                    Some(buf) => buf.push(Bytes::copy_from_slice($bytes)),
                    None => self.client.queue($bytes),
                }
            };
        }
        let Some(b) = self.bound.as_mut() else {
            return Ok(None);
        };
        let swallowed_syncs = expects.iter().take_while(|e| matches!(e, Expect::Sync)).count();
        let mut prelude_syncs = swallowed_syncs.min(expects.len().saturating_sub(1));
        let mut skipping = false;
        let mut status = None;
        self.saw_error = false;
        while let Some(exp) = expects.pop_front() {
            let prelude = prelude_syncs > 0;
            if let Expect::Synth(bytes) = &exp {
                if !skipping {
                    emit!(bytes);
                }
                continue;
            }
            if skipping && !matches!(exp, Expect::Sync) {
                // The server skips everything up to Sync after an error.
                if let Expect::Parse { server_name, .. } = &exp {
                    b.conn.prepared.remove(server_name);
                }
                continue;
            }
            loop {
                let m = b.conn.conn.read().await.map_err(RelayError::Backend)?;
                let tag = m.tag();
                if prelude {
                    // The reply to a pending BEGIN sent ahead: only errors matter.
                    if tag == b'E' {
                        emit!(m.raw());
                    }
                    if tag == b'Z' {
                        prelude_syncs -= 1;
                        break;
                    }
                    continue;
                }
                match tag {
                    b'N' | b'S' | b'A' => emit!(m.raw()),
                    b'E' => {
                        emit!(m.raw());
                        self.saw_error = true;
                        crate::metrics::global().error_message(m.body());
                        if let Expect::Parse { server_name, client_name, .. } = &exp {
                            b.conn.prepared.remove(server_name);
                            if let Some(c) = client_name {
                                self.prepared.remove(c);
                            }
                        }
                        if matches!(exp, Expect::Sync) {
                            continue; // e.g. a deferred constraint failing at commit
                        }
                        skipping = true;
                        break;
                    }
                    b'1' => {
                        if matches!(exp, Expect::Parse { forward: true, .. }) {
                            emit!(m.raw());
                        }
                        break;
                    }
                    b'3' if matches!(exp, Expect::Close { forward: false }) => break,
                    b'C' => {
                        self.rows_written += crate::load::rows_written(m.body());
                        emit!(m.raw());
                        break;
                    }
                    b'2' | b'3' | b'n' | b'T' | b'I' | b's' => {
                        emit!(m.raw());
                        break;
                    }
                    b'Z' => {
                        // Queued by the caller, who may report another status.
                        status = m.body().first().copied();
                        break;
                    }
                    b'G' if sink.is_some() => {
                        // COPY FROM STDIN on several shards at once through the
                        // extended protocol: the data could only go to one of them.
                        let fail = messages::Builder::new(b'f')
                            .cstr("COPY FROM STDIN into a table on every shard is not supported through the extended query protocol; use a simple query")
                            .finish();
                        b.conn.conn.queue(&fail);
                        b.conn.conn.flush().await.map_err(RelayError::Backend)?;
                    }
                    b'G' => {
                        emit!(m.raw());
                        self.client.flush().await.map_err(client_err)?;
                        copy_in_passthrough(&mut self.client, &mut b.conn.conn).await?;
                        // The server ignored the batch's Sync during the copy; the
                        // client's next Sync ends the pipeline on this connection.
                        if let Some(pos) = expects.iter().position(|e| matches!(e, Expect::Sync)) {
                            expects.remove(pos);
                            self.open_batch = true;
                        }
                    }
                    _ => {
                        // DataRow, ParameterDescription, CopyOut data …
                        if tag == b'D' {
                            if let Some(d) = self.shadow_digest.as_mut() {
                                d.add(m.raw());
                            }
                        }
                        emit!(m.raw());
                        if sink.is_none() && self.client.queued() > 256 * 1024 {
                            self.client.flush().await.map_err(client_err)?;
                        }
                    }
                }
            }
            if matches!(exp, Expect::Sync) {
                skipping = false;
            }
        }
        // Every expected reply came: the (empty) queue serves the next batch.
        self.spare_expects = expects;
        match status {
            // The caller queues ReadyForQuery (it may report another status) and
            // flushes: the client gets the whole reply in one write.
            Some(_) => self.open_batch = false,
            None => self.client.flush().await.map_err(client_err)?,
        }
        Ok(status)
    }

    /// Runs a whole batch (ending in Sync) on several shards, one after another,
    /// each on a connection of its own, and answers with one combined reply:
    /// a write that must land everywhere answers as the first shard did, or with
    /// the first shard's error; a read (`gather`) answers with every shard's rows.
    async fn run_batch_on_shards(
        &mut self,
        batch: &[Message],
        shards: Vec<ShardId>,
        gather: bool,
    ) -> Result<(), SessionError> {
        let dir = self.ctx.directory.load();
        let mut replies: Vec<(ShardId, Vec<Bytes>)> = Vec::with_capacity(shards.len());
        for &shard in &shards {
            if let Err(e) = self.bind(shard).await {
                return self.fail_batch(e, true).await;
            }
            let expects = self.rewrite_batch(batch, 0);
            let mut buf = Vec::new();
            let flushed = match self.bound.as_mut() {
                Some(b) => b.conn.conn.flush().await,
                None => Ok(()),
            };
            let relayed = match flushed {
                Ok(()) => self.relay_batch(expects, Some(&mut buf)).await,
                Err(e) => Err(RelayError::Backend(e)),
            };
            match relayed {
                Ok(_) => {
                    self.bound = None;
                    self.clear_cancel();
                }
                Err(RelayError::Client(e)) => return Err(e),
                Err(RelayError::Backend(e)) => return self.lost_backend(e).await,
            }
            replies.push((shard, buf));
        }
        self.open_batch = false;
        let failed = replies.iter().find(|(_, r)| r.iter().any(|m| m.first() == Some(&b'E')));
        if let Some((shard, reply)) = failed {
            let name = dir.shards.get(*shard).map(|s| s.name.as_str()).unwrap_or("?");
            for m in reply {
                if m.first() == Some(&b'E') {
                    self.client.queue(&prefix_error(m, name));
                } else {
                    self.client.queue(m);
                }
            }
        } else if !gather {
            for m in replies.first().map(|(_, r)| r.as_slice()).unwrap_or_default() {
                self.client.queue(m);
            }
        } else {
            // Every shard's rows where the first shard's rows stood.
            let first = replies.first().map(|(_, r)| r.clone()).unwrap_or_default();
            let mut rows_sent = false;
            for m in &first {
                match m.first() {
                    Some(b'D') | Some(b'C') if !rows_sent => {
                        rows_sent = true;
                        let mut n = 0u64;
                        for (_, r) in &replies {
                            for row in r.iter().filter(|x| x.first() == Some(&b'D')) {
                                self.client.queue(row);
                                n += 1;
                            }
                        }
                        self.client.queue(&messages::command_complete(&format!("SELECT {n}")));
                    }
                    Some(b'D') | Some(b'C') => {}
                    _ => self.client.queue(m),
                }
            }
        }
        self.client.queue(&messages::ready_for_query_bytes(self.status()));
        self.client.flush().await?;
        if !gather {
            let ddl = batch.iter().any(|m| {
                m.tag() == b'B'
                    && Bind::parse(m)
                        .ok()
                        .and_then(|b| self.prepared.get(b.statement))
                        .and_then(|p| p.analysis.as_ref())
                        .is_some_and(|a| a.statements.iter().any(|s| s.kind == StatementKind::Ddl))
            });
            if ddl {
                if let Err(e) = self.ctx.refresh_catalog().await {
                    warn!(error = %e, "could not refresh the table catalog after DDL");
                }
            }
        }
        Ok(())
    }

    /// The reply Postgres gives to Parse, Bind, Describe or Close of a statement
    /// that takes no parameters and returns no rows, for batches the router
    /// answers itself.
    fn reply_for_statement_message(&mut self, m: &Message) {
        match m.tag() {
            b'P' => self.client.queue(&messages::parse_complete()),
            b'B' => self.client.queue(&messages::bind_complete()),
            b'D' => {
                if let Ok((b'S', _)) = target_and_name(m) {
                    self.client.queue(&messages::Builder::new(b't').i16(0).finish());
                }
                self.client.queue(&messages::no_data());
            }
            b'C' => self.client.queue(&messages::close_complete()),
            _ => {}
        }
    }

    /// Answers a batch whose only statement the router handles itself (BEGIN,
    /// COMMIT of a transaction that never reached a shard, SET shardgate.tenant).
    async fn answer_batch_locally(&mut self, batch: &[Message], sync: bool, tag: &str) -> Result<(), SessionError> {
        for m in batch {
            match m.tag() {
                b'E' => self.client.queue(&messages::command_complete(tag)),
                _ => self.reply_for_statement_message(m),
            }
        }
        if sync {
            self.client.queue(&messages::ready_for_query_bytes(self.status()));
        }
        self.client.flush().await?;
        Ok(())
    }

    /// `COPY … FROM STDIN` into a sharded table sent with the extended protocol
    /// (Bind, Execute, Sync, then the data). As in Postgres, the Sync sent before
    /// the data is ignored; the client's Sync after CopyDone gets ReadyForQuery.
    async fn copy_split_extended(&mut self, batch: &[Message], stmt: &Statement) -> Result<(), SessionError> {
        for m in batch {
            match m.tag() {
                b'E' => {
                    self.client.flush().await?;
                    let dir = self.ctx.directory.load();
                    match crate::copy::copy_in_split(&self.ctx, &dir, stmt, &mut self.client).await {
                        Ok(tag) => self.client.queue(&messages::command_complete(&tag)),
                        Err(crate::copy::CopyError::Client(e)) => return Err(e.into()),
                        Err(crate::copy::CopyError::Sql(e)) => self.client.queue(&e.to_message(Severity::Error)),
                    }
                    break;
                }
                _ => self.reply_for_statement_message(m),
            }
        }
        self.client.flush().await?;
        Ok(())
    }

    /// A batch refused by the router: the error, then (at Sync) ReadyForQuery.
    async fn fail_batch(&mut self, e: SqlError, sync: bool) -> Result<(), SessionError> {
        debug!(code = e.code, message = %e.message, "batch refused");
        crate::metrics::global().error(e.code);
        self.client.queue(&e.to_message(Severity::Error));
        if self.bound.is_some() || self.pending_begin.is_some() {
            self.aborted_locally = true;
        }
        if sync {
            if self.open_batch {
                // A Flush left part of this pipeline on the server: end it there.
                self.open_batch = false;
                if let Some(b) = self.bound.as_mut() {
                    b.conn.conn.queue(&messages::sync());
                    let _ = b.conn.conn.flush().await;
                    loop {
                        match b.conn.conn.read().await {
                            Ok(m) if m.tag() == b'Z' => break,
                            Ok(_) => {}
                            Err(_) => {
                                b.conn.broken = true;
                                break;
                            }
                        }
                    }
                }
            }
            self.client.queue(&messages::ready_for_query_bytes(self.status()));
        } else {
            // After an error the client's batch is skipped up to its Sync.
            self.skip_to_sync().await?;
            self.client.queue(&messages::ready_for_query_bytes(self.status()));
        }
        self.client.flush().await?;
        Ok(())
    }

    async fn skip_to_sync(&mut self) -> Result<(), SessionError> {
        self.client.flush().await?;
        loop {
            let m = self.client.read().await?;
            match m.tag() {
                b'S' => return Ok(()),
                b'X' => return Err(ProtocolError::Closed.into()),
                _ => {}
            }
        }
    }

    // ----- statements that run on several shards ---------------------------------

    /// DDL and writes to reference tables: every live shard, one after another.
    async fn run_everywhere(&mut self, sql: &str, analysis: &Analysis) -> Result<(), SessionError> {
        let dir = self.ctx.directory.load();
        let shards = everywhere(&dir, analysis.statements.iter());
        let mut first_reply: Option<Vec<Bytes>> = None;
        let mut failure: Option<Bytes> = None;
        for &s in &shards {
            match self.collect_on(s, sql).await {
                Ok((reply, err)) => {
                    if let Some(e) = err {
                        let (code, msg) = error_summary(&Message::from_raw(e.clone()));
                        warn!(shard = %dir.shards[s].name, %code, %msg, "statement failed on one shard");
                        if failure.is_none() {
                            failure = Some(prefix_error(&e, &dir.shards[s].name));
                        }
                    }
                    first_reply.get_or_insert(reply);
                }
                Err(e) => {
                    failure.get_or_insert(e.to_message(Severity::Error));
                }
            }
        }
        match failure {
            Some(e) => self.client.queue(&e),
            None => {
                for m in first_reply.unwrap_or_default() {
                    self.client.queue(&m);
                }
            }
        }
        if analysis.statements.iter().any(|s| s.kind == StatementKind::Ddl) {
            if let Err(e) = self.ctx.refresh_catalog().await {
                warn!(error = %e, "could not refresh the table catalog after DDL");
            }
        }
        self.ready().await
    }

    /// Runs a simple query on one shard outside any session transaction and returns
    /// its replies (without ReadyForQuery) and its first error, if any.
    async fn collect_on(&self, shard: ShardId, sql: &str) -> Result<(Vec<Bytes>, Option<Bytes>), SqlError> {
        self.collect_messages_on(shard, &messages::query(sql)).await
    }

    /// Like [`Self::collect_on`] for messages that end in one ReadyForQuery.
    async fn collect_messages_on(&self, shard: ShardId, run: &[u8]) -> Result<(Vec<Bytes>, Option<Bytes>), SqlError> {
        let pool = self.ctx.pool(shard).ok_or_else(|| SqlError::new("XX000", format!("no pool for shard {shard}")))?;
        let mut conn = pool.get().await.map_err(|e| SqlError::new(e.sqlstate(), e.to_string()))?;
        let prelude = self.settings_prelude(&mut conn);
        collect_messages(&mut conn, run, prelude, false).await
    }

    /// `RESET ALL; SET …` for a connection whose settings are not this
    /// session's, marking it as having them.
    fn settings_prelude(&self, conn: &mut crate::backend::Backend) -> Option<String> {
        let sig = self.settings_signature;
        if conn.settings == Some(sig) {
            return None;
        }
        conn.settings = Some(sig);
        let mut sql = String::from("RESET ALL");
        for text in self.settings.values() {
            sql.push_str("; ");
            sql.push_str(text);
        }
        Some(sql)
    }

    /// `COPY … TO STDOUT` without a tenant: every shard's rows, one shard after
    /// another, as one copy (a CSV header only once).
    async fn run_copy_out_fanout(&mut self, stmt: &Statement, shards: Vec<ShardId>) -> Result<(), SessionError> {
        if let Err(e) = self.refuse_during_moves(&shards, stmt) {
            return self.fail_simple(e).await;
        }
        let header = matches!(&stmt.kind, StatementKind::Copy(c) if c.header);
        let dir = self.ctx.directory.load();
        let mut total = 0u64;
        let mut started = false;
        for (i, &shard) in shards.iter().enumerate() {
            let name = dir.shards.get(shard).map(|s| s.name.clone()).unwrap_or_default();
            let pool = match self.ctx.pool(shard) {
                Some(p) => p,
                None => return self.fail_simple(SqlError::new("XX000", format!("no pool for shard {shard}"))).await,
            };
            let mut conn = match pool.get().await {
                Ok(c) => c,
                Err(e) => return self.fail_copy_out(started, SqlError::new(e.sqlstate(), e.to_string())).await,
            };
            let lost = |e: ProtocolError| SqlError::new("08006", format!("lost the connection to shard {name}: {e}"));
            if let Err(e) = conn.conn.send(&messages::query(&stmt.text)).await {
                conn.broken = true;
                return self.fail_copy_out(started, lost(e)).await;
            }
            let mut first_data = true;
            loop {
                let m = match conn.conn.read().await {
                    Ok(m) => m,
                    Err(e) => {
                        conn.broken = true;
                        return self.fail_copy_out(started, lost(e)).await;
                    }
                };
                match m.tag() {
                    b'H' if !started => {
                        self.client.queue(m.raw());
                        started = true;
                    }
                    b'd' => {
                        let skip = header && i > 0 && first_data;
                        first_data = false;
                        if !skip {
                            self.client.queue(m.raw());
                            if self.client.queued() > 256 * 1024 {
                                self.client.flush().await?;
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
                        return self.ready().await;
                    }
                    b'Z' => break,
                    b'c' => {}
                    _ => {}
                }
            }
        }
        if started {
            self.client.queue(&messages::simple(b'c'));
        }
        self.client.queue(&messages::command_complete(&format!("COPY {total}")));
        self.ready().await
    }

    async fn fail_copy_out(&mut self, started: bool, e: SqlError) -> Result<(), SessionError> {
        if started {
            self.client.queue(&messages::simple(b'c'));
        }
        self.fail_simple(e).await
    }

    /// A read without a tenant: every shard (concurrently), results merged.
    async fn run_fanout(&mut self, stmt: &Statement, shards: Vec<ShardId>) -> Result<(), SessionError> {
        let plan = match crate::fanout::plan(&stmt.text) {
            Ok(p) => p,
            Err(e) => return self.fail_simple(SqlError::new("0A000", e.to_string())).await,
        };
        let texts = match self.shard_texts(&shards, &plan.shard_sql, stmt) {
            Ok(t) => t,
            Err(e) => return self.fail_simple(e).await,
        };
        let streamed = plan.merge.streamed();
        if let Some((order, limit, offset)) = streamed {
            let read = |sql: &str| messages::query(sql).to_vec();
            return self
                .stream_fanout(Answer::Simple, &shards, &plan.shard_sql, texts, read, &order, limit, offset)
                .await;
        }
        let this = &*self;
        let runs = shards.iter().zip(&texts).map(|(&s, sql)| {
            let sql = sql.as_deref().unwrap_or(plan.shard_sql.as_str());
            async move { this.collect_on(s, sql).await }
        });
        let answers = futures::future::join_all(runs).await;
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

    /// A cross-shard read without grouping, streamed (see [`crate::fanout::ShardRows`]):
    /// rows relayed shard after shard, or merged in ORDER BY order; then OFFSET
    /// and LIMIT. Every shard's connection is taken first, so a shard that is down
    /// fails the read before a row is sent; an error after rows were sent ends the
    /// answer with it, as Postgres does for an error in the middle of a scan.
    #[allow(clippy::too_many_arguments)]
    async fn stream_fanout(
        &mut self,
        answer: Answer<'_>,
        shards: &[ShardId],
        sql: &str,
        texts: Vec<Option<String>>,
        read: impl Fn(&str) -> Vec<u8>,
        order: &[crate::fanout::SortKey],
        limit: Option<u64>,
        offset: u64,
    ) -> Result<(), SessionError> {
        let dir = self.ctx.directory.load();
        let mut readers = Vec::with_capacity(shards.len());
        let mut streams = Vec::with_capacity(shards.len());
        for (&s, text) in shards.iter().zip(&texts) {
            let pool = match self.ctx.pool(s) {
                Some(p) => p,
                None => {
                    return self.fail_answer(&answer, SqlError::new("XX000", format!("no pool for shard {s}"))).await
                }
            };
            let mut conn = match pool.get().await {
                Ok(c) => c,
                Err(e) => return self.fail_answer(&answer, SqlError::new(e.sqlstate(), e.to_string())).await,
            };
            let mut run = Vec::new();
            let mut skip = 0;
            if let Some(p) = self.settings_prelude(&mut conn) {
                run.extend_from_slice(&messages::query(&p));
                skip = 1;
            }
            run.extend_from_slice(&read(text.as_deref().unwrap_or(sql)));
            let (tx, rx) = tokio::sync::mpsc::channel(crate::fanout::QUEUE);
            readers.push(crate::fanout::read_shard(conn, Bytes::from(run), skip, tx));
            let name = dir.shards.get(s).map(|x| x.name.clone()).unwrap_or_default();
            streams.push(crate::fanout::ShardRows::new(name, rx));
        }
        let relay = self.relay_streams(answer, streams, order, limit, offset);
        let (_, relayed) = tokio::join!(futures::future::join_all(readers), relay);
        relayed
    }

    /// Fails a cross-shard read before any of its rows went out.
    async fn fail_answer(&mut self, answer: &Answer<'_>, e: SqlError) -> Result<(), SessionError> {
        match answer {
            Answer::Simple => self.fail_simple(e).await,
            Answer::Extended { .. } => self.fail_batch(e, true).await,
        }
    }

    /// The replies to a pipeline's messages other than Execute, for a
    /// cross-shard read described by `rd` (text) and `client_rd` (the Bind's
    /// formats).
    fn reply_around_execute(
        &mut self,
        messages: &[Message],
        parameters: Option<&Bytes>,
        rd: &Bytes,
        client_rd: &Bytes,
    ) {
        for m in messages {
            match (m.tag(), target_and_name(m)) {
                (b'D', Ok((b'S', _))) => {
                    if let Some(t) = parameters {
                        self.client.queue(t);
                    }
                    self.client.queue(rd);
                }
                (b'D', _) => self.client.queue(client_rd),
                (b'C', Ok((b'S', name))) => {
                    self.prepared.remove(name);
                    self.client.queue(&messages::close_complete());
                }
                _ => self.reply_for_statement_message(m),
            }
        }
    }

    async fn relay_streams(
        &mut self,
        answer: Answer<'_>,
        mut streams: Vec<crate::fanout::ShardRows>,
        order: &[crate::fanout::SortKey],
        limit: Option<u64>,
        offset: u64,
    ) -> Result<(), SessionError> {
        use crate::fanout::Event;
        // Every shard's RowDescription (or its error) before anything is sent.
        let mut description = None;
        for st in streams.iter_mut() {
            match st.next().await {
                Event::Described(rd) => {
                    description.get_or_insert(rd);
                }
                Event::ShardError(err) => {
                    if let Answer::Extended { batch, .. } = answer {
                        // As in Postgres: a statement whose Parse failed does not exist.
                        if !st.parsed {
                            for m in batch.iter().filter(|m| m.tag() == b'P') {
                                if let Ok(p) = Parse::parse(m) {
                                    self.prepared.remove(p.name);
                                }
                            }
                        }
                    }
                    self.client.queue(&prefix_error(&err, &st.shard));
                    return self.ready().await;
                }
                Event::Failed(e) => return self.fail_answer(&answer, e).await,
                Event::Row(_) | Event::Done => {
                    let e = SqlError::new("0A000", "a cross-shard statement must return rows".into());
                    return self.fail_answer(&answer, e).await;
                }
            }
        }
        let Some(description) = description else {
            return self.fail_answer(&answer, SqlError::new("XX000", "no shard to read from".into())).await;
        };
        let c_collation = self.ctx.c_collation.load(std::sync::atomic::Ordering::Relaxed);
        let keys = match crate::fanout::types_of(&description)
            .and_then(|types| crate::fanout::sort_keys(order, &types, c_collation))
        {
            Ok(k) => k,
            Err(e) => return self.fail_answer(&answer, SqlError::new(e.sqlstate(), e.to_string())).await,
        };
        // The rows as the client asks for them, and the replies before them.
        let formats = match &answer {
            Answer::Simple => None,
            Answer::Extended { formats, relayed, .. } => {
                let f = if *relayed {
                    crate::fanout::ClientFormats::as_sent(&description, formats)
                } else {
                    crate::fanout::ClientFormats::new(&description, formats)
                };
                match f {
                    Ok(f) => Some(f),
                    Err(e) => return self.fail_answer(&answer, SqlError::new(e.sqlstate(), e.to_string())).await,
                }
            }
        };
        let after_execute = match (&answer, &formats) {
            (Answer::Extended { batch, .. }, Some(f)) => {
                let at = batch.iter().position(|m| m.tag() == b'E').unwrap_or(batch.len());
                let parameters = streams.iter().find_map(|s| s.parameters.clone());
                self.reply_around_execute(&batch[..at], parameters.as_ref(), &description, &f.row_description);
                batch.get(at + 1..).unwrap_or_default()
            }
            _ => {
                self.client.queue(&description);
                &[]
            }
        };
        let client_row = |raw: Bytes| -> Result<Bytes, Bytes> {
            match &formats {
                None => Ok(raw),
                Some(f) => {
                    f.row(&raw).map_err(|e| SqlError::new(e.sqlstate(), e.to_string()).to_message(Severity::Error))
                }
            }
        };
        let (mut skipped, mut sent) = (0u64, 0u64);
        let mut failure: Option<Bytes> = None;
        if keys.is_empty() {
            'shards: for st in streams.iter_mut() {
                loop {
                    if limit.is_some_and(|l| sent >= l) {
                        break 'shards;
                    }
                    match st.next().await {
                        Event::Row(r) if skipped < offset => {
                            skipped += 1;
                            drop(r);
                        }
                        Event::Row(r) => {
                            match client_row(r) {
                                Ok(r) => self.client.queue(&r),
                                Err(e) => {
                                    failure = Some(e);
                                    break 'shards;
                                }
                            }
                            sent += 1;
                            if self.client.queued() > 256 * 1024 {
                                self.client.flush().await?;
                            }
                        }
                        Event::Described(_) => {}
                        Event::Done => break,
                        Event::ShardError(err) => {
                            failure = Some(prefix_error(&err, &st.shard));
                            break 'shards;
                        }
                        Event::Failed(e) => {
                            failure = Some(e.to_message(Severity::Error));
                            break 'shards;
                        }
                    }
                }
            }
        } else {
            let mut heads = crate::fanout::Heads::new(keys, streams.len());
            let mut last: Vec<Option<crate::fanout::Row>> = vec![None; streams.len()];
            let mut refill = (0..streams.len()).collect::<Vec<usize>>();
            loop {
                for i in refill.drain(..) {
                    let st = &mut streams[i];
                    match st.next().await {
                        Event::Row(r) => {
                            if let Err(e) = heads.put(i, r, last[i].as_ref()) {
                                failure = Some(e.to_message(Severity::Error));
                            }
                        }
                        Event::Described(_) | Event::Done => {}
                        Event::ShardError(err) => failure = Some(prefix_error(&err, &st.shard)),
                        Event::Failed(e) => failure = Some(e.to_message(Severity::Error)),
                    }
                }
                if failure.is_some() || limit.is_some_and(|l| sent >= l) {
                    break;
                }
                let Some(i) = heads.first() else { break };
                let (raw, row) = heads.take(i).expect("a head");
                if skipped < offset {
                    skipped += 1;
                } else {
                    match client_row(raw) {
                        Ok(r) => self.client.queue(&r),
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    }
                    sent += 1;
                    if self.client.queued() > 256 * 1024 {
                        self.client.flush().await?;
                    }
                }
                last[i] = Some(row);
                refill.push(i);
            }
        }
        drop(streams);
        match failure {
            Some(err) => {
                crate::metrics::global().error_message(err.get(5..).unwrap_or_default());
                self.client.queue(&err);
            }
            None => {
                self.client.queue(&messages::command_complete(&format!("SELECT {sent}")));
                if let Some(f) = &formats {
                    self.reply_around_execute(after_execute, None, &description, &f.row_description);
                }
            }
        }
        self.ready().await
    }

    /// A read without a tenant, sent with the extended protocol, whose answers
    /// must be merged (sorting, limits, aggregates). Each shard runs the planned
    /// text as an unnamed statement with the client's parameters and text results;
    /// the merged rows go back in the formats the client's Bind asked for, with a
    /// reply for each of the client's messages as Postgres would give them.
    async fn run_fanout_extended(
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
        for m in batch.iter().filter(|m| m.tag() == b'E') {
            let mut r = messages::Reader::new(m.body(), "Execute");
            let max_rows = r.cstr().and_then(|_| r.i32()).unwrap_or(0);
            if max_rows != 0 {
                let e = SqlError::new(
                    "0A000",
                    "a cross-shard query whose rows are merged cannot be fetched in parts (Execute with a row limit)".into(),
                )
                .hint("fetch every row at once (no fetch size), or add a tenant_id condition so the query runs on one shard");
                return self.fail_batch(e, true).await;
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
        if let (Some((order, limit, offset)), 1) = (streamed, batch.iter().filter(|m| m.tag() == b'E').count()) {
            let answer = Answer::Extended { batch, formats: &result_formats, relayed };
            return self.stream_fanout(answer, &shards, &plan.shard_sql, texts, read, &order, limit, offset).await;
        }
        let this = &*self;
        let runs = shards.iter().zip(&texts).map(|(&s, sql)| {
            let run = read(sql.as_deref().unwrap_or(plan.shard_sql.as_str()));
            async move { this.collect_messages_on(s, &run).await }
        });
        let answers = futures::future::join_all(runs).await;
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
        for m in batch {
            if m.tag() != b'E' {
                let described = &merged.row_description;
                self.reply_around_execute(std::slice::from_ref(m), params_description.as_ref(), described, &client_rd);
                continue;
            }
            for r in &rows {
                self.client.queue(r);
                if self.client.queued() > 256 * 1024 {
                    self.client.flush().await?;
                }
            }
            self.client.queue(&messages::command_complete(&merged.command_tag));
        }
        self.ready().await
    }

    /// Per shard, the text of a cross-shard read with rows under a move left out
    /// where they are not owned (see [`crate::hold::without_moving_rows`]).
    fn shard_texts(&self, shards: &[ShardId], sql: &str, stmt: &Statement) -> Result<Vec<Option<String>>, SqlError> {
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
    fn refuse_during_moves(&self, shards: &[ShardId], stmt: &Statement) -> Result<(), SqlError> {
        if self.shard_texts(shards, &stmt.text, stmt)?.iter().any(Option::is_some) {
            return Err(SqlError::new(
                "55000",
                "this cross-shard read cannot run while rows of its tables are being moved between shards".into(),
            )
            .hint("send it as a SELECT, name the tenant (WHERE tenant_id = …), or retry after the move"));
        }
        Ok(())
    }

    async fn run_split_insert(
        &mut self,
        stmt: &Statement,
        parts: Vec<(ShardId, Vec<usize>)>,
    ) -> Result<(), SessionError> {
        let texts = match crate::split::insert_per_shard(&stmt.text, &parts) {
            Ok(t) => t,
            Err(e) => return self.fail_simple(e).await,
        };
        // Not atomic across shards; each shard's part commits on its own.
        let mut total = 0u64;
        let mut header: Option<Bytes> = None;
        let mut rows = Vec::new();
        for (shard, sql) in texts {
            match self.collect_on(shard, &sql).await {
                Err(e) => return self.fail_simple(e).await,
                Ok((_, Some(err))) => {
                    let dir = self.ctx.directory.load();
                    let name = dir.shards.get(shard).map(|x| x.name.clone()).unwrap_or_default();
                    self.client.queue(&prefix_error(&err, &name));
                    return self.ready().await;
                }
                Ok((replies, None)) => {
                    for r in replies {
                        match r.first() {
                            Some(b'T') => {
                                header.get_or_insert(r);
                            }
                            Some(b'D') => rows.push(r),
                            Some(b'C') => {
                                let tag = String::from_utf8_lossy(&r[5..r.len().saturating_sub(1)]).to_string();
                                total += tag.rsplit(' ').next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
        if let Some(h) = header {
            self.client.queue(&h);
        }
        for r in rows {
            self.client.queue(&r);
        }
        self.client.queue(&messages::command_complete(&format!("INSERT 0 {total}")));
        self.ready().await
    }

    async fn run_copy_split(&mut self, stmt: &Statement, _query: Bytes) -> Result<(), SessionError> {
        let dir = self.ctx.directory.load();
        let result = crate::copy::copy_in_split(&self.ctx, &dir, stmt, &mut self.client).await;
        match result {
            Ok(tag) => {
                self.client.queue(&messages::command_complete(&tag));
                self.ready().await
            }
            Err(crate::copy::CopyError::Client(e)) => Err(e.into()),
            Err(crate::copy::CopyError::Sql(e)) => self.fail_simple(e).await,
        }
    }
}

/// Sends `sql` (after `prelude`, whose replies are dropped but for errors) as a
/// simple query on `conn` and returns the replies without ReadyForQuery, and the
/// first error.
/// Makes sure the statement is prepared on this server connection, queuing
/// a Parse (whose reply the client does not see) when it is not.
fn ensure_prepared(backend: &mut crate::backend::Backend, p: &Prepared, expects: &mut VecDeque<Expect>) {
    // Looked up before inserting: no copy of the name for the common case.
    if !backend.prepared.contains(&p.server_name) && backend.prepared.insert(p.server_name.clone()) {
        backend.conn.queue(&messages::parse(&p.server_name, &p.sql, &p.param_types));
        expects.push_back(Expect::Parse { forward: false, server_name: p.server_name.clone(), client_name: None });
    }
}

async fn collect(
    conn: &mut Pooled,
    sql: &str,
    prelude: Option<String>,
    in_transaction: bool,
) -> Result<(Vec<Bytes>, Option<Bytes>), SqlError> {
    collect_messages(conn, &messages::query(sql), prelude, in_transaction).await
}

/// [`collect`] for any messages that end in one ReadyForQuery (a simple query,
/// or an extended-protocol batch ending in Sync).
async fn collect_messages(
    conn: &mut Pooled,
    run: &[u8],
    prelude: Option<String>,
    in_transaction: bool,
) -> Result<(Vec<Bytes>, Option<Bytes>), SqlError> {
    let name = conn.shard_name().to_string();
    let lost = |e: ProtocolError| SqlError::new("08006", format!("lost the connection to shard {name}: {e}"));
    let mut skip = 0;
    if let Some(p) = prelude {
        conn.conn.queue(&messages::query(&p));
        skip = 1;
    }
    conn.conn.queue(run);
    if let Err(e) = conn.conn.flush().await {
        conn.broken = true;
        return Err(lost(e));
    }
    let mut replies = Vec::new();
    let mut error = None;
    let status;
    loop {
        let m = match conn.conn.read().await {
            Ok(m) => m,
            Err(e) => {
                conn.broken = true;
                return Err(lost(e));
            }
        };
        match m.tag() {
            b'Z' if skip > 0 => skip -= 1,
            b'Z' => {
                status = m.body().first().copied().unwrap_or(b'I');
                break;
            }
            b'E' => {
                error.get_or_insert(m.raw().clone());
            }
            _ if skip > 0 => {}
            b'G' => {
                // COPY FROM STDIN cannot be fed here.
                conn.conn.queue(&messages::Builder::new(b'f').cstr("not supported here").finish());
                let _ = conn.conn.flush().await;
            }
            _ => replies.push(m.raw().clone()),
        }
    }
    if status != b'I' && !in_transaction {
        // Only a transaction the session tracks may stay open on a connection.
        conn.broken = true;
    }
    Ok((replies, error))
}

/// The shards a statement that must run "everywhere" runs on: DDL on every live
/// shard (the schema is the same everywhere, a shard added at run time included);
/// writes to reference tables, and keyless writes to sharded tables, on the
/// shards that hold reference rows or own sharded rows. A shard added and not
/// moved to yet has neither (and maybe not the tables).
fn everywhere<'a>(
    dir: &shardgate_directory::Directory,
    mut statements: impl Iterator<Item = &'a Statement>,
) -> Vec<ShardId> {
    if statements.any(|s| s.kind == StatementKind::Ddl) {
        return dir.live_shards().map(|(i, _)| i).collect();
    }
    let refs = dir.reference_shards();
    let owning = dir.owning_shards();
    dir.live_shards().map(|(i, _)| i).filter(|i| refs.contains(i) || owning.contains(i)).collect()
}

fn route_kind(t: &Target) -> crate::metrics::RouteKind {
    use crate::metrics::RouteKind as K;
    match t {
        Target::Shard(_) => K::Shard,
        Target::Any => K::Any,
        Target::All => K::All,
        Target::Fanout(_) => K::Fanout,
        Target::SplitInsert(_) | Target::CopySplit => K::Split,
    }
}

/// Whether a query string opens a transaction block it does not close.
fn leaves_transaction_open(analysis: &Analysis) -> bool {
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

/// A shard's collected answer: its ParameterDescription, RowDescription and
/// DataRows (the last of each description).
fn split_answer(replies: Vec<Bytes>) -> (Option<Bytes>, Option<Bytes>, Vec<Bytes>) {
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

/// The result format codes at the start of a Bind's tail.
fn result_formats(tail: &[u8]) -> Option<Vec<i16>> {
    let mut r = messages::Reader::new(tail, "Bind");
    let n = r.i16().ok()?;
    (0..n.max(0)).map(|_| r.i16().ok()).collect()
}

fn unknown_statement(name: &str) -> SqlError {
    SqlError::new("26000", format!("prepared statement \"{name}\" does not exist"))
}

/// A shard's ErrorResponse with the shard named in its message.
fn prefix_error(err: &Bytes, shard: &str) -> Bytes {
    let fields = messages::error_fields(&Message::from_raw(err.clone()));
    let mut b = messages::Builder::new(b'E');
    for (code, value) in fields {
        if code == b'M' {
            b.u8(code).cstr(&format!("{value} (on shard {shard})"));
        } else {
            b.u8(code).cstr(&value);
        }
    }
    b.u8(0).finish()
}

enum RelayError {
    Client(SessionError),
    Backend(ProtocolError),
}

impl From<SessionError> for RelayError {
    fn from(e: SessionError) -> Self {
        RelayError::Client(e)
    }
}

fn client_err(e: ProtocolError) -> RelayError {
    RelayError::Client(e.into())
}

/// COPY FROM STDIN to one server: client CopyData/CopyDone/CopyFail go through
/// as they come, until the client ends the copy.
async fn copy_in_passthrough<C, B>(client: &mut Connection<C>, backend: &mut Connection<B>) -> Result<(), RelayError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let m = client.read().await.map_err(|e| RelayError::Client(e.into()))?;
        backend.queue(m.raw());
        let done = matches!(m.tag(), b'c' | b'f');
        if done || !client.has_buffered() || backend.queued() > 256 * 1024 {
            backend.flush().await.map_err(RelayError::Backend)?;
        }
        match m.tag() {
            b'd' | b'H' | b'S' => {}
            b'c' | b'f' => return Ok(()),
            _ => {
                // Anything else ends the copy with an error on the server's side.
                backend.queue(&messages::Builder::new(b'f').cstr("unexpected message during COPY").finish());
                backend.flush().await.map_err(RelayError::Backend)?;
                return Ok(());
            }
        }
    }
}

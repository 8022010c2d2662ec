//! A transaction open on every shard at once: one that began with DDL or a
//! reference-table write (a schema migration). Statements run on each shard in
//! turn; COMMIT commits them on every shard or on none.

use bytes::Bytes;
use shardgate_directory::ShardId;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::warn;

use super::everywhere::{collect, everywhere};
use super::reply::prefix_error;
use super::transaction::Held;
use super::{Session, SessionError};
use crate::error::SqlError;
use crate::protocol::messages::{self, Severity};
use crate::protocol::Message;
use crate::route::{self, Target};
use crate::sql::{Analysis, StatementKind, TxnControl};

/// The connections of a transaction open on every shard.
pub(super) struct AllShards {
    pub(super) held: Vec<Held>,
    /// A shard reported an error: COMMIT then rolls back everywhere.
    pub(super) failed: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// A transaction whose first statement must run on every shard (DDL, a
    /// reference-table write): BEGIN on every live shard, then the statement.
    pub(super) async fn open_multi(&mut self, sql: &str, analysis: &Analysis) -> Result<(), SessionError> {
        let dir = self.ctx.directory.load();
        // BEGIN was either held (pending) or is part of `sql` itself.
        let prelude = self.txn.pending_begin.take().map(|p| p.join("; "));
        let mut bounds = Vec::new();
        for shard in everywhere(&dir, analysis.statements.iter()) {
            let Some(pool) = self.role_pool(shard) else {
                continue;
            };
            match pool.get().await {
                Ok(mut conn) => {
                    let settings = self.settings.prelude(&mut conn);
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
                            let b: &mut Held = b;
                            b.conn.broken = true;
                        }
                        self.txn.aborted = true;
                        return self.fail_simple(e).await;
                    }
                    bounds.push(Held { shard, conn });
                }
                Err(e) => {
                    for b in bounds.iter_mut() {
                        let b: &mut Held = b;
                        b.conn.broken = true;
                    }
                    self.txn.aborted = true;
                    return self.fail_simple(SqlError::new(e.sqlstate(), e.to_string())).await;
                }
            }
        }
        self.multi = Some(AllShards { held: bounds, failed: false });
        self.multi_query(sql, analysis).await
    }

    /// A statement inside a transaction open on every shard.
    pub(super) async fn multi_query(&mut self, sql: &str, analysis: &Analysis) -> Result<(), SessionError> {
        let first = &analysis.statements[0];
        let single = analysis.statements.len() == 1;
        if single {
            match &first.kind {
                StatementKind::Txn(TxnControl::Commit | TxnControl::Rollback) => {
                    let commit = matches!(first.kind, StatementKind::Txn(TxnControl::Commit)) && !self.multi_failed();
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
        if self.multi_failed() {
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
        let bound_shards: Vec<ShardId> = self.multi.iter().flat_map(|all| &all.held).map(|b| b.shard).collect();
        let target = self.route_multi(analysis, &dir);
        if target.is_ok() {
            self.note_fresh_tables(analysis);
        }
        let run_on: Vec<usize> = match target {
            Ok(Target::Shard(s)) => bound_shards.iter().position(|&x| x == s).into_iter().collect(),
            // A shard that holds the reference rows, if the statement reads any.
            Ok(Target::Any) => {
                let holds_rows = |s: &ShardId| dir.shards.get(*s).is_some_and(|x| x.reference);
                vec![bound_shards.iter().position(holds_rows).unwrap_or(0)]
            }
            Ok(Target::All) => (0..bound_shards.len()).collect(),
            Ok(_) => {
                self.fail_multi();
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
                self.fail_multi();
                return self.fail_simple(e).await;
            }
        };
        let mut first_reply = None;
        let mut failure = None;
        let Some(bounds) = self.multi.as_mut().map(|all| &mut all.held) else {
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
                self.fail_multi();
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

    pub(super) fn route_multi(
        &self,
        analysis: &Analysis,
        dir: &shardgate_directory::Directory,
    ) -> Result<Target, SqlError> {
        route::check_fresh_tables(&analysis.statements, self.fresh_tables())?;
        let rules = self.ctx.rules();
        let mut target = Target::Any;
        for stmt in &analysis.statements {
            let t = route::route(stmt, None, self.tenant.as_ref(), dir, &self.ctx.catalog, &rules, &mut Vec::new())?;
            target = route::combine_on_every_shard(target, t);
        }
        route::check_reference_reads(&analysis.statements, &target, dir, &self.ctx.catalog)?;
        Ok(target)
    }

    /// COMMIT (or ROLLBACK) on every shard of a transaction open on all of them:
    /// on all of them or on none (two-phase commit). With
    /// `cross_shard_transactions = "refuse"` shards commit one after another:
    /// if one fails after others committed, the error says which committed,
    /// since that cannot be undone.
    pub(super) async fn end_multi(&mut self, commit: bool) -> Result<(), SessionError> {
        let mut bounds = self.multi.take().map(|all| all.held).unwrap_or_default();
        if commit && bounds.len() > 1 && self.ctx.two_phase() {
            let mut decider = bounds.pop().expect("two parts or more");
            let ended = self.commit_parts(&mut decider, &mut bounds).await;
            for b in bounds.iter_mut().chain(std::iter::once(&mut decider)) {
                b.conn.settings = None;
            }
            match ended? {
                Ok(()) => {
                    self.client.queue(&messages::command_complete("COMMIT"));
                    if let Err(e) = self.ctx.refresh_catalog().await {
                        warn!(error = %e, "could not refresh the table catalog after DDL");
                    }
                }
                Err(e) => {
                    crate::metrics::global().error(e.code);
                    self.client.queue(&e.to_message(Severity::Error));
                }
            }
            return self.ready().await;
        }
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

    fn multi_failed(&self) -> bool {
        self.multi.as_ref().is_some_and(|all| all.failed)
    }

    fn fail_multi(&mut self) {
        if let Some(all) = self.multi.as_mut() {
            all.failed = true;
        }
    }
}

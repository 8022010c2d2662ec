//! Statements that must land on every shard (DDL, reference-table writes,
//! keyless writes where allowed), each shard on a connection of its own, and the
//! helpers that run a statement on one shard and collect its whole answer.

use bytes::Bytes;
use shardgate_directory::ShardId;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::warn;

use super::relay::RelayError;
use super::reply::prefix_error;
use super::{Session, SessionError};
use crate::error::SqlError;
use crate::pool::Pooled;
use crate::protocol::messages::{self, error_summary, Bind, Severity};
use crate::protocol::{Message, ProtocolError};
use crate::sql::{Analysis, Statement, StatementKind};

/// Sends `sql` (after `prelude`, whose replies are dropped but for errors) as a
/// simple query on `conn` and returns the replies without ReadyForQuery, and the
/// first error.
pub(super) async fn collect(
    conn: &mut Pooled,
    sql: &str,
    prelude: Option<String>,
    in_transaction: bool,
) -> Result<(Vec<Bytes>, Option<Bytes>), SqlError> {
    collect_messages(conn, &messages::query(sql), prelude, in_transaction).await
}

/// [`collect`] for any messages that end in one ReadyForQuery (a simple query,
/// or an extended-protocol batch ending in Sync).
pub(super) async fn collect_messages(
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
pub(super) fn everywhere<'a>(
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

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Runs a whole batch (ending in Sync) on several shards, one after another,
    /// each on a connection of its own, and answers with one combined reply:
    /// a write that must land everywhere answers as the first shard did, or with
    /// the first shard's error; a read (`gather`) answers with every shard's rows.
    pub(super) async fn run_batch_on_shards(
        &mut self,
        batch: &[Message],
        shards: Vec<ShardId>,
        gather: bool,
    ) -> Result<(), SessionError> {
        let dir = self.ctx.directory.load();
        let mut replies: Vec<(ShardId, Vec<Bytes>)> = Vec::with_capacity(shards.len());
        for &shard in &shards {
            if let Err(e) = self.checkout(shard).await {
                return self.fail_batch(e, true).await;
            }
            let expects = self.rewrite_batch(batch, 0);
            let mut buf = Vec::new();
            let flushed = match self.txn.held.as_mut() {
                Some(b) => b.conn.conn.flush().await,
                None => Ok(()),
            };
            let relayed = match flushed {
                Ok(()) => self.relay_batch(expects, Some(&mut buf)).await,
                Err(e) => Err(RelayError::Backend(e)),
            };
            match relayed {
                Ok(_) => {
                    self.txn.held = None;
                    self.clear_cancel();
                }
                Err(RelayError::Client(e)) => return Err(e),
                Err(RelayError::Backend(e)) => return self.lost_backend(e).await,
            }
            replies.push((shard, buf));
        }
        self.txn.open_batch = false;
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

    /// DDL and writes to reference tables: every live shard, in one
    /// transaction committed on all of them (two-phase commit), or one shard
    /// after another for statements that cannot run in a transaction block.
    pub(super) async fn run_everywhere(&mut self, sql: &str, analysis: &Analysis) -> Result<(), SessionError> {
        let dir = self.ctx.directory.load();
        let shards = everywhere(&dir, analysis.statements.iter());
        let ddl = analysis.statements.iter().any(|s| s.kind == StatementKind::Ddl);
        // A role changed: the passwords looked up are looked up again.
        let roles = ddl && crate::sql::roles::changes_roles(sql);
        // On every shard or on none, unless the statement cannot run in a
        // transaction block, or the string ends or opens one itself.
        if shards.len() > 1
            && self.ctx.two_phase()
            && !analysis.statements.iter().any(|s| matches!(s.kind, StatementKind::Txn(_)))
            && self.run_everywhere_atomically(sql, &shards, ddl).await?
        {
            if roles {
                self.ctx.roles.forget_all();
            }
            return Ok(());
        }
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
        if ddl {
            if let Err(e) = self.ctx.refresh_catalog().await {
                warn!(error = %e, "could not refresh the table catalog after DDL");
            }
        }
        if roles {
            self.ctx.roles.forget_all();
        }
        self.ready().await
    }

    /// Runs a simple query on one shard outside any session transaction and returns
    /// its replies (without ReadyForQuery) and its first error, if any.
    pub(super) async fn collect_on(&self, shard: ShardId, sql: &str) -> Result<(Vec<Bytes>, Option<Bytes>), SqlError> {
        self.collect_messages_on(shard, &messages::query(sql)).await
    }

    /// Like [`Self::collect_on`] for messages that end in one ReadyForQuery.
    pub(super) async fn collect_messages_on(
        &self,
        shard: ShardId,
        run: &[u8],
    ) -> Result<(Vec<Bytes>, Option<Bytes>), SqlError> {
        let pool = self.role_pool(shard).ok_or_else(|| SqlError::new("XX000", format!("no pool for shard {shard}")))?;
        let mut conn = pool.get().await.map_err(|e| SqlError::new(e.sqlstate(), e.to_string()))?;
        let prelude = self.settings.prelude(&mut conn);
        collect_messages(&mut conn, run, prelude, false).await
    }
}

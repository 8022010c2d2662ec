//! Statements whose rows are split between shards or gathered from all of them:
//! a multi-row INSERT of several tenants, `COPY … FROM STDIN` into a sharded
//! table, and `COPY … TO STDOUT` without a tenant.

use bytes::Bytes;
use shardgate_directory::ShardId;
use tokio::io::{AsyncRead, AsyncWrite};

use super::reply::prefix_error;
use super::{Session, SessionError};
use crate::error::SqlError;
use crate::protocol::messages::{self, Severity};
use crate::protocol::{Message, ProtocolError};
use crate::sql::{Statement, StatementKind};

/// The answers of one statement run on several shards, gathered: the first
/// RowDescription, every shard's rows, and the rows written, summed.
#[derive(Default)]
pub(super) struct Gathered {
    header: Option<Bytes>,
    rows: Vec<Bytes>,
    pub(super) total: u64,
}

impl Gathered {
    pub(super) fn add(&mut self, replies: Vec<Bytes>) {
        for r in replies {
            match r.first() {
                Some(b'T') => {
                    self.header.get_or_insert(r);
                }
                Some(b'D') => self.rows.push(r),
                Some(b'C') => self.total += command_count(&r),
                _ => {}
            }
        }
    }

    /// Queues the answer: the rows, then `tag` with the count.
    pub(super) fn answer<S: AsyncRead + AsyncWrite + Unpin>(
        self,
        client: &mut crate::protocol::Connection<S>,
        tag: &str,
    ) {
        if let Some(h) = &self.header {
            client.queue(h);
        }
        for r in &self.rows {
            client.queue(r);
        }
        client.queue(&messages::command_complete(&format!("{tag} {}", self.total)));
    }
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
                    match crate::copy_in::copy_in_split(&self.ctx, &dir, stmt, &mut self.client).await {
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

    /// `COPY … TO STDOUT` without a tenant: every shard's rows, one shard after
    /// another, as one copy (a CSV header only once).
    pub(super) async fn run_copy_out_fanout(
        &mut self,
        stmt: &Statement,
        shards: Vec<ShardId>,
    ) -> Result<(), SessionError> {
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

    pub(super) async fn fail_copy_out(&mut self, started: bool, e: SqlError) -> Result<(), SessionError> {
        if started {
            self.client.queue(&messages::simple(b'c'));
        }
        self.fail_simple(e).await
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
        let two_phase = self.ctx.config.cross_shard_transactions == crate::config::CrossShard::TwoPhase;
        if two_phase && texts.len() > 1 {
            return self.run_split_insert_atomically(texts).await;
        }
        // cross_shard_transactions = "refuse": each shard's part commits on its own.
        let mut gathered = Gathered::default();
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
        gathered.answer(&mut self.client, "INSERT 0");
        self.ready().await
    }

    pub(super) async fn run_copy_split(&mut self, stmt: &Statement, _query: Bytes) -> Result<(), SessionError> {
        let dir = self.ctx.directory.load();
        let result = crate::copy_in::copy_in_split(&self.ctx, &dir, stmt, &mut self.client).await;
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

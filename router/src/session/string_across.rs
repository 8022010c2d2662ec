//! One query string whose statements are for tenants on different shards
//! (`BEGIN; UPDATE … tenant 1; UPDATE … tenant 2; COMMIT`, or the same
//! without BEGIN): run one statement at a time, each as if sent alone, and
//! answered as Postgres answers a query string, with one ReadyForQuery at the
//! end.
//!
//! Postgres runs a query string without BEGIN as one implicit transaction: an
//! error in any statement rolls back the ones before it, and the rest are not
//! run. So does the router: it opens a block for the string, each statement
//! joins it on its shard, and at the end the block commits on every shard it
//! reached (two-phase commit when there are several, `twophase.rs`) or, after
//! an error, rolls back everywhere. With BEGIN at its start, or inside a block
//! already open, the statements run in the block and it stays open (failed,
//! after an error) for the client to end, as it would in Postgres.

use tokio::io::{AsyncRead, AsyncWrite};

use super::{Session, SessionError};
use crate::protocol::messages::{self, Severity};
use crate::protocol::Message;
use crate::route::{self, Target};
use crate::sql::{Analysis, StatementKind, TxnControl};

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Whether a query string of several statements is for several shards
    /// and can run one statement at a time: BEGIN only first, COMMIT or
    /// ROLLBACK only last, no COPY (its data would follow the string).
    pub(super) fn runs_statement_by_statement(&self, analysis: &Analysis) -> bool {
        let statements = &analysis.statements;
        if statements.len() < 2 || !self.ctx.two_phase() || self.multi.is_some() || self.txn.aborted {
            return false;
        }
        let last = statements.len() - 1;
        let fits = statements.iter().enumerate().all(|(i, s)| match &s.kind {
            StatementKind::Txn(TxnControl::Begin) => i == 0,
            StatementKind::Txn(TxnControl::Commit | TxnControl::Rollback) => i == last,
            StatementKind::Txn(TxnControl::Savepoint) => true,
            StatementKind::Txn(_) | StatementKind::Copy(_) => false,
            _ => true,
        });
        if !fits {
            return false;
        }
        // Each statement on its own: statements for two shards make the
        // string one the combined routing refuses.
        let dir = self.ctx.directory.load();
        let rules = self.rules();
        let mut touched = Vec::new();
        let mut shards = Vec::new();
        for s in statements {
            let target = route::route_statements(
                std::slice::from_ref(s),
                None,
                self.tenant.as_ref(),
                &dir,
                &self.ctx.catalog,
                &rules,
                route::Joining::default(),
                &mut touched,
            );
            match target {
                Ok(Target::Shard(shard)) => {
                    if !shards.contains(&shard) {
                        shards.push(shard);
                    }
                }
                Ok(Target::Any) => {}
                // DDL and writes of every shard run whole on every shard, as
                // before; a refusal is the normal path's to give.
                Ok(_) | Err(_) => return false,
            }
        }
        shards.len() > 1
    }

    /// Runs the statements of `analysis` one at a time (see the module's
    /// doc) and answers with one ReadyForQuery.
    pub(super) async fn run_statement_by_statement(&mut self, analysis: &Analysis) -> Result<(), SessionError> {
        let implicit =
            !self.txn.in_block() && !matches!(analysis.statements[0].kind, StatementKind::Txn(TxnControl::Begin));
        if implicit {
            self.txn.pending_begin = Some(vec!["BEGIN".into()]);
        }
        self.client.hold_ready();
        let mut failed = false;
        for stmt in &analysis.statements {
            let m = Message::from_raw(messages::query(&stmt.text));
            let ran = Box::pin(self.simple_query(&m)).await;
            if let Err(e) = ran {
                self.client.release_ready();
                return Err(e);
            }
            if self.client.take_held_ready() == Some(b'E') {
                failed = true;
                break;
            }
        }
        self.client.release_ready();
        if implicit {
            if failed {
                self.txn.aborted = false;
                self.txn.pending_begin = None;
                self.roll_back_all().await;
            } else if let Err(e) = self.commit_implicit().await? {
                self.client.queue(&e.to_message(Severity::Error));
            }
        }
        let status = if self.txn.in_block() && (failed || self.txn.aborted) { b'E' } else { self.status() };
        self.client.queue(&messages::ready_for_query_bytes(status));
        self.client.flush().await?;
        Ok(())
    }

    /// Commits the block a query string ran in: on every shard it reached,
    /// together; on its one shard, as that shard's COMMIT.
    async fn commit_implicit(&mut self) -> Result<Result<(), crate::error::SqlError>, SessionError> {
        self.txn.pending_begin = None;
        if !self.txn.parked.is_empty() {
            return Ok(Box::pin(self.end_cross_shard(true)).await?.map(|_| ()));
        }
        let Some(held) = self.txn.held.as_mut() else { return Ok(Ok(())) };
        let committed = held.conn.simple_query("COMMIT").await;
        let name = held.conn.shard_name().to_string();
        self.after_ready(b'I');
        Ok(committed.map(|_| ()).map_err(|(code, message)| {
            crate::error::SqlError::from_server(&code, format!("{message} (on shard {name})"))
        }))
    }
}

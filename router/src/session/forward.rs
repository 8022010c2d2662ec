//! One statement of the simple protocol to one shard: sent as text or as its
//! shape's prepared statement, its answer relayed, the connection kept or
//! returned.

use bytes::Bytes;
use shardgate_directory::ShardId;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};

use super::prepared::MAX_PREPARED_PER_CONNECTION;
use super::relay::{RelayError, Relayed};
use super::{Session, SessionError};
use crate::error::SqlError;
use crate::protocol::messages::{self, Severity};
use crate::protocol::ProtocolError;
use crate::sql::{Analysis, SimpleForm};

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Sends one statement to one shard, as its prepared form when it has one.
    pub(super) async fn forward(
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
    pub(super) async fn forward_simple(
        &mut self,
        shard: ShardId,
        query: Bytes,
        analysis: Option<&Analysis>,
    ) -> Result<(), SessionError> {
        let Some(swallow) = self.checkout_for_simple(shard).await? else {
            return Ok(());
        };
        let Some(b) = self.txn.held.as_mut() else {
            return Ok(());
        };
        b.conn.conn.queue(&query);
        let started = crate::clock::Stamp::now();
        if let Err(e) = b.conn.conn.flush().await {
            return self.lost_backend(e).await;
        }
        let relayed = self.relay_simple(swallow).await;
        self.finish_forward(relayed, started, analysis).await
    }

    /// The reply to a simple query (and the `swallow` statements sent ahead
    /// of it) relayed: the transaction status it ended in.
    pub(super) async fn relay_simple(&mut self, swallow: usize) -> Result<u8, RelayError> {
        self.relay_until_ready(swallow, None).await.map(|r| match r {
            Relayed::Ready(status) => status,
            Relayed::Refused { .. } => unreachable!("a simple query's reply is never refused"),
        })
    }

    /// Runs a simple query as its shape's prepared statement: Parse (once per
    /// server connection), then Bind, Describe, Execute and Sync, the replies
    /// only a simple query has passed on. If the server refuses it before it
    /// runs, the original text is sent instead.
    pub(super) async fn forward_prepared(
        &mut self,
        shard: ShardId,
        query: Bytes,
        analysis: &Analysis,
        simple: SimpleForm,
    ) -> Result<(), SessionError> {
        let Some(swallow) = self.checkout_for_simple(shard).await? else {
            return Ok(());
        };
        let Some(b) = self.txn.held.as_mut() else {
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
                let Some(b) = self.txn.held.as_mut() else {
                    return Ok(());
                };
                b.conn.prepared.remove(&form.name);
                b.conn.conn.queue(&messages::close(b'S', &form.name));
                b.conn.conn.queue(&messages::sync());
                b.conn.conn.queue(&query);
                if let Err(e) = b.conn.conn.flush().await {
                    return self.lost_backend(e).await;
                }
                self.relay_simple(1).await
            }
            Err(e) => Err(e),
        };
        self.finish_forward(relayed, started, Some(analysis)).await
    }

    /// [`Self::checkout`] for a simple query: None once a refusal has been
    /// answered.
    async fn checkout_for_simple(&mut self, shard: ShardId) -> Result<Option<usize>, SessionError> {
        match self.checkout(shard).await {
            Ok(n) => Ok(Some(n)),
            Err(e) => self.fail_simple(e).await.map(|()| None),
        }
    }

    /// After the reply to one forwarded statement was relayed.
    pub(super) async fn finish_forward(
        &mut self,
        relayed: Result<u8, RelayError>,
        started: crate::clock::Stamp,
        analysis: Option<&Analysis>,
    ) -> Result<(), SessionError> {
        match relayed {
            Ok(status) => {
                let elapsed = started.elapsed();
                if let Some(b) = &self.txn.held {
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

    /// The held server connection failed mid-statement: tell the client, drop the
    /// connection, keep the session.
    pub(super) async fn lost_backend(&mut self, e: ProtocolError) -> Result<(), SessionError> {
        let name = self.txn.held.as_ref().map(|b| b.conn.shard_name().to_string()).unwrap_or_default();
        warn!(shard = %name, error = %e, "lost server connection");
        if let Some(mut b) = self.txn.held.take() {
            b.conn.broken = true;
        }
        // The transaction's other shards roll back as their connections close.
        for mut b in std::mem::take(&mut self.txn.parked) {
            b.conn.broken = true;
        }
        self.txn.begin_sql = None;
        self.txn.savepoints = Default::default();
        self.txn.last_status = b'I';
        self.clear_cancel();
        self.txn.pending_begin = None;
        self.txn.aborted = false;
        self.txn.open_batch = false;
        self.txn.skipping = false;
        self.shadow_digest = None;
        crate::metrics::global().error("08006");
        self.client.queue(
            &SqlError::new("08006", format!("lost the connection to shard {name}: {e}"))
                .hint("the statement may or may not have been applied; if it was in a transaction, the transaction was rolled back")
                .to_message(Severity::Error),
        );
        self.ready().await
    }
}

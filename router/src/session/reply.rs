//! The router's own answers: its errors (simple query or batch), ReadyForQuery,
//! and the replies Postgres would give to a batch the router answers itself.

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::{Session, SessionError};
use crate::error::SqlError;
use crate::protocol::messages::{self, target_and_name, Severity};
use crate::protocol::{Message, ProtocolError};

/// A shard's ErrorResponse with the shard named in its message.
pub(super) fn prefix_error(err: &Bytes, shard: &str) -> Bytes {
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

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Reports an error of the router's own, then ReadyForQuery.
    pub(super) async fn fail_simple(&mut self, e: SqlError) -> Result<(), SessionError> {
        debug!(code = e.code, message = %e.message, "statement refused");
        crate::metrics::global().error(e.code);
        self.client.queue(&e.to_message(Severity::Error));
        if self.txn.in_block() {
            self.txn.aborted = true;
        }
        self.ready().await
    }

    pub(super) async fn ready(&mut self) -> Result<(), SessionError> {
        self.client.queue(&messages::ready_for_query_bytes(self.status()));
        self.client.flush().await?;
        Ok(())
    }

    /// The reply Postgres gives to Parse, Bind, Describe or Close of a statement
    /// that takes no parameters and returns no rows, for batches the router
    /// answers itself.
    pub(super) fn reply_for_statement_message(&mut self, m: &Message) {
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
    pub(super) async fn answer_batch_locally(
        &mut self,
        batch: &[Message],
        sync: bool,
        tag: &str,
    ) -> Result<(), SessionError> {
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

    /// A batch refused by the router: the error, then (at Sync) ReadyForQuery.
    pub(super) async fn fail_batch(&mut self, e: SqlError, sync: bool) -> Result<(), SessionError> {
        debug!(code = e.code, message = %e.message, "batch refused");
        crate::metrics::global().error(e.code);
        self.client.queue(&e.to_message(Severity::Error));
        if self.txn.in_block() {
            self.txn.aborted = true;
        }
        if !sync {
            // After an error the client's batch is skipped up to its Sync.
            self.skip_to_sync().await?;
        }
        // The block the refusal fails, on the shard it holds: from then on
        // the shard answers each message as Postgres does in a failed block.
        let fails_shard_block = self.txn.in_block() && self.txn.held.is_some() && self.txn.last_status == b'T';
        if self.txn.open_batch || fails_shard_block {
            // A Flush left part of this pipeline on the server: end it there,
            // failed, as Postgres ends a pipeline that hits an error. A
            // statement that cannot parse aborts the server's transaction, so
            // the Sync rolls back what the pipeline's first part did (an
            // implicit transaction) or leaves the client's block failed until
            // its ROLLBACK. What the server says then decides: back to idle,
            // the pipeline was an implicit transaction, over now, and the
            // session is not left in a failed block.
            self.txn.open_batch = false;
            let mut server_status = None;
            if let Some(b) = self.txn.held.as_mut() {
                b.conn.conn.queue(&messages::parse("", "shardgate: the rest of this pipeline was refused", &[]));
                b.conn.conn.queue(&messages::sync());
                let _ = b.conn.conn.flush().await;
                loop {
                    match b.conn.conn.read().await {
                        Ok(m) if m.tag() == b'Z' => {
                            server_status = m.body().first().copied();
                            break;
                        }
                        Ok(_) => {}
                        Err(_) => {
                            b.conn.broken = true;
                            break;
                        }
                    }
                }
            }
            if let Some(status) = server_status {
                self.txn.last_status = status;
            }
            if server_status == Some(b'I') && self.txn.pending_begin.is_none() {
                self.txn.aborted = false;
                self.after_ready(b'I');
            }
        }
        self.client.queue(&messages::ready_for_query_bytes(self.status()));
        self.client.flush().await?;
        Ok(())
    }

    pub(super) async fn skip_to_sync(&mut self) -> Result<(), SessionError> {
        self.client.flush().await?;
        while let Some(m) = self.pushback.pop_front() {
            if m.tag() == b'S' {
                return Ok(());
            }
        }
        loop {
            let m = self.client.read().await?;
            match m.tag() {
                b'S' => return Ok(()),
                b'X' => return Err(ProtocolError::Closed.into()),
                _ => {}
            }
        }
    }
}

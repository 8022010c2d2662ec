//! Relaying a server's replies to the client as they come: for one simple query
//! (up to ReadyForQuery), for a rewritten extended-protocol batch (in the order
//! its messages expect), and the client's COPY data the other way.

use std::collections::VecDeque;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Session, SessionError};
use crate::protocol::messages::{self};
use crate::protocol::{Connection, ProtocolError};

/// How the reply to one forwarded statement ended.
pub(super) enum Relayed {
    /// ReadyForQuery, with the transaction status.
    Ready(u8),
    /// The server refused a statement's prepared form before running it; at
    /// Parse (the form will not do for this shape) or at Bind.
    Refused { at_parse: bool },
}

/// What the relay expects next from the server, in order, for one batch.
pub(super) enum Expect {
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

pub(super) enum RelayError {
    Client(SessionError),
    Backend(ProtocolError),
}

impl From<SessionError> for RelayError {
    fn from(e: SessionError) -> Self {
        RelayError::Client(e)
    }
}

pub(super) fn client_err(e: ProtocolError) -> RelayError {
    RelayError::Client(e.into())
}

/// COPY FROM STDIN to one server: client CopyData/CopyDone/CopyFail go through
/// as they come, until the client ends the copy.
pub(super) async fn copy_in_passthrough<C, B>(
    client: &mut Connection<C>,
    backend: &mut Connection<B>,
) -> Result<(), RelayError>
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

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Relays server messages to the client until ReadyForQuery, swallowing the
    /// first `swallow` ReadyForQuery (and what precedes them, errors aside) that
    /// answer statements the router sent on its own.
    ///
    /// `prepared` is set when the statement went as a prepared form (and says
    /// whether its Parse went too): the replies a simple query has no counterpart
    /// for are dropped, and an error before BindComplete — nothing has run — is
    /// not passed on but returned as [`Relayed::Refused`].
    pub(super) async fn relay_until_ready(
        &mut self,
        mut swallow: usize,
        prepared: Option<bool>,
    ) -> Result<Relayed, RelayError> {
        self.saw_error = false;
        let Some(b) = self.txn.held.as_mut() else {
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
            if tag == b'C' {
                // The PREPARE sent ahead of an EXECUTE (or alone): this
                // connection has the statement now (sql_prepared.rs).
                if let Some((name, show)) = self.sql_prepared.as_mut().and_then(|s| s.in_flight.take()) {
                    b.conn.prepared.insert(name);
                    if !show {
                        continue;
                    }
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

    /// Relays the server's replies to a rewritten batch. Returns the transaction
    /// status if the batch ended with Sync; the replies are then left queued for
    /// the caller to add ReadyForQuery and flush.
    pub(super) async fn relay_batch(
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
        let Some(b) = self.txn.held.as_mut() else {
            return Ok(None);
        };
        let swallowed_syncs = expects.iter().take_while(|e| matches!(e, Expect::Sync)).count();
        let mut prelude_syncs = swallowed_syncs.min(expects.len().saturating_sub(1));
        let mut skipping = false;
        let mut status = None;
        self.saw_error = false;
        self.batch_failed_at = None;
        // The client's messages answered so far (not the router's own
        // Parse, Close and prelude).
        let mut answered = 0;
        while let Some(exp) = expects.pop_front() {
            let prelude = prelude_syncs > 0;
            let own = prelude || matches!(exp, Expect::Parse { forward: false, .. } | Expect::Close { forward: false });
            if let Expect::Synth(bytes) = &exp {
                if !skipping {
                    emit!(bytes);
                }
                answered += 1;
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
                        self.batch_failed_at.get_or_insert(answered);
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
                            self.txn.open_batch = true;
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
            if !own {
                answered += 1;
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
            Some(_) => self.txn.open_batch = false,
            None => self.client.flush().await.map_err(client_err)?,
        }
        Ok(status)
    }
}

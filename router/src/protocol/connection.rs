//! Buffered, framed message I/O on one socket, decoded by [`FrameCodec`].
//!
//! Not a `Framed` stream: writes are queued and flushed explicitly, so a relay
//! loop can queue every message already in the read buffer and flush once, not
//! once per `DataRow`, and can ask whether more is buffered without polling.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use tokio_util::codec::Decoder;

use super::codec::FrameCodec;
use super::Message;

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection closed")]
    Closed,
    #[error("invalid message length {0}")]
    BadLength(i64),
    #[error("message of {size} bytes is over the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("malformed {what} message")]
    Malformed { what: &'static str },
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Buffered framed I/O over any byte stream (a socket in the clear or under
/// TLS: `crate::tls::Stream`, or an in-memory pipe in tests).
pub struct Connection<S> {
    stream: S,
    codec: FrameCodec,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// While set, ReadyForQuery messages are taken out of what is written,
    /// the status of the last one kept: a query string the router runs one
    /// statement at a time answers with one ReadyForQuery, at its end.
    ready_held: Option<Option<u8>>,
}

/// What a connection's buffers start with. Most clients of a pooler sit idle,
/// and an idle client holds its buffers: they start small and grow with the
/// messages (a busy connection reaches its working size once and keeps it).
const INITIAL_BUFFER: usize = 1024;

/// A read asks the socket for at least this much room, so that a buffer that
/// filled up is not read into a few bytes at a time.
const MIN_READ: usize = 4096;

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// A connection whose first frame is a startup packet (the server side of a
    /// client connection).
    pub fn accepting(stream: S, max_message: usize) -> Self {
        Self::new(stream, max_message, true)
    }

    /// A connection that only ever reads typed messages (our side of a backend).
    pub fn connecting(stream: S, max_message: usize) -> Self {
        Self::new(stream, max_message, false)
    }

    fn new(stream: S, max_message: usize, startup_phase: bool) -> Self {
        Connection {
            stream,
            codec: FrameCodec { max_message, startup_phase },
            rbuf: BytesMut::with_capacity(INITIAL_BUFFER),
            wbuf: BytesMut::with_capacity(INITIAL_BUFFER),
            ready_held: None,
        }
    }

    /// Holds back ReadyForQuery messages from now on.
    pub fn hold_ready(&mut self) {
        self.ready_held = Some(None);
    }

    /// The status of the last ReadyForQuery held back since the last call.
    pub fn take_held_ready(&mut self) -> Option<u8> {
        self.strip_ready();
        self.ready_held.as_mut().and_then(Option::take)
    }

    /// Stops holding ReadyForQuery back; returns the status of the last one
    /// held since the last [`Self::take_held_ready`].
    pub fn release_ready(&mut self) -> Option<u8> {
        self.strip_ready();
        self.ready_held.take().flatten()
    }

    /// Takes the ReadyForQuery messages out of the write buffer, which holds
    /// whole messages (a flush writes it all).
    fn strip_ready(&mut self) {
        let Some(held) = self.ready_held.as_mut() else { return };
        fn frames(buf: &[u8]) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
            let mut at = 0;
            std::iter::from_fn(move || {
                let len = u32::from_be_bytes(buf.get(at + 1..at + 5)?.try_into().ok()?) as usize;
                let end = (at + 1 + len).min(buf.len());
                let frame = at..end;
                at = end.max(at + 5);
                Some(frame)
            })
        }
        let is_ready = |f: &std::ops::Range<usize>| f.len() == 6 && self.wbuf[f.start] == b'Z';
        if !frames(&self.wbuf).any(|f| is_ready(&f)) {
            return;
        }
        let mut kept = BytesMut::with_capacity(self.wbuf.len());
        for f in frames(&self.wbuf) {
            if is_ready(&f) {
                *held = Some(self.wbuf[f.end - 1]);
            } else {
                kept.extend_from_slice(&self.wbuf[f]);
            }
        }
        self.wbuf = kept;
    }

    /// Frames from now on carry a type byte (after startup is done).
    pub fn end_startup_phase(&mut self) {
        self.codec.startup_phase = false;
    }

    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The stream itself, for a TLS upgrade in place. Anything still buffered
    /// was read before the upgrade and is the caller's to refuse.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// The next complete message, reading from the socket as needed.
    pub async fn read(&mut self) -> Result<Message, ProtocolError> {
        loop {
            if let Some(m) = self.try_buffered()? {
                return Ok(m);
            }
            if self.rbuf.capacity() - self.rbuf.len() < MIN_READ / 4 {
                // Room for a read: reuses the space of messages already taken
                // when it can, else grows (doubling, as a Vec does).
                self.rbuf.reserve(MIN_READ);
            }
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Err(ProtocolError::Closed);
            }
        }
    }

    /// A message that is already complete in the read buffer, without any I/O.
    pub fn try_buffered(&mut self) -> Result<Option<Message>, ProtocolError> {
        self.codec.decode(&mut self.rbuf)
    }

    /// Whether unread bytes are waiting in the buffer.
    pub fn has_buffered(&self) -> bool {
        !self.rbuf.is_empty()
    }

    /// Queues bytes (one or more whole messages) for the next flush.
    pub fn queue(&mut self, bytes: &[u8]) {
        self.wbuf.extend_from_slice(bytes);
    }

    /// The write buffer, for encoding messages straight into it.
    pub fn write_buf(&mut self) -> &mut BytesMut {
        &mut self.wbuf
    }

    pub fn queued(&self) -> usize {
        self.wbuf.len()
    }

    pub async fn flush(&mut self) -> Result<(), ProtocolError> {
        if self.ready_held.is_some() {
            self.strip_ready();
        }
        while self.wbuf.has_remaining() {
            let n = self.stream.write(&self.wbuf).await?;
            if n == 0 {
                return Err(ProtocolError::Closed);
            }
            self.wbuf.advance(n);
        }
        self.stream.flush().await?;
        Ok(())
    }

    /// Queues and flushes.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), ProtocolError> {
        self.queue(bytes);
        self.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::messages;

    #[tokio::test]
    async fn held_ready_for_query_messages_are_kept_from_the_client() {
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        let mut c = Connection::accepting(ours, 1 << 20);
        c.hold_ready();
        c.queue(&messages::command_complete("UPDATE 1"));
        c.queue(&messages::ready_for_query_bytes(b'T'));
        c.flush().await.unwrap();
        c.queue(&messages::command_complete("UPDATE 2"));
        assert_eq!(c.take_held_ready(), Some(b'T'));
        assert_eq!(c.take_held_ready(), None);
        c.queue(&[&messages::ready_for_query_bytes(b'E')[..], &messages::command_complete("X")[..]].concat());
        assert_eq!(c.release_ready(), Some(b'E'));
        c.queue(&messages::ready_for_query_bytes(b'I'));
        c.flush().await.unwrap();
        let mut got = vec![0u8; 1024];
        let n = tokio::io::AsyncReadExt::read(&mut theirs, &mut got).await.unwrap();
        let want = [
            &messages::command_complete("UPDATE 1")[..],
            &messages::command_complete("UPDATE 2")[..],
            &messages::command_complete("X")[..],
            &messages::ready_for_query_bytes(b'I')[..],
        ]
        .concat();
        assert_eq!(&got[..n], &want[..]);
    }
}

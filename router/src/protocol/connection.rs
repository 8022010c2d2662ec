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
        }
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

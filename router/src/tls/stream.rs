//! A socket in the clear or under TLS: the byte stream of a client session or
//! of a server connection to a shard.
//!
//! An enum, not a boxed trait object: the plain arm, which most deployments
//! run on loopback or a private network, costs one match per read or write
//! and no allocation. The TLS arm is boxed so the enum stays the size of a
//! `TcpStream`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
    /// A plain stream handed to a TLS handshake that has not given it back
    /// (it failed): every read and write fails.
    Taken,
}

impl Stream {
    /// The TCP socket underneath (for its socket options).
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Plain(s) => Some(s),
            Stream::Tls(s) => Some(s.get_ref().0),
            Stream::Taken => None,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// Runs a TLS handshake on this plain stream and becomes its TLS stream.
    /// The plain stream is moved into the handshake, so a failed handshake
    /// leaves [`Stream::Taken`] behind: the connection is over either way.
    pub async fn upgrade<F, Fut>(&mut self, handshake: F) -> io::Result<()>
    where
        F: FnOnce(TcpStream) -> Fut,
        Fut: std::future::Future<Output = io::Result<tokio_rustls::TlsStream<TcpStream>>>,
    {
        let Stream::Plain(tcp) = std::mem::replace(self, Stream::Taken) else {
            return Err(io::Error::other("TLS was asked for twice on one connection"));
        };
        *self = Stream::Tls(Box::new(handshake(tcp).await?));
        Ok(())
    }
}

fn taken() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the connection's TLS handshake failed")
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Taken => Poll::Ready(Err(taken())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Taken => Poll::Ready(Err(taken())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Stream::Taken => Poll::Ready(Err(taken())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
            Stream::Taken => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Taken => Poll::Ready(Err(taken())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Taken => Poll::Ready(Err(taken())),
        }
    }
}

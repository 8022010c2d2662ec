//! Raft messages over TCP.
//!
//! Each node listens on its raft address; to each peer it keeps one outgoing
//! connection fed by a bounded queue. Frames are `[u32 length][Message protobuf]`.
//! A connection starts with the cluster token, so a stray client (or a node of
//! another cluster) cannot inject votes; with TLS (`tls.rs`) it runs inside a
//! mutual TLS session of the cluster's CA. Messages that cannot be sent (peer down,
//! queue full) are dropped: raft retries what matters, and a slow peer must never
//! block the Ready loop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protobuf::Message as _;
use raft::prelude::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::node::{Node, Transport};
use super::tls::{RaftStream, RaftTls};

/// How long a peer may take over its TLS handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);

const MAX_FRAME: usize = 64 << 20;
const QUEUE: usize = 4096;

/// Outgoing raft messages of one node, and its fault switch for tests.
pub struct TcpTransport {
    token: Arc<Vec<u8>>,
    /// TLS with the cluster CA, both ways; None: plain TCP.
    tls: Option<Arc<RaftTls>>,
    peers: Mutex<HashMap<u64, mpsc::Sender<Message>>>,
    /// When set, nothing is sent or received: a network partition, for tests and
    /// for operators who want to isolate a node.
    isolated: Arc<AtomicBool>,
}

impl TcpTransport {
    pub fn new(token: &str) -> Arc<TcpTransport> {
        Self::with_tls(token, None)
    }

    /// A transport whose connections run under mutual TLS when `tls` is set.
    pub fn with_tls(token: &str, tls: Option<Arc<RaftTls>>) -> Arc<TcpTransport> {
        Arc::new(TcpTransport {
            tls,
            token: Arc::new(token.as_bytes().to_vec()),
            peers: Mutex::new(HashMap::new()),
            isolated: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Adds or replaces the address of a peer (`host:port`, resolved at each
    /// connection attempt, so a peer whose name does not resolve yet — a container
    /// still starting — is simply retried).
    pub fn set_peer(&self, id: u64, addr: impl Into<String>) {
        let addr = addr.into();
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(sender(id, addr, rx, self.token.clone(), self.tls.clone(), self.isolated.clone()));
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).insert(id, tx);
    }

    pub fn remove_peer(&self, id: u64) {
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    }

    pub fn set_isolated(&self, isolated: bool) {
        self.isolated.store(isolated, Ordering::SeqCst);
    }

    /// Accepts peers' connections on `listener` and hands their messages to `node`.
    pub fn serve(self: &Arc<Self>, listener: TcpListener, node: Node) -> tokio::task::JoinHandle<()> {
        let token = self.token.clone();
        let isolated = self.isolated.clone();
        let tls = self.tls.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                stream.set_nodelay(true).ok();
                let (token, isolated, node, tls) = (token.clone(), isolated.clone(), node.clone(), tls.clone());
                tokio::spawn(async move {
                    let stream: Box<dyn RaftStream> = match &tls {
                        None => Box::new(stream),
                        Some(tls) => match tokio::time::timeout(HANDSHAKE, tls.accept(stream)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                warn!(%peer, error = %e, "a raft peer failed the TLS handshake; closing");
                                return;
                            }
                            Err(_) => {
                                warn!(%peer, "a raft peer did not finish its TLS handshake within 10 s; closing");
                                return;
                            }
                        },
                    };
                    if let Err(e) = receive(stream, &token, &isolated, &node).await {
                        debug!(%peer, error = %e, "raft connection ended");
                    }
                });
            }
        })
    }
}

impl Transport for TcpTransport {
    fn send(&self, msg: Message) {
        if self.isolated.load(Ordering::Relaxed) {
            return;
        }
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = peers.get(&msg.to) {
            // Full queue: the peer is slow or gone; raft will retry.
            let _ = tx.try_send(msg);
        }
    }
}

async fn receive(
    mut stream: impl AsyncRead + Unpin,
    token: &[u8],
    isolated: &AtomicBool,
    node: &Node,
) -> std::io::Result<()> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await?;
    let n = u32::from_le_bytes(len) as usize;
    if n != token.len() {
        warn!("raft peer sent a wrong cluster token; closing");
        return Ok(());
    }
    let mut got = vec![0u8; n];
    stream.read_exact(&mut got).await?;
    if got != token {
        warn!("raft peer sent a wrong cluster token; closing");
        return Ok(());
    }
    let mut buf = Vec::new();
    loop {
        stream.read_exact(&mut len).await?;
        let n = u32::from_le_bytes(len) as usize;
        if n > MAX_FRAME {
            warn!(bytes = n, "raft frame too large; closing");
            return Ok(());
        }
        buf.resize(n, 0);
        stream.read_exact(&mut buf).await?;
        if isolated.load(Ordering::Relaxed) {
            continue;
        }
        match Message::parse_from_bytes(&buf) {
            Ok(m) => node.receive(m),
            Err(e) => {
                warn!(error = %e, "undecodable raft message; closing");
                return Ok(());
            }
        }
    }
}

/// Keeps a connection to one peer and writes its queue to it, reconnecting with
/// backoff. Ends when the transport drops the queue.
async fn sender(
    id: u64,
    addr: String,
    mut rx: mpsc::Receiver<Message>,
    token: Arc<Vec<u8>>,
    tls: Option<Arc<RaftTls>>,
    isolated: Arc<AtomicBool>,
) {
    let mut backoff = Duration::from_millis(20);
    let mut conn: Option<Box<dyn RaftStream>> = None;
    let mut frame = Vec::with_capacity(4096);
    while let Some(first) = rx.recv().await {
        if isolated.load(Ordering::Relaxed) {
            continue;
        }
        if conn.is_none() {
            let connected = match TcpStream::connect(addr.as_str()).await {
                Ok(tcp) => {
                    tcp.set_nodelay(true).ok();
                    match &tls {
                        None => Ok(Box::new(tcp) as Box<dyn RaftStream>),
                        Some(tls) => match tokio::time::timeout(HANDSHAKE, tls.connect(tcp, &addr)).await {
                            Ok(r) => r,
                            Err(_) => Err(std::io::Error::other("TLS handshake timed out")),
                        },
                    }
                }
                Err(e) => Err(e),
            };
            match connected {
                Ok(mut s) => {
                    let mut hello = (token.len() as u32).to_le_bytes().to_vec();
                    hello.extend_from_slice(&token);
                    if s.write_all(&hello).await.is_ok() {
                        conn = Some(s);
                        backoff = Duration::from_millis(20);
                    }
                }
                Err(e) => {
                    debug!(peer = id, %addr, error = %e, "cannot reach raft peer");
                    // Drop what is queued meanwhile: it is stale by the time the
                    // peer is back, and raft sends fresh messages.
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    while rx.try_recv().is_ok() {}
                    continue;
                }
            }
        }
        // Batch what is already queued into one write.
        frame.clear();
        let mut next = Some(first);
        while let Some(m) = next {
            if let Ok(bytes) = m.write_to_bytes() {
                frame.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                frame.extend_from_slice(&bytes);
            }
            next = if frame.len() < 1 << 20 { rx.try_recv().ok() } else { None };
        }
        if let Some(s) = conn.as_mut() {
            if s.write_all(&frame).await.is_err() {
                conn = None;
            }
        }
    }
}

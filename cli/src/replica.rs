//! Starting a directory replica (raft node + TCP transport) from settings.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use shardgate_directory::replica::{Node, NodeConfig, RaftTls, RaftTlsFiles, TcpTransport};
use shardgate_directory::Directory;

pub struct ReplicaSpec {
    pub id: u64,
    pub listen: SocketAddr,
    /// A listener already bound to `listen`, when the caller picked the port by
    /// binding it (so no other process can take it in between).
    pub bound: Option<std::net::TcpListener>,
    pub data_dir: PathBuf,
    pub token: String,
    pub peers: Vec<(u64, String)>,
    /// Mutual TLS with the cluster's CA for raft traffic; None: plain TCP.
    pub tls: Option<RaftTlsFiles>,
    /// Founding voters, when starting a new cluster.
    pub bootstrap: Option<Vec<u64>>,
    pub initial: Directory,
}

pub async fn start(spec: ReplicaSpec) -> Result<(Node, Arc<TcpTransport>)> {
    if spec.id == 0 {
        bail!("directory node_id must be a positive integer");
    }
    let listener = match spec.bound {
        Some(bound) => bound.set_nonblocking(true).and_then(|()| tokio::net::TcpListener::from_std(bound)),
        None => tokio::net::TcpListener::bind(spec.listen).await,
    }
    .with_context(|| format!("cannot listen on {} for the directory's raft traffic", spec.listen))?;
    let tls = match &spec.tls {
        Some(files) => Some(RaftTls::from_files(files).map_err(|e| anyhow::anyhow!("[directory] TLS: {e}"))?),
        None => None,
    };
    let transport = TcpTransport::with_tls(&spec.token, tls);
    for (id, addr) in &spec.peers {
        transport.set_peer(*id, addr.clone());
    }
    let mut cfg = NodeConfig::new(spec.id, spec.data_dir.clone(), spec.initial);
    cfg.founding_voters = spec.bootstrap;
    cfg.tick = Duration::from_millis(50);
    let node = Node::start(cfg, transport.clone())
        .with_context(|| format!("cannot start directory node {} in {}", spec.id, spec.data_dir.display()))?;
    transport.serve(listener, node.clone());
    Ok((node, transport))
}

/// Waits until the replica knows a leader and has heard from it, so that a fresh `up` or `serve` does
/// not refuse its first writes while the first election runs.
pub async fn wait_for_leader(node: &Node, within: Duration) -> Result<()> {
    let mut rx = node.watch_status();
    tokio::time::timeout(within, rx.wait_for(|s| s.leader.is_some() && s.last_contact.is_some()))
        .await
        .map(|_| ())
        .map_err(|_| {
            anyhow::anyhow!(
                "the directory elected no leader within {within:?}; are a majority of its nodes running and reachable?"
            )
        })
}

/// Keeps the transport's peers in step with the node addresses recorded in the
/// directory (`shardgate node add`), so every node can reach a node that joined.
pub fn follow_node_addresses(node: Node, transport: Arc<TcpTransport>, peers: Vec<(u64, String)>) {
    let me = node.id;
    tokio::spawn(async move {
        let mut known: std::collections::HashMap<u64, String> = peers.into_iter().collect();
        let mut rx = node.watch_status();
        while rx.changed().await.is_ok() {
            let dir = node.directory().load();
            for (id, addr) in &dir.nodes {
                if *id != me && known.get(id) != Some(addr) {
                    transport.set_peer(*id, addr.clone());
                    known.insert(*id, addr.clone());
                }
            }
        }
    });
}

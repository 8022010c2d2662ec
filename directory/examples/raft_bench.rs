//! Directory numbers for docs/benchmarks.md: commit latency of one change, time for
//! a placement change to reach every replica's routing table, and leader failover
//! (leader cut off → first change committed by the others). Three replicas over
//! loopback TCP in one process, fsync on.
//!
//! cargo run --release -p shardgate-directory --example raft_bench [-- ROUNDS]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use shardgate_directory::replica::{Node, NodeConfig, TcpTransport};
use shardgate_directory::state::{Command, Outcome};
use shardgate_directory::{Directory, KeyType, Shard};

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(300);
    let tmp = tempfile::tempdir().expect("temp dir");
    let shards = (0..3).map(|i| Shard::new(format!("s{i}"), format!("postgres://h/{i}"))).collect();
    let initial = Directory::new("tenant_id", KeyType::Int, 256, shards).expect("directory");
    let mut listeners = Vec::new();
    let mut addrs = HashMap::new();
    for id in 1..=3u64 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        addrs.insert(id, l.local_addr().expect("addr"));
        listeners.push((id, l));
    }
    let mut nodes = Vec::new();
    let mut transports = HashMap::new();
    for (id, l) in listeners {
        let t = TcpTransport::new("bench");
        for (&p, a) in &addrs {
            if p != id {
                t.set_peer(p, a.to_string());
            }
        }
        let mut cfg = NodeConfig::new(id, tmp.path().join(format!("n{id}")), initial.clone());
        cfg.founding_voters = Some(vec![1, 2, 3]);
        let node = Node::start(cfg, t.clone()).expect("node");
        t.serve(l, node.clone());
        transports.insert(id, t);
        nodes.push(node);
    }
    let mut rx = nodes[0].watch_status();
    rx.wait_for(|s| s.leader.is_some()).await.expect("leader");
    let leader = nodes[0].status().leader.expect("leader");
    let follower = nodes.iter().find(|n| n.id != leader).expect("follower").clone();

    // 1. Commit latency: one change at a time, proposed on a follower (forwarded).
    let mut commit = Vec::with_capacity(rounds);
    let mut visible = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let cmd = Command::PlaceBucket { bucket: (i % 256) as u32, shard: format!("s{}", i % 3) };
        let start = Instant::now();
        let out = follower.propose(cmd, Duration::from_secs(5)).await.expect("commit");
        commit.push(start.elapsed());
        let Outcome::Applied { epoch } = out else { panic!("{out:?}") };
        // 2. Until every replica's routing table shows it.
        for n in &nodes {
            let mut rx = n.watch_status();
            rx.wait_for(|s| s.epoch >= epoch).await.expect("applied");
        }
        visible.push(start.elapsed());
    }
    commit.sort();
    visible.sort();
    println!("rounds: {rounds}");
    println!(
        "commit latency (proposed on a follower): p50 {:?}  p99 {:?}  max {:?}",
        pct(&commit, 0.5),
        pct(&commit, 0.99),
        commit[commit.len() - 1]
    );
    println!(
        "placement visible on all 3 replicas:    p50 {:?}  p99 {:?}  max {:?}",
        pct(&visible, 0.5),
        pct(&visible, 0.99),
        visible[visible.len() - 1]
    );

    // 3. Failover: cut the leader off, time until the others commit a change.
    let mut failovers = Vec::new();
    for round in 0..5 {
        let leader = nodes[0].status().leader.unwrap_or(1);
        let other = nodes.iter().find(|n| n.id != leader).expect("other").clone();
        let start = Instant::now();
        transports[&leader].set_isolated(true);
        loop {
            let cmd = Command::PlaceBucket { bucket: round, shard: "s0".into() };
            match other.propose(cmd, Duration::from_millis(300)).await {
                Ok(_) if other.status().leader != Some(leader) => break,
                _ => tokio::task::yield_now().await,
            }
        }
        failovers.push(start.elapsed());
        transports[&leader].set_isolated(false);
        // Let the old leader rejoin before the next round.
        let epoch = other.status().epoch;
        let old = nodes.iter().find(|n| n.id == leader).expect("old").clone();
        let mut rx = old.watch_status();
        rx.wait_for(|s| s.epoch >= epoch).await.expect("rejoined");
    }
    failovers.sort();
    println!(
        "leader failover (cut off → first change committed): median {:?}  max {:?}  over {} rounds",
        failovers[failovers.len() / 2],
        failovers[failovers.len() - 1],
        failovers.len()
    );
}

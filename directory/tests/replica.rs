//! Directory replicas on an in-memory network that can cut links: elections,
//! replication, restarts, snapshots and leases, without sockets.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use raft::prelude::{Message, MessageType};
use shardgate_directory::replica::{Node, NodeConfig, NodeStatus, ProposeError, Transport};
use shardgate_directory::state::{Command, Outcome};
use shardgate_directory::{Directory, KeyType, Shard};

#[derive(Default)]
struct Network {
    nodes: Mutex<HashMap<u64, Node>>,
    cut: Mutex<HashSet<u64>>,
    /// Proposals forwarded to a leader that the network is to lose.
    lose_proposals: AtomicUsize,
    /// Deliver every forwarded proposal twice.
    double_proposals: AtomicBool,
    /// A node that gets no log entries (MsgAppend), only the rest.
    starve: Mutex<Option<u64>>,
}

struct Link(Arc<Network>);

impl Transport for Link {
    fn send(&self, m: Message) {
        let cut = self.0.cut.lock().unwrap();
        if cut.contains(&m.from) || cut.contains(&m.to) {
            return;
        }
        drop(cut);
        if m.get_msg_type() == MessageType::MsgAppend && *self.0.starve.lock().unwrap() == Some(m.to) {
            return;
        }
        let proposal = m.get_msg_type() == MessageType::MsgPropose;
        if proposal
            && self.0.lose_proposals.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
        {
            return;
        }
        if let Some(n) = self.0.nodes.lock().unwrap().get(&m.to) {
            if proposal && self.0.double_proposals.load(Ordering::SeqCst) {
                n.receive(m.clone());
            }
            n.receive(m);
        }
    }
}

fn initial() -> Directory {
    let shards = (0..3).map(|i| Shard::new(format!("s{i}"), format!("postgres://h/{i}"))).collect();
    Directory::new("tenant_id", KeyType::Int, 64, shards).unwrap()
}

struct Cluster {
    net: Arc<Network>,
    base: PathBuf,
    _tmp: tempfile::TempDir,
    snapshot_every: u64,
}

impl Cluster {
    fn new(snapshot_every: u64) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        Cluster { net: Arc::default(), base: tmp.path().to_path_buf(), _tmp: tmp, snapshot_every }
    }

    fn start(&self, id: u64, founding: bool) -> Node {
        self.start_with(id, founding, 10)
    }

    fn start_with(&self, id: u64, founding: bool, election_ticks: usize) -> Node {
        let mut cfg = NodeConfig::new(id, dir(&self.base, id), initial());
        cfg.tick = Duration::from_millis(20);
        cfg.election_ticks = election_ticks;
        cfg.snapshot_every = self.snapshot_every;
        if founding {
            cfg.founding_voters = Some(vec![1, 2, 3]);
        }
        let node = Node::start(cfg, Arc::new(Link(self.net.clone()))).unwrap();
        self.net.nodes.lock().unwrap().insert(id, node.clone());
        node
    }

    /// Stops a node as a crash would: its task ends, its files stay.
    /// Stops the node and takes it off the network, as a process exits.
    async fn kill(&self, id: u64) {
        let node = self.net.nodes.lock().unwrap().get(&id).cloned();
        if let Some(n) = node {
            n.stop().await;
        }
        self.net.nodes.lock().unwrap().remove(&id);
    }

    fn node(&self, id: u64) -> Node {
        self.net.nodes.lock().unwrap()[&id].clone()
    }
}

fn dir(base: &Path, id: u64) -> PathBuf {
    base.join(format!("node{id}"))
}

async fn wait_status(node: &Node, what: &str, pred: impl Fn(&NodeStatus) -> bool) -> NodeStatus {
    let mut rx = node.watch_status();
    let reached =
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| pred(s))).await.map(|r| r.map(|s| s.clone()));
    match reached {
        Ok(Ok(s)) => s,
        _ => panic!("node {} never reached: {what}; last status {:?}", node.id, node.status()),
    }
}

async fn leader_among(nodes: &[Node]) -> u64 {
    let s = wait_status(&nodes[0], "a known leader", |s| s.leader.is_some()).await;
    s.leader.unwrap()
}

fn place(bucket: u32, shard: usize) -> Command {
    Command::PlaceBucket { bucket, shard: format!("s{shard}") }
}

/// The epoch a committed change produced.
fn epoch_of(out: Outcome) -> u64 {
    match out {
        Outcome::Applied { epoch } | Outcome::MoveCreated { epoch, .. } => epoch,
        Outcome::Rejected { reason } => panic!("rejected: {reason}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_from_every_node_apply_in_the_same_order_everywhere() {
    let c = Cluster::new(10_000);
    let nodes: Vec<Node> = (1..=3).map(|i| c.start(i, true)).collect();
    leader_among(&nodes).await;
    for n in &nodes {
        wait_status(n, "a leader", |s| s.leader.is_some()).await;
    }
    // 1,000 changes proposed from all three nodes at once.
    let mut tasks = Vec::new();
    for (k, n) in nodes.iter().enumerate() {
        let n = n.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..334u32 {
                let cmd = place((i * 7 + k as u32) % 64, ((i as usize) + k) % 3);
                let out = n.propose(cmd, Duration::from_secs(10)).await.unwrap();
                assert!(matches!(out, Outcome::Applied { .. }), "{out:?}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let epoch = initial().epoch + 1002;
    for n in &nodes {
        wait_status(n, "every change applied", |s| s.epoch == epoch).await;
    }
    let d1 = nodes[0].directory().load();
    for n in &nodes[1..] {
        assert_eq!(*n.directory().load(), *d1, "replicas diverged");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_leader_elects_another_and_the_old_one_catches_up_after_restart() {
    let c = Cluster::new(10_000);
    let nodes: Vec<Node> = (1..=3).map(|i| c.start(i, true)).collect();
    let leader = leader_among(&nodes).await;
    c.node(leader).propose(place(1, 2), Duration::from_secs(5)).await.unwrap();
    c.kill(leader).await;
    let survivors: Vec<Node> = nodes.iter().filter(|n| n.id != leader).cloned().collect();
    drop(nodes);
    let s = wait_status(&survivors[0], "a new leader", |s| s.leader.is_some_and(|l| l != leader)).await;
    wait_status(&survivors[1], "the new leader", |s| s.leader.is_some_and(|l| l != leader)).await;
    assert_ne!(s.leader, Some(leader));
    let mut epoch = 0;
    for b in 2..12 {
        let out = survivors[1].propose(place(b, 2), Duration::from_secs(5)).await;
        epoch = epoch_of(out.unwrap());
    }
    wait_status(&survivors[0], "applied", |s| s.epoch == epoch).await;
    let back = c.start(leader, false);
    wait_status(&back, "caught up", |s| s.epoch == epoch).await;
    assert_eq!(*back.directory().load(), *survivors[0].directory().load());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_a_compacted_log_rejoins_by_snapshot() {
    let c = Cluster::new(20);
    let nodes: Vec<Node> = (1..=3).map(|i| c.start(i, true)).collect();
    let leader = leader_among(&nodes).await;
    let lagger = (1..=3).find(|i| *i != leader).unwrap();
    c.kill(lagger).await;
    let live: Vec<Node> = nodes.into_iter().filter(|n| n.id != lagger).collect();
    let mut epoch = 0;
    for b in 0..60u32 {
        let out = live[0].propose(place(b % 64, (b % 3) as usize), Duration::from_secs(5)).await;
        epoch = epoch_of(out.unwrap());
    }
    // The log the lagger needs is gone: its first entries were compacted.
    let log = std::fs::metadata(dir(&c.base, leader).join("snapshot"));
    assert!(log.is_ok(), "the leader took a snapshot");
    let back = c.start(lagger, false);
    wait_status(&back, "caught up by snapshot", |s| s.epoch == epoch).await;
    assert_eq!(*back.directory().load(), *live[0].directory().load());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_every_node_and_starting_them_again_keeps_epoch_and_state() {
    let c = Cluster::new(15);
    let nodes: Vec<Node> = (1..=3).map(|i| c.start(i, true)).collect();
    leader_among(&nodes).await;
    let mut epoch = 0;
    for b in 0..40u32 {
        let out = nodes[(b % 3) as usize].propose(place(b, ((b + 1) % 3) as usize), Duration::from_secs(5)).await;
        epoch = epoch.max(epoch_of(out.unwrap()));
    }
    for n in &nodes {
        wait_status(n, "all applied", |s| s.epoch == epoch).await;
    }
    let before = (*nodes[0].directory().load()).clone();
    drop(nodes);
    for i in 1..=3 {
        c.kill(i).await;
    }
    let nodes: Vec<Node> = (1..=3).map(|i| c.start(i, false)).collect();
    for n in &nodes {
        wait_status(n, "state restored", |s| s.epoch == epoch).await;
        assert_eq!(*n.directory().load(), before);
    }
    // And the cluster goes on.
    leader_among(&nodes).await;
    if let Err(e) = nodes[0].propose(place(5, 0), Duration::from_secs(5)).await {
        let statuses: Vec<NodeStatus> = nodes.iter().map(|n| n.status()).collect();
        panic!("{e}: {statuses:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_loses_its_lease_and_regains_it_when_reconnected() {
    let c = Cluster::new(10_000);
    let nodes: Vec<Node> = (1..=3).map(|i| c.start(i, true)).collect();
    let leader = leader_among(&nodes).await;
    let follower = nodes.iter().find(|n| n.id != leader).unwrap().clone();
    let lease = Duration::from_millis(300);
    wait_status(&follower, "contact", |s| s.last_contact.is_some()).await;
    assert!(follower.lease_valid(lease));
    c.net.cut.lock().unwrap().insert(follower.id);
    // The lease runs out on the status updates of its own ticks.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut rx = follower.watch_status();
    while follower.lease_valid(lease) {
        assert!(tokio::time::Instant::now() < deadline, "lease never expired");
        let _ = tokio::time::timeout(Duration::from_millis(100), rx.changed()).await;
    }
    c.net.cut.lock().unwrap().clear();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !follower.lease_valid(lease) {
        assert!(tokio::time::Instant::now() < deadline, "lease never came back");
        let _ = tokio::time::timeout(Duration::from_millis(100), rx.changed()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_over_tcp_elect_replicate_and_survive_an_isolated_node() {
    use shardgate_directory::replica::TcpTransport;
    let tmp = tempfile::tempdir().unwrap();
    let mut listeners = Vec::new();
    let mut addrs = HashMap::new();
    for id in 1..=3u64 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.insert(id, l.local_addr().unwrap());
        listeners.push((id, l));
    }
    let mut nodes = Vec::new();
    let mut transports = HashMap::new();
    for (id, listener) in listeners {
        let t = TcpTransport::new("cluster-secret");
        for (&peer, &addr) in &addrs {
            if peer != id {
                t.set_peer(peer, addr.to_string());
            }
        }
        let mut cfg = NodeConfig::new(id, dir(tmp.path(), id), initial());
        cfg.tick = Duration::from_millis(20);
        cfg.founding_voters = Some(vec![1, 2, 3]);
        let node = Node::start(cfg, t.clone()).unwrap();
        t.serve(listener, node.clone());
        transports.insert(id, t);
        nodes.push(node);
    }
    let leader = leader_among(&nodes).await;
    let epoch = epoch_of(nodes[0].propose(place(9, 2), Duration::from_secs(5)).await.unwrap());
    for n in &nodes {
        wait_status(n, "replicated over TCP", |s| s.epoch == epoch).await;
    }
    // Isolate the leader: the other two elect a new one and keep committing.
    transports[&leader].set_isolated(true);
    let other = nodes.iter().find(|n| n.id != leader).unwrap().clone();
    wait_status(&other, "a new leader", |s| s.leader.is_some_and(|l| l != leader)).await;
    let epoch = epoch_of(other.propose(place(10, 1), Duration::from_secs(5)).await.unwrap());
    transports[&leader].set_isolated(false);
    let old = nodes.iter().find(|n| n.id == leader).unwrap();
    wait_status(old, "caught up after the partition", |s| s.epoch >= epoch).await;
    // A connection with the wrong token is refused and changes nothing.
    let mut s = tokio::net::TcpStream::connect(addrs[&1]).await.unwrap();
    use tokio::io::AsyncWriteExt;
    s.write_all(&5u32.to_le_bytes()).await.unwrap();
    s.write_all(b"wrong").await.unwrap();
    let mut buf = [0u8; 1];
    use tokio::io::AsyncReadExt;
    assert_eq!(s.read(&mut buf).await.unwrap_or(0), 0, "the node closes the connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_joins_catches_up_becomes_a_voter_and_a_voter_leaves() {
    use shardgate_directory::replica::MembershipChange;
    let c = Cluster::new(10_000);
    let nodes: Vec<Node> = (1..=3).map(|i| c.start(i, true)).collect();
    leader_among(&nodes).await;
    let mut epoch = 0;
    for b in 0..20 {
        epoch = epoch_of(nodes[0].propose(place(b, 1), Duration::from_secs(5)).await.unwrap());
    }
    // Node 4 starts empty (not a founder) and is added as a learner.
    let four = c.start(4, false);
    nodes[1].change_membership(4, MembershipChange::AddLearner, Duration::from_secs(5)).await.unwrap();
    wait_status(&four, "caught up as a learner", |s| s.epoch == epoch).await;
    assert_eq!(*four.directory().load(), *nodes[0].directory().load());
    // Promoted to voter, then node 1 leaves: the cluster of 2, 3, 4 goes on.
    nodes[0].change_membership(4, MembershipChange::AddVoter, Duration::from_secs(5)).await.unwrap();
    nodes[2].change_membership(1, MembershipChange::Remove, Duration::from_secs(5)).await.unwrap();
    wait_status(&four, "membership 2, 3, 4", |s| {
        let mut v = s.voters.clone();
        v.sort();
        v == vec![2, 3, 4]
    })
    .await;
    c.kill(1).await;
    // A proposal forwarded to node 1 just before it left is lost with it; the
    // proposing node sends it again to the next leader.
    let e = epoch_of(four.propose(place(30, 0), Duration::from_secs(10)).await.unwrap());
    wait_status(&nodes[1], "applied after the change", |s| s.epoch >= e).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_barrier_makes_a_follower_show_every_committed_change() {
    let c = Cluster::new(10_000);
    let nodes: Vec<Node> = (1..=3).map(|i| c.start(i, true)).collect();
    let leader = leader_among(&nodes).await;
    let follower = nodes.iter().find(|n| n.id != leader).unwrap().clone();
    let on_leader = nodes.iter().find(|n| n.id == leader).unwrap().clone();
    for b in 0..50 {
        let epoch = epoch_of(on_leader.propose(place(b, 2), Duration::from_secs(5)).await.unwrap());
        follower.read_barrier(Duration::from_secs(5)).await.unwrap();
        assert!(follower.directory().load().epoch >= epoch, "a read after the barrier missed a committed change");
    }
    // Without a quorum there is no linearizable read.
    drop((nodes, on_leader));
    for id in 1..=3 {
        if id != follower.id {
            c.kill(id).await;
        }
    }
    assert!(follower.read_barrier(Duration::from_secs(2)).await.is_err());
}

/// The epoch every node shows once it has applied through `epoch`, and a check
/// that the replicas agree.
async fn all_at(nodes: &[Node], epoch: u64) {
    for n in nodes {
        wait_status(n, "the same epoch", |s| s.epoch >= epoch).await;
    }
    for n in nodes {
        assert_eq!(n.status().epoch, epoch, "node {} applied a change twice", n.id);
        assert_eq!(*n.directory().load(), *nodes[0].directory().load(), "replicas diverged");
    }
}

/// Three founding nodes, the leader's id, a follower that knows that leader,
/// and the follower's epoch.
async fn three_with_a_follower(c: &Cluster) -> (Vec<Node>, u64, Node, u64) {
    let nodes: Vec<Node> = (1..=3).map(|i| c.start(i, true)).collect();
    let leader = leader_among(&nodes).await;
    let follower = nodes.iter().find(|n| n.id != leader).unwrap().clone();
    wait_status(&follower, "a leader", |s| s.leader == Some(leader)).await;
    let before = follower.status().epoch;
    (nodes, leader, follower, before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_lost_on_its_way_to_the_leader_is_sent_again() {
    let c = Cluster::new(10_000);
    let (nodes, _, follower, before) = three_with_a_follower(&c).await;
    c.net.lose_proposals.store(1, Ordering::SeqCst);
    let epoch = epoch_of(follower.propose(place(3, 1), Duration::from_secs(10)).await.unwrap());
    assert_eq!(c.net.lose_proposals.load(Ordering::SeqCst), 0, "the first copy was lost");
    assert_eq!(epoch, before + 1);
    all_at(&nodes, epoch).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_that_reaches_the_log_twice_applies_once() {
    let c = Cluster::new(7);
    let (nodes, _, follower, before) = three_with_a_follower(&c).await;
    c.net.double_proposals.store(true, Ordering::SeqCst);
    // Every change bumps the epoch: one applied twice would show.
    let mut epoch = before;
    for b in 0..20 {
        epoch = epoch_of(follower.propose(place(b, 2), Duration::from_secs(5)).await.unwrap());
    }
    assert_eq!(epoch, before + 20);
    all_at(&nodes, epoch).await;
    // The table of applied proposals survives snapshots (taken every 7 entries
    // here) and restarts: the copies still apply once after it.
    c.kill(follower.id).await;
    let back = c.start(follower.id, false);
    wait_status(&back, "restored", |s| s.epoch == epoch).await;
    let e = epoch_of(back.propose(place(1, 0), Duration::from_secs(5)).await.unwrap());
    assert_eq!(e, epoch + 1);
    let nodes: Vec<Node> = (1..=3).map(|i| c.node(i)).collect();
    all_at(&nodes, e).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_forwarded_to_a_leader_that_is_cut_off_goes_through_the_next_one() {
    let c = Cluster::new(10_000);
    let (nodes, leader, follower, before) = three_with_a_follower(&c).await;
    c.net.cut.lock().unwrap().insert(leader);
    // The follower still takes the old leader for the leader and forwards the
    // proposal there, into the cut.
    let epoch = epoch_of(follower.propose(place(4, 0), Duration::from_secs(10)).await.unwrap());
    assert_eq!(epoch, before + 1);
    assert_ne!(follower.status().leader, Some(leader));
    c.net.cut.lock().unwrap().clear();
    all_at(&nodes, epoch).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_stops_hands_its_office_over() {
    let c = Cluster::new(10_000);
    // Only node 1 ever times out into an election: a leader after it stops can
    // only come from its handing over.
    let nodes: Vec<Node> = (1..=3).map(|i| c.start_with(i, true, if i == 1 { 10 } else { 1_000_000 })).collect();
    assert_eq!(leader_among(&nodes).await, 1);
    let epoch = epoch_of(nodes[0].propose(place(2, 1), Duration::from_secs(5)).await.unwrap());
    c.kill(1).await;
    for n in &nodes[1..] {
        wait_status(n, "a new leader", |s| s.leader.is_some_and(|l| l != 1)).await;
    }
    let e = epoch_of(nodes[2].propose(place(3, 1), Duration::from_secs(5)).await.unwrap());
    assert_eq!(e, epoch + 1);
    // A stopped node answers as stopped, and stopping it again returns at once.
    assert!(matches!(nodes[0].propose(place(4, 1), Duration::from_secs(1)).await, Err(ProposeError::Stopped)));
    nodes[0].stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_whose_entry_reaches_its_node_inside_a_snapshot_is_answered() {
    let c = Cluster::new(5);
    let (nodes, leader, follower, before) = three_with_a_follower(&c).await;
    let on_leader = c.node(leader);
    // The follower's proposal reaches the leader, but no log entry reaches the
    // follower until the leader has compacted its log past the proposal's.
    *c.net.starve.lock().unwrap() = Some(follower.id);
    let proposing = {
        let f = follower.clone();
        tokio::spawn(async move { f.propose(place(7, 1), Duration::from_secs(15)).await })
    };
    wait_status(&on_leader, "the proposal applied", |s| s.epoch > before).await;
    let mut epoch = 0;
    for b in 10..22 {
        epoch = epoch_of(on_leader.propose(place(b, 2), Duration::from_secs(5)).await.unwrap());
    }
    assert!(dir(&c.base, leader).join("snapshot").exists(), "the leader compacted its log");
    assert!(follower.status().epoch <= before, "the follower got no entry yet");
    *c.net.starve.lock().unwrap() = None;
    let out = proposing.await.unwrap().unwrap();
    assert!(matches!(out, Outcome::Applied { epoch: e } if e > before && e < epoch), "{out:?}");
    all_at(&nodes, epoch).await;
}

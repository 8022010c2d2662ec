//! One directory replica: the raft Ready loop, in one function that reads top to
//! bottom (tick, step, propose → persist → send → apply → advance), and the
//! handle the rest of the process uses to propose changes and read state.
//!
//! The applied state is published through the same [`DirectoryHandle`] the router
//! already reads, so routing never waits on consensus: it reads whatever this
//! replica has applied.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::prelude::{ConfChangeType, ConfChangeV2, Entry, EntryType, Message, Snapshot};
use raft::{RawNode, StateRole};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use super::once::{self, Applied, Origin, Verdict};
use super::storage::{DiskStorage, StoreError};
use crate::state::{Command, Outcome};
use crate::{Directory, DirectoryHandle};

/// Where raft messages go. Implemented by the TCP transport and, in tests, by an
/// in-memory network that can cut links.
pub trait Transport: Send + Sync + 'static {
    fn send(&self, msg: Message);
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: u64,
    pub dir: PathBuf,
    /// The founding voters, when this node starts a new cluster (None when it
    /// joins an existing one, or restarts).
    pub founding_voters: Option<Vec<u64>>,
    /// The directory a new cluster starts from.
    pub initial: Directory,
    pub tick: Duration,
    /// Ticks without a leader before an election (randomised up to twice this).
    pub election_ticks: usize,
    /// Entries applied between snapshots (log compaction).
    pub snapshot_every: u64,
}

impl NodeConfig {
    pub fn new(id: u64, dir: PathBuf, initial: Directory) -> NodeConfig {
        NodeConfig {
            id,
            dir,
            founding_voters: None,
            initial,
            tick: Duration::from_millis(50),
            election_ticks: 10,
            snapshot_every: 1000,
        }
    }
}

/// What a node reports about itself.
#[derive(Debug, Clone)]
pub struct NodeStatus {
    pub id: u64,
    pub leader: Option<u64>,
    pub term: u64,
    pub is_leader: bool,
    /// When this node last heard from a leader (or, as leader, when a quorum was
    /// last active).
    pub last_contact: Option<Instant>,
    pub applied: u64,
    pub epoch: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
}

impl NodeStatus {
    /// Whether the node had heard from the cluster within `lease` of now.
    pub fn within_lease(&self, lease: Duration) -> bool {
        self.last_contact.is_some_and(|t| t.elapsed() <= lease)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    #[error("no directory leader is known yet; try again in a moment")]
    NoLeader,
    #[error("the proposal was not committed within {0:?}; the directory may have lost its quorum")]
    Timeout(Duration),
    #[error("the directory node has stopped")]
    Stopped,
    #[error("raft: {0}")]
    Raft(String),
}

type Reply = oneshot::Sender<Result<Outcome, ProposeError>>;

enum Request {
    Propose {
        cmd: Command,
        reply: Reply,
    },
    ConfChange {
        cc: ConfChangeV2,
        reply: Reply,
    },
    ReadIndex {
        reply: Reply,
    },
    /// Ends the Ready loop; answered once the replica's storage is closed.
    Stop {
        done: oneshot::Sender<()>,
    },
}

/// A running replica.
#[derive(Clone)]
pub struct Node {
    pub id: u64,
    handle: DirectoryHandle,
    requests: mpsc::Sender<Request>,
    inbox: mpsc::UnboundedSender<Message>,
    status: watch::Receiver<NodeStatus>,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("the directory snapshot in {0} cannot be read: {1}")]
    Snapshot(PathBuf, String),
}

impl Node {
    /// Opens the node's storage, replays it, and starts the Ready loop.
    pub fn start(cfg: NodeConfig, transport: Arc<dyn Transport>) -> Result<Node, NodeError> {
        let storage = DiskStorage::open(&cfg.dir)?;
        if let (Some(voters), true) = (&cfg.founding_voters, storage.is_new()) {
            let data =
                serde_json::to_vec(&cfg.initial).map_err(|e| NodeError::Snapshot(cfg.dir.clone(), e.to_string()))?;
            storage.bootstrap(voters, data)?;
        }
        let snap = storage.last_snapshot();
        let (state, proposals) = if snap.get_data().is_empty() {
            (cfg.initial.clone(), Applied::default())
        } else {
            once::decode_snapshot(snap.get_data()).map_err(|e| NodeError::Snapshot(cfg.dir.clone(), e.to_string()))?
        };
        let raft_cfg = raft::Config {
            id: cfg.id,
            election_tick: cfg.election_ticks,
            heartbeat_tick: 1,
            applied: snap.get_metadata().index,
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            ..Default::default()
        };
        raft_cfg.validate()?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let raw = RawNode::new(&raft_cfg, storage.clone(), &logger)?;
        let handle = DirectoryHandle::new(state.clone());
        let (requests, req_rx) = mpsc::channel(1024);
        let (inbox, inbox_rx) = mpsc::unbounded_channel();
        let (status_tx, status) = watch::channel(NodeStatus {
            id: cfg.id,
            leader: None,
            term: 0,
            is_leader: false,
            last_contact: None,
            applied: snap.get_metadata().index,
            epoch: state.epoch,
            voters: Vec::new(),
            learners: Vec::new(),
        });
        let replica = Replica {
            id: cfg.id,
            raw,
            storage,
            state,
            handle: handle.clone(),
            transport,
            run: new_run(),
            pending: HashMap::new(),
            proposals,
            election_ticks: cfg.election_ticks,
            next_request: 1,
            applied: snap.get_metadata().index,
            snapshot_index: snap.get_metadata().index,
            snapshot_every: cfg.snapshot_every,
            status: status_tx,
            last_contact: None,
            reads: Vec::new(),
            stopping: None,
        };
        tokio::spawn(replica.run(cfg.tick, req_rx, inbox_rx));
        Ok(Node { id: cfg.id, handle, requests, inbox, status })
    }

    /// The applied directory, as routers read it.
    pub fn directory(&self) -> DirectoryHandle {
        self.handle.clone()
    }

    /// Hands a message from a peer to this node.
    pub fn receive(&self, msg: Message) {
        let _ = self.inbox.send(msg);
    }

    pub fn status(&self) -> NodeStatus {
        self.status.borrow().clone()
    }

    /// The last log index applied here (0: the directory has not arrived yet).
    /// Unlike [`Node::status`], copies nothing: routers ask on every statement.
    pub fn applied(&self) -> u64 {
        self.status.borrow().applied
    }

    pub fn watch_status(&self) -> watch::Receiver<NodeStatus> {
        self.status.clone()
    }

    /// Whether this node has heard from the cluster within `lease`: if not, it can
    /// no longer know whether a bucket moved.
    pub fn lease_valid(&self, lease: Duration) -> bool {
        self.status.borrow().within_lease(lease)
    }

    /// Proposes a change (from any node: raft forwards it to the leader) and waits
    /// until it is committed and applied here. A proposal lost in a change of
    /// leader is proposed again, and applies once (see [`super::once`]).
    ///
    /// During an election (no leader known) it waits for one, within `timeout`,
    /// rather than failing at once: a change proposed while a node restarts goes
    /// through as soon as the cluster has a leader again.
    pub async fn propose(&self, cmd: Command, timeout: Duration) -> Result<Outcome, ProposeError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut status = self.watch_status();
        loop {
            status.borrow_and_update();
            let (reply, rx) = oneshot::channel();
            self.requests
                .send(Request::Propose { cmd: cmd.clone(), reply })
                .await
                .map_err(|_| ProposeError::Stopped)?;
            match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(Err(ProposeError::NoLeader))) => {
                    // Try again when the node's view changes (a leader elected),
                    // or give up at the deadline.
                    if !matches!(tokio::time::timeout_at(deadline, status.changed()).await, Ok(Ok(()))) {
                        return Err(ProposeError::NoLeader);
                    }
                }
                Ok(Ok(r)) => return r,
                Ok(Err(_)) => return Err(ProposeError::Stopped),
                Err(_) => return Err(ProposeError::Timeout(timeout)),
            }
        }
    }

    /// Waits until this replica has applied everything committed when the call
    /// was made (raft's read index): what it then shows is linearizable.
    pub async fn read_barrier(&self, timeout: Duration) -> Result<(), ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.requests.send(Request::ReadIndex { reply }).await.map_err(|_| ProposeError::Stopped)?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r.map(|_| ()),
            Ok(Err(_)) => Err(ProposeError::Stopped),
            Err(_) => Err(ProposeError::Timeout(timeout)),
        }
    }

    /// Stops the replica and waits until its storage is closed: another replica
    /// can then open the same directory. Other handles to the node see
    /// [`ProposeError::Stopped`] from then on.
    pub async fn stop(&self) {
        let (done, rx) = oneshot::channel();
        if self.requests.send(Request::Stop { done }).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Adds a voter or a learner, promotes a learner, or removes a node.
    pub async fn change_membership(
        &self,
        node: u64,
        change: MembershipChange,
        timeout: Duration,
    ) -> Result<Outcome, ProposeError> {
        let mut cc = ConfChangeV2::default();
        let mut single = raft::prelude::ConfChangeSingle::default();
        single.set_change_type(match change {
            MembershipChange::AddVoter => ConfChangeType::AddNode,
            MembershipChange::AddLearner => ConfChangeType::AddLearnerNode,
            MembershipChange::Remove => ConfChangeType::RemoveNode,
        });
        single.node_id = node;
        cc.mut_changes().push(single);
        let (reply, rx) = oneshot::channel();
        self.requests.send(Request::ConfChange { cc, reply }).await.map_err(|_| ProposeError::Stopped)?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ProposeError::Stopped),
            Err(_) => Err(ProposeError::Timeout(timeout)),
        }
    }
}

/// A change to who takes part in the directory, for
/// [`Node::change_membership`]: the directory's own words, so that callers need
/// not know the consensus library.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MembershipChange {
    /// Add a voter, or promote a learner to one.
    AddVoter,
    /// Add a node that receives the log without voting.
    AddLearner,
    /// Remove a voter or a learner.
    Remove,
}

/// The state owned by the Ready loop.
struct Replica {
    id: u64,
    raw: RawNode<DiskStorage>,
    storage: DiskStorage,
    state: Directory,
    handle: DirectoryHandle,
    transport: Arc<dyn Transport>,
    /// This run of the node: drawn at start, part of every proposal's origin.
    run: u64,
    /// Proposals of this node waiting for their entry to apply, by request id.
    pending: HashMap<u64, Pending>,
    /// The proposals every replica has applied, so that a copy applies as a no-op.
    proposals: Applied,
    /// Ticks without a leader before an election (raft's election timeout).
    election_ticks: usize,
    next_request: u64,
    applied: u64,
    snapshot_index: u64,
    snapshot_every: u64,
    status: watch::Sender<NodeStatus>,
    last_contact: Option<Instant>,
    /// Linearizable reads waiting for their read index, then for it to apply.
    reads: Vec<Read>,
    /// Set once asked to stop.
    stopping: Option<Stopping>,
}

/// A stop in progress: who waits for it, and when it ends at the latest.
struct Stopping {
    done: Vec<oneshot::Sender<()>>,
    until: Instant,
}

/// A proposal waiting for its entry to apply.
struct Pending {
    reply: Reply,
    /// What to propose again if it may have been lost (None: a membership
    /// change, which is not retried).
    retry: Option<Retry>,
}

/// A proposal as sent, and the leader it was sent under.
struct Retry {
    context: Vec<u8>,
    data: Vec<u8>,
    /// Either raw.propose(ctx, data) or raw.read_index(ctx).
    read: bool,
    leader: u64,
    term: u64,
    ticks: usize,
}

impl Retry {
    fn new(context: Vec<u8>, data: Vec<u8>, read: bool, raw: &RawNode<DiskStorage>) -> Retry {
        Retry { context, data, read, leader: raw.raft.leader_id, term: raw.raft.term, ticks: 0 }
    }

    /// Sends the proposal again when the leader changed since it was sent, or
    /// after `patience` ticks under the same leader (a message lost on the way).
    fn tick(&mut self, raw: &mut RawNode<DiskStorage>, patience: usize) {
        self.ticks += 1;
        let (leader, term) = (raw.raft.leader_id, raw.raft.term);
        if leader == 0 || (leader == self.leader && term == self.term && self.ticks < patience) {
            return;
        }
        let sent = if self.read {
            raw.read_index(self.context.clone());
            true
        } else {
            // Refused while the leader hands over; tried again next tick.
            raw.propose(self.context.clone(), self.data.clone()).is_ok()
        };
        if sent {
            (self.leader, self.term, self.ticks) = (leader, term, 0);
        }
    }
}

/// A linearizable read: its request id, the read index once the leader gave
/// it, and its caller.
struct Read {
    request: u64,
    index: Option<u64>,
    reply: Reply,
    retry: Retry,
}

/// A random id for this run of the node (never 0: 0 marks entries from before
/// runs existed).
fn new_run() -> u64 {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    u64::from_le_bytes(bytes[..8].try_into().unwrap_or([1; 8])).max(1)
}

impl Replica {
    async fn run(
        mut self,
        tick: Duration,
        mut requests: mpsc::Receiver<Request>,
        mut inbox: mpsc::UnboundedReceiver<Message>,
    ) {
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // 1. Input: a tick, a message from a peer, or a request of ours.
            tokio::select! {
                _ = ticker.tick() => {
                    self.raw.tick();
                    self.retry_lost();
                }
                msg = inbox.recv() => match msg {
                    Some(m) => self.step(m),
                    None => return,
                },
                req = requests.recv() => match req {
                    Some(Request::Stop { done }) => self.begin_stop(done, tick),
                    Some(r) => self.request(r),
                    None => return,
                },
            }
            // Take everything else already waiting before producing a Ready.
            while let Ok(m) = inbox.try_recv() {
                self.step(m);
            }
            if let Err(e) = self.handle_ready() {
                // Storage failed: this replica cannot go on safely.
                warn!(node = self.id, error = %e, "directory replica stopped: storage failed");
                return;
            }
            self.publish_status();
            if self
                .stopping
                .as_ref()
                .is_some_and(|s| self.raw.raft.state != StateRole::Leader || Instant::now() >= s.until)
            {
                let done = self.stopping.take().map(|s| s.done).unwrap_or_default();
                // Close the storage before anyone hears that the node stopped.
                drop(self);
                for d in done {
                    let _ = d.send(());
                }
                return;
            }
        }
    }

    /// A leader that stops hands its office to the follower furthest along, so
    /// the cluster does not wait an election timeout for a new one; it stops
    /// once a new leader took over, or after two election timeouts at most.
    /// Any other node stops at once.
    fn begin_stop(&mut self, done: oneshot::Sender<()>, tick: Duration) {
        let grace = tick * u32::try_from(2 * self.election_ticks).unwrap_or(u32::MAX);
        let stopping =
            self.stopping.get_or_insert_with(|| Stopping { done: Vec::new(), until: Instant::now() + grace });
        stopping.done.push(done);
        if self.raw.raft.state != StateRole::Leader {
            return;
        }
        let me = self.id;
        let voters = self.raw.raft.prs().conf().voters().ids();
        let heir = self
            .raw
            .raft
            .prs()
            .iter()
            .filter(|(id, _)| **id != me && voters.contains(**id))
            .max_by_key(|(id, p)| (p.matched, std::cmp::Reverse(**id)))
            .map(|(id, _)| *id);
        match heir {
            Some(id) => {
                info!(node = me, to = id, "stopping: handing the directory's leadership over");
                self.raw.transfer_leader(id);
            }
            // The only voter: nobody to hand over to.
            None => stopping.until = Instant::now(),
        }
    }

    fn step(&mut self, m: Message) {
        let from = m.from;
        if let Err(e) = self.raw.step(m) {
            tracing::debug!(node = self.id, error = %e, "raft message dropped");
            return;
        }
        // Contact with the leader (checked after the step, so that the message
        // that announces a new leader counts too).
        if from != 0 && from == self.raw.raft.leader_id {
            self.last_contact = Some(Instant::now());
        }
    }

    /// Proposals and reads that may have been lost go out again (see
    /// [`super::once`]); those whose caller gave up are forgotten.
    fn retry_lost(&mut self) {
        // Ticks a proposal waits under the same leader before it is sent again.
        let patience = 4 * self.election_ticks;
        self.pending.retain(|_, p| !p.reply.is_closed());
        for p in self.pending.values_mut() {
            if let Some(r) = &mut p.retry {
                r.tick(&mut self.raw, patience);
            }
        }
        self.reads.retain(|r| !r.reply.is_closed());
        for r in self.reads.iter_mut().filter(|r| r.index.is_none()) {
            r.retry.tick(&mut self.raw, patience);
        }
    }

    fn request(&mut self, r: Request) {
        let id = self.next_request;
        self.next_request += 1;
        let ctx = Origin { node: self.id, run: self.run, request: id }.encode();
        match r {
            Request::Propose { cmd, reply } => {
                if self.raw.raft.leader_id == 0 {
                    let _ = reply.send(Err(ProposeError::NoLeader));
                    return;
                }
                let data = match serde_json::to_vec(&cmd) {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = reply.send(Err(ProposeError::Raft(e.to_string())));
                        return;
                    }
                };
                match self.raw.propose(ctx.clone(), data.clone()) {
                    Ok(()) => {
                        let retry = Some(Retry::new(ctx, data, false, &self.raw));
                        self.pending.insert(id, Pending { reply, retry });
                    }
                    Err(e) => {
                        let _ = reply.send(Err(ProposeError::Raft(e.to_string())));
                    }
                }
            }
            Request::ReadIndex { reply } => {
                if self.raw.raft.leader_id == 0 {
                    let _ = reply.send(Err(ProposeError::NoLeader));
                    return;
                }
                self.raw.read_index(ctx.clone());
                let retry = Retry::new(ctx, Vec::new(), true, &self.raw);
                self.reads.push(Read { request: id, index: None, reply, retry });
            }
            Request::ConfChange { cc, reply } => match self.raw.propose_conf_change(ctx, cc) {
                Ok(()) => {
                    self.pending.insert(id, Pending { reply, retry: None });
                }
                Err(e) => {
                    let _ = reply.send(Err(ProposeError::Raft(e.to_string())));
                }
            },
            Request::Stop { .. } => unreachable!("handled by the Ready loop"),
        }
    }

    /// Persist, send, apply, advance: the order raft requires.
    fn handle_ready(&mut self) -> Result<(), NodeError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        // A leader may send before it persists (raft thesis 10.2.1).
        for m in ready.take_messages() {
            self.transport.send(m);
        }
        if !ready.snapshot().is_empty() {
            let snap = ready.snapshot().clone();
            self.install_snapshot(snap)?;
        }
        for rs in ready.take_read_states() {
            self.read_index_known(&rs);
        }
        let committed = ready.take_committed_entries();
        self.apply(committed)?;
        self.storage.append(ready.entries())?;
        if let Some(hs) = ready.hs() {
            self.storage.set_hardstate(hs.clone())?;
        }
        for m in ready.take_persisted_messages() {
            self.transport.send(m);
        }
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.storage.set_commit(commit)?;
        }
        for m in light.take_messages() {
            self.transport.send(m);
        }
        let committed = light.take_committed_entries();
        self.apply(committed)?;
        self.raw.advance_apply();
        self.answer_reads();
        self.maybe_compact()?;
        Ok(())
    }

    /// The leader confirmed the commit index a read must wait for.
    fn read_index_known(&mut self, rs: &raft::ReadState) {
        if let Some(o) = Origin::decode(&rs.request_ctx).filter(|o| o.node == self.id && o.run == self.run) {
            if let Some(r) = self.reads.iter_mut().find(|r| r.request == o.request) {
                r.index = Some(rs.index);
            }
        }
    }

    /// Answers the reads whose index this replica has applied.
    fn answer_reads(&mut self) {
        let applied = self.applied;
        let epoch = self.state.epoch;
        let (done, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.reads).into_iter().partition(|r| r.index.is_some_and(|i| i <= applied));
        self.reads = waiting;
        for r in done {
            let _ = r.reply.send(Ok(Outcome::Applied { epoch }));
        }
    }

    fn install_snapshot(&mut self, snap: Snapshot) -> Result<(), NodeError> {
        let (state, proposals) = once::decode_snapshot(snap.get_data())
            .map_err(|e| NodeError::Snapshot(PathBuf::from("(received)"), e.to_string()))?;
        let index = snap.get_metadata().index;
        self.storage.apply_snapshot(snap)?;
        self.state = state;
        self.proposals = proposals;
        self.applied = index;
        self.snapshot_index = index;
        self.handle.store(self.state.clone());
        // Proposals of ours whose entry came inside the snapshot.
        let (run, me) = (self.run, self.id);
        let done: Vec<(u64, Outcome)> = self
            .pending
            .keys()
            .filter_map(|&request| {
                let o = Origin { node: me, run, request };
                self.proposals.outcome(o).map(|out| (request, out.clone()))
            })
            .collect();
        for (request, outcome) in done {
            if let Some(p) = self.pending.remove(&request) {
                let _ = p.reply.send(Ok(outcome));
            }
        }
        info!(node = self.id, index, epoch = self.state.epoch, "installed a directory snapshot");
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), NodeError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut answers = Vec::new();
        for e in entries {
            self.applied = e.index;
            let origin = Origin::decode(e.get_context());
            let outcome = match e.get_entry_type() {
                EntryType::EntryNormal if e.get_data().is_empty() => continue, // a new leader's no-op
                EntryType::EntryNormal => {
                    let verdict = origin.map_or(Verdict::Apply, |o| self.proposals.admit(o, e.index));
                    match (verdict, serde_json::from_slice::<Command>(e.get_data())) {
                        // The first copy answered its caller, unless it reached
                        // this node inside a snapshot: then this one does.
                        (Verdict::Copy, _) => match origin.and_then(|o| self.proposals.outcome(o)) {
                            Some(out) => Ok(out.clone()),
                            None => continue,
                        },
                        (Verdict::TooOld, _) => Err(ProposeError::Raft(
                            "the change reached the log too late to be applied; check the directory and try again"
                                .into(),
                        )),
                        (Verdict::Apply, Ok(cmd)) => {
                            let out = self.state.apply(&cmd);
                            if let Some(o) = origin {
                                self.proposals.record(o, &out);
                            }
                            Ok(out)
                        }
                        (Verdict::Apply, Err(err)) => {
                            Ok(Outcome::Rejected { reason: format!("undecodable command: {err}") })
                        }
                    }
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = ConfChangeV2::parse_from_bytes(e.get_data()).map_err(raft::Error::CodecError)?;
                    let cs = self.raw.apply_conf_change(&cc)?;
                    self.storage.set_conf_state(cs)?;
                    Ok(Outcome::Applied { epoch: self.state.epoch })
                }
                EntryType::EntryConfChange => {
                    let cc =
                        raft::prelude::ConfChange::parse_from_bytes(e.get_data()).map_err(raft::Error::CodecError)?;
                    let cs = self.raw.apply_conf_change(&cc)?;
                    self.storage.set_conf_state(cs)?;
                    Ok(Outcome::Applied { epoch: self.state.epoch })
                }
            };
            if let Some(o) = origin.filter(|o| o.node == self.id && o.run == self.run) {
                if let Some(p) = self.pending.remove(&o.request) {
                    answers.push((p.reply, outcome));
                }
            }
        }
        // Callers hear once routing here sees what they proposed.
        self.handle.store(self.state.clone());
        for (reply, outcome) in answers {
            let _ = reply.send(outcome);
        }
        Ok(())
    }

    fn maybe_compact(&mut self) -> Result<(), NodeError> {
        let requested = self.storage.take_snapshot_request();
        if !requested && self.applied < self.snapshot_index + self.snapshot_every {
            return Ok(());
        }
        if self.applied <= self.snapshot_index && !requested {
            return Ok(());
        }
        let data = once::encode_snapshot(&self.state, &self.proposals)
            .map_err(|e| NodeError::Snapshot(PathBuf::new(), e.to_string()))?;
        let cs = self.raw.raft.prs().conf().to_conf_state();
        self.storage.compact(self.applied, data, cs)?;
        self.snapshot_index = self.applied;
        Ok(())
    }

    fn publish_status(&mut self) {
        let is_leader = self.raw.raft.state == StateRole::Leader;
        if is_leader {
            // A leader under check_quorum steps down when it loses its quorum, so
            // being leader is itself recent contact with a quorum.
            self.last_contact = Some(Instant::now());
        }
        let cs = self.raw.raft.prs().conf().to_conf_state();
        let leader = self.raw.raft.leader_id;
        let status = NodeStatus {
            id: self.id,
            leader: (leader != 0).then_some(leader),
            term: self.raw.raft.term,
            is_leader,
            last_contact: self.last_contact,
            applied: self.applied,
            epoch: self.state.epoch,
            voters: cs.voters.clone(),
            learners: cs.learners.clone(),
        };
        self.status.send_replace(status);
    }
}

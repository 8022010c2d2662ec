//! Durable raft storage: the log and hard state on disk, served from memory.
//!
//! Why an append-only file and not an embedded database: the directory's log is
//! small (a few thousand entries between snapshots, each a few hundred bytes), is
//! only ever appended to or truncated at the tail, and is read back in full only at
//! start-up. A file of `[len u32][crc32 u32][Entry protobuf]` records, fsynced per
//! append, does exactly that with nothing to tune; the CRC makes a torn last
//! record (a crash mid-append) detectable, and it is dropped on load because it
//! was never acknowledged.
//!
//! Files in the node's directory:
//! - `raft.log`: entries after the snapshot;
//! - `hardstate`: term, vote, commit (rewritten atomically: tmp file, fsync, rename);
//! - `snapshot`: the last snapshot (metadata + the directory as JSON), same way;
//! - `confstate`: the voters and learners, same way;
//! - `lock`: held (flock) while a replica has the directory open, with that
//!   process's id in it. Two replicas writing one log would corrupt it.
//!
//! `raft::storage::MemStorage` keeps everything in memory for the reads raft makes;
//! this type writes to disk first, then updates memory.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RaftState, Storage};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("raft storage in {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "raft storage in {path} is in use by another directory replica{holder}: stop it first, or give this node a directory of its own"
    )]
    InUse { path: PathBuf, holder: String },
    #[error("raft storage in {path} is damaged: {what}")]
    Damaged { path: PathBuf, what: String },
    #[error(transparent)]
    Raft(#[from] raft::Error),
}

/// The raft log, hard state and snapshot of one node.
#[derive(Clone)]
pub struct DiskStorage {
    mem: MemStorage,
    dir: PathBuf,
    snapshot: Arc<RwLock<Snapshot>>,
    log: Arc<std::sync::Mutex<File>>,
    /// Set when raft asked for a snapshot newer than the last one (or one that
    /// includes a peer the last one does not know): the replica takes one.
    wants_snapshot: Arc<std::sync::atomic::AtomicBool>,
    /// The locked `lock` file: released when the last clone is dropped.
    _lock: Arc<File>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// Writes `bytes` to `path` so that a crash leaves either the old or the new file.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(parent) = path.parent() {
        File::open(parent).and_then(|d| d.sync_all()).map_err(io(parent))?;
    }
    Ok(())
}

/// Takes the directory's lock, or says who holds it.
fn lock(dir: &Path) -> Result<File, StoreError> {
    use std::os::fd::AsRawFd;
    let path = dir.join("lock");
    let mut f =
        OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io(&path))?;
    // SAFETY: flock on a descriptor this function owns; no memory is shared.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(StoreError::Io { path, source: err });
        }
        let mut pid = String::new();
        let _ = f.read_to_string(&mut pid);
        let pid = pid.trim();
        let holder = if pid.is_empty() { String::new() } else { format!(" (process {pid})") };
        return Err(StoreError::InUse { path: dir.to_path_buf(), holder });
    }
    f.set_len(0).map_err(io(&path))?;
    f.write_all(format!("{}\n", std::process::id()).as_bytes()).map_err(io(&path))?;
    Ok(f)
}

fn encode_record(e: &Entry, out: &mut Vec<u8>) -> Result<(), StoreError> {
    let bytes = e
        .write_to_bytes()
        .map_err(|err| StoreError::Damaged { path: PathBuf::new(), what: format!("cannot encode entry: {err}") })?;
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&bytes).to_le_bytes());
    out.extend_from_slice(&bytes);
    Ok(())
}

impl DiskStorage {
    /// Opens (or creates) the storage in `dir`.
    pub fn open(dir: &Path) -> Result<DiskStorage, StoreError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let lock = lock(dir)?;
        let mem = MemStorage::new();
        let snap_path = dir.join("snapshot");
        let mut snapshot = Snapshot::default();
        if snap_path.exists() {
            let bytes = std::fs::read(&snap_path).map_err(io(&snap_path))?;
            snapshot = Snapshot::parse_from_bytes(&bytes)
                .map_err(|e| StoreError::Damaged { path: snap_path.clone(), what: e.to_string() })?;
            mem.wl().apply_snapshot(snapshot.clone())?;
        }
        let cs_path = dir.join("confstate");
        if cs_path.exists() {
            let bytes = std::fs::read(&cs_path).map_err(io(&cs_path))?;
            let cs = ConfState::parse_from_bytes(&bytes)
                .map_err(|e| StoreError::Damaged { path: cs_path.clone(), what: e.to_string() })?;
            mem.wl().set_conf_state(cs);
        }
        let hs_path = dir.join("hardstate");
        if hs_path.exists() {
            let bytes = std::fs::read(&hs_path).map_err(io(&hs_path))?;
            let hs = HardState::parse_from_bytes(&bytes)
                .map_err(|e| StoreError::Damaged { path: hs_path.clone(), what: e.to_string() })?;
            mem.wl().set_hardstate(hs);
        }
        let log_path = dir.join("raft.log");
        let entries = read_log(&log_path)?;
        let after_snapshot: Vec<Entry> =
            entries.into_iter().filter(|e| e.index > snapshot.get_metadata().index).collect();
        if !after_snapshot.is_empty() {
            mem.wl().append(&after_snapshot)?;
        }
        // Rewrite the log without a torn tail before appending to it again.
        let store = DiskStorage {
            mem,
            dir: dir.to_path_buf(),
            snapshot: Arc::new(RwLock::new(snapshot)),
            wants_snapshot: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            _lock: Arc::new(lock),
            log: Arc::new(std::sync::Mutex::new(
                OpenOptions::new().create(true).append(true).open(&log_path).map_err(io(&log_path))?,
            )),
        };
        store.rewrite_log()?;
        Ok(store)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("raft.log")
    }

    /// Rewrites `raft.log` from the entries in memory.
    fn rewrite_log(&self) -> Result<(), StoreError> {
        let path = self.log_path();
        let first = self.mem.first_index()?;
        let last = self.mem.last_index()?;
        let mut buf = Vec::new();
        if last >= first {
            let ents = self.mem.entries(first, last + 1, None, GetEntriesContext::empty(false))?;
            for e in &ents {
                encode_record(e, &mut buf)?;
            }
        }
        write_atomically(&path, &buf)?;
        let f = OpenOptions::new().append(true).open(&path).map_err(io(&path))?;
        *self.log.lock().unwrap_or_else(|p| p.into_inner()) = f;
        Ok(())
    }

    /// Appends entries, fsynced, before raft may act on them.
    pub fn append(&self, ents: &[Entry]) -> Result<(), StoreError> {
        if ents.is_empty() {
            return Ok(());
        }
        let last = self.mem.last_index()?;
        let conflict = ents[0].index <= last;
        self.mem.wl().append(ents)?;
        if conflict {
            // A new leader overwrote our tail: rare, so rewrite the whole file.
            return self.rewrite_log();
        }
        let mut buf = Vec::new();
        for e in ents {
            encode_record(e, &mut buf)?;
        }
        let path = self.log_path();
        let mut f = self.log.lock().unwrap_or_else(|p| p.into_inner());
        f.write_all(&buf).map_err(io(&path))?;
        f.sync_data().map_err(io(&path))?;
        Ok(())
    }

    pub fn set_hardstate(&self, hs: HardState) -> Result<(), StoreError> {
        let bytes = hs
            .write_to_bytes()
            .map_err(|e| StoreError::Damaged { path: self.dir.join("hardstate"), what: e.to_string() })?;
        write_atomically(&self.dir.join("hardstate"), &bytes)?;
        self.mem.wl().set_hardstate(hs);
        Ok(())
    }

    pub fn set_commit(&self, commit: u64) -> Result<(), StoreError> {
        let mut hs = self.mem.rl().hard_state().clone();
        if hs.commit != commit {
            hs.commit = commit;
            self.set_hardstate(hs)?;
        }
        Ok(())
    }

    /// Records the membership (after a configuration change applies).
    pub fn set_conf_state(&self, cs: ConfState) -> Result<(), StoreError> {
        let path = self.dir.join("confstate");
        let bytes = cs.write_to_bytes().map_err(|e| StoreError::Damaged { path: path.clone(), what: e.to_string() })?;
        write_atomically(&path, &bytes)?;
        self.mem.wl().set_conf_state(cs);
        Ok(())
    }

    /// Installs a snapshot received from the leader.
    pub fn apply_snapshot(&self, snap: Snapshot) -> Result<(), StoreError> {
        self.save_snapshot(&snap)?;
        self.set_conf_state(snap.get_metadata().get_conf_state().clone())?;
        self.mem.wl().apply_snapshot(snap.clone())?;
        *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) = snap;
        self.rewrite_log()
    }

    /// Takes a snapshot of the state machine at `index` (already applied) and drops
    /// the log up to it.
    pub fn compact(&self, index: u64, data: Vec<u8>, conf_state: ConfState) -> Result<(), StoreError> {
        let mut snap = Snapshot::default();
        snap.set_data(data.into());
        let meta = snap.mut_metadata();
        meta.index = index;
        meta.term = self.mem.term(index)?;
        meta.set_conf_state(conf_state);
        self.save_snapshot(&snap)?;
        *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) = snap;
        self.mem.wl().compact(index)?;
        self.rewrite_log()
    }

    fn save_snapshot(&self, snap: &Snapshot) -> Result<(), StoreError> {
        let path = self.dir.join("snapshot");
        let bytes =
            snap.write_to_bytes().map_err(|e| StoreError::Damaged { path: path.clone(), what: e.to_string() })?;
        write_atomically(&path, &bytes)
    }

    /// The last snapshot (empty before the first one).
    pub fn last_snapshot(&self) -> Snapshot {
        self.snapshot.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn hard_state(&self) -> HardState {
        self.mem.rl().hard_state().clone()
    }

    pub fn conf_state(&self) -> ConfState {
        self.mem.initial_state().map(|s| s.conf_state).unwrap_or_default()
    }

    /// Whether raft asked for a snapshot the storage does not have (and clears it).
    pub fn take_snapshot_request(&self) -> bool {
        self.wants_snapshot.swap(false, std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether nothing was ever stored here.
    pub fn is_new(&self) -> bool {
        self.last_snapshot().get_metadata().index == 0 && self.mem.last_index().unwrap_or(0) == 0
    }

    /// Starts a new cluster: the founding voters and the initial state, as a
    /// snapshot at index 1. Every founder writes the same one; a node that joins
    /// later starts empty and receives the leader's snapshot, membership included.
    pub fn bootstrap(&self, voters: &[u64], data: Vec<u8>) -> Result<(), StoreError> {
        let mut snap = Snapshot::default();
        snap.set_data(data.into());
        let meta = snap.mut_metadata();
        meta.index = 1;
        meta.term = 1;
        meta.set_conf_state(ConfState { voters: voters.to_vec(), ..Default::default() });
        self.apply_snapshot(snap)
    }

    /// Entries in `[low, high)`, for applying committed entries at start-up.
    pub fn committed_entries(&self, low: u64, high: u64) -> Result<Vec<Entry>, StoreError> {
        if high <= low {
            return Ok(Vec::new());
        }
        Ok(self.mem.entries(low, high, None, GetEntriesContext::empty(false))?)
    }
}

fn read_log(path: &Path) -> Result<Vec<Entry>, StoreError> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes).map_err(io(path))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(path)(e)),
    }
    let mut entries = Vec::new();
    let mut at = 0;
    while at + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap_or_default());
        let Some(body) = bytes.get(at + 8..at + 8 + len) else {
            break;
        };
        if crc32fast::hash(body) != crc {
            break;
        }
        match Entry::parse_from_bytes(body) {
            Ok(e) => entries.push(e),
            Err(_) => break,
        }
        at += 8 + len;
    }
    // Anything after `at` is a torn write from a crash: it was never fsynced
    // completely, so never acknowledged; it is dropped.
    Ok(entries)
}

impl Storage for DiskStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.mem.initial_state()
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.mem.entries(low, high, max_size, context)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.mem.term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.mem.first_index()
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.mem.last_index()
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let snap = self.last_snapshot();
        let cs = snap.get_metadata().get_conf_state();
        let knows_peer = cs.voters.contains(&to) || cs.learners.contains(&to);
        if snap.get_metadata().index < request_index || !knows_peer {
            // The peer would refuse a snapshot that does not list it: ask the
            // replica for a fresh one; raft retries.
            self.wants_snapshot.store(true, std::sync::atomic::Ordering::SeqCst);
            return Err(raft::Error::Store(raft::StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, data: &str) -> Entry {
        let mut e = Entry { index, term, ..Default::default() };
        e.set_data(data.as_bytes().to_vec().into());
        e
    }

    #[test]
    fn entries_and_hard_state_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStorage::open(dir.path()).unwrap();
        s.append(&[entry(1, 1, "a"), entry(2, 1, "b"), entry(3, 2, "c")]).unwrap();
        let hs = HardState { term: 2, vote: 3, commit: 2, ..Default::default() };
        s.set_hardstate(hs.clone()).unwrap();
        drop(s);
        let s = DiskStorage::open(dir.path()).unwrap();
        assert_eq!(s.last_index().unwrap(), 3);
        assert_eq!(s.term(3).unwrap(), 2);
        assert_eq!(s.hard_state(), hs);
        let es = s.entries(1, 4, None, GetEntriesContext::empty(false)).unwrap();
        assert_eq!(
            es.iter().map(|e| e.get_data().to_vec()).collect::<Vec<_>>(),
            vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]
        );
    }

    #[test]
    fn a_directory_open_in_one_replica_is_refused_to_another_until_closed() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStorage::open(dir.path()).unwrap();
        let clone = s.clone();
        let err = DiskStorage::open(dir.path()).err().expect("a second open is refused");
        let text = err.to_string();
        assert!(matches!(err, StoreError::InUse { .. }), "{text}");
        assert!(text.contains(&format!("(process {})", std::process::id())), "{text}");
        assert!(text.contains("stop it first"), "{text}");
        drop(s);
        assert!(DiskStorage::open(dir.path()).is_err(), "a clone still holds the lock");
        drop(clone);
        DiskStorage::open(dir.path()).unwrap();
    }

    #[test]
    fn a_conflicting_append_truncates_the_tail_on_disk_too() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStorage::open(dir.path()).unwrap();
        s.append(&[entry(1, 1, "a"), entry(2, 1, "b"), entry(3, 1, "c")]).unwrap();
        s.append(&[entry(2, 2, "B")]).unwrap();
        drop(s);
        let s = DiskStorage::open(dir.path()).unwrap();
        assert_eq!(s.last_index().unwrap(), 2);
        assert_eq!(s.entries(2, 3, None, GetEntriesContext::empty(false)).unwrap()[0].get_data(), b"B");
    }

    #[test]
    fn a_torn_last_record_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStorage::open(dir.path()).unwrap();
        s.append(&[entry(1, 1, "a"), entry(2, 1, "b")]).unwrap();
        drop(s);
        let path = dir.path().join("raft.log");
        let len = std::fs::metadata(&path).unwrap().len();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 3).unwrap();
        let s = DiskStorage::open(dir.path()).unwrap();
        assert_eq!(s.last_index().unwrap(), 1);
    }

    #[test]
    fn compaction_keeps_a_snapshot_and_the_entries_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStorage::open(dir.path()).unwrap();
        s.append(&(1..=10).map(|i| entry(i, 1, "x")).collect::<Vec<_>>()).unwrap();
        s.set_commit(10).unwrap();
        s.compact(7, b"state at 7".to_vec(), ConfState { voters: vec![1], ..Default::default() }).unwrap();
        drop(s);
        let s = DiskStorage::open(dir.path()).unwrap();
        assert_eq!(s.first_index().unwrap(), 8);
        assert_eq!(s.last_index().unwrap(), 10);
        let snap = s.snapshot(7, 1).unwrap();
        assert_eq!(snap.get_metadata().index, 7);
        assert_eq!(snap.get_data(), b"state at 7");
        assert!(s.snapshot(9, 1).is_err());
        assert!(s.snapshot(7, 5).is_err(), "a snapshot that does not list the peer is refused");
        assert!(s.take_snapshot_request());
    }
}

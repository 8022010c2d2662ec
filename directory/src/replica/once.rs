//! Exactly-once proposals.
//!
//! A proposal made on a follower is forwarded to the leader in a raft message.
//! Raft drops it without a word when that leader has just stepped down, and a
//! leader's own entry can be overwritten when it loses its office before the
//! entry reached a quorum. So a replica proposes a change again when the leader
//! changes, or when it has waited long without seeing it apply (see
//! `Replica::retry_lost`). A proposal can then reach the log twice; this table
//! makes the second copy a no-op, the way a session table does in Raft's thesis
//! (§6.3).
//!
//! Every proposal carries its origin: the node, the node's *run* (a random id
//! drawn at each start, so request numbers can restart at 1 without matching
//! entries of an earlier run) and the request number. The table records, per
//! run, the requests that applied and what they did. It is replicated state:
//! every replica applies the same entries in the same order and so keeps the
//! same table, and snapshots carry it, so a replica that catches up by snapshot
//! skips the same copies. A proposal whose entry reached its own node inside a
//! snapshot (the node was behind) is answered from the table.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::state::Outcome;
use crate::Directory;

/// Requests of one run remembered individually; anything older than the last
/// `WINDOW` is taken as decided. A run would need this many later proposals to
/// apply while one of its own was still being retried, and a caller gives up
/// after seconds.
const WINDOW: usize = 1024;

/// A run not seen for this many log entries is forgotten. Its node has long
/// restarted or stopped retrying: a retry ends with its caller's timeout.
const RUN_HORIZON: u64 = 100_000;

/// Where a log entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Origin {
    pub node: u64,
    /// 0 in entries written before runs existed: those are applied as they are.
    pub run: u64,
    pub request: u64,
}

impl Origin {
    pub fn encode(&self) -> Vec<u8> {
        let mut c = Vec::with_capacity(24);
        c.extend_from_slice(&self.node.to_le_bytes());
        c.extend_from_slice(&self.run.to_le_bytes());
        c.extend_from_slice(&self.request.to_le_bytes());
        c
    }

    /// Reads an entry's context: 24 bytes (node, run, request), or the 16 bytes
    /// (node, request) of entries written before runs existed.
    pub fn decode(c: &[u8]) -> Option<Origin> {
        let word = |i: usize| c.get(i * 8..i * 8 + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
        match c.len() {
            16 => Some(Origin { node: word(0)?, run: 0, request: word(1)? }),
            24 => Some(Origin { node: word(0)?, run: word(1)?, request: word(2)? }),
            _ => None,
        }
    }
}

/// What one run has had applied.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Run {
    /// The log index of the run's latest entry.
    last_index: u64,
    /// Requests below this are decided (applied, or too old to apply now).
    floor: u64,
    /// Requests at or above `floor` that applied, with their outcome.
    applied: BTreeMap<u64, Outcome>,
}

/// The requests applied, per run (keyed `"node/run"`: JSON keys are strings).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Applied {
    runs: BTreeMap<String, Run>,
}

/// Whether an entry is applied.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The first copy: apply it.
    Apply,
    /// The request applied already: this is a copy proposed again.
    Copy,
    /// Older than the run's window: it may or may not have applied, so it is
    /// not applied now.
    TooOld,
}

fn key(origin: &Origin) -> String {
    format!("{}/{}", origin.node, origin.run)
}

impl Applied {
    /// Decides on the entry at log `index` from `origin`. An entry to apply is
    /// then [`Applied::record`]ed with its outcome.
    pub fn admit(&mut self, origin: Origin, index: u64) -> Verdict {
        if origin.run == 0 {
            return Verdict::Apply;
        }
        self.runs.retain(|_, r| r.last_index + RUN_HORIZON >= index);
        let run = self.runs.entry(key(&origin)).or_default();
        run.last_index = index;
        if origin.request < run.floor {
            Verdict::TooOld
        } else if run.applied.contains_key(&origin.request) {
            Verdict::Copy
        } else {
            Verdict::Apply
        }
    }

    /// Records what an admitted entry did.
    pub fn record(&mut self, origin: Origin, outcome: &Outcome) {
        if origin.run == 0 {
            return;
        }
        let run = self.runs.entry(key(&origin)).or_default();
        run.applied.insert(origin.request, outcome.clone());
        while run.applied.len() > WINDOW {
            if let Some((oldest, _)) = run.applied.pop_first() {
                run.floor = oldest + 1;
            }
        }
    }

    /// What the request did, if it applied (and is still remembered).
    pub fn outcome(&self, origin: Origin) -> Option<&Outcome> {
        self.runs.get(&key(&origin))?.applied.get(&origin.request)
    }
}

/// A snapshot's data: the directory, and the table of applied proposals.
#[derive(Serialize, Deserialize)]
struct SnapshotData {
    directory: Directory,
    applied: Applied,
}

pub(crate) fn encode_snapshot(directory: &Directory, applied: &Applied) -> serde_json::Result<Vec<u8>> {
    #[derive(Serialize)]
    struct Borrowed<'a> {
        directory: &'a Directory,
        applied: &'a Applied,
    }
    serde_json::to_vec(&Borrowed { directory, applied })
}

/// Reads a snapshot's data. A cluster's first snapshot (and every snapshot
/// written before the table existed) is the directory alone.
pub(crate) fn decode_snapshot(data: &[u8]) -> serde_json::Result<(Directory, Applied)> {
    match serde_json::from_slice::<SnapshotData>(data) {
        Ok(s) => Ok((s.directory, s.applied)),
        Err(wrapped) => match serde_json::from_slice::<Directory>(data) {
            Ok(d) => Ok((d, Applied::default())),
            Err(_) => Err(wrapped),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(node: u64, run: u64, request: u64) -> Origin {
        Origin { node, run, request }
    }

    #[test]
    fn contexts_round_trip_and_old_ones_read_as_run_zero() {
        let o = from(3, 0xdead_beef, 42);
        assert_eq!(Origin::decode(&o.encode()), Some(o));
        let mut old = 7u64.to_le_bytes().to_vec();
        old.extend_from_slice(&9u64.to_le_bytes());
        assert_eq!(Origin::decode(&old), Some(from(7, 0, 9)));
        assert_eq!(Origin::decode(b"short"), None);
        assert_eq!(Origin::decode(&[0; 25]), None);
    }

    fn epoch(epoch: u64) -> Outcome {
        Outcome::Applied { epoch }
    }

    /// Admits an entry and, when it is to apply, records `epoch` as its outcome.
    fn apply(a: &mut Applied, o: Origin, index: u64) -> Verdict {
        let v = a.admit(o, index);
        if v == Verdict::Apply {
            a.record(o, &epoch(index));
        }
        v
    }

    #[test]
    fn a_request_applies_once_and_runs_are_told_apart() {
        let mut a = Applied::default();
        assert_eq!(apply(&mut a, from(1, 5, 1), 10), Verdict::Apply);
        assert_eq!(apply(&mut a, from(1, 5, 2), 11), Verdict::Apply);
        assert_eq!(apply(&mut a, from(1, 5, 1), 12), Verdict::Copy);
        // The first copy's outcome is kept for its caller.
        assert_eq!(a.outcome(from(1, 5, 1)), Some(&epoch(10)));
        assert_eq!(a.outcome(from(1, 5, 9)), None);
        // The same request number in another run, or from another node, is new.
        assert_eq!(apply(&mut a, from(1, 6, 1), 13), Verdict::Apply);
        assert_eq!(apply(&mut a, from(2, 5, 1), 14), Verdict::Apply);
        // Requests may apply out of order (a retry overtaken by a later one).
        assert_eq!(apply(&mut a, from(1, 5, 4), 15), Verdict::Apply);
        assert_eq!(apply(&mut a, from(1, 5, 3), 16), Verdict::Apply);
        assert_eq!(apply(&mut a, from(1, 5, 3), 17), Verdict::Copy);
        // Entries from before runs existed are always applied.
        assert_eq!(apply(&mut a, from(1, 0, 1), 18), Verdict::Apply);
        assert_eq!(apply(&mut a, from(1, 0, 1), 19), Verdict::Apply);
    }

    #[test]
    fn the_window_slides_and_old_runs_are_forgotten() {
        let mut a = Applied::default();
        for r in 0..(WINDOW as u64 + 10) {
            assert_eq!(apply(&mut a, from(1, 5, r + 100), r + 1), Verdict::Apply);
        }
        // The first ten fell out of the window: a late copy of one is not applied.
        assert_eq!(apply(&mut a, from(1, 5, 100), 50_000), Verdict::TooOld);
        assert_eq!(apply(&mut a, from(1, 5, 99), 50_001), Verdict::TooOld);
        assert_eq!(apply(&mut a, from(1, 5, 110), 50_002), Verdict::Copy);
        assert_eq!(apply(&mut a, from(2, 1, 1), 50_003), Verdict::Apply);
        // Far enough on, run 1/5 is gone and run 2/1 stays.
        assert_eq!(apply(&mut a, from(2, 1, 2), 50_002 + RUN_HORIZON + 1), Verdict::Apply);
        assert_eq!(a.runs.len(), 1);
        assert!(a.runs.contains_key("2/1"));
    }

    #[test]
    fn snapshots_carry_the_table_and_old_snapshots_still_read() {
        let shards = (0..2).map(|i| crate::Shard::new(format!("s{i}"), format!("postgres://h/{i}"))).collect();
        let d = Directory::new("tenant_id", crate::KeyType::Int, 8, shards).unwrap();
        let mut a = Applied::default();
        apply(&mut a, from(1, 5, 1), 3);
        let (d2, a2) = decode_snapshot(&encode_snapshot(&d, &a).unwrap()).unwrap();
        assert_eq!((d2, a2), (d.clone(), a));
        let (d3, a3) = decode_snapshot(&serde_json::to_vec(&d).unwrap()).unwrap();
        assert_eq!((d3, a3), (d, Applied::default()));
        assert!(decode_snapshot(b"{\"directory\": 1}").is_err());
    }
}

//! Cross-shard reads streamed: each shard's answer is read into a small bounded
//! queue while the client is written, so a large result never sits whole in the
//! router's memory and a slow client holds the shards back (through their
//! sockets) instead. Rows without ORDER BY are relayed shard after shard; with
//! ORDER BY they are a k-way merge of the shards' sorted answers.

use std::cmp::Ordering;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::merge::{check_row, compare_rows, decode_row, Row};
use super::value::Order;
use super::SortKey;
use crate::error::SqlError;
use crate::pool::Pooled;
use crate::protocol::messages;
use crate::protocol::ProtocolError;

/// Messages queued per shard: enough to keep every shard busy, small enough
/// that a cross-shard read holds a few hundred rows at a time.
pub const QUEUE: usize = 64;

/// After the router has what it needs (LIMIT reached, an error, the client
/// gone), a shard's remaining answer is read and dropped up to this many bytes
/// so its connection can be used again; beyond it the connection is closed.
const DRAIN_BYTES: usize = 1 << 20;

/// What a shard's reader passes on.
pub enum Reply {
    /// A message of the answer (RowDescription, DataRow, CommandComplete,
    /// ErrorResponse …), raw.
    Message(Bytes),
    /// The connection failed; the answer is incomplete.
    Failed(SqlError),
    /// ReadyForQuery: the answer is complete.
    End,
}

/// Sends `run` (the session settings as simple queries, whose `skip` answers are
/// dropped except for errors; then the read, as a simple query or as one
/// extended-protocol pipeline ending in Sync) and passes each message of the
/// read's answer on until ReadyForQuery. Gives the connection back with the
/// transaction status of that ReadyForQuery; None (and the connection marked
/// broken) when its answer was not read to the end.
pub async fn read_shard(
    mut conn: Pooled,
    run: Bytes,
    mut skip: usize,
    tx: mpsc::Sender<Reply>,
) -> (Pooled, Option<u8>) {
    let name = conn.shard_name().to_string();
    let lost = |e: ProtocolError| SqlError::new("08006", format!("lost the connection to shard {name}: {e}"));
    conn.broken = true; // until ReadyForQuery
    conn.conn.queue(&run);
    if let Err(e) = conn.conn.flush().await {
        let _ = tx.send(Reply::Failed(lost(e))).await;
        return (conn, None);
    }
    let mut listening = true;
    let mut drained = 0usize;
    loop {
        let m = match conn.conn.read().await {
            Ok(m) => m,
            Err(e) => {
                if listening {
                    let _ = tx.send(Reply::Failed(lost(e))).await;
                }
                return (conn, None);
            }
        };
        match m.tag() {
            b'Z' if skip > 0 => skip -= 1,
            b'Z' => {
                conn.broken = false;
                if listening {
                    let _ = tx.send(Reply::End).await;
                }
                return (conn, m.body().first().copied());
            }
            b'E' | b'T' | b'D' | b'C' | b'I' | b'1' | b't' if skip == 0 || m.tag() == b'E' => {
                if listening && tx.send(Reply::Message(m.raw().clone())).await.is_err() {
                    listening = false;
                }
                if !listening {
                    drained += m.raw().len();
                    if drained > DRAIN_BYTES {
                        return (conn, None); // still marked broken: closed, not reused
                    }
                }
            }
            b'G' => {
                // COPY FROM STDIN cannot be fed here.
                conn.conn.queue(&messages::Builder::new(b'f').cstr("not supported here").finish());
                if conn.conn.flush().await.is_err() {
                    return (conn, None);
                }
            }
            _ => {}
        }
    }
}

/// One shard's answer as the session reads it.
pub struct ShardRows {
    pub shard: String,
    rx: mpsc::Receiver<Reply>,
    done: bool,
    /// An extended-protocol read: whether its Parse went through.
    pub parsed: bool,
    /// An extended-protocol read: the statement's ParameterDescription.
    pub parameters: Option<Bytes>,
}

/// The next step of a shard's answer.
pub enum Event {
    Described(Bytes),
    Row(Bytes),
    /// The shard's ErrorResponse, raw.
    ShardError(Bytes),
    Failed(SqlError),
    Done,
}

impl ShardRows {
    pub fn new(shard: String, rx: mpsc::Receiver<Reply>) -> ShardRows {
        ShardRows { shard, rx, done: false, parsed: false, parameters: None }
    }

    pub async fn next(&mut self) -> Event {
        let e = self.step().await;
        if self.done {
            // The reader must not wait on a queue nobody reads: it drains instead.
            self.rx.close();
        }
        e
    }

    async fn step(&mut self) -> Event {
        if self.done {
            return Event::Done;
        }
        loop {
            let Some(reply) = self.rx.recv().await else {
                self.done = true;
                return Event::Failed(SqlError::new("08006", format!("the read on shard {} stopped", self.shard)));
            };
            match reply {
                Reply::Message(m) => match m.first() {
                    Some(b'1') => self.parsed = true,
                    Some(b't') => self.parameters = Some(m),
                    Some(b'T') => return Event::Described(m),
                    Some(b'D') => return Event::Row(m),
                    Some(b'E') => {
                        self.done = true;
                        return Event::ShardError(m);
                    }
                    Some(b'C') | Some(b'I') => {
                        self.done = true;
                        return Event::Done;
                    }
                    _ => {}
                },
                Reply::Failed(e) => {
                    self.done = true;
                    return Event::Failed(e);
                }
                Reply::End => {
                    self.done = true;
                    return Event::Done;
                }
            }
        }
    }
}

/// The k-way merge's state: each shard's next row, decoded for comparing.
pub struct Heads {
    keys: Vec<(SortKey, Order)>,
    heads: Vec<Option<(Bytes, Row)>>,
}

impl Heads {
    pub fn new(keys: Vec<(SortKey, Order)>, shards: usize) -> Heads {
        Heads { keys, heads: (0..shards).map(|_| None).collect() }
    }

    /// Sets shard `i`'s next row. Err when it sorts before the row it follows:
    /// the shard's order is not the router's, and merging would answer wrong.
    pub fn put(&mut self, i: usize, raw: Bytes, previous: Option<&Row>) -> Result<(), SqlError> {
        let row = decode_row(&raw).map_err(|e| SqlError::new("08P01", e.to_string()))?;
        check_row(&self.keys, &row).map_err(|e| SqlError::new(e.sqlstate(), e.to_string()))?;
        if previous.is_some_and(|p| compare_rows(&self.keys, &row, p) == Ordering::Less) {
            return Err(SqlError::new(
                "XX000",
                "a shard returned rows out of the order the router merges by; the answer would be wrong".into(),
            )
            .hint("add a tenant_id condition so the query runs on one shard, or report this with the query"));
        }
        self.heads[i] = Some((raw, row));
        Ok(())
    }

    /// The shard whose head sorts first (the lowest shard among equals).
    pub fn first(&self) -> Option<usize> {
        let mut best: Option<usize> = None;
        for (i, h) in self.heads.iter().enumerate() {
            let Some((_, row)) = h else { continue };
            match best {
                Some(b) if compare_rows(&self.keys, row, &self.heads[b].as_ref().expect("set").1) != Ordering::Less => {
                }
                _ => best = Some(i),
            }
        }
        best
    }

    pub fn take(&mut self, i: usize) -> Option<(Bytes, Row)> {
        self.heads[i].take()
    }

    /// Whether `row` equals `previous` under the first `n` sort keys: a
    /// duplicate under DISTINCT or DISTINCT ON, which the merge brings next to
    /// the row it repeats.
    pub fn repeats(&self, n: usize, row: &Row, previous: &Row) -> bool {
        compare_rows(&self.keys[..n.min(self.keys.len())], row, previous) == Ordering::Equal
    }
}

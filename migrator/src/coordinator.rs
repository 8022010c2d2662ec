//! The cutover's [`Coordinator`] for a real cluster: holds, acknowledgements and
//! the flip all go through the directory, so every router — each reading its own
//! replica — takes part.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use shardgate_directory::clock::now_ms;
use shardgate_directory::state::{Command, Outcome};
use shardgate_directory::DirectoryHandle;
use shardgate_router::moves::{unacknowledged, DirectoryWriter};

use crate::cutover::Coordinator;
use crate::Error;

pub struct DirectoryCoordinator {
    pub directory: DirectoryHandle,
    pub writer: Arc<dyn DirectoryWriter>,
    pub move_id: u64,
    /// A router whose last heartbeat is older than this is out of the cluster: its
    /// lease has run out, so it refuses writes and its acknowledgement is not
    /// needed. Heartbeats come every second; this is the lease plus that second.
    pub router_timeout: Duration,
    token: Mutex<u64>,
}

impl DirectoryCoordinator {
    pub fn new(
        directory: DirectoryHandle,
        writer: Arc<dyn DirectoryWriter>,
        move_id: u64,
        router_timeout: Duration,
    ) -> Self {
        DirectoryCoordinator { directory, writer, move_id, router_timeout, token: Mutex::new(0) }
    }

    fn token(&self) -> u64 {
        *self.token.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn propose(&self, cmd: Command) -> Result<Outcome, Error> {
        match self.writer.propose(cmd).await {
            Ok(Outcome::Rejected { reason }) => Err(Error::Other(reason)),
            Ok(o) => Ok(o),
            Err(e) => Err(Error::Other(format!("directory: {e}"))),
        }
    }

    /// Ends this attempt's hold, retrying until the directory confirms it: after
    /// that no flip of this attempt can commit.
    async fn release_surely(&self) {
        let token = self.token();
        let mut pause = Duration::from_millis(20);
        loop {
            let r = self.propose(Command::ReleaseHold { id: self.move_id, token }).await;
            if r.is_ok() && self.writer.barrier().await.is_ok() {
                return;
            }
            tracing::warn!(move_id = self.move_id, "could not release the cutover hold yet; retrying");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }
}

impl Coordinator for DirectoryCoordinator {
    async fn hold(&self, deadline: Instant) -> Result<(), Error> {
        // Tokens only need to differ between attempts of one move.
        let token = now_ms().max(self.token() + 1);
        *self.token.lock().unwrap_or_else(|p| p.into_inner()) = token;
        let left = deadline.saturating_duration_since(Instant::now());
        let mut changes = self.directory.subscribe();
        // Routers give up holding on their own only well after this cutover would
        // have given up and undone its fence: their deadline is a safety net for
        // a migrator that died, not a race with a live one.
        let deadline_ms = now_ms() + 2 * left.as_millis() as u64 + 1000;
        self.propose(Command::HoldMove { id: self.move_id, token, deadline_ms, at_ms: now_ms() }).await?;
        loop {
            let dir = self.directory.load();
            let Some(h) = dir.holds.get(&self.move_id).filter(|h| h.token == token) else {
                // Not applied here yet, or already gone.
                if Instant::now() >= deadline {
                    return Err(Error::Timeout("the cutover hold never showed up in the directory".into()));
                }
                let _ = tokio::time::timeout(deadline - Instant::now(), changes.changed()).await;
                continue;
            };
            let missing = unacknowledged(&dir, h, self.router_timeout, now_ms());
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout(format!(
                    "routers {} did not confirm the hold in time (a transaction on the moving rows stayed open?)",
                    missing.join(", ")
                )));
            }
            let _ = tokio::time::timeout(deadline - Instant::now(), changes.changed()).await;
        }
    }

    async fn flip(&self, shard: &str) -> Result<(), Error> {
        let token = self.token();
        match self.propose(Command::FlipMove { id: self.move_id, shard: shard.to_string(), token }).await {
            Ok(_) => Ok(()),
            Err(e) => {
                // Committed or not? Release the hold (which makes any late commit of
                // the flip impossible), then look.
                self.release_surely().await;
                let dir = self.directory.load();
                let flipped = dir
                    .moves
                    .get(&self.move_id)
                    .is_some_and(|m| dir.shards.get(dir.owner_of(m)).is_some_and(|s| s.name == shard));
                if flipped {
                    Ok(())
                } else {
                    Err(Error::Other(format!("the placement flip did not commit: {e}")))
                }
            }
        }
    }

    async fn release(&self) {
        self.release_surely().await
    }
}

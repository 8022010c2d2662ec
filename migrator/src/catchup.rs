//! The migrator's half of shadow reads (the comparing is the router's; it asks
//! through `shardgate_router::moves::CatchUp`): before a difference between the
//! shards counts as a mismatch, the move's other end is made to catch up with
//! everything its owner has committed, through the same marker row a cutover
//! uses.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use shardgate_directory::DirectoryHandle;
use shardgate_router::moves::CatchUp;

use crate::driver::{spec_of, Resolve};
use crate::replication;

pub struct ShadowCatchUp {
    pub directory: DirectoryHandle,
    pub resolve: Resolve,
    /// How long the target may take to catch up before the re-check gives up
    /// (the read is then counted as skipped, not as a mismatch).
    pub timeout: Duration,
}

impl CatchUp for ShadowCatchUp {
    fn wait(&self, move_id: u64) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            let dir = self.directory.load();
            let m = dir.moves.get(&move_id).ok_or_else(|| format!("move {move_id} is gone"))?;
            let spec = spec_of(&dir, m, &self.resolve).ok_or("a shard of the move is gone")?;
            // Marker from the shard that owns the rows now to the other one.
            let (from, to) =
                if dir.owner_of(m) == m.source { (&spec.source, &spec.target) } else { (&spec.target, &spec.source) };
            let fc = from.connect(&format!("move {move_id} shadow catch-up")).await.map_err(|e| e.to_string())?;
            let tc = to.connect(&format!("move {move_id} shadow catch-up")).await.map_err(|e| e.to_string())?;
            replication::catch_up(&spec, (from, &fc), (to, &tc), self.timeout)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }
}

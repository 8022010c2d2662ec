//! What moving a bucket or a tenant needs from routers: the whole contract
//! between the migrator and the router. The migrator imports from the router
//! through this module and nowhere else; what is not here is the router's own
//! business.
//!
//! Routers and the migrator never call each other over the network. Each router
//! reads its own directory replica and writes to the directory; the migrator
//! does the same. So the contract is mostly the directory's commands and what
//! routers promise to do when they see them.
//!
//! **Cutover hold** (the router's half is [`crate::hold`]):
//! 1. *Hold*: the migrator proposes `Command::HoldMove { id, token, deadline_ms }`.
//!    From the moment a router applies it, new statements for the move's rows
//!    wait in that router (they are not refused).
//! 2. *Acknowledge*: once no transaction of its own that touched the rows' bucket
//!    is still open, each router proposes `Command::AckHold` with the hold's
//!    token. The migrator goes on when every router in [`unacknowledged`] has.
//! 3. *Flip or release*: `Command::FlipMove` makes the other end the owner
//!    ([`shardgate_directory::Directory::owner_of`]) and ends the hold in the same
//!    entry, so held statements go straight to the new owner;
//!    `Command::ReleaseHold` ends it without a flip (they go to the old one). A
//!    router stops holding on its own at `deadline_ms`, so a migrator that died
//!    cannot stall traffic; the migrator gives up well before that.
//!
//! **Directory writes**: the migrator writes through the router's
//! [`DirectoryWriter`] (Raft, or the local snapshot of a router without
//! replicas), so a node's router and migrator share one way in.
//!
//! **Catch-up marker**: a router's shadow read that differs between the two ends
//! asks the migrator, through [`CatchUp`], to make the other end apply
//! everything the owner has committed (a marker row through the move's change
//! stream) before it compares again.
//!
//! **Shard connections**: the migrator reaches shards with the router's login
//! details ([`ShardAddress`], TLS settings included: [`ShardSslMode`]) and opens
//! its replication connections with the router's wire client ([`Backend`]). It installs [`ShardSetup`] so that a shard
//! added through the router gets the schema before its first move.
//!
//! **Shared details**: SQL text is quoted one way on both sides ([`quote`]); a
//! cutover's pause is counted in the router's metrics
//! ([`record_cutover_pause`]).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use shardgate_directory::state::{Command, Hold, Outcome};
use shardgate_directory::{Directory, ShardId};

pub use crate::backend::{Backend, ShardAddress};
pub use crate::sql::quote;
pub use crate::tls::ShardSslMode;

/// Something that commits directory commands: the Raft replica, or, for a single
/// router with a static directory, the local snapshot itself (see
/// [`crate::hold::ReplicaWriter`] and [`crate::hold::LocalWriter`]).
pub trait DirectoryWriter: Send + Sync {
    fn propose(&self, cmd: Command) -> Pin<Box<dyn Future<Output = Result<Outcome, String>> + Send + '_>>;
    /// Waits until this node shows everything committed before the call.
    fn barrier(&self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>>;
}

/// Waits until the other end of a move has applied everything its owner
/// committed before the call. The migrator knows how (a marker row through the
/// move's change stream); the router only asks, from its shadow reads.
pub trait CatchUp: Send + Sync {
    fn wait(&self, move_id: u64) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>>;
}

/// Makes a shard just added to the directory ready to serve: the migrator copies
/// the schema onto it, so DDL through the router reaches it from the start.
/// Returns what it did, for the operator.
pub trait ShardSetup: Send + Sync {
    fn prepare(&self, shard: ShardId) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + '_>>;
}

/// The routers whose acknowledgement of `hold` is still missing at `now_ms`:
/// every router whose last heartbeat is within `router_timeout` and that has not
/// acknowledged this hold's token. A router silent for longer is out of the
/// cluster: its lease has run out, so it refuses writes, and its acknowledgement
/// is not needed. (Routers heartbeat every second; the migrator passes the lease
/// plus that second.)
pub fn unacknowledged<'a>(dir: &'a Directory, hold: &Hold, router_timeout: Duration, now_ms: u64) -> Vec<&'a str> {
    let timeout_ms = router_timeout.as_millis() as u64;
    dir.routers
        .values()
        .filter(|r| now_ms.saturating_sub(r.last_heartbeat_ms) <= timeout_ms)
        .filter(|r| !hold.acks.contains(&r.id))
        .map(|r| r.id.as_str())
        .collect()
}

/// Counts how long a cutover held statements, in the router's metrics.
pub fn record_cutover_pause(pause: Duration) {
    crate::metrics::global().cutover_pause(pause);
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardgate_directory::state::{MoveSubject, RouterInfo};
    use shardgate_directory::{KeyType, Shard};

    #[test]
    fn a_hold_waits_for_every_live_router_and_no_silent_one() {
        let shards = (0..2).map(|i| Shard::new(format!("s{i}"), format!("postgres://h/{i}"))).collect();
        let mut dir = Directory::new("tenant_id", KeyType::Int, 8, shards).unwrap();
        for (id, beat) in [("r1", 9_500), ("r2", 9_000), ("silent", 5_000)] {
            let info = RouterInfo { id: id.into(), address: "a".into(), last_heartbeat_ms: beat, applied_epoch: 1 };
            dir.routers.insert(id.into(), info);
        }
        let mut hold = Hold {
            move_id: 1,
            subject: MoveSubject::Bucket(1),
            token: 7,
            deadline_ms: 20_000,
            acks: Default::default(),
        };
        let timeout = Duration::from_secs(3);
        assert_eq!(unacknowledged(&dir, &hold, timeout, 10_000), vec!["r1", "r2"]);
        hold.acks.insert("r2".into());
        assert_eq!(unacknowledged(&dir, &hold, timeout, 10_000), vec!["r1"]);
        hold.acks.insert("r1".into());
        assert!(unacknowledged(&dir, &hold, timeout, 10_000).is_empty());
    }
}

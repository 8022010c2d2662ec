//! The shard directory: which Postgres server holds which bucket and tenant.
//!
//! This crate knows nothing of SQL or sockets. It defines the data model
//! ([`Directory`]: shards, bucket placements, tenant pins, the epoch), the hash that
//! maps a tenant key to its bucket ([`hash`]), and the one narrow interface through
//! which the router reads placements: a [`DirectoryHandle`], an atomically swapped
//! snapshot. Today the snapshot is built from configuration; the replicated directory
//! swaps in new snapshots the same way, so the router's hot path never changes.

pub mod clock;
pub mod fault;
pub mod hash;
mod model;
pub mod pause;
pub mod replica;
pub mod state;

pub use model::{Directory, DirectoryError, DirectoryHandle, KeyType, Shard, ShardId, ShardState, TenantKey};

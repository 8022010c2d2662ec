//! The replicated directory: raft consensus over [`Command`](crate::state::Command)s.

pub mod storage;

pub use storage::{DiskStorage, StoreError};

//! The replicated directory: raft consensus over [`Command`](crate::state::Command)s.

pub mod node;
pub mod storage;

pub use node::{Node, NodeConfig, NodeError, NodeStatus, ProposeError, Transport};
pub use storage::{DiskStorage, StoreError};

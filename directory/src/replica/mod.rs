//! The replicated directory: raft consensus over [`Command`](crate::state::Command)s.

pub mod node;
mod once;
pub mod storage;
pub mod tls;
pub mod transport;

pub use node::{MembershipChange, Node, NodeConfig, NodeError, NodeStatus, ProposeError, Transport};
pub use storage::{DiskStorage, StoreError};
pub use tls::{RaftTls, RaftTlsFiles};
pub use transport::TcpTransport;

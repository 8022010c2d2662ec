//! Online moves of a bucket or a tenant from one shard to another.
//!
//! The data path is Postgres's own logical replication, filtered to the moving rows
//! by a publication row filter with the router's hash expression: a copy from one
//! consistent snapshot, then every committed change after it, in commit order. Nothing here replays
//! statements. The pieces, in the order a move uses them:
//!
//! - [`prepare`]: checks (logical WAL, primary keys, schema on the target), the
//!   `shardgate` schema on both shards, the fence triggers, the publications and
//!   reverse stream (created disabled, so a rollback needs no DDL).
//! - [`copy`]: the moving rows from one snapshot of the source, at a rate that can
//!   be capped, and the forward stream started exactly where the snapshot ends.
//! - [`replication`]: the change stream's lag, and exact catch-up waits through
//!   marker rows.
//! - [`verify`]: chunked row counts and checksums at one consistent cut.
//! - [`cutover`]: hold, fence, catch up, flip, reverse, release — and the same
//!   backwards for a rollback.
//! - [`cleanup`]: drop the moved rows from the shard that no longer owns them and the
//!   replication objects (`complete`), or from the target (`cancel`).
//!
//! See docs/moves.md for the operator's view and the reasoning behind each step.

pub mod catchup;
pub mod cleanup;
pub mod coordinator;
pub mod copy;
pub mod cutover;
pub mod driver;
pub mod fault;
pub mod pg;
pub mod planner;
pub mod prepare;
pub mod replication;
pub mod schema;
pub mod verify;

use shardgate_directory::state::MoveSubject;
use shardgate_directory::{hash::bucket_sql, KeyType};
use shardgate_router::moves::quote;

pub use pg::Endpoint;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A precondition the operator must fix; the message says how.
    #[error("{0}")]
    Refused(String),
    #[error("shard {shard}: {action}: {message}")]
    Postgres { shard: String, action: String, message: String },
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn pg(shard: &str, action: impl Into<String>, e: tokio_postgres::Error) -> Error {
        let message = match e.as_db_error() {
            Some(db) => {
                let mut m = format!("{} (SQLSTATE {})", db.message(), db.code().code());
                if let Some(d) = db.detail() {
                    m.push_str(&format!("; {d}"));
                }
                m
            }
            // A failed connection's cause (a refused TLS certificate, say)
            // is the error's source, not in its own text.
            None => match std::error::Error::source(&e) {
                Some(cause) => format!("{e}: {cause}"),
                None => e.to_string(),
            },
        };
        Error::Postgres { shard: shard.to_string(), action: action.into(), message }
    }
}

/// Everything the migrator needs to know about one move; derived from the move's
/// directory record and the cluster's key settings.
#[derive(Debug, Clone)]
pub struct MoveSpec {
    pub id: u64,
    pub subject: MoveSubject,
    pub key_column: String,
    pub key_type: KeyType,
    pub bucket_count: u32,
    /// The shard the data starts on.
    pub source: Endpoint,
    pub target: Endpoint,
}

impl MoveSpec {
    /// The SQL condition that selects the moving rows of a table: the bucket's hash
    /// expression (the same function the router computes) or the tenant's equality.
    pub fn row_filter(&self) -> String {
        let col = quote::ident(&self.key_column);
        match &self.subject {
            MoveSubject::Bucket(b) => format!("({} = {b})", bucket_sql(&col, self.key_type, self.bucket_count)),
            MoveSubject::Tenant(k) => format!("({col} = {})", quote::key_literal(k, self.key_type)),
        }
    }

    /// Name of the replication objects carrying changes source → target (publication
    /// and slot on the source, subscription on the target).
    pub fn forward_name(&self) -> String {
        format!("sg_move_{}", self.id)
    }

    /// … and target → source, used after cutover so that a rollback loses nothing.
    pub fn reverse_name(&self) -> String {
        format!("sg_move_{}_back", self.id)
    }

    /// The fence row that refuses writes of the moving rows on a shard that no longer
    /// owns them: `(kind, value)`.
    pub fn fence_key(&self) -> (&'static str, String) {
        match &self.subject {
            MoveSubject::Bucket(b) => ("bucket", b.to_string()),
            MoveSubject::Tenant(k) => ("tenant", k.to_string()),
        }
    }
}

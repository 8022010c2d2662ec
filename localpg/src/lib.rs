//! Local PostgreSQL servers for shardgate: starting and stopping them, for two users.
//!
//! - `shardgate up` keeps long-lived servers whose data survives between runs:
//!   [`Server::init`] makes (or reuses) a data directory, [`Server::start`] and
//!   [`Server::stop`] run it.
//! - The end-to-end tests want many throwaway servers, fast: [`TestServer::start`]
//!   copies a template made by a single `initdb`, and deletes the copy on drop;
//!   [`TestCluster::start`] starts several with database `app` on each.
//!
//! Servers listen on 127.0.0.1 only, trust local connections as superuser
//! `postgres`, and run with `wal_level = logical` so that tenants can be moved.
//! When this process is root, PostgreSQL runs as the `postgres` OS user.
//!
//! ```no_run
//! # async fn example() -> Result<(), shardgate_localpg::Error> {
//! let server = shardgate_localpg::TestServer::start().await?;
//! server.create_database("app").await?;
//! let client = server.connect("app").await?;
//! client.simple_query("SELECT 1").await.ok();
//! # Ok(()) }
//! ```

mod bindir;
mod ca;
mod cluster;
mod error;
mod os_user;
mod port;
mod scratch;
mod server;
mod settings;
mod template;
mod test_server;
mod tls;

pub use bindir::find_bindir;
pub use ca::{Issued, LocalCa, TlsFiles, LOCAL_NAMES};
pub use cluster::TestCluster;
pub use error::Error;
pub use port::free_port;
pub use server::{Durability, Server, Shutdown, HOST, SUPERUSER};
pub use test_server::TestServer;
pub use tls::PlainClients;

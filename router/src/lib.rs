//! The router: accepts Postgres clients, finds each statement's tenant, and relays
//! the statement to the shard that holds it.
//!
//! A newcomer's map, by file:
//! - `protocol/`: framing and messages (wire format only).
//! - `auth.rs`: client authentication (trust, md5, SCRAM-SHA-256) and ours to backends;
//!   `roles.rs`: clients as their own roles on the shards (lookup, per-role pools).
//! - `sql/`: parsing with the Postgres grammar and finding the tenant key.
//! - `route.rs`: key → bucket → shard, from the directory snapshot.
//! - `backend.rs`, `pool.rs`: connections to shards and the per-shard pools;
//!   `health.rs`: each shard probed once a second (up, readiness, restarts).
//! - `session/`: one client's state machine (simple and extended protocol, COPY),
//!   one file per part of it (see its `mod.rs`).
//! - `fanout/`: statements that run on every shard, and merging their results.
//! - `server.rs`: accept loop, connection limit, shutdown; `reload.rs`: a new
//!   configuration put in force while the router runs.
//! - `tls/`: TLS to clients and to shards, and the stream that is plain or TLS.
//! - `hold.rs`: the router's half of a cutover (holding and acknowledging);
//!   `moves.rs`: everything the migrator may use of the router, and why.
//! - `admin/`: the admin HTTP API (its request and answer types, which the CLI
//!   reads too, in `admin/api.rs`); `events.rs` its live status stream, `web.rs`
//!   the web page built on it (files in `router/web/`).

pub mod admin;
pub mod auth;
pub mod backend;
pub mod clock;
pub mod config;
pub mod console;
pub mod context;
pub mod copy_binary;
pub mod copy_in;
pub mod error;
pub mod events;
pub mod fanout;
pub mod fuzz;
pub mod health;
pub mod hold;
pub mod idle;
pub mod key_array;
pub mod load;
pub mod metrics;
pub mod moves;
pub mod pool;
pub mod protocol;
pub mod reload;
pub mod roles;
pub mod route;
pub mod server;
pub mod session;
pub mod shadow;
pub mod sizes;
pub mod split;
pub mod sql;
pub mod timer;
pub mod tls;
pub mod twophase;
pub mod web;

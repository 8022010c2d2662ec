//! The one error type of this crate. Every message says what went wrong and what to
//! do next, because the reader is usually an operator at a terminal or a developer
//! looking at a failed test.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;

/// Everything that can go wrong finding, preparing, starting or stopping a local
/// PostgreSQL server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A PostgreSQL program is not installed where we look for it.
    #[error("{program} not found: install postgresql-15 or put its bin directory on PATH")]
    BinaryNotFound { program: &'static str },

    /// We are root, and PostgreSQL refuses to run as root, but there is no account to
    /// run it as instead.
    #[error(
        "running as root, but there is no `postgres` OS user to run PostgreSQL as (it refuses \
         to run as root): install postgresql-15, which creates that user, or run as an ordinary user"
    )]
    NoServerUser,

    /// We are root and the `postgres` OS user cannot get to the data directory.
    #[error(
        "the `postgres` OS user cannot reach {}: {} is not searchable by it; put the data \
         directory under a directory with mode 0755 (e.g. /var/lib/shardgate) or run \
         `chmod o+x {}`",
        path.display(), blocking.display(), blocking.display()
    )]
    Unreachable { path: PathBuf, blocking: PathBuf },

    /// The directory given as a data directory holds something else.
    #[error(
        "{} exists, is not empty and is not a PostgreSQL data directory (it has no \
         PG_VERSION): choose a new or empty directory",
        path.display()
    )]
    NotADataDir { path: PathBuf },

    /// The data directory was made by another major version than the binaries found.
    #[error(
        "{} holds a PostgreSQL {data_version} data directory, but the binaries in {} are \
         PostgreSQL {bin_version}: put the matching binaries on PATH or upgrade the \
         directory with pg_upgrade",
        path.display(), bindir.display()
    )]
    VersionMismatch { path: PathBuf, data_version: String, bindir: PathBuf, bin_version: String },

    /// The per-user scratch directory for test servers is not ours to use.
    #[error(
        "{} is not a directory owned by this OS user, so test servers cannot be put there: \
         remove it, or point TMPDIR somewhere else",
        path.display()
    )]
    ForeignScratchDir { path: PathBuf },

    /// A file system operation failed.
    #[error("could not {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A certificate or key could not be made.
    #[error("could not make a TLS certificate: {0}")]
    Certificate(String),

    /// A program could not be started at all.
    #[error(
        "could not run {}: {source}; check that it is installed and executable",
        program.display()
    )]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A program ran and failed; `output` is what it printed.
    #[error("`{command}` failed ({status}):\n{output}\nfix the cause above and retry")]
    Command { command: String, status: ExitStatus, output: String },

    /// The server did not come up; `log_tail` is the end of its log.
    #[error(
        "PostgreSQL in {} did not start on port {port}: {reason}\n--- end of {} ---\n{log_tail}\n\
         --- fix the cause above (the full log is in {}) and start it again",
        data_dir.display(), log.display(), log.display()
    )]
    Start { data_dir: PathBuf, port: u16, reason: String, log: PathBuf, log_tail: String },

    /// The server did not shut down.
    #[error(
        "PostgreSQL in {} did not stop: {output}\nfind the postmaster's pid on the first line \
         of {}/postmaster.pid and stop it by hand (kill -INT <pid>)",
        data_dir.display(), data_dir.display()
    )]
    Stop { data_dir: PathBuf, output: String },

    /// The kernel would not hand out a port on the loopback interface.
    #[error("no free TCP port on 127.0.0.1: {source}; check that the loopback interface is up")]
    NoFreePort {
        #[source]
        source: io::Error,
    },

    /// Talking SQL to the server failed.
    #[error(
        "could not {action} on PostgreSQL at 127.0.0.1:{port}: {source}; check that the \
         server is running and look at its log in {}",
        log.display()
    )]
    Postgres {
        action: String,
        port: u16,
        log: PathBuf,
        #[source]
        source: tokio_postgres::Error,
    },

    /// A blocking helper task died (it panicked or the runtime is shutting down).
    #[error("a background task starting a test server failed: {0}; see the panic message above")]
    Task(String),
}

impl Error {
    /// Wraps an I/O error with what we were doing and where.
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { action, path, source }
    }
}

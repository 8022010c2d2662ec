//! One local PostgreSQL server: its data directory, its port, and the `initdb` /
//! `pg_ctl` calls that create, start and stop it.

use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

use crate::os_user::{describe, ServerUser};
use crate::settings::{self, Settings};
use crate::{find_bindir, free_port, Error};

/// The only address local servers listen on.
pub const HOST: &str = "127.0.0.1";

/// The superuser `initdb` creates; it logs in without a password (trust) from
/// 127.0.0.1 and the server's own Unix socket.
pub const SUPERUSER: &str = "postgres";

/// How long `pg_ctl` waits for a server to start or stop.
const PG_CTL_TIMEOUT_SECS: &str = "60";

/// How long a client connection may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How many lines of the server log a failed start shows.
const LOG_TAIL_LINES: usize = 30;

/// What a server logs when its port is taken: the bind itself is logged at LOG
/// level (hidden by `log_min_messages = warning`), the give-up at FATAL.
const PORT_IN_USE: [&str; 3] = ["could not bind", "could not create any TCP/IP sockets", "Address already in use"];

/// How careful a server is with its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// `fsync = on`: servers started by `shardgate up`, whose data is kept between
    /// runs and must survive a crash of the machine.
    Durable,
    /// `fsync = off`, and `initdb --no-sync`: test servers, thrown away after the
    /// test. A crash of the machine may corrupt them, which nobody minds; starting
    /// and writing is much faster.
    Throwaway,
}

/// How a server shuts down (`pg_ctl stop -m …`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shutdown {
    /// Disconnect clients, write a checkpoint, exit: the next start needs no recovery.
    Fast,
    /// Exit at once: the next start replays WAL. For servers about to be deleted.
    Immediate,
}

impl Shutdown {
    fn pg_ctl_mode(self) -> &'static str {
        match self {
            Shutdown::Fast => "fast",
            Shutdown::Immediate => "immediate",
        }
    }
}

/// One local PostgreSQL server: a data directory, and the port on 127.0.0.1 it
/// listens on.
///
/// A `Server` is a handle, not a guard: dropping it leaves the server running,
/// because servers started by `shardgate up` outlive the command that started them
/// (and a later `Server::init` on the same directory finds them running). Tests use
/// [`crate::TestServer`], which stops and deletes its server on drop.
#[derive(Debug)]
pub struct Server {
    data_dir: PathBuf,
    port: u16,
    durability: Durability,
    bindir: PathBuf,
    user: ServerUser,
}

impl Server {
    /// Prepares a long-lived ([`Durability::Durable`]) server in `data_dir`; see
    /// [`Server::init_with`].
    pub fn init(data_dir: impl Into<PathBuf>, port_hint: Option<u16>) -> Result<Server, Error> {
        Server::init_with(data_dir, port_hint, Durability::Durable)
    }

    /// Prepares a server in `data_dir` without starting it.
    ///
    /// If the directory holds no `PG_VERSION`, runs `initdb` there (superuser
    /// `postgres`, trust authentication, UTF8, locale C); the directory must be new or
    /// empty. Otherwise the existing data is kept. Then writes shardgate's settings
    /// (see the `settings` module) with the port: `port_hint` if given, else the port
    /// this directory used last time, else a free one.
    ///
    /// If the server is already running, nothing is rewritten and the port is the one
    /// it listens on.
    pub fn init_with(
        data_dir: impl Into<PathBuf>,
        port_hint: Option<u16>,
        durability: Durability,
    ) -> Result<Server, Error> {
        let bindir = find_bindir()?;
        let user = ServerUser::current()?;
        Server::prepare(bindir, user, data_dir.into(), port_hint, durability)
    }

    /// [`Server::init_with`] for callers that already know the binaries and user.
    pub(crate) fn prepare(
        bindir: PathBuf,
        user: ServerUser,
        data_dir: PathBuf,
        port_hint: Option<u16>,
        durability: Durability,
    ) -> Result<Server, Error> {
        let data_dir = std::path::absolute(&data_dir).map_err(Error::io("resolve", &data_dir))?;
        let mut server = Server { data_dir, port: 0, durability, bindir, user };
        if server.data_dir.join("PG_VERSION").is_file() {
            server.user.check_reachable(&server.data_dir)?;
            server.check_version()?;
        } else {
            initdb(&server.bindir, &server.user, &server.data_dir, durability)?;
        }

        if let Some(port) = server.running_port()? {
            if port_hint.is_some_and(|hint| hint != port) {
                tracing::warn!(data_dir = %server.data_dir.display(), port, "server already running; keeping its port");
            }
            server.port = port;
            return Ok(server);
        }
        server.port = match port_hint.or_else(|| settings::read_port(&server.data_dir)) {
            Some(port) => port,
            None => free_port()?,
        };
        server.write_settings()?;
        Ok(server)
    }

    /// The data directory (absolute).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The OS user the server runs as (who must own the files it reads).
    pub(crate) fn user(&self) -> &ServerUser {
        &self.user
    }

    /// The TCP port on [`HOST`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Always [`HOST`], 127.0.0.1: local servers never listen elsewhere.
    pub fn host(&self) -> &'static str {
        HOST
    }

    /// Whether `fsync` is on.
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// The server's log file, inside its data directory.
    pub fn log_path(&self) -> PathBuf {
        settings::log_path(&self.data_dir)
    }

    /// The connection string for database `db` as the superuser, e.g.
    /// `postgres://postgres@127.0.0.1:54321/app`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{SUPERUSER}@{HOST}:{}/{}", self.port, percent_encode(db))
    }

    /// Starts the server and waits until it accepts connections; does nothing if it
    /// is already running.
    ///
    /// If the port was taken in the meantime, moves to a free port once (logged as a
    /// warning; [`Server::port`] tells the new one). A failure carries the end of the
    /// server log.
    pub fn start(&mut self) -> Result<(), Error> {
        if self.is_running()? {
            tracing::debug!(data_dir = %self.data_dir.display(), port = self.port, "server already running");
            return Ok(());
        }
        match self.try_start() {
            Ok(()) => Ok(()),
            Err(failure) if failure.port_in_use => {
                let port = free_port()?;
                tracing::warn!(
                    data_dir = %self.data_dir.display(),
                    taken = self.port,
                    port,
                    "port taken; starting on another port"
                );
                self.port = port;
                self.write_settings()?;
                self.try_start().map_err(|failure| failure.error)
            }
            Err(failure) => Err(failure.error),
        }
    }

    /// Starts a server stopped with [`Server::stop`] again, on its port (a shard
    /// restart in a test; nothing else took the port meanwhile).
    pub fn start_again(&self) -> Result<(), Error> {
        if self.is_running()? {
            return Ok(());
        }
        self.try_start().map_err(|failure| failure.error)
    }

    /// Stops the server the polite way (`pg_ctl stop -m fast`); does nothing if it is
    /// not running.
    pub fn stop(&self) -> Result<(), Error> {
        self.stop_with(Shutdown::Fast)
    }

    /// Stops the server with the given shutdown mode; does nothing if it is not
    /// running.
    pub fn stop_with(&self, mode: Shutdown) -> Result<(), Error> {
        if !self.is_running()? {
            return Ok(());
        }
        pg_ctl_stop(&self.bindir, &self.user, &self.data_dir, mode)?;
        tracing::info!(data_dir = %self.data_dir.display(), port = self.port, ?mode, "server stopped");
        Ok(())
    }

    /// Replaces pg_hba.conf with `lines` and has a running server reload it
    /// (`pg_ctl reload`). The reload is asynchronous: a caller that depends on
    /// the new rules waits for a login they decide.
    pub fn set_hba(&self, lines: &str) -> Result<(), Error> {
        let hba = self.data_dir.join("pg_hba.conf");
        std::fs::write(&hba, lines).map_err(Error::io("write", &hba))?;
        self.user.own(&hba)?;
        if self.is_running()? {
            let mut command = self.pg_ctl();
            command.arg("reload").arg("-D").arg(&self.data_dir);
            let output = command.output().map_err(|source| self.spawn_error(source))?;
            if !output.status.success() {
                return Err(Error::io("reload", &hba)(std::io::Error::other(
                    String::from_utf8_lossy(&output.stderr).into_owned(),
                )));
            }
        }
        Ok(())
    }

    /// Whether a postmaster is running on this data directory (`pg_ctl status`).
    pub fn is_running(&self) -> Result<bool, Error> {
        let mut command = self.pg_ctl();
        command.arg("status").arg("-D").arg(&self.data_dir);
        let output = command.output().map_err(|source| self.spawn_error(source))?;
        match output.status.code() {
            Some(0) => Ok(true),
            Some(3) => Ok(false),
            Some(4) if !self.data_dir.exists() => Ok(false),
            _ => Err(command_failed(&command, &output)),
        }
    }

    /// Opens a connection to database `db` as the superuser. The connection is
    /// driven by a task on the current tokio runtime.
    pub async fn connect(&self, db: &str) -> Result<tokio_postgres::Client, Error> {
        let (client, connection) = tokio_postgres::Config::new()
            .host(HOST)
            .port(self.port)
            .user(SUPERUSER)
            .dbname(db)
            .application_name("shardgate-localpg")
            .connect_timeout(CONNECT_TIMEOUT)
            .connect(NoTls)
            .await
            .map_err(|source| self.sql_error(format!("connect to database {db:?}"), source))?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(%err, "connection to local server ended");
            }
        });
        Ok(client)
    }

    /// Creates database `name` unless it exists; returns whether it created it.
    pub async fn create_database(&self, name: &str) -> Result<bool, Error> {
        let client = self.connect("postgres").await?;
        let exists = client
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
            .await
            .map_err(|source| self.sql_error(format!("look up database {name:?}"), source))?
            .is_some();
        if exists {
            return Ok(false);
        }
        match client.batch_execute(&format!("CREATE DATABASE {}", quote_ident(name))).await {
            Ok(()) => Ok(true),
            // Someone else created it between our check and our CREATE.
            Err(err) if err.code() == Some(&SqlState::DUPLICATE_DATABASE) => Ok(false),
            Err(source) => Err(self.sql_error(format!("create database {name:?}"), source)),
        }
    }

    fn try_start(&self) -> Result<(), StartFailure> {
        let log = self.log_path();
        let log_offset = std::fs::metadata(&log).map(|meta| meta.len()).unwrap_or(0);
        let mut command = self.pg_ctl();
        command.args(["start", "-w", "-t", PG_CTL_TIMEOUT_SECS, "-D"]).arg(&self.data_dir).arg("-l").arg(&log);
        // pg_ctl points the postmaster's output at the log, so these pipes close
        // when pg_ctl exits even though the server keeps running.
        let output =
            command.output().map_err(|source| StartFailure { error: self.spawn_error(source), port_in_use: false })?;
        if output.status.success() {
            tracing::info!(data_dir = %self.data_dir.display(), port = self.port, "server started");
            return Ok(());
        }
        let log_tail = read_tail(&log, log_offset);
        let port_in_use = PORT_IN_USE.iter().any(|needle| log_tail.contains(needle));
        Err(StartFailure {
            error: Error::Start {
                data_dir: self.data_dir.clone(),
                port: self.port,
                reason: program_output(&output),
                log,
                log_tail: if log_tail.is_empty() { "(the server wrote nothing)".into() } else { log_tail },
            },
            port_in_use,
        })
    }

    fn write_settings(&self) -> Result<(), Error> {
        settings::write(
            &Settings { port: self.port, data_dir: &self.data_dir, durability: self.durability },
            &self.user,
        )
    }

    /// The port of the running postmaster, from line 4 of `postmaster.pid`.
    fn running_port(&self) -> Result<Option<u16>, Error> {
        if !self.data_dir.join("postmaster.pid").exists() || !self.is_running()? {
            return Ok(None);
        }
        let pid_file = self.data_dir.join("postmaster.pid");
        let text = std::fs::read_to_string(&pid_file).map_err(Error::io("read", &pid_file))?;
        Ok(text.lines().nth(3).and_then(|line| line.trim().parse().ok()))
    }

    fn check_version(&self) -> Result<(), Error> {
        let path = self.data_dir.join("PG_VERSION");
        let data_version = std::fs::read_to_string(&path).map_err(Error::io("read", &path))?;
        let data_version = data_version.trim();
        let bin_version = bin_version(&self.bindir, &self.user)?;
        if major(&bin_version) != data_version {
            return Err(Error::VersionMismatch {
                path: self.data_dir.clone(),
                data_version: data_version.into(),
                bindir: self.bindir.clone(),
                bin_version,
            });
        }
        Ok(())
    }

    fn pg_ctl(&self) -> Command {
        self.user.command(&self.bindir.join("pg_ctl"))
    }

    fn spawn_error(&self, source: std::io::Error) -> Error {
        Error::Spawn { program: self.bindir.join("pg_ctl"), source }
    }

    fn sql_error(&self, action: String, source: tokio_postgres::Error) -> Error {
        Error::Postgres { action, port: self.port, log: self.log_path(), source }
    }
}

/// A failed start, and whether it failed because the port was taken.
struct StartFailure {
    error: Error,
    port_in_use: bool,
}

/// Runs `initdb` into `data_dir`, which must be new or empty.
pub(crate) fn initdb(bindir: &Path, user: &ServerUser, data_dir: &Path, durability: Durability) -> Result<(), Error> {
    create_empty_dir(data_dir, user)?;
    let mut command = user.command(&bindir.join("initdb"));
    command.arg("-D").arg(data_dir).args([
        "--username",
        SUPERUSER,
        "--auth=trust",
        "--encoding=UTF8",
        "--locale=C",
        "--no-instructions",
    ]);
    if durability == Durability::Throwaway {
        command.arg("--no-sync");
    }
    tracing::info!(data_dir = %data_dir.display(), ?durability, "initdb");
    run(&mut command, bindir.join("initdb"))?;
    Ok(())
}

/// Creates `dir` (mode 0700, owned by the server user) or checks that it is empty.
fn create_empty_dir(dir: &Path, user: &ServerUser) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;

    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(Error::NotADataDir { path: dir.to_path_buf() });
            }
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            // Refuse before creating anything the server user could not reach anyway.
            user.check_reachable(dir)?;
            std::fs::create_dir_all(dir).map_err(Error::io("create", dir))?;
        }
        Err(err) => return Err(Error::io("read", dir)(err)),
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(Error::io("set permissions on", dir))?;
    user.own(dir)?;
    // Again: directories we just created follow the umask.
    user.check_reachable(dir)
}

/// Stops the postmaster on `data_dir` and waits for it to exit.
pub(crate) fn pg_ctl_stop(bindir: &Path, user: &ServerUser, data_dir: &Path, mode: Shutdown) -> Result<(), Error> {
    let mut command = user.command(&bindir.join("pg_ctl"));
    command.args(["stop", "-w", "-t", PG_CTL_TIMEOUT_SECS, "-m", mode.pg_ctl_mode(), "-D"]).arg(data_dir);
    let output = command.output().map_err(|source| Error::Spawn { program: bindir.join("pg_ctl"), source })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(Error::Stop { data_dir: data_dir.to_path_buf(), output: program_output(&output) })
    }
}

/// The full version of the binaries, e.g. `15.18`.
pub(crate) fn bin_version(bindir: &Path, user: &ServerUser) -> Result<String, Error> {
    let program = bindir.join("pg_ctl");
    let mut command = user.command(&program);
    command.arg("--version");
    let output = run(&mut command, program)?;
    // "pg_ctl (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
    let text = String::from_utf8_lossy(&output.stdout);
    let version =
        text.split_once("(PostgreSQL)").and_then(|(_, rest)| rest.split_whitespace().next()).unwrap_or(text.trim());
    Ok(version.to_string())
}

/// The major version as `PG_VERSION` spells it: `15.18` → `15`, `16beta1` → `16`,
/// `9.6.24` → `9.6`.
fn major(version: &str) -> String {
    let mut parts = version.split('.');
    let first = parts.next().unwrap_or_default();
    let first = first.find(|c: char| !c.is_ascii_digit()).map_or(first, |end| &first[..end]);
    match first.parse::<u32>() {
        Ok(n) if n < 10 => format!("{first}.{}", parts.next().unwrap_or_default()),
        _ => first.to_string(),
    }
}

/// Runs a command to completion; a non-zero exit is an error with its output.
fn run(command: &mut Command, program: PathBuf) -> Result<Output, Error> {
    let output = command.output().map_err(|source| Error::Spawn { program, source })?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(command_failed(command, &output))
    }
}

fn command_failed(command: &Command, output: &Output) -> Error {
    Error::Command { command: describe(command), status: output.status, output: program_output(output) }
}

/// What a program printed, stderr first, trimmed.
fn program_output(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let text = format!("{}\n{}", stderr.trim(), stdout.trim());
    match text.trim() {
        "" => "(no output)".into(),
        text => text.into(),
    }
}

/// The last lines the server logged since `offset`; empty if it logged nothing.
fn read_tail(log: &Path, offset: u64) -> String {
    let Ok(mut file) = std::fs::File::open(log) else {
        return String::new();
    };
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(offset)).is_err() || file.read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

/// Quotes an SQL identifier, always (a quoted name is always right, if less
/// readable). Not `shardgate_router::sql::quote::ident`, the quoting the rest of
/// the workspace shares: `localpg` only starts Postgres servers for tests and
/// `shardgate up`, sits below the router, and should not depend on it (nor on
/// its SQL parser) for one line.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Percent-encodes a URL path segment (everything but RFC 3986 unreserved bytes).
fn percent_encode(segment: &str) -> String {
    segment.bytes().fold(String::new(), |mut out, byte| {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn major_versions_match_pg_version_files() {
        assert_eq!(major("15.18"), "15");
        assert_eq!(major("16beta1"), "16");
        assert_eq!(major("9.6.24"), "9.6");
    }

    #[test]
    fn database_names_are_escaped_in_urls_and_sql() {
        assert_eq!(percent_encode("app"), "app");
        assert_eq!(percent_encode("my app/1"), "my%20app%2F1");
        assert_eq!(quote_ident(r#"we"ird"#), r#""we""ird""#);
    }
}

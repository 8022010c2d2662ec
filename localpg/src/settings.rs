//! The settings shardgate manages in a data directory. They live in a file of their
//! own, `shardgate.conf`, which `postgresql.conf` includes at its end: we can rewrite
//! the whole file every time a server is prepared (a new port for a copied test
//! server, `fsync` back on for a long-lived one) without parsing anyone's edits, and
//! `ALTER SYSTEM` (postgresql.auto.conf, read last) still overrides what we set.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::os_user::ServerUser;
use crate::{Durability, Error};

/// The managed file, next to postgresql.conf.
pub(crate) const FILE: &str = "shardgate.conf";

/// The line that pulls the managed file into postgresql.conf. A plain `include`
/// (not `include_if_exists`): a server whose settings went missing should refuse to
/// start rather than come up on the default port with `wal_level = replica`.
const INCLUDE: &str = "include 'shardgate.conf'";

/// The server log, next to the data. Not `log`: that is PostgreSQL's default
/// `log_directory`, which would clash if someone turns `logging_collector` on.
pub(crate) const LOG_FILE: &str = "server.log";

/// Unix socket paths are limited to 107 bytes; the socket is `<dir>/.s.PGSQL.<port>`.
const SOCKET_PATH_MAX: usize = 107;
const SOCKET_NAME_MAX: &str = "/.s.PGSQL.65535";

/// What one server listens on and how careful it is with its data.
pub(crate) struct Settings<'a> {
    pub(crate) port: u16,
    pub(crate) data_dir: &'a Path,
    pub(crate) durability: Durability,
}

impl Settings<'_> {
    /// The Unix socket directory: the data directory itself, so servers never share
    /// one, unless its path is too long for a socket; then TCP only.
    fn socket_dir(&self) -> Option<&Path> {
        let len = self.data_dir.as_os_str().len() + SOCKET_NAME_MAX.len();
        (len <= SOCKET_PATH_MAX).then_some(self.data_dir)
    }

    fn render(&self) -> String {
        let socket_dir = self.socket_dir().map(|dir| dir.to_string_lossy().into_owned());
        let fsync = match self.durability {
            Durability::Durable => "on",
            Durability::Throwaway => "off",
        };
        let mut text = String::from(
            "# Managed by shardgate: rewritten each time the server is prepared.\n\
             # Override a setting with ALTER SYSTEM (postgresql.auto.conf is read after this file).\n",
        );
        let lines: [(&str, String); 11] = [
            ("listen_addresses", quote("127.0.0.1")),
            ("port", self.port.to_string()),
            ("unix_socket_directories", quote(socket_dir.as_deref().unwrap_or(""))),
            ("wal_level", "logical".into()),
            ("max_wal_senders", "20".into()),
            ("max_replication_slots", "20".into()),
            ("max_connections", "200".into()),
            // Two-phase commit across shards: one prepared transaction per
            // connection at most, as the Postgres docs advise.
            ("max_prepared_transactions", "200".into()),
            ("shared_buffers", quote("32MB")),
            ("fsync", fsync.into()),
            ("log_min_messages", "warning".into()),
        ];
        for (name, value) in lines {
            // Writing to a String cannot fail.
            let _ = writeln!(text, "{name} = {value}");
        }
        text
    }
}

/// Quotes a configuration string value.
fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// Writes `shardgate.conf` (atomically, owned by the server user) and makes sure
/// postgresql.conf includes it.
pub(crate) fn write(settings: &Settings<'_>, user: &ServerUser) -> Result<(), Error> {
    let path = settings.data_dir.join(FILE);
    let staging = settings.data_dir.join(format!("{FILE}.new"));
    std::fs::write(&staging, settings.render()).map_err(Error::io("write", &staging))?;
    user.own(&staging)?;
    std::fs::rename(&staging, &path).map_err(Error::io("replace", &path))?;
    ensure_included(settings.data_dir, INCLUDE)
}

/// Makes sure postgresql.conf ends with `include` (an `include '…'` line).
pub(crate) fn ensure_included(data_dir: &Path, include: &str) -> Result<(), Error> {
    let conf = data_dir.join("postgresql.conf");
    let text = std::fs::read_to_string(&conf).map_err(Error::io("read", &conf))?;
    if text.lines().any(|line| line.trim() == include) {
        return Ok(());
    }
    let mut file = std::fs::OpenOptions::new().append(true).open(&conf).map_err(Error::io("open", &conf))?;
    let separator = if text.ends_with('\n') { "" } else { "\n" };
    write!(file, "{separator}\n# Settings managed by shardgate.\n{include}\n").map_err(Error::io("append to", &conf))
}

/// The port a previous `write` chose, if any.
pub(crate) fn read_port(data_dir: &Path) -> Option<u16> {
    let text = std::fs::read_to_string(data_dir.join(FILE)).ok()?;
    text.lines().find_map(|line| {
        let (name, value) = line.split_once('=')?;
        if name.trim() != "port" {
            return None;
        }
        value.trim().parse().ok()
    })
}

/// Where the server writes its log.
pub(crate) fn log_path(data_dir: &Path) -> PathBuf {
    data_dir.join(LOG_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_are_doubled_and_backslashes_escaped() {
        assert_eq!(quote(r"it's C:\pg"), r"'it''s C:\\pg'");
    }

    #[test]
    fn long_data_dirs_listen_on_tcp_only() {
        let short = Path::new("/tmp/pg");
        let long = PathBuf::from(format!("/tmp/{}", "d".repeat(100)));
        let render = |data_dir: &Path| Settings { port: 5432, data_dir, durability: Durability::Throwaway }.render();
        assert!(render(short).contains("unix_socket_directories = '/tmp/pg'"));
        assert!(render(&long).contains("unix_socket_directories = ''"));
        assert!(render(short).contains("fsync = off"));
    }
}

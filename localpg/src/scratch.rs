//! The scratch area test servers live in: one base directory per OS user under the
//! system temp directory, holding one directory per test server (and per template
//! build), named after the test process that owns it:
//! `<kind>-<pid>-<process start time>-<sequence>`.
//!
//! A test process killed with SIGKILL runs no destructors and its postmaster keeps
//! running (pg_ctl puts it in a session of its own). So every new test server first
//! sweeps the base directory: a directory whose owner is gone (no such pid, a zombie,
//! or the pid now belongs to a process that started at another time) is claimed by
//! renaming it to a `trash-` name of our own (rename is atomic: one sweeper wins),
//! its postmaster is stopped, and it is deleted.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::os_user::ServerUser;
use crate::server::pg_ctl_stop;
use crate::{Error, Shutdown};

/// The kinds of owned directory: a test server, a template build, a claimed leftover.
const KINDS: [&str; 3] = ["srv", "build", "trash"];

/// Numbers the directories one process makes.
static SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// `<temp dir>/shardgate-localpg-<euid>`, mode 0755 so that the `postgres` OS user
/// can walk through it to the data directories when we are root.
pub(crate) fn base_dir() -> Result<PathBuf, Error> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let dir = std::env::temp_dir().join(format!("shardgate-localpg-{euid}"));
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(err) => return Err(Error::io("create", &dir)(err)),
    }
    // The temp directory is shared: make sure nobody else planted this one.
    let meta = std::fs::symlink_metadata(&dir).map_err(Error::io("inspect", &dir))?;
    if !meta.is_dir() || meta.uid() != euid {
        return Err(Error::ForeignScratchDir { path: dir });
    }
    if meta.permissions().mode() & 0o777 != 0o755 {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .map_err(Error::io("set permissions on", &dir))?;
    }
    Ok(dir)
}

/// A directory this test process owns. Dropping it stops any server running in its
/// `data` subdirectory and deletes it.
#[derive(Debug)]
pub(crate) struct ScratchDir {
    path: PathBuf,
    bindir: PathBuf,
    user: ServerUser,
    /// A leftover of a dead process, whose postmaster has probably died too.
    leftover: bool,
}

impl ScratchDir {
    /// Creates `<base>/<kind>-<owner>-<sequence>`, mode 0755.
    pub(crate) fn create(
        base: &Path,
        kind: &'static str,
        bindir: &Path,
        user: &ServerUser,
    ) -> Result<ScratchDir, Error> {
        use std::os::unix::fs::DirBuilderExt;

        let path = new_name(base, kind);
        std::fs::DirBuilder::new().mode(0o755).create(&path).map_err(Error::io("create", &path))?;
        Ok(ScratchDir { path, bindir: bindir.to_path_buf(), user: user.clone(), leftover: false })
    }

    /// Where the data directory goes: `<dir>/data`, created by whoever fills it.
    pub(crate) fn data_dir(&self) -> PathBuf {
        self.path.join("data")
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let data_dir = self.data_dir();
        if data_dir.join("postmaster.pid").exists() {
            if let Err(err) = pg_ctl_stop(&self.bindir, &self.user, &data_dir, Shutdown::Immediate) {
                if self.leftover {
                    tracing::debug!(%err, "leftover test server was not running");
                } else {
                    tracing::warn!(%err, "could not stop test server");
                }
            }
        }
        match std::fs::remove_dir_all(&self.path) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                tracing::warn!(dir = %self.path.display(), %err, "could not delete test server directory")
            }
        }
    }
}

/// Stops and deletes the test servers (and template builds) of dead test processes.
pub(crate) fn sweep(base: &Path, bindir: &Path, user: &ServerUser) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(owner) = name.to_str().and_then(Owner::from_dir_name) else {
            continue;
        };
        if owner.is_alive() {
            continue;
        }
        let claimed = new_name(base, "trash");
        if std::fs::rename(entry.path(), &claimed).is_err() {
            continue; // another process claimed it first
        }
        tracing::info!(
            dir = %entry.path().display(),
            pid = owner.pid,
            "removing a test server left behind by a dead test process"
        );
        drop(ScratchDir { path: claimed, bindir: bindir.to_path_buf(), user: user.clone(), leftover: true });
    }
}

fn new_name(base: &Path, kind: &str) -> PathBuf {
    let me = Owner::me();
    let sequence = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    base.join(format!("{kind}-{}-{}-{sequence}", me.pid, me.start))
}

/// A process, told apart from a later one that reuses its pid by its start time
/// (clock ticks since boot, field 22 of `/proc/<pid>/stat`; 0 where unknown).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Owner {
    pid: u32,
    start: u64,
}

impl Owner {
    fn me() -> Owner {
        static ME: OnceLock<Owner> = OnceLock::new();
        *ME.get_or_init(|| {
            let pid = std::process::id();
            let start = std::fs::read_to_string("/proc/self/stat")
                .ok()
                .and_then(|stat| parse_stat(&stat))
                .map_or(0, |(_, start)| start);
            Owner { pid, start }
        })
    }

    /// Parses `<kind>-<pid>-<start>-<sequence>`.
    fn from_dir_name(name: &str) -> Option<Owner> {
        let mut parts = name.split('-');
        let kind = parts.next()?;
        let pid = parts.next()?.parse().ok()?;
        let start = parts.next()?.parse().ok()?;
        let _sequence: u64 = parts.next()?.parse().ok()?;
        (KINDS.contains(&kind) && parts.next().is_none()).then_some(Owner { pid, start })
    }

    fn is_alive(self) -> bool {
        let me = Owner::me();
        if self.pid == me.pid {
            return self.start == me.start;
        }
        if !Path::new("/proc/self/stat").exists() {
            return signal_reaches(self.pid);
        }
        match std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) {
            Err(_) => false,
            Ok(stat) => match parse_stat(&stat) {
                Some((state, start)) => !matches!(state, 'Z' | 'X' | 'x') && (self.start == 0 || start == self.start),
                None => true, // unknown format: leave it alone
            },
        }
    }
}

/// Without procfs: does the pid exist at all?
fn signal_reaches(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The state letter and start time from a `/proc/<pid>/stat` line. The command name
/// (field 2) is in parentheses and may hold spaces and parentheses itself, so fields
/// are counted after its last `)`.
fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Field 3 is the state; the start time is field 22.
    let start = fields.nth(22 - 4)?.parse().ok()?;
    Some((state, start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_command_names_parse() {
        let stat = "4242 (my (odd) test) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 3 0 987654 1000 10";
        assert_eq!(parse_stat(stat), Some(('S', 987654)));
    }

    #[test]
    fn directory_names_carry_their_owner() {
        assert_eq!(Owner::from_dir_name("srv-4242-987654-3"), Some(Owner { pid: 4242, start: 987654 }));
        assert_eq!(Owner::from_dir_name("template-pg15.18-v1"), None);
        assert_eq!(Owner::from_dir_name("srv-4242-x-3"), None);
    }

    #[test]
    fn this_process_is_alive_and_an_exited_one_is_not() {
        assert!(Owner::me().is_alive());
        let mut child = std::process::Command::new("true").spawn().expect("spawn true");
        let pid = child.id();
        child.wait().expect("wait for true");
        assert!(!Owner { pid, start: 0 }.is_alive());
    }
}

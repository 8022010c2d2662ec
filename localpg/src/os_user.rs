//! The OS account PostgreSQL runs under. PostgreSQL refuses to run as root, so when
//! this process is root (CI containers, the test machines) every `initdb` and
//! `pg_ctl` runs as the `postgres` OS user and the data directories belong to it.
//! As an ordinary user, everything runs as ourselves and nothing changes hands.

use std::ffi::{CStr, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::Error;

/// The name of the account PostgreSQL runs as when we are root.
const SERVER_ACCOUNT: &CStr = c"postgres";

/// Who PostgreSQL programs run as: ourselves, or (when we are root) another account.
#[derive(Clone, Debug)]
pub(crate) struct ServerUser {
    switch_to: Option<Account>,
}

#[derive(Clone, Debug)]
struct Account {
    uid: libc::uid_t,
    gid: libc::gid_t,
    /// Its home directory: the server's `HOME`, where the libpq inside it
    /// (a subscription's walreceiver) looks for `~/.postgresql/` files.
    home: std::path::PathBuf,
}

impl ServerUser {
    /// Ourselves, unless we are root; then the `postgres` account.
    pub(crate) fn current() -> Result<ServerUser, Error> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(ServerUser { switch_to: None });
        }
        match lookup(SERVER_ACCOUNT) {
            Ok(Some(account)) => Ok(ServerUser { switch_to: Some(account) }),
            Ok(None) => Err(Error::NoServerUser),
            Err(source) => Err(Error::Io { action: "look up the OS user", path: "postgres".into(), source }),
        }
    }

    /// A command for a PostgreSQL program, run as this user, from `/` (the caller's
    /// working directory may be unreadable to it), without the caller's `PG*`
    /// variables (a stray `PGDATA` or `PGPORT` must not redirect it), reading nothing.
    pub(crate) fn command(&self, program: &Path) -> Command {
        let mut command = Command::new(program);
        command.current_dir("/").stdin(Stdio::null());
        for (key, _) in std::env::vars_os() {
            if key.as_bytes().starts_with(b"PG") {
                command.env_remove(key);
            }
        }
        if let Some(account) = &self.switch_to {
            // std drops supplementary groups when it switches uid from root.
            command.uid(account.uid).gid(account.gid);
            // Not root's HOME: libpq in the server would look in
            // /root/.postgresql/ for a client certificate, be denied, and
            // fail every TLS connection a subscription opens.
            command.env("HOME", &account.home);
        }
        command
    }

    /// Hands `path` (not its contents) to this user.
    pub(crate) fn own(&self, path: &Path) -> Result<(), Error> {
        match &self.switch_to {
            Some(account) => std::os::unix::fs::chown(path, Some(account.uid), Some(account.gid))
                .map_err(Error::io("change the owner of", path)),
            None => Ok(()),
        }
    }

    /// Checks that this user can walk down to `dir`: every ancestor must be
    /// searchable by it. Only matters when we switch users; we can reach what we made.
    pub(crate) fn check_reachable(&self, dir: &Path) -> Result<(), Error> {
        let Some(account) = &self.switch_to else {
            return Ok(());
        };
        for ancestor in dir.ancestors().skip(1) {
            let meta = match std::fs::metadata(ancestor) {
                Ok(meta) => meta,
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(err) => return Err(Error::io("inspect", ancestor)(err)),
            };
            let mode = meta.permissions().mode();
            let searchable = if meta.uid() == account.uid {
                mode & 0o100 != 0
            } else if meta.gid() == account.gid {
                mode & 0o010 != 0
            } else {
                mode & 0o001 != 0
            };
            if !searchable {
                return Err(Error::Unreachable { path: dir.to_path_buf(), blocking: ancestor.to_path_buf() });
            }
        }
        Ok(())
    }
}

/// Looks an account up with the thread-safe `getpwnam_r`.
fn lookup(name: &CStr) -> io::Result<Option<Account>> {
    let mut buf: Vec<libc::c_char> = vec![0; 1024];
    loop {
        // SAFETY: passwd is plain old data; all-zero is a valid (empty) value.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call, and buf.len() is its real size.
        let rc = unsafe { libc::getpwnam_r(name.as_ptr(), &mut entry, buf.as_mut_ptr(), buf.len(), &mut result) };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        if result.is_null() {
            return Ok(None);
        }
        let home = if entry.pw_dir.is_null() {
            std::path::PathBuf::from("/")
        } else {
            // SAFETY: on success a non-null pw_dir points at a NUL-terminated string in buf.
            let home = unsafe { CStr::from_ptr(entry.pw_dir) };
            std::path::PathBuf::from(OsStr::from_bytes(home.to_bytes()))
        };
        return Ok(Some(Account { uid: entry.pw_uid, gid: entry.pw_gid, home }));
    }
}

/// Renders a program and its arguments for an error message.
pub(crate) fn describe(command: &Command) -> String {
    let program =
        Path::new(command.get_program()).file_name().unwrap_or(OsStr::new("?")).to_string_lossy().into_owned();
    command.get_args().fold(program, |mut line, arg| {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
        line
    })
}

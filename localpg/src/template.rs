//! The template data directory test servers are copied from. `initdb` takes a second
//! or more; copying its result takes a tenth of that. So each OS user gets one
//! initdb'ed directory per PostgreSQL installation, made once and copied for every
//! test server.
//!
//! Several test processes may want it at the same moment (cargo nextest runs each
//! test in a process of its own). Each builds into a scratch directory of its own
//! and renames the result into place. Rename is atomic and a directory cannot be
//! renamed onto a non-empty one, so the template exists only when complete, and a
//! process that loses the race deletes its build and uses the winner's. Within one
//! process a mutex makes parallel tests wait for a single build.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, PoisonError};

use crate::os_user::{describe, ServerUser};
use crate::scratch::ScratchDir;
use crate::server::{bin_version, initdb};
use crate::{Durability, Error};

/// Bump when what goes into a template changes (initdb flags), so that templates made
/// by older code are not reused.
const FORMAT: u32 = 1;

/// The template this process has found or built.
static TEMPLATE: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Returns the template directory for these binaries, building it if needed.
pub(crate) fn template(base: &Path, bindir: &Path, user: &ServerUser) -> Result<PathBuf, Error> {
    let mut cached = TEMPLATE.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(path) = cached.as_ref().filter(|path| is_complete(path)) {
        return Ok(path.clone());
    }
    let path = base.join(name(bindir, user)?);
    if !is_complete(&path) {
        build(base, &path, bindir, user)?;
    }
    *cached = Some(path.clone());
    Ok(path)
}

/// Copies the template to `dest`, which must not exist, keeping owners and modes.
pub(crate) fn copy(template: &Path, dest: &Path) -> Result<(), Error> {
    let mut command = Command::new("cp");
    command.arg("-a").arg("--").arg(template).arg(dest);
    let output = command.output().map_err(|source| Error::Spawn { program: "cp".into(), source })?;
    if output.status.success() {
        return Ok(());
    }
    Err(Error::Command {
        command: describe(&command),
        status: output.status,
        output: String::from_utf8_lossy(&output.stderr).trim().to_string(),
    })
}

/// `template-pg<version>-<hash of the bin directory>-v<format>`.
fn name(bindir: &Path, user: &ServerUser) -> Result<String, Error> {
    let version: String =
        bin_version(bindir, user)?.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '.').collect();
    let hash = fnv1a(bindir.as_os_str().as_encoded_bytes());
    Ok(format!("template-pg{version}-{:08x}-v{FORMAT}", hash as u32))
}

fn build(base: &Path, path: &Path, bindir: &Path, user: &ServerUser) -> Result<(), Error> {
    if path.exists() {
        // Damaged (a temp cleaner took files?): move it aside, a trash dir deletes it.
        let trash = ScratchDir::create(base, "trash", bindir, user)?;
        if std::fs::rename(path, trash.data_dir()).is_ok() {
            tracing::warn!(template = %path.display(), "replacing an incomplete template");
        }
    }
    let build = ScratchDir::create(base, "build", bindir, user)?;
    let data_dir = build.data_dir();
    initdb(bindir, user, &data_dir, Durability::Throwaway)?;
    match std::fs::rename(&data_dir, path) {
        Ok(()) => {
            tracing::info!(template = %path.display(), "built test server template");
            Ok(())
        }
        // Another process renamed its build into place first; ours goes with `build`.
        Err(_) if is_complete(path) => Ok(()),
        Err(err) => Err(Error::io("move into place", path)(err)),
    }
}

fn is_complete(path: &Path) -> bool {
    path.join("PG_VERSION").is_file() && path.join("global/pg_control").is_file()
}

/// 64-bit FNV-1a: a stable hash (std's is randomly seeded per process).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3))
}

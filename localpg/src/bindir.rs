//! Finding the PostgreSQL binaries. Debian and Ubuntu keep them off PATH in
//! `/usr/lib/postgresql/<major>/bin`, other systems put them on PATH, and
//! `pg_config` knows where its own installation keeps them; we ask in that order.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Error;

/// The programs a directory must hold to be usable.
const REQUIRED: [&str; 2] = ["initdb", "pg_ctl"];

/// Where Debian-style packages install each major version.
const VERSIONED_ROOT: &str = "/usr/lib/postgresql";

/// Returns the directory holding `initdb` and `pg_ctl`: the first one on `$PATH`,
/// else `pg_config --bindir`, else the highest version in `/usr/lib/postgresql/*/bin`.
///
/// A directory found on `$PATH` is resolved through the `initdb` symlink when the
/// target directory holds both programs too, so `/usr/local/bin/initdb ->
/// /usr/lib/postgresql/15/bin/initdb` yields the real installation directory.
pub fn find_bindir() -> Result<PathBuf, Error> {
    if let Some(dir) = on_path() {
        return Ok(dir);
    }
    if let Some(dir) = from_pg_config() {
        return Ok(dir);
    }
    if let Some(dir) = highest_versioned() {
        return Ok(dir);
    }
    Err(Error::BinaryNotFound { program: "initdb" })
}

fn on_path() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .filter(|dir| dir.is_absolute())
        .find(|dir| holds_all(dir))
        .map(|dir| resolve_symlinked(&dir))
}

/// Prefers the directory `initdb` really lives in, when it is a complete one.
fn resolve_symlinked(dir: &Path) -> PathBuf {
    match std::fs::canonicalize(dir.join("initdb")) {
        Ok(real) => match real.parent() {
            Some(real_dir) if holds_all(real_dir) => real_dir.to_path_buf(),
            _ => dir.to_path_buf(),
        },
        Err(_) => dir.to_path_buf(),
    }
}

fn from_pg_config() -> Option<PathBuf> {
    let output = Command::new("pg_config").arg("--bindir").output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?;
    let dir = PathBuf::from(text.trim());
    (dir.is_absolute() && holds_all(&dir)).then_some(dir)
}

fn highest_versioned() -> Option<PathBuf> {
    let entries = std::fs::read_dir(VERSIONED_ROOT).ok()?;
    entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let version = version_key(&entry.file_name())?;
            let bin = entry.path().join("bin");
            holds_all(&bin).then_some((version, bin))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, bin)| bin)
}

/// `15` → `[15]`, `9.6` → `[9, 6]`; anything else is not a version directory.
fn version_key(name: &OsStr) -> Option<Vec<u32>> {
    name.to_str()?.split('.').map(|part| part.parse().ok()).collect()
}

fn holds_all(dir: &Path) -> bool {
    REQUIRED.iter().all(|program| is_executable(&dir.join(program)))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_directories_sort_numerically() {
        let mut versions: Vec<Vec<u32>> =
            ["9.6", "15", "10"].iter().filter_map(|name| version_key(OsStr::new(name))).collect();
        versions.sort();
        assert_eq!(versions, vec![vec![9, 6], vec![10], vec![15]]);
        assert_eq!(version_key(OsStr::new("main")), None);
    }

    #[test]
    fn finds_a_directory_with_initdb_and_pg_ctl() {
        let dir = find_bindir().expect("PostgreSQL is installed on test machines");
        assert!(dir.join("initdb").is_file());
        assert!(dir.join("pg_ctl").is_file());
    }
}

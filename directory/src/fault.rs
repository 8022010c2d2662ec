//! Named fault points: places where a test makes the driving process die or
//! the step fail, to prove that what was in progress resumes or rolls back
//! cleanly (a move's phases, a two-phase commit's steps).
//!
//! Off unless a test turns them on, either in-process with [`set`] or for a whole
//! process with the environment variable `SHARDGATE_FAULTS`, a comma-separated list
//! of `point=crash` (the process aborts on the spot, like `kill -9`) or
//! `point=error` (the step returns an error). Operators never set it. With
//! `SHARDGATE_FAULTS_ONCE_DIR` set, a crash fires once across processes: the first
//! process to reach the point leaves a file named after it there, and a restarted
//! process passes the point.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Crash,
    Error,
}

fn table() -> &'static Mutex<HashMap<String, Action>> {
    static T: OnceLock<Mutex<HashMap<String, Action>>> = OnceLock::new();
    T.get_or_init(|| {
        let mut m = HashMap::new();
        if let Ok(spec) = std::env::var("SHARDGATE_FAULTS") {
            for item in spec.split(',').filter(|s| !s.is_empty()) {
                let (name, action) = item.split_once('=').unwrap_or((item, "crash"));
                let action = if action == "error" { Action::Error } else { Action::Crash };
                m.insert(name.trim().to_string(), action);
            }
        }
        Mutex::new(m)
    })
}

/// Arms (or with `None`, disarms) a fault point in this process.
pub fn set(name: &str, action: Option<Action>) {
    let mut t = table().lock().unwrap_or_else(|p| p.into_inner());
    match action {
        Some(a) => t.insert(name.to_string(), a),
        None => t.remove(name),
    };
}

/// Whether a fault point is armed in this process (an `error` fault that
/// fired is not: a test sees that its point was reached).
pub fn armed(name: &str) -> bool {
    table().lock().unwrap_or_else(|p| p.into_inner()).contains_key(name)
}

/// Passes a fault point: does nothing unless a test armed it. A `crash`
/// aborts the process here; an `error` fault fires once (returning
/// `Err(message)`) and disarms itself, so the retry that follows can succeed.
pub fn pass(name: &str) -> Result<(), String> {
    let mut t = table().lock().unwrap_or_else(|p| p.into_inner());
    match t.get(name).copied() {
        None => Ok(()),
        Some(Action::Crash) => {
            if let Some(dir) = std::env::var_os("SHARDGATE_FAULTS_ONCE_DIR") {
                let first = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(std::path::Path::new(&dir).join(name))
                    .is_ok();
                if !first {
                    return Ok(());
                }
            }
            tracing::error!(point = name, "fault point: crashing as a test asked");
            std::process::abort()
        }
        Some(Action::Error) => {
            t.remove(name);
            Err(format!("fault point {name} fired (test)"))
        }
    }
}

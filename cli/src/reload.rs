//! Reloading the configuration of a running `shardgate serve`: the file it
//! reads again (on SIGHUP or `POST /reload`), and `shardgate reload`, which
//! asks it to through the admin API and says what came of it.

use std::path::PathBuf;

use anyhow::Result;
use shardgate_router::admin::api::Reloaded;
use shardgate_router::config::RouterConfig;
use shardgate_router::reload::ConfigSource;

use crate::admin_client::Api;
use crate::config::FileConfig;

/// `shardgate serve`'s configuration file, and what it said at start (the
/// keys outside `[router]` only change with a restart, so a reload compares
/// them with that).
pub struct ConfigFile {
    pub path: PathBuf,
    pub started: FileConfig,
}

impl ConfigSource for ConfigFile {
    fn read(&self) -> Result<(RouterConfig, Vec<String>), String> {
        let read = FileConfig::load(&self.path).and_then(|new| new.check().map(|()| new));
        let new = read.map_err(|e| format!("{e:#}"))?;
        let outside = new.restart_keys(&self.started);
        Ok((new.router, outside))
    }
}

/// `shardgate reload`: what changed, what needs a restart; an error (and a
/// non-zero exit) when the file was refused.
pub fn run(api: &Api) -> Result<()> {
    let reloaded: Reloaded = api.post("/reload", &serde_json::json!({}))?;
    print!("{}", describe(&reloaded));
    Ok(())
}

fn describe(r: &Reloaded) -> String {
    let mut out = String::from("configuration reloaded\n");
    if r.changed.is_empty() {
        out.push_str("nothing that reloads changed\n");
    } else {
        out.push_str(&format!("applied: {}\n", r.changed.join(", ")));
    }
    if !r.needs_restart.is_empty() {
        out.push_str(&format!("needs a restart (running values kept): {}\n", r.needs_restart.join(", ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_says_what_was_applied_and_what_waits_for_a_restart() {
        let r = Reloaded { changed: vec!["users".into(), "router.pool.size".into()], needs_restart: vec![] };
        assert_eq!(describe(&r), "configuration reloaded\napplied: users, router.pool.size\n");
        let r = Reloaded { changed: vec![], needs_restart: vec!["router.listen".into()] };
        assert_eq!(
            describe(&r),
            "configuration reloaded\nnothing that reloads changed\nneeds a restart (running values kept): router.listen\n"
        );
    }
}

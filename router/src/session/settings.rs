//! The session's settings: startup parameters and `SET name …` outside a
//! transaction, replayed as `RESET ALL; SET …` on each server connection the
//! session borrows (skipped when the connection last served the same settings).

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use tokio::io::{AsyncRead, AsyncWrite};

use super::Session;
use crate::backend::Backend;
use crate::sql::{Analysis, SettingChange, StatementKind};

/// Session settings by name, each as the statement that sets it.
#[derive(Default)]
pub(super) struct Settings {
    statements: BTreeMap<String, String>,
    /// A hash of `statements` (0 for none), kept up to date with them: a server
    /// connection that last served the same signature needs no `RESET ALL; SET …`.
    signature: u64,
}

impl Settings {
    /// A startup parameter, kept as `SET name TO 'value'` when its name is a
    /// plain setting name.
    fn set_startup(&mut self, name: &str, value: &str) {
        let name = name.to_ascii_lowercase();
        if name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') && !name.is_empty() {
            let text = format!("SET {name} TO {}", crate::sql::quote::literal(value));
            self.statements.insert(name, text);
            self.changed();
        }
    }

    /// Whether the session sets `name` (lower case).
    pub(super) fn has(&self, name: &str) -> bool {
        !self.statements.is_empty() && self.statements.contains_key(name)
    }

    /// Forgets every setting (`DISCARD ALL`).
    pub(super) fn clear(&mut self) {
        self.statements.clear();
        self.changed();
    }

    /// Recomputes the signature; called whenever the settings change, so that
    /// borrowing a connection costs no hashing.
    fn changed(&mut self) {
        self.signature = if self.statements.is_empty() {
            0
        } else {
            let mut h = DefaultHasher::new();
            self.statements.hash(&mut h);
            h.finish() | 1
        };
    }

    /// `RESET ALL; SET …`: the statements that give a connection these settings.
    pub(super) fn sql(&self) -> String {
        let mut sql = String::from("RESET ALL");
        for text in self.statements.values() {
            sql.push_str("; ");
            sql.push_str(text);
        }
        sql
    }

    /// [`Self::sql`] for a connection whose settings are not these, marking it
    /// as having them; None when it has them already.
    pub(super) fn prelude(&self, conn: &mut Backend) -> Option<String> {
        if conn.settings == Some(self.signature) {
            return None;
        }
        conn.settings = Some(self.signature);
        Some(self.sql())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Startup parameters the client asked for (`application_name`, `DateStyle`,
    /// `options=-c name=value` …), kept as session settings.
    pub fn with_startup_settings(mut self, params: &[(String, String)]) -> Self {
        for (k, v) in params {
            match k.as_str() {
                // client_encoding: the router talks UTF8 to every shard and passes
                // text through; replaying a client's encoding would make the shard
                // convert what the router has already parsed as UTF-8.
                "user" | "database" | "replication" | "client_encoding" => {}
                "options" => {
                    let mut words = v.split_whitespace();
                    while let Some(w) = words.next() {
                        let kv = match w {
                            "-c" => words.next(),
                            w => w.strip_prefix("-c").or_else(|| w.strip_prefix("--")),
                        };
                        if let Some((name, value)) = kv.and_then(|kv| kv.split_once('=')) {
                            self.settings.set_startup(name, value);
                        }
                    }
                }
                name => self.settings.set_startup(name, v),
            }
        }
        self
    }

    /// Records the session-setting statements of `analysis` after they ran on the
    /// held connection (`status` is the server's transaction status after them).
    pub(super) fn record_settings(&mut self, analysis: &Analysis, status: u8) {
        self.record_setting_statements(analysis, status);
        if analysis.statements.iter().any(|s| s.sets_config) {
            // set_config(…, false): a setting the session does not carry, and
            // the next session must not inherit. The connection starts from
            // RESET ALL for whichever session borrows it next.
            if let Some(b) = self.txn.held.as_mut() {
                b.conn.settings = None;
            }
        }
    }

    fn record_setting_statements(&mut self, analysis: &Analysis, status: u8) {
        let mut changes = analysis.statements.iter().filter_map(|s| match &s.kind {
            StatementKind::SetVar(c) => Some((s, c)),
            _ => None,
        });
        if changes.clone().next().is_none() {
            return;
        }
        if status != b'I' || self.saw_error {
            // Inside a transaction (or failed): what the connection now has is
            // unknown; the next session to use it starts from RESET ALL.
            if let Some(b) = self.txn.held.as_mut() {
                b.conn.settings = None;
            }
            return;
        }
        let settings = &mut self.settings;
        for (stmt, change) in changes.by_ref() {
            match change {
                SettingChange::Set { name } => {
                    settings.statements.insert(name.clone(), stmt.text.clone());
                }
                SettingChange::Reset { name } => {
                    settings.statements.remove(name);
                }
                // DISCARD ALL is answered before it reaches a shard; should one
                // come this way, it resets the settings all the same.
                SettingChange::ResetAll | SettingChange::DiscardAll => settings.statements.clear(),
            }
        }
        settings.changed();
        let sig = settings.signature;
        if let Some(b) = self.txn.held.as_mut() {
            b.conn.settings = Some(sig);
        }
    }
}

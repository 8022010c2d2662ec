//! The session's settings: startup parameters and `SET name …` outside a
//! transaction, replayed as `RESET ALL; SET …` on each server connection the
//! session borrows (skipped when the connection last served the same settings).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use tokio::io::{AsyncRead, AsyncWrite};

use super::Session;
use crate::sql::{Analysis, SettingChange, StatementKind};

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
                            self.set_startup(name, value);
                        }
                    }
                }
                name => self.set_startup(name, v),
            }
        }
        self
    }

    pub(super) fn set_startup(&mut self, name: &str, value: &str) {
        let name = name.to_ascii_lowercase();
        if name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') && !name.is_empty() {
            let text = format!("SET {name} TO '{}'", value.replace('\'', "''"));
            self.settings.insert(name, text);
            self.settings_changed();
        }
    }

    /// Recomputes the settings' signature; called whenever they change, so that
    /// borrowing a connection costs no hashing.
    pub(super) fn settings_changed(&mut self) {
        self.settings_signature = if self.settings.is_empty() {
            0
        } else {
            let mut h = DefaultHasher::new();
            self.settings.hash(&mut h);
            h.finish() | 1
        };
    }

    /// Records the session-setting statements of `analysis` after they ran on the
    /// bound connection (`status` is the server's transaction status after them).
    pub(super) fn record_settings(&mut self, analysis: &Analysis, status: u8) {
        let changes: Vec<&SettingChange> = analysis
            .statements
            .iter()
            .filter_map(|s| match &s.kind {
                StatementKind::SetVar(c) => Some(c),
                _ => None,
            })
            .collect();
        if changes.is_empty() {
            return;
        }
        if status != b'I' || self.saw_error {
            // Inside a transaction (or failed): what the connection now has is
            // unknown; the next session to use it starts from RESET ALL.
            if let Some(b) = self.bound.as_mut() {
                b.conn.settings = None;
            }
            return;
        }
        for (stmt, change) in analysis.statements.iter().filter_map(|s| match &s.kind {
            StatementKind::SetVar(c) => Some((s, c)),
            _ => None,
        }) {
            match change {
                SettingChange::Set { name } => {
                    self.settings.insert(name.clone(), stmt.text.clone());
                }
                SettingChange::Reset { name } => {
                    self.settings.remove(name);
                }
                SettingChange::ResetAll => self.settings.clear(),
            }
        }
        self.settings_changed();
        let sig = self.settings_signature;
        if let Some(b) = self.bound.as_mut() {
            b.conn.settings = Some(sig);
        }
    }

    /// The session's settings as statements, for a connection of the shadow
    /// reads (which runs them inside a transaction it rolls back).
    pub(super) fn settings_sql(&self) -> String {
        let mut sql = String::from("RESET ALL");
        for text in self.settings.values() {
            sql.push_str("; ");
            sql.push_str(text);
        }
        sql
    }

    /// `RESET ALL; SET …` for a connection whose settings are not this
    /// session's, marking it as having them.
    pub(super) fn settings_prelude(&self, conn: &mut crate::backend::Backend) -> Option<String> {
        let sig = self.settings_signature;
        if conn.settings == Some(sig) {
            return None;
        }
        conn.settings = Some(sig);
        let mut sql = String::from("RESET ALL");
        for text in self.settings.values() {
            sql.push_str("; ");
            sql.push_str(text);
        }
        Some(sql)
    }
}

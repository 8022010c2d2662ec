//! The client's prepared statements and their names on server connections: a
//! client's statement maps to a server name derived from its text and types, so
//! it is prepared lazily on whichever pooled connection runs it.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use super::relay::Expect;
use super::Session;
use crate::error::SqlError;
use crate::protocol::messages::{self, target_and_name, Bind, Parse};
use crate::protocol::Message;
use crate::sql::Analysis;

/// What [`Session::remember_statements`] kept of a batch, for
/// [`Session::statements_as_at`] to use once.
#[derive(Default)]
pub(super) enum Remembered {
    #[default]
    Nothing,
    /// The batch parses or closes nothing but its first message, a Parse.
    HeadParse,
    Changes(Box<BatchBefore>),
}

/// The statements a batch parses or closes, as they were before it.
pub(super) struct BatchBefore {
    names: Vec<(String, Option<Prepared>)>,
    /// Its Parse and Close messages, by position, with the client's names.
    changes: Vec<(usize, Message)>,
}

/// A statement the client prepared (named or unnamed).
#[derive(Clone)]
pub(super) struct Prepared {
    pub(super) sql: Arc<str>,
    pub(super) param_types: Vec<i32>,
    /// The name it has on server connections ([`server_name`]).
    pub(super) server_name: String,
    /// None when the text does not parse: it then goes to a shard, which reports
    /// the syntax error in Postgres's own words.
    pub(super) analysis: Option<Arc<Analysis>>,
    /// The schema generation its server name was made in.
    pub(super) generation: u64,
}

/// Statements a server connection keeps prepared before its cache starts over.
pub(super) const MAX_PREPARED_PER_CONNECTION: usize = 1000;

/// Makes sure the statement is prepared on this server connection, queuing
/// a Parse (whose reply the client does not see) when it is not.
pub(super) fn ensure_prepared(backend: &mut crate::backend::Backend, p: &Prepared, expects: &mut VecDeque<Expect>) {
    // Looked up before inserting: no copy of the name for the common case.
    if !backend.prepared.contains(&p.server_name) && backend.prepared.insert(p.server_name.clone()) {
        backend.conn.queue(&messages::parse(&p.server_name, &p.sql, &p.param_types));
        expects.push_back(Expect::Parse { forward: false, server_name: p.server_name.clone(), client_name: None });
    }
}

/// A client statement's name on server connections: its text and types'
/// ([`crate::sql::statement_name`]) and the schema generation it was prepared
/// in. A statement prepared after DDL gets a name of its own, so it is parsed
/// afresh wherever it runs and sees the table's new columns, as on a Postgres
/// of its own; server connections' copies prepared before would fail it with
/// "cached plan must not change result type".
pub(super) fn server_name(sql: &str, param_types: &[i32], generation: u64) -> String {
    format!("{}_{generation}", crate::sql::statement_name(sql, param_types))
}

pub(super) fn unknown_statement(name: &str) -> SqlError {
    SqlError::new("26000", format!("prepared statement \"{name}\" does not exist"))
}

pub(super) fn unknown_portal(name: &str) -> SqlError {
    SqlError::new("34000", format!("portal \"{name}\" does not exist"))
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// A batch that parses a statement name again after using it (pgjdbc's
    /// batches and psycopg's pipelines parse the unnamed statement before
    /// each execution, with a different text each time) is learnt message by
    /// message, as the server runs it: each Bind, Describe and Close runs the
    /// definition in force at its place. The router walks a batch several
    /// times (route, rewrite, run across shards) against one table of names,
    /// so the earlier messages are renamed to an alias holding the earlier
    /// definition. Aliases never reach a server (server names come from the
    /// text) and live until the batch is done ([`Self::drop_aliases`]).
    /// Costs nothing for a batch whose only Parse comes first.
    pub(super) fn separate_redefinitions(&mut self, batch: &mut [Message]) {
        for i in 1..batch.len() {
            if batch[i].tag() != b'P' {
                continue;
            }
            let Ok(name) = Parse::parse(&batch[i]).map(|p| p.name.to_string()) else { continue };
            if !batch[..i].iter().any(|m| statement_named(m) == Some(&name)) {
                continue;
            }
            let parsed_here = batch[..i].iter().any(|m| m.tag() == b'P' && statement_named(m) == Some(&name));
            let alias = format!("\u{1}shardgate: {name} before its Parse {i}");
            if !parsed_here {
                // Used as defined by an earlier batch, or not defined at all
                // (a Close of a name not in use, then its Parse): the alias
                // stays undefined, and the Close does not undo the Parse.
                if let Some(p) = self.prepared.get(&name).cloned() {
                    self.prepared.insert(alias.clone(), p);
                }
            }
            for m in &mut batch[..i] {
                if statement_named(m) == Some(&name) {
                    if let Some(renamed) = with_statement_name(m, &alias) {
                        *m = renamed;
                    }
                }
            }
            self.batch_aliases.push(alias);
        }
    }

    /// Learns the statement a Parse defines.
    pub(super) fn learn(&mut self, p: &Parse<'_>) {
        let generation = self.ctx.catalog.generation();
        // A client that parses the same statement again before each use (the
        // unnamed statement of most drivers, pgbench -M extended) keeps the
        // entry it has: the analysis, server name and copies would all come
        // out the same.
        let same = self.prepared.get(p.name).is_some_and(|old| {
            old.generation == generation && *old.sql == *p.query && old.param_types == p.param_types
        });
        if same {
            return;
        }
        let hashed =
            crate::sql::roles::mentions_password(p.query).then(|| crate::sql::roles::hash_passwords(p.query)).flatten();
        let prepared = Prepared {
            sql: hashed.map_or_else(|| Arc::from(p.query), Arc::from),
            server_name: server_name(p.query, &p.param_types, generation),
            param_types: p.param_types.clone(),
            analysis: self.ctx.cache.get(p.query).ok(),
            generation,
        };
        self.prepared.insert(p.name.to_string(), prepared);
    }

    /// Before a batch runs: what the statements it parses or closes stand
    /// for, should a message fail on the server and the messages after it be
    /// skipped ([`Self::statements_as_at`]). Needed when one of them comes
    /// after another message (one before them can fail), or any in a failed
    /// transaction (the first message fails); costs nothing otherwise.
    pub(super) fn remember_statements(&mut self, batch: &[Message], failed: bool) {
        self.batch_before = Remembered::Nothing;
        let changes = || {
            batch
                .iter()
                .enumerate()
                .filter(|(_, m)| m.tag() == b'P' || (m.tag() == b'C' && matches!(target_and_name(m), Ok((b'S', _)))))
        };
        if !changes().any(|(i, _)| i > 0 || failed) {
            if batch.first().is_some_and(|m| m.tag() == b'P') {
                self.batch_before = Remembered::HeadParse;
            }
            return;
        }
        let changes: Vec<(usize, Message)> = changes().map(|(i, m)| (i, m.clone())).collect();
        let mut names: Vec<(String, Option<Prepared>)> = Vec::new();
        for (_, m) in &changes {
            if let Some(name) = statement_named(m) {
                if !names.iter().any(|(n, _)| n == name) {
                    names.push((name.to_string(), self.prepared.get(name).cloned()));
                }
            }
        }
        self.batch_before = Remembered::Changes(Box::new(BatchBefore { names, changes }));
    }

    /// The statements as the batch left them when the server failed its
    /// message `at` and skipped the rest: as before the batch, with the
    /// Parses and Closes before `at` applied, and the unnamed statement
    /// dropped by a failed Parse of it, as in Postgres. `batch`: the batch
    /// [`Self::remember_statements`] was given.
    pub(super) fn statements_as_at(&mut self, at: usize, batch: &[Message]) {
        let before = match std::mem::take(&mut self.batch_before) {
            Remembered::Nothing => return,
            Remembered::HeadParse => {
                // The batch's one Parse, at its head, failed if `at` is 0. A
                // Parse that fails leaves its name undefined (the name was
                // not in use: 42P05 otherwise; the unnamed statement is
                // dropped first).
                if let (0, Some(name)) = (at, batch.first().and_then(statement_named)) {
                    self.prepared.remove(name);
                }
                return;
            }
            Remembered::Changes(before) => before,
        };
        for (name, p) in before.names {
            match p {
                Some(p) => self.prepared.insert(name, p),
                None => self.prepared.remove(&name),
            };
        }
        for (i, m) in &before.changes {
            match (m.tag(), *i) {
                (b'P', i) if i < at => {
                    if let Ok(p) = Parse::parse(m) {
                        self.learn(&p);
                    }
                }
                (b'P', i) if i == at && Parse::parse(m).is_ok_and(|p| p.name.is_empty()) => {
                    self.prepared.remove("");
                }
                (_, i) if i < at => {
                    if let Some(name) = statement_named(m) {
                        self.prepared.remove(name);
                    }
                }
                _ => {}
            }
        }
    }

    /// Forgets the aliases of a batch that is done.
    pub(super) fn drop_aliases(&mut self) {
        for alias in self.batch_aliases.drain(..) {
            self.prepared.remove(&alias);
        }
    }

    /// The replies to expect on the held connection before a batch's own:
    /// ReadyForQuery for each statement `checkout` sent ahead (`swallow`), and the
    /// CloseComplete of a statement cache started over.
    pub(super) fn start_expects(&mut self, swallow: usize) -> VecDeque<Expect> {
        let mut expects = std::mem::take(&mut self.spare_expects);
        expects.clear();
        let Some(b) = self.txn.held.as_mut() else {
            return expects;
        };
        let backend = &mut b.conn;
        for _ in 0..swallow {
            expects.push_back(Expect::Sync);
        }
        if backend.prepared.len() >= MAX_PREPARED_PER_CONNECTION {
            // Held the memory each server connection spends on statements that
            // clients prepared: start its cache over (statements are prepared
            // again, lazily, when next used).
            let names: Vec<String> = backend.prepared.drain().collect();
            for name in names {
                backend.conn.queue(&messages::close(b'S', &name));
                expects.push_back(Expect::Close { forward: false });
            }
        }
        expects
    }

    /// Queues the batch on the held connection with statement names rewritten,
    /// and returns the replies to expect.
    pub(super) fn rewrite_batch(&mut self, batch: &[Message], swallow: usize) -> VecDeque<Expect> {
        let mut expects = self.start_expects(swallow);
        let Some(b) = self.txn.held.as_mut() else {
            return expects;
        };
        let backend = &mut b.conn;
        // A Parse of a statement the server has is answered here, but not
        // when the server must see it: its transaction block failed (it
        // refuses the Parse, 25P02, or parses an end of the block), or an
        // Execute with a row limit ran before it (a Parse makes the rows
        // that Execute wrote visible to what follows, as in Postgres). The
        // server then parses it again, unnamed.
        let failed = self.txn.last_status == b'E';
        // The portals this batch binds, and whether their statements read only.
        let mut portals: smallvec::SmallVec<[(&[u8], bool); 4]> = smallvec::SmallVec::new();
        for m in batch {
            if m.tag() == b'E' && !m.body().ends_with(&[0, 0, 0, 0]) {
                let portal = m.body().split(|&b| b == 0).next().unwrap_or_default();
                let reads = portals.iter().rev().find(|(p, _)| *p == portal).is_some_and(|(_, reads)| *reads);
                self.txn.limited_execute |= !reads;
            }
            if m.tag() == b'B' {
                if let Ok(bind) = Bind::parse(m) {
                    let reads = self.prepared.get(bind.statement).and_then(|p| p.analysis.as_ref()).is_some_and(|a| {
                        a.statements.iter().all(|s| s.kind == crate::sql::StatementKind::Select && s.written.is_empty())
                    });
                    portals.push((bind.portal.as_bytes(), reads));
                }
            }
            match m.tag() {
                b'P' => {
                    let Ok(parse) = Parse::parse(m) else { continue };
                    let Some(p) = self.prepared.get(parse.name) else {
                        continue;
                    };
                    if !backend.prepared.contains(&p.server_name) && backend.prepared.insert(p.server_name.clone()) {
                        backend.conn.queue(&messages::parse(&p.server_name, &p.sql, &p.param_types));
                        expects.push_back(Expect::Parse {
                            forward: true,
                            server_name: p.server_name.clone(),
                            client_name: Some(parse.name.to_string()),
                        });
                    } else if failed || self.txn.limited_execute {
                        backend.conn.queue(&messages::parse("", &p.sql, &p.param_types));
                        expects.push_back(Expect::Parse {
                            forward: true,
                            server_name: String::new(),
                            client_name: Some(parse.name.to_string()),
                        });
                    } else {
                        expects.push_back(Expect::Synth(messages::parse_complete()));
                    }
                }
                b'B' => {
                    let Ok(bind) = Bind::parse(m) else { continue };
                    let Some(p) = self.prepared.get(bind.statement) else {
                        continue;
                    };
                    ensure_prepared(backend, p, &mut expects);
                    bind.put_with_statement(backend.conn.write_buf(), &p.server_name);
                    expects.push_back(Expect::Bind);
                }
                b'D' => match target_and_name(m) {
                    Ok((b'S', name)) => {
                        let Some(p) = self.prepared.get(name) else {
                            continue;
                        };
                        ensure_prepared(backend, p, &mut expects);
                        backend.conn.queue(&messages::describe(b'S', &p.server_name));
                        expects.push_back(Expect::Describe);
                    }
                    _ => {
                        backend.conn.queue(m.raw());
                        expects.push_back(Expect::Describe);
                    }
                },
                b'C' => match target_and_name(m) {
                    Ok((b'S', name)) => {
                        // The server keeps its copy for the next client that needs it.
                        self.prepared.remove(name);
                        expects.push_back(Expect::Synth(messages::close_complete()));
                    }
                    _ => {
                        backend.conn.queue(m.raw());
                        expects.push_back(Expect::Close { forward: true });
                    }
                },
                b'E' => {
                    backend.conn.queue(m.raw());
                    expects.push_back(Expect::Execute);
                }
                b'S' => {
                    backend.conn.queue(m.raw());
                    expects.push_back(Expect::Sync);
                }
                _ => {}
            }
        }
        if !matches!(expects.back(), Some(Expect::Sync)) {
            // A Flush: make the server send what it has.
            backend.conn.queue(&messages::simple(b'H'));
        }
        expects
    }
}

/// The statement a Parse defines, a Bind binds, or a Describe or Close names.
fn statement_named(m: &Message) -> Option<&str> {
    match m.tag() {
        b'P' => Parse::parse(m).ok().map(|p| p.name),
        b'B' => {
            let body = m.body();
            let portal_end = body.iter().position(|&b| b == 0)?;
            let rest = &body[portal_end + 1..];
            std::str::from_utf8(&rest[..rest.iter().position(|&b| b == 0)?]).ok()
        }
        b'D' | b'C' => match target_and_name(m) {
            Ok((b'S', name)) => Some(name),
            _ => None,
        },
        _ => None,
    }
}

/// `m` naming the statement `name` instead.
fn with_statement_name(m: &Message, name: &str) -> Option<Message> {
    let raw = match m.tag() {
        b'P' => {
            let p = Parse::parse(m).ok()?;
            messages::parse(name, p.query, &p.param_types)
        }
        b'B' => Bind::parse(m).ok()?.with_statement(name),
        tag @ (b'D' | b'C') => messages::Builder::new(tag).u8(b'S').cstr(name).finish(),
        _ => return None,
    };
    Some(Message::from_raw(raw))
}

//! Session pooling (`pool_mode = "session"`): a client keeps the server
//! connections it used until it leaves, so the state it leaves on them —
//! `LISTEN`, session advisory locks, temporary tables, cursors `WITH HOLD` —
//! is there for its next statement and for no one else.
//!
//! Statements route exactly as in transaction pooling; a shard's connection is
//! simply the client's own ([`crate::pool::Kept`]). State that names no tenant
//! lives on the session's *home* shard, the first shard holding the reference
//! tables: every session-pooled client has the same home, so `LISTEN` and
//! `NOTIFY`, and advisory locks, meet there. Statements that name one of the
//! session's temporary tables run there too. State whose statement reads a
//! tenant's rows on another shard is refused: the next statement that uses it
//! (a read of the temporary table) would be routed to the home shard and miss
//! it. Cursors `WITH HOLD` are the exception: each is remembered with the
//! shard its query read, and `FETCH`, `MOVE` and `CLOSE` of it go there.
//!
//! When the client leaves, each kept connection runs `DISCARD ALL` (as
//! pgbouncer's `server_reset_query`) and goes back to its pool; one that does
//! not answer cleanly is closed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use shardgate_directory::{Directory, ShardId};
use tokio::io::{AsyncRead, AsyncWrite};

use super::Session;
use crate::error::SqlError;
use crate::pool::Kept;
use crate::protocol::{Message, ProtocolError};
use crate::route::Target;
use crate::sql::{Analysis, StatementKind};

/// What session pooling adds to a session.
#[derive(Default)]
pub(super) struct SessionPooling {
    /// The server connections the client keeps.
    pub(super) kept: Arc<Kept>,
    /// Temporary tables, views and sequences the client created: statements
    /// that name them run on the home shard.
    temp: Mutex<Vec<String>>,
    /// The client ran `LISTEN`: while it is idle, notifications that reach
    /// its home connection are passed on at once.
    listening: AtomicBool,
    /// Cursors `WITH HOLD`, by name, and the shard whose connection holds
    /// each: the one its query read. FETCH, MOVE and CLOSE go there.
    cursors: Mutex<Vec<(String, ShardId)>>,
}

/// Where a session-pooled client's state that names no tenant lives: the
/// first live shard holding the reference tables.
pub(super) fn home_shard(dir: &Directory) -> ShardId {
    dir.live_shards().find(|(_, s)| s.reference).or_else(|| dir.live_shards().next()).map(|(i, _)| i).unwrap_or(0)
}

impl SessionPooling {
    fn is_temp(&self, table: &str) -> bool {
        let table = table.strip_prefix("pg_temp.").unwrap_or(table);
        self.temp.lock().unwrap_or_else(|p| p.into_inner()).iter().any(|t| t == table)
    }

    /// Whether every table of `tables` is one of the session's temporary ones
    /// (the catalog does not need to look for them).
    pub(super) fn all_temp(&self, tables: &[String]) -> bool {
        !tables.is_empty() && tables.iter().all(|t| self.is_temp(t))
    }

    /// The target of statements routed as transaction pooling would route
    /// them, for a session-pooled client: the state they leave or use must be
    /// on the home shard. Records the temporary tables they create and
    /// whether they LISTEN.
    pub(super) fn place(&self, analysis: &Analysis, target: Target, dir: &Directory) -> Result<Target, SqlError> {
        let home = home_shard(dir);
        if let Some(placed) = self.place_cursor(analysis, &target, home) {
            return placed;
        }
        let mut uses_state = false;
        // A table other than the session's own written from its state: a
        // regular table is on every shard, its state on one.
        let mut writes_shared = None;
        for s in &analysis.statements {
            let names_temp = s.tables.iter().chain(&s.written).any(|t| self.is_temp(t));
            if names_temp || matches!(s.kind, StatementKind::SessionState(_)) {
                writes_shared = writes_shared.or_else(|| s.written.iter().find(|t| !self.is_temp(t)).cloned());
            }
            match s.kind {
                StatementKind::SessionState(state) => {
                    uses_state = true;
                    if state.starts_with("a temporary") {
                        let mut temp = self.temp.lock().unwrap_or_else(|p| p.into_inner());
                        for t in &s.written {
                            let t = t.strip_prefix("pg_temp.").unwrap_or(t);
                            if !temp.iter().any(|x| x == t) {
                                temp.push(t.to_string());
                            }
                        }
                    }
                    if state == "LISTEN" {
                        self.listening.store(true, Ordering::Relaxed);
                    }
                }
                _ if names_temp => uses_state = true,
                _ => {}
            }
        }
        if !uses_state {
            return Ok(target);
        }
        if let (Target::All, Some(table)) = (&target, writes_shared) {
            return Err(SqlError::new(
                "0A000",
                format!("this statement writes {table}, which is on every shard, from this session's temporary state, which is on one"),
            )
            .hint("write it from regular tables, or copy the rows out of the temporary table and send them as INSERT … VALUES or COPY"));
        }
        match target {
            Target::Any | Target::All => Ok(Target::Shard(home)),
            Target::Shard(s) if s == home => Ok(target),
            _ => {
                let name = |s: ShardId| dir.shards.get(s).map(|x| x.name.clone()).unwrap_or_default();
                let other = match &target {
                    Target::Shard(s) => format!("shard {}", name(*s)),
                    _ => "several shards".to_string(),
                };
                Err(SqlError::new(
                    "0A000",
                    format!(
                        "this statement keeps or uses session state, which lives on this session's home shard {}, but reads rows of {other}",
                        name(home)
                    ),
                )
                .hint(format!(
                    "in session pooling, temporary tables, cursors WITH HOLD and the like hold rows of the tenants on {} only: read other tenants' rows without them",
                    name(home)
                )))
            }
        }
    }
}

impl SessionPooling {
    /// A statement alone in its query string that declares a cursor `WITH
    /// HOLD`, or uses one: it runs on the shard of the cursor's query (the
    /// tenant's it names, or home). None for any other statement.
    fn place_cursor(&self, analysis: &Analysis, target: &Target, home: ShardId) -> Option<Result<Target, SqlError>> {
        let [s] = analysis.statements.as_slice() else { return None };
        let name = s.cursor.as_ref()?;
        let mut cursors = self.cursors.lock().unwrap_or_else(|p| p.into_inner());
        match (&s.kind, target) {
            (StatementKind::SessionState(_), Target::Shard(shard)) => {
                cursors.retain(|(n, _)| n != name);
                cursors.push((name.clone(), *shard));
                Some(Ok(target.clone()))
            }
            (StatementKind::SessionState(_), _) => None,
            // CLOSE ALL: on every shard that holds one, which one statement
            // cannot do.
            _ if name.is_empty() => {
                let elsewhere = cursors.iter().find(|(_, shard)| *shard != home)?;
                Some(Err(SqlError::new(
                    "0A000",
                    format!("CLOSE ALL would leave cursor {} open: it is on another shard's connection", elsewhere.0),
                )
                .hint("close each cursor by name (CLOSE name)")))
            }
            _ => {
                let at = cursors.iter().position(|(n, _)| n == name)?;
                let shard = cursors[at].1;
                if s.text.get(..5).is_some_and(|w| w.eq_ignore_ascii_case("close")) {
                    cursors.remove(at);
                }
                Some(Ok(Target::Shard(shard)))
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// The client's next message. A session-pooled client that ran LISTEN
    /// also gets, while it waits, the notifications its home connection
    /// receives (as Postgres sends them to an idle client).
    pub(super) async fn read_client(&mut self) -> Result<Message, ProtocolError> {
        let Some(pooling) = self.pooling.as_ref().filter(|p| p.listening.load(Ordering::Relaxed)) else {
            return self.client.read().await;
        };
        let dir = self.ctx.directory.load();
        let home = home_shard(&dir);
        drop(dir);
        let Some(pool) = self.role_pool(home) else { return self.client.read().await };
        let Some(mut conn) = pooling.kept.take(&pool) else { return self.client.read().await };
        loop {
            tokio::select! {
                biased;
                m = self.client.read() => return m,
                n = conn.conn.read() => match n {
                    Ok(n) if matches!(n.tag(), b'A' | b'N' | b'S') => {
                        self.client.queue(n.raw());
                        self.client.flush().await?;
                    }
                    // Anything else from an idle server is its end (a FATAL
                    // at shutdown): the connection is closed, the client's
                    // next statement gets a new one.
                    _ => {
                        conn.broken = true;
                        drop(conn);
                        return self.client.read().await;
                    }
                }
            }
        }
    }

    /// The client left: its kept connections lose its state (`DISCARD ALL`)
    /// and go back to their pools; one that does not answer cleanly is closed.
    pub(super) async fn release_kept(&mut self) {
        let Some(pooling) = self.pooling.as_ref() else { return };
        for mut conn in pooling.kept.release() {
            let reset =
                crate::timer::timeout(std::time::Duration::from_secs(5), conn.simple_query("DISCARD ALL")).await;
            match reset {
                Ok(Ok(_)) => {
                    // Gone with it: the router's prepared statements and the
                    // settings it replayed.
                    conn.prepared.clear();
                    conn.settings = None;
                }
                _ => conn.broken = true,
            }
        }
    }
}

//! SQL-level `PREPARE`, `EXECUTE` and `DEALLOCATE`, carried by the session
//! (docs/routing.md "SQL PREPARE and EXECUTE").
//!
//! A statement the client prepares with SQL is kept here as text. PREPARE is
//! checked on one shard (so its errors come when Postgres gives them) under a
//! server name made from its text; each EXECUTE is routed by its body read
//! with the arguments in place, and runs on the chosen connection as
//! `EXECUTE <server name>(args)`, preceded there, the first time, by the
//! PREPARE itself in the same query string. Postgres coerces the arguments to
//! the declared types as it would on one server.

use tokio::io::{AsyncRead, AsyncWrite};

use super::{Session, SessionError};
use crate::error::SqlError;
use crate::protocol::messages;
use crate::route::Target;
use crate::sql::prepare_text::{self, PrepareText};

/// One statement the client prepared with SQL.
pub(super) struct SqlStatement {
    text: PrepareText,
    /// Its name on server connections (unique to its text and the schema
    /// generation, like the protocol's prepared statements').
    server_name: String,
}

/// The session's SQL prepared statements, and the PREPARE in flight.
#[derive(Default)]
pub(super) struct SqlPreparedState {
    statements: rustc_hash::FxHashMap<String, SqlStatement>,
    /// A PREPARE sent ahead of an EXECUTE (or alone): its server name, and
    /// whether the client sees its CommandComplete. The relay takes it when
    /// the server answers.
    pub(super) in_flight: Option<(String, bool)>,
}

impl SqlPreparedState {
    pub(super) fn remove(&mut self, name: &str) -> bool {
        self.statements.remove(name).is_some()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// `PREPARE name [(types)] AS body`, alone in its query string.
    pub(super) async fn sql_prepare(&mut self, sql: &str) -> Result<(), SessionError> {
        let text = match prepare_text::parse_prepare(sql) {
            Ok(t) => t,
            Err(e) => return self.fail_simple(SqlError::new("42601", format!("cannot read PREPARE: {e}"))).await,
        };
        let exists = self.prepared.contains_key(&text.name)
            || self.sql_prepared.as_ref().is_some_and(|s| s.statements.contains_key(&text.name));
        if exists {
            let e = SqlError::new("42P05", format!("prepared statement \"{}\" already exists", text.name));
            return self.fail_simple(e).await;
        }
        let generation = self.ctx.catalog.generation();
        let server_name =
            super::prepared::server_name(&format!("PREPARE {} AS {}", text.types, text.body), &[], generation);
        let shard = self.any_shard();
        let already =
            self.txn.held.as_ref().is_some_and(|b| b.shard == shard && b.conn.prepared.contains(&server_name));
        // Checking it would send the BEGIN held back, binding the transaction to
        // that shard: inside a block not yet on a shard, a body Postgres
        // refuses is refused at its first EXECUTE instead.
        let unchecked = self.txn.held.is_none() && self.txn.pending_begin.is_some();
        let prepared = if already || unchecked {
            self.client.queue(&messages::command_complete("PREPARE"));
            self.ready().await?;
            true
        } else {
            // On one shard, so that a body Postgres refuses is refused now,
            // with the shard's own error; the name is the router's.
            let query = format!("PREPARE {server_name} {} AS {}", text.types, text.body);
            self.sql_prepared.get_or_insert_with(Default::default).in_flight = Some((server_name.clone(), true));
            self.forward_simple(shard, messages::query(&query), None).await?;
            let state = self.sql_prepared.get_or_insert_with(Default::default);
            state.in_flight.take().is_none()
        };
        if prepared {
            let state = self.sql_prepared.get_or_insert_with(Default::default);
            state.statements.insert(text.name.clone(), SqlStatement { text, server_name });
        }
        Ok(())
    }

    /// `EXECUTE name [(args)]`, alone in its query string: routed by its body
    /// with the arguments in place.
    pub(super) async fn sql_execute(&mut self, sql: &str) -> Result<(), SessionError> {
        let execute = match prepare_text::parse_execute(sql) {
            Ok(e) => e,
            Err(e) => return self.fail_simple(SqlError::new("42601", format!("cannot read EXECUTE: {e}"))).await,
        };
        let Some(stmt) = self.sql_prepared.as_ref().and_then(|s| s.statements.get(&execute.name)) else {
            let hint = if self.prepared.contains_key(&execute.name) {
                "this name was prepared through the protocol (Parse); shardgate runs those with Bind and Execute only"
            } else {
                "prepare it with PREPARE first, in this session"
            };
            return self.fail_simple(super::prepared::unknown_statement(&execute.name).hint(hint)).await;
        };
        if execute.args.len() != stmt.text.params {
            let e = SqlError::new(
                "42601",
                format!("wrong number of parameters for prepared statement \"{}\"", execute.name),
            )
            .hint(format!("expected {} parameters but got {}", stmt.text.params, execute.args.len()));
            return self.fail_simple(e).await;
        }
        let (server_name, types, body) = (stmt.server_name.clone(), stmt.text.types.clone(), stmt.text.body.clone());
        let routed_text = match prepare_text::substitute(&body, &execute.args) {
            Ok(t) => t,
            Err(e) => return self.fail_simple(SqlError::new("42601", format!("cannot read EXECUTE: {e}"))).await,
        };
        let analysis = match self.ctx.cache.get(&routed_text) {
            Ok(a) => a,
            Err(e) => return self.fail_simple(SqlError::new("42601", format!("cannot read EXECUTE: {e}"))).await,
        };
        if let Some(e) = self.lease_check(&analysis).await {
            return self.fail_simple(e).await;
        }
        let target = match self.route_simple(&analysis).await {
            Ok(t) => t,
            Err(e) => return self.fail_simple(e).await,
        };
        crate::metrics::global().query(super::admission::route_kind(&target));
        let shard = match target {
            Target::Shard(s) => s,
            Target::Any => self.any_shard(),
            _ => {
                let e = SqlError::new(
                    "0A000",
                    format!("EXECUTE {} would run on several shards; shardgate runs a SQL prepared statement on one shard", execute.name),
                )
                .hint(format!(
                    "give the tenant key as a constant argument ({} = …), or send the statement itself (or prepare it through your driver) to read or write several shards",
                    self.ctx.directory.load().key_column
                ));
                return self.fail_simple(e).await;
            }
        };
        self.forward_execute(shard, &server_name, &types, &body, &execute.args, &analysis).await
    }

    /// Runs `EXECUTE <server name>(args)` on `shard`, preceded by the PREPARE
    /// where this connection has not got the statement yet.
    async fn forward_execute(
        &mut self,
        shard: shardgate_directory::ShardId,
        server_name: &str,
        types: &str,
        body: &str,
        args: &[String],
        analysis: &crate::sql::Analysis,
    ) -> Result<(), SessionError> {
        let swallow = match self.checkout(shard).await {
            Ok(n) => n,
            Err(e) => return self.fail_simple(e).await,
        };
        let Some(b) = self.txn.held.as_mut() else {
            return Ok(());
        };
        let execute = if args.is_empty() {
            format!("EXECUTE {server_name}")
        } else {
            format!("EXECUTE {server_name}({})", args.join(", "))
        };
        let query = if b.conn.prepared.contains(server_name) {
            execute
        } else {
            // In one query string: when the PREPARE fails the EXECUTE does not
            // run, and the client sees only the PREPARE's error.
            self.sql_prepared.get_or_insert_with(Default::default).in_flight = Some((server_name.to_string(), false));
            format!("PREPARE {server_name} {types} AS {body}; {execute}")
        };
        b.conn.conn.queue(&messages::query(&query));
        let started = crate::clock::Stamp::now();
        if let Err(e) = b.conn.conn.flush().await {
            return self.lost_backend(e).await;
        }
        let relayed = self.relay_simple(swallow).await;
        if let Some(state) = self.sql_prepared.as_mut() {
            state.in_flight = None;
        }
        self.finish_forward(relayed, started, Some(analysis)).await
    }
}

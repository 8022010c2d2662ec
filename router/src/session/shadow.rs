//! The session's side of shadow reads: a read of rows under a move in its shadow
//! phase is relayed from the source as usual, digested on the way, and then
//! compared on the target (see [`crate::shadow`]).

use bytes::Bytes;
use shardgate_directory::{ShardId, TenantKey};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Session, SessionError};
use crate::protocol::messages::{self, Bind};
use crate::protocol::Message;
use crate::route::{self, Params};
use crate::shadow::{RowDigest, ShadowMove, ShadowQuery, ShadowRead};
use crate::sql::{Analysis, StatementKind};

/// An extended-protocol batch whose read is compared once it has been relayed.
pub(super) struct ShadowedBatch {
    pub(super) mv: ShadowMove,
    pub(super) keys: Vec<TenantKey>,
    pub(super) query: ShadowQuery,
    pub(super) permit: tokio::sync::OwnedSemaphorePermit,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// The move in its shadow phase whose moving rows hold every key of this
    /// read, and those keys, when the read is one to compare: a single SELECT
    /// outside a transaction (see [`crate::shadow`]). One emptiness check when no
    /// move is shadowed.
    pub(super) fn shadow_candidate(
        &self,
        analysis: &Analysis,
        shard: ShardId,
        params: Option<&Params<'_>>,
    ) -> Option<(ShadowMove, Vec<TenantKey>)> {
        if self.ctx.shadow.is_idle()
            || self.txn.held.is_some()
            || self.txn.pending_begin.is_some()
            || self.txn.open_batch
            || analysis.statements.len() != 1
        {
            return None;
        }
        let stmt = &analysis.statements[0];
        if !matches!(stmt.kind, StatementKind::Select) {
            return None;
        }
        let dir = self.ctx.directory.load();
        let comment_key = analysis.comment_key.as_ref().and_then(|v| dir.key_type.parse_text(v).ok());
        let fallback = comment_key.as_ref().or(self.tenant.as_ref());
        let keys = route::statement_keys(stmt, params, fallback, dir.key_type)?;
        let mv = self.ctx.shadow.covering(&dir, shard, &keys)?;
        Some((mv, keys))
    }

    /// A batch that is one read of shadowed rows (Parse, Bind, Describe, Execute,
    /// Sync), with the messages that run it once more on an unnamed statement.
    pub(super) fn shadow_extended(&self, batch: &[Message], shard: ShardId) -> Option<ShadowedBatch> {
        if self.ctx.shadow.is_idle() {
            return None;
        }
        let mut binds = batch.iter().filter(|m| m.tag() == b'B');
        let mut executes = batch.iter().filter(|m| m.tag() == b'E');
        let (bind, execute) = (binds.next()?, executes.next()?);
        if binds.next().is_some() || executes.next().is_some() {
            return None;
        }
        // An Execute with a row limit answers part of the rows: not comparable.
        if execute.body().len() < 4 || execute.body()[execute.body().len() - 4..] != [0, 0, 0, 0] {
            return None;
        }
        let bind = Bind::parse(bind).ok()?;
        let p = self.prepared.get(bind.statement)?;
        let analysis = p.analysis.as_ref()?;
        let params = Params { values: &bind.params, formats: &bind.param_formats, types: &p.param_types };
        let (mv, keys) = self.shadow_candidate(analysis, shard, Some(&params))?;
        let permit = self.ctx.shadow.permit(mv.id)?;
        let mut exec = messages::Builder::new(b'E');
        exec.cstr(bind.portal).i32(0);
        let messages =
            vec![messages::parse("", &p.sql, &p.param_types), bind.with_statement(""), exec.finish(), messages::sync()];
        Some(ShadowedBatch { mv, keys, query: ShadowQuery::Extended { sql: p.sql.to_string(), messages }, permit })
    }

    /// Forwards a read to its shard like [`Self::forward_simple`], digesting the
    /// rows on the way, then has the read compared on the move's other shard.
    pub(super) async fn forward_shadowed(
        &mut self,
        shard: ShardId,
        query: Bytes,
        analysis: &Analysis,
        (mv, keys): (ShadowMove, Vec<TenantKey>),
        sql: String,
    ) -> Result<(), SessionError> {
        let Some(permit) = self.ctx.shadow.permit(mv.id) else {
            return self.forward_simple(shard, query, Some(analysis)).await;
        };
        self.shadow_digest = Some(RowDigest::default());
        let r = self.forward_simple(shard, query, Some(analysis)).await;
        self.shadow_done(mv, keys, ShadowQuery::Simple(sql), permit);
        r
    }

    /// After a shadowed read was relayed: compare it, unless it failed.
    pub(super) fn shadow_done(
        &mut self,
        mv: ShadowMove,
        keys: Vec<TenantKey>,
        query: ShadowQuery,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let Some(source) = self.shadow_digest.take() else { return };
        if self.saw_error || self.txn.held.is_some() {
            return;
        }
        let read = ShadowRead { mv, keys, query, settings: Some(self.settings.sql()), source };
        crate::shadow::spawn_compare(self.ctx.clone(), read, permit);
    }
}

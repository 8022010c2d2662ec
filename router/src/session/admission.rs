//! Before a statement goes out: the directory lease, the table catalog, routing
//! every statement to one target, and the cutover holds its buckets must pass;
//! after it came back, what it cost, counted for its buckets and tenant.

use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use super::Session;
use crate::error::SqlError;
use crate::protocol::messages::{self, Bind, Severity};
use crate::protocol::Message;
use crate::route::{self, Params, Target};
use crate::sql::{Analysis, StatementKind};

pub(super) fn route_kind(t: &Target) -> crate::metrics::RouteKind {
    use crate::metrics::RouteKind as K;
    match t {
        Target::Shard(_) => K::Shard,
        Target::Any => K::Any,
        Target::All => K::All,
        Target::Fanout(_) => K::Fanout,
        Target::SplitInsert(_) | Target::CopySplit => K::Split,
    }
}

/// What routing and the cutover holds know of the statements in flight.
pub(super) struct Admission {
    /// Buckets the statements being routed touch (filled by routing).
    pub(super) touched: Vec<u32>,
    /// The directory epoch the statements being routed were routed by (0: not
    /// routed yet; u64::MAX: by several), checked once they are in flight.
    pub(super) routed_epoch: AtomicU64,
    /// Buckets this session's statement or transaction has in flight.
    pub(super) flight: crate::hold::Flight,
}

impl Admission {
    pub(super) fn new(in_flight: Arc<crate::hold::InFlight>) -> Admission {
        Admission { touched: Vec::new(), routed_epoch: AtomicU64::new(0), flight: crate::hold::Flight::new(in_flight) }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// With the directory out of reach past the lease, a write waits up to
    /// `lease_wait` for contact to come back (a leader election takes about a
    /// second) and is refused if it does not (the bucket may have moved); reads go
    /// on from the last known placement, with a NOTICE saying so.
    pub(super) async fn lease_check(&mut self, analysis: &Analysis) -> Option<SqlError> {
        if let Some((node, _)) = &self.ctx.replica {
            if node.applied() == 0 {
                // A replica that joined but has not received the directory yet
                // knows no placement at all: nothing may be routed.
                return Some(
                    SqlError::new("57P03", "directory not loaded yet: this router's replica is still joining".into())
                        .hint("try again in a moment; `shardgate status` shows the replica's progress"),
                );
            }
        }
        let why = self.ctx.lease_expired()?;
        let writes = analysis.statements.iter().any(|s| {
            !matches!(
                s.kind,
                StatementKind::Select
                    | StatementKind::Txn(_)
                    | StatementKind::Session
                    | StatementKind::SetVar(_)
                    | StatementKind::SetTenant(_)
            ) && !matches!(&s.kind, StatementKind::Copy(c) if !c.from_stdin)
        });
        if writes {
            let why = self.wait_for_lease().await?;
            let why = format!("{why}; this write waited {:?} for it", self.ctx.config.load().lease_wait);
            return Some(
                SqlError::new("57P03", why)
                    .hint("writes resume by themselves when the directory is reachable again; check `shardgate status` and the network between the nodes"),
            );
        }
        self.client.queue(&messages::error_response(
            Severity::Notice,
            "01000",
            &format!("{why}; this read uses the last known placement"),
            None,
        ));
        None
    }

    /// Waits up to `lease_wait` for this router's replica to hear from the
    /// directory quorum again; None once it has, or why writes are still refused.
    pub(super) async fn wait_for_lease(&self) -> Option<String> {
        let (node, lease) = self.ctx.replica.as_ref()?;
        let lease = *lease;
        let wait = self.ctx.config.load().lease_wait;
        if !wait.is_zero() {
            let metrics = crate::metrics::global();
            metrics.lease_wait_started();
            let started = std::time::Instant::now();
            let mut status = node.watch_status();
            let _ = crate::timer::timeout(wait, async move {
                loop {
                    if status.borrow_and_update().within_lease(lease) {
                        return;
                    }
                    if status.changed().await.is_err() {
                        // The replica stopped: contact cannot come back.
                        std::future::pending::<()>().await;
                    }
                }
            })
            .await;
            metrics.lease_wait(started.elapsed());
        }
        self.ctx.lease_expired()
    }

    /// Reloads the table catalog when a statement names a table it has not seen
    /// (created by another router, or straight on the shards).
    pub(super) async fn ensure_catalog(&self, analysis: &Analysis) {
        for s in &analysis.statements {
            // A session's temporary tables are not in the catalog, nor are
            // those it is creating.
            let creates =
                matches!(s.kind, StatementKind::SessionState(_)) && s.tables.iter().all(|t| s.written.contains(t));
            if creates || self.pooling.as_ref().is_some_and(|p| p.all_temp(&s.tables)) {
                continue;
            }
            self.ctx.learn_tables(&s.tables).await;
        }
    }

    /// Remembers the tables a transaction block's DDL creates with the key
    /// column (or may), for [`route::check_fresh_tables`] to refuse their
    /// use until the block commits.
    pub(super) fn note_fresh_tables(&mut self, analysis: &Analysis) {
        // A migration's block is open on every shard (`multi`).
        if !self.txn.in_block() && self.multi.is_none() {
            self.txn.fresh_tables.clear();
            return;
        }
        // Kept for the session: SET LOCAL, a SET inside a block and
        // set_config are not among the settings it carries.
        self.search_path_set |= analysis.statements.iter().any(|s| s.sets_search_path);
        for s in &analysis.statements {
            if let Some(t) = &s.creates_sharded {
                self.txn.fresh_tables.push(t.clone());
            }
        }
    }

    /// The tables [`Self::note_fresh_tables`] noted, while their block lasts.
    pub(super) fn fresh_tables(&self) -> &[String] {
        if self.txn.in_block() || self.multi.is_some() {
            &self.txn.fresh_tables
        } else {
            &[]
        }
    }

    /// Routes every statement of a query string (or a batch) to one target.
    /// Where the statements of `analysis` run; the buckets they touch are added
    /// to `touched`.
    pub(super) fn route_all(
        &self,
        analysis: &Analysis,
        params: Option<&Params<'_>>,
        touched: &mut Vec<u32>,
    ) -> Result<Target, SqlError> {
        let dir = self.ctx.directory.load();
        let epoch = dir.epoch;
        let _ = self.admission.routed_epoch.fetch_update(AtomicOrdering::Relaxed, AtomicOrdering::Relaxed, |e| {
            Some(if e == 0 || e == epoch { epoch } else { u64::MAX })
        });
        let comment_key = match &analysis.comment_key {
            Some(v) => Some(dir.key_type.parse_text(v).map_err(|e| SqlError::new("22P02", e.to_string()))?),
            None => None,
        };
        let fallback = comment_key.as_ref().or(self.tenant.as_ref());
        let joining = route::Joining {
            bound: self.txn.held.as_ref().map(|b| b.shard),
            in_block: self.txn.in_block(),
            cross_shard: self.ctx.two_phase(),
        };
        let fresh = self.fresh_tables();
        route::check_fresh_tables(&analysis.statements, fresh)?;
        let rules = self.rules();
        let target = route::route_statements(
            &analysis.statements,
            params,
            fallback,
            &dir,
            &self.ctx.catalog,
            &rules,
            joining,
            touched,
        )?;
        match &self.pooling {
            None => Ok(target),
            Some(p) => p.place(analysis, target, &dir),
        }
    }

    /// The routing rules for this session's statements: the configured ones,
    /// with what the session itself changes.
    pub(super) fn rules(&self) -> route::Rules {
        let mut rules = self.ctx.rules();
        rules.session_state = self.pooling.is_some();
        // Read only where it matters: a lookup in the settings per statement
        // otherwise.
        rules.search_path_set = self.search_path_set
            || (self.ctx.catalog.marked(crate::context::Marks::AMBIGUOUS) && self.settings.has("search_path"));
        rules
    }

    /// Refuses `currval()` or `lastval()` in the first statement the client's
    /// transaction runs on its server connection ([`route::last_value_refusal`]);
    /// `earlier`: statements before it in the same pipeline run there first.
    /// Session pooling keeps the client's connection, and its values.
    pub(super) fn check_last_value(&self, analysis: &Analysis, earlier: bool) -> Result<(), SqlError> {
        let first = analysis.statements.first().is_some_and(|s| s.reads_last_value);
        if first && !earlier && self.txn.held.is_none() && self.pooling.is_none() {
            return Err(route::last_value_refusal());
        }
        Ok(())
    }

    /// Where a simple query's statements run: the catalog made to know their
    /// tables, then routed, and routed again after waiting out a cutover's hold
    /// (the placement may have changed).
    pub(super) async fn route_simple(&mut self, analysis: &Analysis) -> Result<Target, SqlError> {
        self.check_last_value(analysis, false)?;
        self.ensure_catalog(analysis).await;
        loop {
            let mut touched = std::mem::take(&mut self.admission.touched);
            touched.clear();
            let routed = self.route_all(analysis, None, &mut touched);
            self.admission.touched = touched;
            let target = routed?;
            self.note_fresh_tables(analysis);
            if self.pass_holds().await {
                return Ok(target);
            }
        }
    }

    /// Registers the buckets just routed as in flight, unless a cutover holds one
    /// this transaction had not touched yet: then waits for the hold to end and
    /// returns false (route again, the placement may have changed).
    pub(super) async fn pass_holds(&mut self) -> bool {
        let routed_epoch = self.admission.routed_epoch.swap(0, AtomicOrdering::Relaxed);
        let n = self.admission.flight.enter(&self.admission.touched);
        if n == 0 {
            return true;
        }
        let dir = self.ctx.directory.load();
        if routed_epoch != 0 && routed_epoch != dir.epoch {
            // The directory changed between routing and now: a whole cutover
            // may have passed (hold, acknowledgements, flip) while the rows were
            // not yet in flight, so the route may name the old shard. Route again;
            // from here on, a hold waits for these rows.
            self.admission.flight.undo_last(n);
            tracing::debug!(routed_epoch, epoch = dir.epoch, "the directory changed while routing: routing again");
            return false;
        }
        let Some(move_id) = crate::hold::held_bucket(&dir, self.admission.flight.newest(n)) else {
            return true;
        };
        self.admission.flight.undo_last(n);
        let token = dir.holds.get(&move_id).map_or(0, |h| h.token);
        drop(dir);
        let waited = crate::hold::wait_released(&self.ctx.directory, move_id).await;
        crate::metrics::global().held(waited);
        self.ctx.held.record(move_id, token, waited);
        tracing::debug!(move_id, waited_us = waited.as_micros() as u64, "statement held for a cutover");
        false
    }

    /// Counts what the statements just relayed cost, for their buckets and (one
    /// in a few) their tenant. `batch` holds the extended-protocol messages, for
    /// the Bind's parameters.
    pub(super) fn account(
        &mut self,
        elapsed: std::time::Duration,
        analysis: Option<&Analysis>,
        batch: Option<&[Message]>,
    ) {
        let rows = std::mem::take(&mut self.rows_written);
        if self.admission.touched.is_empty() {
            return;
        }
        self.ctx.load.record(&self.admission.touched, elapsed, rows);
        let Some(stmt) = analysis.and_then(|a| a.statements.first()) else { return };
        if !self.ctx.load.sample_tenant() {
            return;
        }
        let key_type = self.ctx.directory.load().key_type;
        let keys = match batch.and_then(|b| b.iter().find(|m| m.tag() == b'B')) {
            None => route::statement_keys(stmt, None, self.tenant.as_ref(), key_type),
            Some(m) => {
                let Ok(bind) = Bind::parse(m) else { return };
                let Some(p) = self.prepared.get(bind.statement) else { return };
                let params = Params { values: &bind.params, formats: &bind.param_formats, types: &p.param_types };
                route::statement_keys(stmt, Some(&params), self.tenant.as_ref(), key_type)
            }
        };
        if let Some([k]) = keys.as_deref() {
            self.ctx.load.record_tenant(k.to_string(), elapsed, rows);
        }
    }
}

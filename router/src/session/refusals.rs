//! Where Postgres would fail a pipeline's message that the router must fail
//! itself: the first such message of a batch (the ones before it run, as in
//! Postgres), and what a transaction block failed in the router answers
//! message by message.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use super::prepared::{unknown_portal, unknown_statement};
use super::{Session, SessionError};
use crate::error::SqlError;
use crate::protocol::messages::{self, target_and_name, Bind, Parse};
use crate::protocol::Message;
use crate::route::{Params, Target};
use crate::sql::Analysis;

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// What Postgres answers in a failed transaction before its general
    /// refusal (25P02): a Close is answered, a Bind or Describe of a
    /// statement not defined is 26000, an Execute or Describe of a portal
    /// where the transaction has none (it never reached a shard) is 34000.
    /// None: the batch goes on to the general path.
    pub(super) async fn in_failed_transaction(
        &mut self,
        batch: &mut Vec<Message>,
        sync: bool,
    ) -> Option<Result<(), SessionError>> {
        if sync && batch.len() == 1 {
            // A lone Sync: the failed block stays failed, nothing refused.
            return Some(self.ready().await);
        }
        let closes = batch.iter().take_while(|m| m.tag() == b'C').count();
        if closes > 0 {
            for m in batch.drain(..closes) {
                if let Ok((b'S', name)) = target_and_name(&m) {
                    self.prepared.remove(name);
                }
                self.client.queue(&messages::close_complete());
            }
            if batch.is_empty() {
                return Some(self.client.flush().await.map_err(Into::into));
            }
            if batch.len() == 1 && sync {
                return Some(self.ready().await);
            }
            // The rest is read again, from its first message.
            if !sync {
                batch.push(Message::from_raw(messages::simple(b'H')));
            }
            self.pushback.extend(batch.drain(..));
            return Some(self.client.flush().await.map_err(Into::into));
        }
        let first = batch.first()?;
        let e = match (first.tag(), target_and_name(first)) {
            (b'B', _) => {
                let bind = Bind::parse(first).ok()?;
                match self.prepared.get(bind.statement) {
                    None => Some(unknown_statement(bind.statement)),
                    Some(p) => {
                        // The parameters are counted before the transaction's
                        // state is looked at: those declared, or as many as
                        // the text's highest `$n`.
                        let uses = crate::sql::prepare_text::max_param(&p.sql).ok()?.max(p.param_types.len());
                        (bind.params.len() != uses).then(|| {
                            SqlError::new(
                                "08P01",
                                format!(
                                    "bind message supplies {} parameters, but prepared statement \"{}\" requires {uses}",
                                    bind.params.len(),
                                    bind.statement
                                ),
                            )
                        })
                    }
                }
            }
            (b'D', Ok((b'S', name))) => (!self.prepared.contains_key(name)).then(|| unknown_statement(name)),
            (b'D', Ok((_, portal))) if self.txn.held.is_none() => Some(unknown_portal(portal)),
            (b'E', _) if self.txn.held.is_none() => {
                let portal = first.body().split(|&b| b == 0).next().unwrap_or_default();
                Some(unknown_portal(&String::from_utf8_lossy(portal)))
            }
            _ => None,
        };
        Some(self.fail_batch(e?, sync).await)
    }

    /// The first message of a batch that fails, and why, where the router
    /// fails it on its own: a Bind, or a Describe of a statement, naming a
    /// statement not defined at its place, a Parse of a statement name in use
    /// (42P05), a Bind the router cannot route. Postgres runs what comes
    /// before it, and so must the router. Looked up
    /// with the client's names, before [`Self::separate_redefinitions`].
    /// `routes` gets the route of each Bind before the refusal whose
    /// statement parses (in their order), and `touched` the buckets they touch.
    pub(super) fn first_refused(
        &mut self,
        batch: &[Message],
        failed: bool,
        routes: &mut Vec<Result<Target, SqlError>>,
        touched: &mut Vec<u32>,
    ) -> Option<(usize, SqlError)> {
        // What the batch's earlier messages did to a name: its definition
        // (the analysis and parameter types), or None once closed.
        type Definition = Option<(Option<Arc<Analysis>>, Vec<i32>)>;
        let mut changes: smallvec::SmallVec<[(&str, Definition); 4]> = smallvec::SmallVec::new();
        for (i, m) in batch.iter().enumerate() {
            let in_force = |changes: &[(&str, Definition)], name: &str| -> Definition {
                match changes.iter().rev().find(|(n, _)| *n == name) {
                    Some((_, d)) => d.clone(),
                    None => self.prepared.get(name).map(|p| (p.analysis.clone(), p.param_types.clone())),
                }
            };
            match m.tag() {
                b'P' => {
                    let Ok(p) = Parse::parse(m) else { continue };
                    // In a failed transaction the Parse is refused first (25P02).
                    if !failed && !p.name.is_empty() && in_force(&changes, p.name).is_some() {
                        let e = SqlError::new("42P05", format!("prepared statement \"{}\" already exists", p.name));
                        return Some((i, e));
                    }
                    // Parsed again with the text it has (most drivers' unnamed
                    // statement): the same analysis.
                    let unchanged = !changes.iter().any(|(n, _)| *n == p.name);
                    let analysis = match self.prepared.get(p.name) {
                        Some(old)
                            if unchanged
                                && old.generation == self.ctx.catalog.generation()
                                && *old.sql == *p.query
                                && old.param_types == p.param_types =>
                        {
                            old.analysis.clone()
                        }
                        _ => self.ctx.cache.get(p.query).ok(),
                    };
                    changes.push((p.name, Some((analysis, p.param_types.clone()))));
                }
                b'B' => {
                    let bind = match Bind::parse(m) {
                        Ok(b) => b,
                        Err(e) => return Some((i, SqlError::new("08P01", e.to_string()))),
                    };
                    let Some((analysis, types)) = in_force(&changes, bind.statement) else {
                        return Some((i, unknown_statement(bind.statement)));
                    };
                    if let Some(a) = analysis {
                        if let Err(e) = self.check_last_value(&a, !routes.is_empty()) {
                            return Some((i, e));
                        }
                        let params = Params { values: &bind.params, formats: &bind.param_formats, types: &types };
                        match self.route_all(&a, Some(&params), touched) {
                            // What Postgres says of the Bind itself: the
                            // parameters missing or not of the key's type.
                            // (The router's own refusals of a statement
                            // still refuse the whole batch.)
                            Err(e) if matches!(e.code, "08P01" | "22P02" | "22P03" | "22003") => return Some((i, e)),
                            route => routes.push(route),
                        }
                    }
                }
                b'D' | b'C' => {
                    if let Ok((b'S', name)) = target_and_name(m) {
                        if m.tag() == b'C' {
                            changes.push((name, None));
                        } else if in_force(&changes, name).is_none() {
                            return Some((i, unknown_statement(name)));
                        }
                    }
                }
                _ => {}
            }
        }
        None
    }
}

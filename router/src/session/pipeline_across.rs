//! A pipeline (up to its Sync) whose statements are for tenants on several
//! shards: cut into segments, each run on its shard in turn inside one
//! transaction that spans them ([`super::twophase`]), committed at the Sync
//! with two-phase commit when the pipeline is its own implicit transaction.

use shardgate_directory::ShardId;
use tokio::io::{AsyncRead, AsyncWrite};

use super::prepared::unknown_statement;
use super::relay::RelayError;
use super::split::SplitRun;
use super::{Session, SessionError};
use crate::error::SqlError;
use crate::protocol::messages::{self, Bind, Severity};
use crate::protocol::Message;
use crate::route::{Params, Target};
use crate::sql::{Analysis, StatementKind, TxnControl};

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// A pipeline (up to its Sync) whose statements are for tenants on
    /// different shards: each run of statements for one shard goes to that
    /// shard in turn, as part of one transaction. Outside a transaction block
    /// the pipeline is one implicit transaction, as in Postgres: it commits
    /// on every shard at the Sync (two-phase commit), or, after an error,
    /// nowhere. Inside one (or after its own BEGIN) the block goes on.
    pub(super) async fn run_pipeline_across(
        &mut self,
        batch: &[Message],
        statements: &[std::sync::Arc<Analysis>],
    ) -> Result<(), SessionError> {
        let plain = |k: &StatementKind| {
            matches!(k, StatementKind::Select | StatementKind::Insert | StatementKind::Update | StatementKind::Delete)
        };
        let begins = statements.first().is_some_and(
            |a| matches!(&a.statements[..], [s] if matches!(s.kind, StatementKind::Txn(TxnControl::Begin))),
        );
        let all_plain = statements
            .iter()
            .enumerate()
            .all(|(i, a)| a.statements.iter().all(|s| plain(&s.kind) || (i == 0 && begins)));
        if !all_plain || self.txn.open_batch || self.multi.is_some() {
            let e = SqlError::new(
                "0A000",
                "a pipeline whose statements are for several shards takes SELECT, INSERT, UPDATE and DELETE (after an optional BEGIN)".into(),
            )
            .hint("send transaction control and other statements in pipelines of their own");
            self.statements_as_at(0, batch);
            return self.fail_batch(e, true).await;
        }
        let segments = loop {
            let segments = match self.segments(batch) {
                Ok(s) => s,
                Err(e) => {
                    self.statements_as_at(0, batch);
                    return self.fail_batch(e, true).await;
                }
            };
            // Held by a cutover, and released: the placement may have
            // changed, route again. (Not the whole batch again: its
            // statements are learnt, some under the batch's aliases.)
            if self.pass_holds().await {
                break segments;
            }
        };
        let implicit = !self.txn.in_block() && !begins;
        if implicit {
            self.txn.pending_begin = Some(vec!["BEGIN".into()]);
        }
        let mut failed = false;
        // The message that failed: the statements parsed or closed after it
        // were not (the rest of the pipeline is skipped).
        let mut failed_at = None;
        for segment in segments {
            let (shard, range) = match segment {
                Segment::Relay(shard, range) => (shard, range),
                Segment::Split { range, bind, analysis, parts } => {
                    let stmt = &analysis.statements[0];
                    let execute = range.end - 1;
                    match self.run_split_in_pipeline(&batch[range], &batch[bind], stmt, &parts).await? {
                        SplitRun::Ran => continue,
                        SplitRun::Failed => {
                            (failed, failed_at) = (true, Some(execute));
                            break;
                        }
                        SplitRun::Answered => return Ok(()),
                    }
                }
            };
            let mut part: Vec<Message> = batch[range.clone()].to_vec();
            // The router's own Sync ends each part on its shard; inside the
            // block it commits nothing.
            part.push(Message::from_raw(messages::sync()));
            let swallow = match self.checkout(shard).await {
                Ok(n) => n,
                Err(e) => {
                    crate::metrics::global().error(e.code);
                    self.client.queue(&e.to_message(Severity::Error));
                    (failed, failed_at) = (true, Some(range.start));
                    break;
                }
            };
            let expects = self.rewrite_batch(&part, swallow);
            let Some(b) = self.txn.held.as_mut() else { break };
            if let Err(e) = b.conn.conn.flush().await {
                return self.lost_backend(e).await;
            }
            let relayed = self.relay_batch(expects, None).await;
            let at = range.start + self.batch_failed_at.take().unwrap_or(range.len());
            match relayed {
                Ok(Some(status)) => {
                    self.txn.last_status = status;
                    if self.saw_error || status != b'T' {
                        (failed, failed_at) = (true, Some(at));
                        break;
                    }
                }
                Ok(None) => {
                    (failed, failed_at) = (true, Some(at));
                    break;
                }
                Err(RelayError::Client(e)) => return Err(e),
                Err(RelayError::Backend(e)) => return self.lost_backend(e).await,
            }
        }
        if let Some(at) = failed_at {
            self.statements_as_at(at, batch);
        }
        if implicit {
            self.txn.pending_begin = None;
            let ended = self.end_cross_shard(!failed).await?;
            if let Err(e) = &ended {
                crate::metrics::global().error(e.code);
                self.client.queue(&e.to_message(Severity::Error));
            }
            self.client.queue(&messages::ready_for_query_bytes(self.status()));
            self.client.flush().await?;
            return Ok(());
        }
        if failed && self.txn.last_status != b'E' {
            // Refused in the router: the block is failed, as after an error.
            self.txn.aborted = self.txn.in_block();
        }
        let status = if self.txn.aborted || self.txn.last_status == b'E' { b'E' } else { self.status() };
        self.client.queue(&messages::ready_for_query_bytes(status));
        self.client.flush().await?;
        Ok(())
    }

    /// Where each part of a pipeline runs: runs of messages whose Binds are
    /// for one shard, and each execution of a multi-row INSERT whose rows are
    /// for several shards on its own; the client's Sync left out.
    fn segments(&mut self, batch: &[Message]) -> Result<Vec<Segment>, SqlError> {
        let mut touched = std::mem::take(&mut self.admission.touched);
        touched.clear();
        let result = (|| {
            let mut out = Vec::new();
            let (mut start, mut current) = (0, None);
            let mut skip_to = 0;
            for (i, m) in batch.iter().enumerate() {
                if m.tag() != b'B' || i < skip_to {
                    continue;
                }
                let bind = Bind::parse(m).map_err(|e| SqlError::new("08P01", e.to_string()))?;
                let p = self.prepared.get(bind.statement).ok_or_else(|| unknown_statement(bind.statement))?;
                let target = match &p.analysis {
                    None => Target::Any,
                    Some(a) => {
                        let params =
                            Params { values: &bind.params, formats: &bind.param_formats, types: &p.param_types };
                        self.route_all(a, Some(&params), &mut touched)?
                    }
                };
                let shard = match target {
                    Target::Shard(s) => s,
                    Target::Any => continue,
                    Target::SplitInsert(parts)
                        if !parts.is_empty() && p.analysis.as_ref().is_some_and(|a| a.statements.len() == 1) =>
                    {
                        // The Bind up to its Execute, answered by the split;
                        // what came before runs where it was going (or on the
                        // split's first shard). The split runs the rows, so a
                        // Bind that is not executed is refused, not run.
                        let analysis = p.analysis.clone().expect("checked above");
                        let next = batch[i + 1..].iter().position(|m| matches!(m.tag(), b'E' | b'B' | b'S'));
                        let end = match next.map(|at| (i + 1 + at, batch[i + 1 + at].tag())) {
                            Some((at, b'E')) => at + 1,
                            _ => {
                                return Err(SqlError::new(
                                    "0A000",
                                    "a multi-row INSERT whose rows are for several shards, bound and not executed".into(),
                                )
                                .hint("execute each Bind of it before the next Bind or Sync"))
                            }
                        };
                        if start < i {
                            let shard = current.unwrap_or(parts[0].0);
                            out.push(Segment::Relay(shard, start..i));
                        }
                        out.push(Segment::Split { range: i..end, bind: i, analysis, parts });
                        (start, current, skip_to) = (end, None, end);
                        continue;
                    }
                    _ => {
                        return Err(SqlError::new(
                            "0A000",
                            "a pipeline whose statements are for several shards cannot include a statement that needs several shards itself".into(),
                        )
                        .hint("name one tenant in each statement of the pipeline"))
                    }
                };
                match current {
                    None => current = Some(shard),
                    Some(c) if c == shard => {}
                    Some(c) => {
                        out.push(Segment::Relay(c, start..i));
                        (start, current) = (i, Some(shard));
                    }
                }
            }
            let end = batch.len() - usize::from(batch.last().is_some_and(|m| m.tag() == b'S'));
            if start < end || out.is_empty() {
                out.push(Segment::Relay(current.unwrap_or_else(|| self.any_shard()), start..end));
            }
            Ok(out)
        })();
        self.admission.touched = touched;
        result
    }
}

/// One part of a pipeline across shards.
enum Segment {
    /// Messages relayed to one shard.
    Relay(ShardId, std::ops::Range<usize>),
    /// One execution of a multi-row INSERT whose rows are for several shards
    /// (the messages from its Bind to its Execute): each shard's rows run on
    /// that shard, and the router answers for the lot.
    Split {
        range: std::ops::Range<usize>,
        bind: usize,
        analysis: std::sync::Arc<Analysis>,
        parts: Vec<(ShardId, Vec<usize>)>,
    },
}

//! Cross-shard reads that stream: every shard's rows through bounded queues,
//! relayed shard after shard or merged in ORDER BY order, then OFFSET and
//! LIMIT, in the simple or the extended protocol.

use bytes::Bytes;
use shardgate_directory::ShardId;
use tokio::io::{AsyncRead, AsyncWrite};

use super::fanout::Answer;
use super::reply::prefix_error;
use super::{Session, SessionError};
use crate::error::SqlError;
use crate::protocol::messages::{self, target_and_name, Parse, Severity};
use crate::protocol::Message;

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// A cross-shard read without grouping, streamed (see [`crate::fanout::ShardRows`]):
    /// rows relayed shard after shard, or merged in ORDER BY order; then OFFSET
    /// and LIMIT. Every shard's connection is taken first, so a shard that is down
    /// fails the read before a row is sent; an error after rows were sent ends the
    /// answer with it, as Postgres does for an error in the middle of a scan.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn stream_fanout(
        &mut self,
        answer: Answer<'_>,
        shards: &[ShardId],
        sql: &str,
        texts: Vec<Option<String>>,
        read: impl Fn(&str) -> Vec<u8>,
        order: &[crate::fanout::SortKey],
        limit: Option<u64>,
        offset: u64,
    ) -> Result<(), SessionError> {
        let dir = self.ctx.directory.load();
        let mut readers = Vec::with_capacity(shards.len());
        let mut streams = Vec::with_capacity(shards.len());
        for (&s, text) in shards.iter().zip(&texts) {
            let pool = match self.ctx.pool(s) {
                Some(p) => p,
                None => {
                    return self.fail_answer(&answer, SqlError::new("XX000", format!("no pool for shard {s}"))).await
                }
            };
            let mut conn = match pool.get().await {
                Ok(c) => c,
                Err(e) => return self.fail_answer(&answer, SqlError::new(e.sqlstate(), e.to_string())).await,
            };
            let mut run = Vec::new();
            let mut skip = 0;
            if let Some(p) = self.settings_prelude(&mut conn) {
                run.extend_from_slice(&messages::query(&p));
                skip = 1;
            }
            run.extend_from_slice(&read(text.as_deref().unwrap_or(sql)));
            let (tx, rx) = tokio::sync::mpsc::channel(crate::fanout::QUEUE);
            readers.push(crate::fanout::read_shard(conn, Bytes::from(run), skip, tx));
            let name = dir.shards.get(s).map(|x| x.name.clone()).unwrap_or_default();
            streams.push(crate::fanout::ShardRows::new(name, rx));
        }
        let relay = self.relay_streams(answer, streams, order, limit, offset);
        let (_, relayed) = tokio::join!(futures::future::join_all(readers), relay);
        relayed
    }

    /// Fails a cross-shard read before any of its rows went out.
    pub(super) async fn fail_answer(&mut self, answer: &Answer<'_>, e: SqlError) -> Result<(), SessionError> {
        match answer {
            Answer::Simple => self.fail_simple(e).await,
            Answer::Extended { .. } => self.fail_batch(e, true).await,
        }
    }

    /// The replies to a pipeline's messages other than Execute, for a
    /// cross-shard read described by `rd` (text) and `client_rd` (the Bind's
    /// formats).
    pub(super) fn reply_around_execute(
        &mut self,
        messages: &[Message],
        parameters: Option<&Bytes>,
        rd: &Bytes,
        client_rd: &Bytes,
    ) {
        for m in messages {
            match (m.tag(), target_and_name(m)) {
                (b'D', Ok((b'S', _))) => {
                    if let Some(t) = parameters {
                        self.client.queue(t);
                    }
                    self.client.queue(rd);
                }
                (b'D', _) => self.client.queue(client_rd),
                (b'C', Ok((b'S', name))) => {
                    self.prepared.remove(name);
                    self.client.queue(&messages::close_complete());
                }
                _ => self.reply_for_statement_message(m),
            }
        }
    }

    pub(super) async fn relay_streams(
        &mut self,
        answer: Answer<'_>,
        mut streams: Vec<crate::fanout::ShardRows>,
        order: &[crate::fanout::SortKey],
        limit: Option<u64>,
        offset: u64,
    ) -> Result<(), SessionError> {
        use crate::fanout::Event;
        // Every shard's RowDescription (or its error) before anything is sent.
        let mut description = None;
        for st in streams.iter_mut() {
            match st.next().await {
                Event::Described(rd) => {
                    description.get_or_insert(rd);
                }
                Event::ShardError(err) => {
                    if let Answer::Extended { batch, .. } = answer {
                        // As in Postgres: a statement whose Parse failed does not exist.
                        if !st.parsed {
                            for m in batch.iter().filter(|m| m.tag() == b'P') {
                                if let Ok(p) = Parse::parse(m) {
                                    self.prepared.remove(p.name);
                                }
                            }
                        }
                    }
                    self.client.queue(&prefix_error(&err, &st.shard));
                    return self.ready().await;
                }
                Event::Failed(e) => return self.fail_answer(&answer, e).await,
                Event::Row(_) | Event::Done => {
                    let e = SqlError::new("0A000", "a cross-shard statement must return rows".into());
                    return self.fail_answer(&answer, e).await;
                }
            }
        }
        let Some(description) = description else {
            return self.fail_answer(&answer, SqlError::new("XX000", "no shard to read from".into())).await;
        };
        let c_collation = self.ctx.c_collation.load(std::sync::atomic::Ordering::Relaxed);
        let keys = match crate::fanout::types_of(&description)
            .and_then(|types| crate::fanout::sort_keys(order, &types, c_collation))
        {
            Ok(k) => k,
            Err(e) => return self.fail_answer(&answer, SqlError::new(e.sqlstate(), e.to_string())).await,
        };
        // The rows as the client asks for them, and the replies before them.
        let formats = match &answer {
            Answer::Simple => None,
            Answer::Extended { formats, relayed, .. } => {
                let f = if *relayed {
                    crate::fanout::ClientFormats::as_sent(&description, formats)
                } else {
                    crate::fanout::ClientFormats::new(&description, formats)
                };
                match f {
                    Ok(f) => Some(f),
                    Err(e) => return self.fail_answer(&answer, SqlError::new(e.sqlstate(), e.to_string())).await,
                }
            }
        };
        let after_execute = match (&answer, &formats) {
            (Answer::Extended { batch, .. }, Some(f)) => {
                let at = batch.iter().position(|m| m.tag() == b'E').unwrap_or(batch.len());
                let parameters = streams.iter().find_map(|s| s.parameters.clone());
                self.reply_around_execute(&batch[..at], parameters.as_ref(), &description, &f.row_description);
                batch.get(at + 1..).unwrap_or_default()
            }
            _ => {
                self.client.queue(&description);
                &[]
            }
        };
        let client_row = |raw: Bytes| -> Result<Bytes, Bytes> {
            match &formats {
                None => Ok(raw),
                Some(f) => {
                    f.row(&raw).map_err(|e| SqlError::new(e.sqlstate(), e.to_string()).to_message(Severity::Error))
                }
            }
        };
        let (mut skipped, mut sent) = (0u64, 0u64);
        let mut failure: Option<Bytes> = None;
        if keys.is_empty() {
            'shards: for st in streams.iter_mut() {
                loop {
                    if limit.is_some_and(|l| sent >= l) {
                        break 'shards;
                    }
                    match st.next().await {
                        Event::Row(r) if skipped < offset => {
                            skipped += 1;
                            drop(r);
                        }
                        Event::Row(r) => {
                            match client_row(r) {
                                Ok(r) => self.client.queue(&r),
                                Err(e) => {
                                    failure = Some(e);
                                    break 'shards;
                                }
                            }
                            sent += 1;
                            if self.client.queued() > 256 * 1024 {
                                self.client.flush().await?;
                            }
                        }
                        Event::Described(_) => {}
                        Event::Done => break,
                        Event::ShardError(err) => {
                            failure = Some(prefix_error(&err, &st.shard));
                            break 'shards;
                        }
                        Event::Failed(e) => {
                            failure = Some(e.to_message(Severity::Error));
                            break 'shards;
                        }
                    }
                }
            }
        } else {
            let mut heads = crate::fanout::Heads::new(keys, streams.len());
            let mut last: Vec<Option<crate::fanout::Row>> = vec![None; streams.len()];
            let mut refill = (0..streams.len()).collect::<Vec<usize>>();
            loop {
                for i in refill.drain(..) {
                    let st = &mut streams[i];
                    match st.next().await {
                        Event::Row(r) => {
                            if let Err(e) = heads.put(i, r, last[i].as_ref()) {
                                failure = Some(e.to_message(Severity::Error));
                            }
                        }
                        Event::Described(_) | Event::Done => {}
                        Event::ShardError(err) => failure = Some(prefix_error(&err, &st.shard)),
                        Event::Failed(e) => failure = Some(e.to_message(Severity::Error)),
                    }
                }
                if failure.is_some() || limit.is_some_and(|l| sent >= l) {
                    break;
                }
                let Some(i) = heads.first() else { break };
                let (raw, row) = heads.take(i).expect("a head");
                if skipped < offset {
                    skipped += 1;
                } else {
                    match client_row(raw) {
                        Ok(r) => self.client.queue(&r),
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    }
                    sent += 1;
                    if self.client.queued() > 256 * 1024 {
                        self.client.flush().await?;
                    }
                }
                last[i] = Some(row);
                refill.push(i);
            }
        }
        drop(streams);
        match failure {
            Some(err) => {
                crate::metrics::global().error_message(err.get(5..).unwrap_or_default());
                self.client.queue(&err);
            }
            None => {
                self.client.queue(&messages::command_complete(&format!("SELECT {sent}")));
                if let Some(f) = &formats {
                    self.reply_around_execute(after_execute, None, &description, &f.row_description);
                }
            }
        }
        self.ready().await
    }
}

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
use crate::fanout::{ClientFormats, Event, FullMerge, Heads, ShardRows};
use crate::protocol::messages::{self, target_and_name, Parse, Severity};
use crate::protocol::Message;

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// A cross-shard read without grouping, streamed (see [`crate::fanout::ShardRows`]):
    /// rows relayed shard after shard, or merged in ORDER BY order; then OFFSET
    /// and LIMIT. Every shard's connection is taken first, so a shard that is down
    /// fails the read before a row is sent; an error after rows were sent ends the
    /// answer with it, as Postgres does for an error in the middle of a scan.
    pub(super) async fn stream_fanout(
        &mut self,
        answer: Answer<'_>,
        shards: &[ShardId],
        sql: &str,
        texts: Vec<Option<String>>,
        read: impl Fn(&str) -> Vec<u8>,
        merge: &FullMerge,
    ) -> Result<(), SessionError> {
        let dir = self.ctx.directory.load();
        // Inside a transaction block, the shards it reached read on its
        // connections (seeing its writes); every connection is had before
        // anything is sent.
        let mut block = self.take_block_parts();
        let mut conns = Vec::with_capacity(shards.len());
        for &s in shards {
            if let Some(h) = block.take(s) {
                conns.push((h.conn, true));
                continue;
            }
            let got = match self.role_pool(s) {
                Some(pool) => pool.get().await.map_err(|e| SqlError::new(e.sqlstate(), e.to_string())),
                None => Err(SqlError::new("XX000", format!("no pool for shard {s}"))),
            };
            match got {
                Ok(c) => conns.push((c, false)),
                Err(e) => {
                    for ((conn, mine), &s) in conns.into_iter().zip(shards) {
                        if mine {
                            block.parts.push(super::transaction::Held { shard: s, conn });
                        }
                    }
                    self.return_block_parts(block, false);
                    return self.fail_answer(&answer, e).await;
                }
            }
        }
        let mut readers = Vec::with_capacity(shards.len());
        let mut streams = Vec::with_capacity(shards.len());
        let mut mine = Vec::with_capacity(shards.len());
        for (((mut conn, own), &s), text) in conns.into_iter().zip(shards).zip(&texts) {
            let mut run = Vec::new();
            let mut skip = 0;
            if let Some(p) = self.settings.prelude(&mut conn) {
                run.extend_from_slice(&messages::query(&p));
                skip = 1;
            }
            run.extend_from_slice(&read(text.as_deref().unwrap_or(sql)));
            let (tx, rx) = tokio::sync::mpsc::channel(crate::fanout::QUEUE);
            readers.push(crate::fanout::read_shard(conn, Bytes::from(run), skip, tx));
            mine.push(own);
            let name = dir.shards.get(s).map(|x| x.name.clone()).unwrap_or_default();
            streams.push(crate::fanout::ShardRows::new(name, rx));
        }
        let relay = self.relay_streams(answer, streams, merge);
        let (read, relayed) = tokio::join!(futures::future::join_all(readers), relay);
        let mut failed = false;
        for (((mut conn, status), own), &s) in read.into_iter().zip(mine).zip(shards) {
            if own {
                // The block goes on unless its part failed or was cut short.
                failed |= status != Some(b'T');
                block.parts.push(super::transaction::Held { shard: s, conn });
            } else if status != Some(b'I') {
                conn.broken = true;
            }
        }
        self.return_block_parts(block, failed);
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

    /// Relays a cross-shard read from its shards' streams: every shard's
    /// RowDescription first (a shard's error then fails the read before a row
    /// went out), then the rows, shard after shard or merged by the merge's
    /// order (its `*` bound to the RowDescription), without the repeats
    /// DISTINCT drops, through OFFSET and LIMIT.
    pub(super) async fn relay_streams(
        &mut self,
        answer: Answer<'_>,
        mut streams: Vec<ShardRows>,
        merge: &FullMerge,
    ) -> Result<(), SessionError> {
        let Some(description) = self.describe_streams(&answer, &mut streams).await? else {
            // Answered with the error.
            return Ok(());
        };
        let c_collation = self.ctx.c_collation.load(std::sync::atomic::Ordering::Relaxed);
        let sort = crate::fanout::bound(merge, &description).and_then(|m| {
            let types = crate::fanout::types_of(&description)?;
            Ok((crate::fanout::sort_keys(&m.order, &types, c_collation)?, m.distinct))
        });
        let (keys, distinct) = match sort {
            Ok(k) => k,
            Err(e) => return self.fail_answer(&answer, SqlError::new(e.sqlstate(), e.to_string())).await,
        };
        // The rows as the client asks for them, and the replies before them.
        let formats = match &answer {
            Answer::Simple => None,
            Answer::Extended { formats, relayed, .. } => {
                let f = if *relayed {
                    ClientFormats::as_sent(&description, formats)
                } else {
                    ClientFormats::new(&description, formats)
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
        // An Execute's row limit caps the rows as LIMIT does; reaching it
        // suspends the portal instead of completing it.
        let max_rows = match &answer {
            Answer::Extended { max_rows, .. } if *max_rows > 0 => Some(*max_rows as u64),
            _ => None,
        };
        let limit = match (merge.limit, max_rows) {
            (Some(l), Some(m)) => Some(l.min(m)),
            (l, m) => l.or(m),
        };
        let mut window = Window { offset: merge.offset, limit, skipped: 0, sent: 0 };
        let failure = if keys.is_empty() {
            self.relay_in_turn(&mut streams, formats.as_ref(), &mut window).await?
        } else {
            let heads = Heads::new(keys, streams.len());
            self.relay_merged(&mut streams, heads, distinct, formats.as_ref(), &mut window).await?
        };
        drop(streams);
        match failure {
            Some(err) => {
                crate::metrics::global().error_message(err.get(5..).unwrap_or_default());
                self.client.queue(&err);
            }
            None if max_rows.is_some_and(|m| window.sent >= m) => {
                if let (true, Answer::Extended { batch, .. }) = (self.txn.in_block(), &answer) {
                    // The portal outlives the Sync here; the rest is not kept.
                    let bind = batch.iter().find(|m| m.tag() == b'B');
                    self.txn.suspended_portal =
                        bind.map(|b| String::from_utf8_lossy(super::fanout::portal_name(b)).into_owned());
                }
                self.client.queue(&messages::simple(b's'));
                if let Some(f) = &formats {
                    self.reply_around_execute(after_execute, None, &description, &f.row_description);
                }
            }
            None => {
                self.client.queue(&messages::command_complete(&format!("SELECT {}", window.sent)));
                if let Some(f) = &formats {
                    self.reply_around_execute(after_execute, None, &description, &f.row_description);
                }
            }
        }
        self.ready().await
    }

    /// Every shard's RowDescription, before anything is sent: the first one,
    /// or None once a shard's error has been answered.
    async fn describe_streams(
        &mut self,
        answer: &Answer<'_>,
        streams: &mut [ShardRows],
    ) -> Result<Option<Bytes>, SessionError> {
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
                    self.ready().await?;
                    return Ok(None);
                }
                Event::Failed(e) => {
                    self.fail_answer(answer, e).await?;
                    return Ok(None);
                }
                Event::Row(_) | Event::Done => {
                    let e = SqlError::new("0A000", "a cross-shard statement must return rows".into());
                    self.fail_answer(answer, e).await?;
                    return Ok(None);
                }
            }
        }
        if description.is_none() {
            self.fail_answer(answer, SqlError::new("XX000", "no shard to read from".into())).await?;
        }
        Ok(description)
    }

    /// Rows in no particular order: each shard's in turn. Returns the error
    /// that ended the read early, if one did.
    async fn relay_in_turn(
        &mut self,
        streams: &mut [ShardRows],
        formats: Option<&ClientFormats>,
        window: &mut Window,
    ) -> Result<Option<Bytes>, SessionError> {
        for st in streams.iter_mut() {
            loop {
                if window.full() {
                    return Ok(None);
                }
                match st.next().await {
                    Event::Row(r) if window.skips() => drop(r),
                    Event::Row(r) => {
                        if let Some(failure) = self.send_row(r, formats, window).await? {
                            return Ok(Some(failure));
                        }
                    }
                    Event::Described(_) => {}
                    Event::Done => break,
                    Event::ShardError(err) => return Ok(Some(prefix_error(&err, &st.shard))),
                    Event::Failed(e) => return Ok(Some(e.to_message(Severity::Error))),
                }
            }
        }
        Ok(None)
    }

    /// Rows in ORDER BY order: a k-way merge of the shards' sorted streams,
    /// one head row per shard; a row equal to the one before it under the
    /// first `distinct` sort keys is dropped. Returns the error that ended the
    /// read early.
    async fn relay_merged(
        &mut self,
        streams: &mut [ShardRows],
        mut heads: Heads,
        distinct: Option<usize>,
        formats: Option<&ClientFormats>,
        window: &mut Window,
    ) -> Result<Option<Bytes>, SessionError> {
        let mut last: Vec<Option<crate::fanout::Row>> = vec![None; streams.len()];
        let mut kept: Option<crate::fanout::Row> = None;
        let mut refill = (0..streams.len()).collect::<Vec<usize>>();
        loop {
            for i in refill.drain(..) {
                let st = &mut streams[i];
                let failure = match st.next().await {
                    Event::Row(r) => heads.put(i, r, last[i].as_ref()).err().map(|e| e.to_message(Severity::Error)),
                    Event::Described(_) | Event::Done => None,
                    Event::ShardError(err) => Some(prefix_error(&err, &st.shard)),
                    Event::Failed(e) => Some(e.to_message(Severity::Error)),
                };
                if failure.is_some() {
                    return Ok(failure);
                }
            }
            if window.full() {
                return Ok(None);
            }
            let Some(i) = heads.first() else { return Ok(None) };
            let Some((raw, row)) = heads.take(i) else {
                let e = SqlError::new("XX000", "cross-shard merge lost its head row".into());
                return Ok(Some(e.to_message(Severity::Error)));
            };
            let repeat = distinct.is_some_and(|n| kept.as_ref().is_some_and(|k| heads.repeats(n, &row, k)));
            if !repeat {
                if !window.skips() {
                    if let Some(failure) = self.send_row(raw, formats, window).await? {
                        return Ok(Some(failure));
                    }
                }
                if distinct.is_some() {
                    kept = Some(row.clone());
                }
            }
            last[i] = Some(row);
            refill.push(i);
        }
    }

    /// Sends one row in the client's formats; the error to end the read with
    /// if it cannot be converted.
    async fn send_row(
        &mut self,
        raw: Bytes,
        formats: Option<&ClientFormats>,
        window: &mut Window,
    ) -> Result<Option<Bytes>, SessionError> {
        let row = match formats {
            None => raw,
            Some(f) => match f.row(&raw) {
                Ok(r) => r,
                Err(e) => return Ok(Some(SqlError::new(e.sqlstate(), e.to_string()).to_message(Severity::Error))),
            },
        };
        self.client.queue(&row);
        window.sent += 1;
        if self.client.queued() > 256 * 1024 {
            self.client.flush().await?;
        }
        Ok(None)
    }
}

/// OFFSET and LIMIT over a cross-shard read's rows as they go out.
struct Window {
    offset: u64,
    limit: Option<u64>,
    skipped: u64,
    sent: u64,
}

impl Window {
    /// LIMIT rows went out.
    fn full(&self) -> bool {
        self.limit.is_some_and(|l| self.sent >= l)
    }

    /// Whether OFFSET skips the next row (counting it if so).
    fn skips(&mut self) -> bool {
        if self.skipped < self.offset {
            self.skipped += 1;
            true
        } else {
            false
        }
    }
}

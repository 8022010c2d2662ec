//! `COPY table FROM STDIN` into a sharded table: rows are split by tenant as they
//! stream, each shard receiving its own rows through its own COPY.
//!
//! Text and CSV formats are read just enough to find row ends and the key field;
//! the binary format just enough to find tuples and the key field (see
//! [`crate::copy_binary`]). Rows are forwarded byte for byte. Bad data (a
//! malformed row or stream, a NULL or unreadable key) aborts every shard's
//! COPY before any is finished: nothing is applied. Each shard's COPY runs in
//! a transaction of its own, and they commit together at the end, with
//! two-phase commit (crate::twophase): a row a shard refuses at CopyDone (a
//! duplicate key, a bad value) leaves nothing on any shard, as one Postgres
//! applies a COPY whole or not at all. Under `cross_shard_transactions =
//! "refuse"` each shard's COPY commits on its own, and one a shard refuses may
//! have been applied on others (the error says which).

use bytes::{Bytes, BytesMut};
use shardgate_directory::{Directory, ShardId};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::context::RouterContext;
use crate::copy_binary::{BinarySplitter, Piece};
use crate::error::SqlError;
use crate::pool::Pooled;
use crate::protocol::messages::{self, error_summary, Builder};
use crate::protocol::{Connection, ProtocolError};
use crate::sql::{CopyFormat, CopyInfo, Statement, StatementKind};

pub enum CopyError {
    /// The client connection failed.
    Client(ProtocolError),
    /// Reported to the client as an ErrorResponse.
    Sql(SqlError),
}

impl From<SqlError> for CopyError {
    fn from(e: SqlError) -> Self {
        CopyError::Sql(e)
    }
}

const FLUSH_AT: usize = 64 * 1024;

struct Target {
    conn: Pooled,
    buf: BytesMut,
}

/// Runs the COPY; returns the command tag (`COPY n`, summed over shards).
pub async fn copy_in_split<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &RouterContext,
    role: Option<&crate::roles::RolePools>,
    dir: &Directory,
    stmt: &Statement,
    client: &mut Connection<S>,
) -> Result<String, CopyError> {
    let StatementKind::Copy(info) = &stmt.kind else {
        return Err(SqlError::new("XX000", "not a COPY".into()).into());
    };
    let table = info.table.clone().unwrap_or_default();
    let columns = match &info.columns {
        Some(c) => c.clone(),
        None => ctx.catalog.copy_columns(&table).unwrap_or_default(),
    };
    let Some(key_pos) = columns.iter().position(|c| c.eq_ignore_ascii_case(&dir.key_column)) else {
        return Err(
            SqlError::new("23502", format!("COPY into sharded table {table} must include {}", dir.key_column)).into()
        );
    };

    // Start the COPY on every shard that owns rows (one added and not moved to
    // yet owns none, and may not have the table).
    let shard_ids: Vec<ShardId> = dir.owning_shards();
    let atomic = ctx.two_phase();
    let mut targets: Vec<(ShardId, Target)> = Vec::with_capacity(shard_ids.len());
    let mut copy_in_response: Option<Bytes> = None;
    for &s in &shard_ids {
        // A shard that cannot start the COPY ends those started before it.
        let mut conn = match start_copy(ctx, role, s, stmt, atomic).await {
            Ok(c) => c,
            Err(e) => {
                abort_all(&mut targets).await;
                return Err(e.into());
            }
        };
        loop {
            let m = match conn.conn.read().await {
                Ok(m) => m,
                Err(e) => {
                    let e = lost(&mut conn, e);
                    abort_all(&mut targets).await;
                    return Err(e.into());
                }
            };
            match m.tag() {
                b'G' => {
                    copy_in_response.get_or_insert(m.raw().clone());
                    break;
                }
                b'E' => {
                    let (code, msg) = error_summary(&m);
                    drain_ready(&mut conn).await;
                    roll_back(&mut conn, atomic).await;
                    abort_all(&mut targets).await;
                    return Err(
                        SqlError::new(static_code(&code), format!("{msg} (on shard {})", conn.shard_name())).into()
                    );
                }
                _ => {}
            }
        }
        targets.push((s, Target { conn, buf: BytesMut::new() }));
    }
    let Some(resp) = copy_in_response else {
        return Err(SqlError::new("XX000", "no shard accepted the COPY".into()).into());
    };

    let max_row = ctx.config.load().max_message_bytes;
    let mut splitter = match info.format {
        CopyFormat::Binary => {
            // The fields a tuple must have: the shard's own count (from its
            // CopyInResponse), which leaves out generated columns.
            let fields = copy_columns(&resp).unwrap_or(columns.len());
            if key_pos >= fields {
                abort_all(&mut targets).await;
                return Err(SqlError::new(
                    "0A000",
                    format!(
                        "COPY {table}: the shards read {fields} columns, but the router finds {} in column {}",
                        dir.key_column,
                        key_pos + 1
                    ),
                )
                .hint(format!("name the columns: COPY {table} ({}, …) FROM STDIN", dir.key_column))
                .into());
            }
            Splitter::Binary(BinarySplitter::new(fields, key_pos, max_row))
        }
        _ => Splitter::Text { rows: RowSplitter::new(info, key_pos, max_row), header_pending: info.header },
    };
    client.send(&resp).await.map_err(CopyError::Client)?;
    let mut ended = false;
    while !ended {
        let m = match client.read().await {
            Ok(m) => m,
            Err(e) => {
                // No client to finish the COPY: closing each shard's
                // connection aborts its COPY, and none goes back to the pool
                // in the middle of one.
                for (_, t) in targets.iter_mut() {
                    t.conn.broken = true;
                }
                return Err(CopyError::Client(e));
            }
        };
        match m.tag() {
            b'd' => splitter.feed(m.body()),
            b'c' => {
                // A last row without a newline is still a row; a row cut off
                // inside a quote or after a backslash is an error, as in Postgres.
                splitter.finish();
                ended = true;
            }
            b'f' => {
                let reason = messages::Reader::new(m.body(), "CopyFail").cstr().unwrap_or("").to_string();
                abort_all(&mut targets).await;
                return Err(SqlError::new("57014", format!("COPY from stdin failed: {reason}")).into());
            }
            b'H' | b'S' => continue,
            other => {
                abort_all(&mut targets).await;
                return Err(
                    SqlError::new("08P01", format!("unexpected message type {other} during COPY from stdin")).into()
                );
            }
        }
        while let Some((row, to)) = splitter.next_row() {
            let shard = match to {
                Ok(To::Every) => Ok(None),
                Ok(To::None) => continue,
                Ok(To::Key(key)) => shard_of_row(dir, &table, key).map(Some),
                Err(e) => Err(e),
            };
            let shard = match shard {
                Ok(s) => s,
                Err(e) => {
                    abort_all(&mut targets).await;
                    return Err(e.into());
                }
            };
            let mut failed = None;
            for (s, t) in targets.iter_mut() {
                let wanted = match shard {
                    None => true,
                    Some(shard) => *s == shard,
                };
                if wanted {
                    t.buf.extend_from_slice(&row);
                    if t.buf.len() >= FLUSH_AT {
                        if let Err(e) = send_buf(t).await {
                            failed = Some(e);
                            break;
                        }
                    }
                }
            }
            if let Some(e) = failed {
                abort_all(&mut targets).await;
                return Err(e.into());
            }
        }
    }
    // Binary data ends with a trailer on every shard, whether or not the
    // client's data had one (Postgres takes both).
    if let Splitter::Binary(_) = splitter {
        for (_, t) in targets.iter_mut() {
            t.buf.extend_from_slice(&crate::copy_binary::TRAILER);
        }
    }
    // Finish every shard's COPY and add up the rows.
    let mut total = 0u64;
    let mut failure: Option<SqlError> = None;
    for (_, t) in targets.iter_mut() {
        if let Err(e) = send_buf(t).await {
            failure.get_or_insert(e);
            continue;
        }
        t.conn.conn.queue(&messages::simple(b'c'));
        if let Err(e) = t.conn.conn.flush().await {
            failure.get_or_insert(lost(&mut t.conn, e));
            continue;
        }
        loop {
            let m = match t.conn.conn.read().await {
                Ok(m) => m,
                Err(e) => {
                    failure.get_or_insert(lost(&mut t.conn, e));
                    break;
                }
            };
            match m.tag() {
                b'C' => {
                    let tag = String::from_utf8_lossy(m.body()).trim_end_matches('\0').to_string();
                    total += tag.rsplit(' ').next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
                }
                b'E' => {
                    let (code, msg) = error_summary(&m);
                    failure.get_or_insert(SqlError::new(
                        static_code(&code),
                        format!("{msg} (on shard {})", t.conn.shard_name()),
                    ));
                }
                b'Z' => break,
                _ => {}
            }
        }
    }
    if let Some(e) = failure {
        for (_, t) in targets.iter_mut() {
            roll_back(&mut t.conn, atomic).await;
        }
        let e = if atomic && targets.len() > 1 {
            let hint = "nothing was applied on any shard";
            SqlError { hint: Some(e.hint.map_or_else(|| hint.to_string(), |h| format!("{h}; {hint}"))), ..e }
        } else {
            e
        };
        return Err(e.into());
    }
    if atomic {
        commit_all(ctx, &mut targets).await?;
    }
    Ok(format!("COPY {total}"))
}

/// Commits each shard's COPY transaction: one shard's on its own, several
/// together with two-phase commit.
async fn commit_all(ctx: &RouterContext, targets: &mut [(ShardId, Target)]) -> Result<(), SqlError> {
    let Some(((decider_shard, decider), others)) = targets.split_last_mut() else { return Ok(()) };
    if others.is_empty() {
        return match decider.conn.simple_query("COMMIT").await {
            Ok(_) => Ok(()),
            Err((code, msg)) => {
                Err(SqlError::from_server(&code, format!("{msg} (on shard {})", decider.conn.shard_name())))
            }
        };
    }
    let txid = crate::twophase::new_txid();
    let parts: Vec<crate::twophase::Part<'_>> = others
        .iter_mut()
        .map(|(s, t)| crate::twophase::Part { shard: *s, name: t.conn.shard_name().to_string(), conn: &mut t.conn })
        .collect();
    let name = decider.conn.shard_name().to_string();
    let decider = crate::twophase::Part { shard: *decider_shard, name, conn: &mut decider.conn };
    match crate::twophase::commit(ctx, &txid, decider, parts).await {
        crate::twophase::Outcome::Committed { .. } => Ok(()),
        crate::twophase::Outcome::RolledBack(e) | crate::twophase::Outcome::Unknown(e) => Err(e),
        crate::twophase::Outcome::Abandoned => {
            for (_, t) in targets.iter_mut() {
                t.conn.broken = true;
            }
            Err(SqlError::new("08006", "two-phase commit fault point (test)".into()))
        }
    }
}

/// Ends the transaction a COPY ran in after it failed: the connection goes
/// back to the pool idle, or closed.
async fn roll_back(conn: &mut Pooled, atomic: bool) {
    if atomic && !conn.broken && conn.simple_query("ROLLBACK").await.is_err() {
        conn.broken = true;
    }
}

/// A row's key field as the COPY data gives it.
enum KeyField {
    /// Text or CSV: the field's text, escapes decoded.
    Text(String),
    /// Binary: the field's bytes, in the key column type's binary form.
    Binary(Bytes),
}

/// Where a piece of COPY data goes.
enum To {
    /// To every shard: a CSV header line, the binary header.
    Every,
    /// To no shard: the end-of-data marker.
    None,
    /// To the shard of this key field (None for NULL).
    Key(Option<KeyField>),
}

/// The COPY data read by its format.
enum Splitter {
    Text { rows: RowSplitter, header_pending: bool },
    Binary(BinarySplitter),
}

impl Splitter {
    fn feed(&mut self, data: &[u8]) {
        match self {
            Splitter::Text { rows, .. } => rows.feed(data),
            Splitter::Binary(b) => b.feed(data),
        }
    }

    fn finish(&mut self) {
        match self {
            Splitter::Text { rows, .. } => rows.finish(),
            Splitter::Binary(b) => b.finish(),
        }
    }

    /// The next whole piece of data and where it goes.
    fn next_row(&mut self) -> Option<(Bytes, Result<To, SqlError>)> {
        match self {
            Splitter::Text { rows, header_pending } => {
                let (row, key) = rows.next_row()?;
                // The header line goes to every shard as it is (each skips it);
                // the end-of-data marker to none.
                let to = match key {
                    _ if std::mem::take(header_pending) => Ok(To::Every),
                    Ok(None) => Ok(To::None),
                    Ok(Some(key)) => Ok(To::Key(key.map(KeyField::Text))),
                    Err(e) => Err(e),
                };
                Some((row, to))
            }
            Splitter::Binary(b) => Some(match b.next_piece()? {
                Ok(Piece::Header(h)) => (h, Ok(To::Every)),
                Ok(Piece::Tuple { row, key }) => (row, Ok(To::Key(key.map(KeyField::Binary)))),
                // The trailer goes to every shard at CopyDone.
                Ok(Piece::End) => (Bytes::new(), Ok(To::None)),
                Err(e) => (Bytes::new(), Err(e)),
            }),
        }
    }
}

/// The column count of a CopyInResponse (format byte, int16 count, formats).
fn copy_columns(resp: &[u8]) -> Option<usize> {
    let n = i16::from_be_bytes(resp.get(6..8)?.try_into().ok()?);
    usize::try_from(n).ok()
}

/// The shard a row goes to, from its key field: an error for a NULL key or
/// one that is not of the key's type. Read into the same key as the router's
/// other routing reads, so a row lands where a query for its tenant looks.
fn shard_of_row(dir: &Directory, table: &str, key: Option<KeyField>) -> Result<ShardId, SqlError> {
    let key = match key {
        None => return Err(SqlError::new("23502", format!("{} must not be NULL in a sharded table", dir.key_column))),
        Some(KeyField::Text(text)) => {
            dir.key_type.parse_text(&text).map_err(|e| SqlError::new("22P02", format!("COPY {table}: {e}")))?
        }
        Some(KeyField::Binary(raw)) => crate::route::column_key(&raw, dir.key_type, &dir.key_column)
            .map_err(|e| SqlError { message: format!("COPY {table}: {}", e.message), ..e })?,
    };
    Ok(dir.shard_for(&key))
}

/// A connection to shard `s` with the COPY statement sent.
async fn start_copy(
    ctx: &RouterContext,
    role: Option<&crate::roles::RolePools>,
    s: ShardId,
    stmt: &Statement,
    atomic: bool,
) -> Result<Pooled, SqlError> {
    let pool = ctx.pool_as(role, s).ok_or_else(|| SqlError::new("XX000", format!("no pool for shard {s}")))?;
    let mut conn = pool.get().await.map_err(|e| SqlError::new(e.sqlstate(), e.to_string()))?;
    let sql = if atomic { format!("BEGIN; {}", stmt.text) } else { stmt.text.clone() };
    conn.conn.send(&messages::query(&sql)).await.map_err(|e| lost(&mut conn, e))?;
    Ok(conn)
}

fn lost(conn: &mut Pooled, e: ProtocolError) -> SqlError {
    conn.broken = true;
    SqlError::new("08006", format!("lost the connection to shard {}: {e}", conn.shard_name()))
}

/// Maps a shard's SQLSTATE text to a `'static` one for our error type.
fn static_code(code: &str) -> &'static str {
    const KNOWN: &[&str] = &["23505", "23502", "23503", "22P02", "22P04", "42P01", "42703", "57014", "53300", "08006"];
    KNOWN.iter().find(|k| **k == code).copied().unwrap_or("XX000")
}

async fn send_buf(t: &mut Target) -> Result<(), SqlError> {
    if t.buf.is_empty() {
        return Ok(());
    }
    let data = t.buf.split();
    let mut b = Builder::new(b'd');
    b.bytes(&data);
    t.conn.conn.queue(&b.finish());
    t.conn.conn.flush().await.map_err(|e| lost(&mut t.conn, e))
}

async fn drain_ready(conn: &mut Pooled) {
    loop {
        match conn.conn.read().await {
            Ok(m) if m.tag() == b'Z' => return,
            Ok(_) => {}
            Err(_) => {
                conn.broken = true;
                return;
            }
        }
    }
}

/// Ends the COPY on every shard without applying it.
async fn abort_all(targets: &mut Vec<(ShardId, Target)>) {
    for (_, t) in targets.iter_mut() {
        t.conn.conn.queue(&Builder::new(b'f').cstr("aborted by shardgate").finish());
        if t.conn.conn.flush().await.is_err() {
            t.conn.broken = true;
            continue;
        }
        drain_ready(&mut t.conn).await;
        // In a transaction (see `start_copy`): the aborted COPY left it failed.
        if !t.conn.broken && t.conn.simple_query("ROLLBACK").await.is_err() {
            t.conn.broken = true;
        }
    }
    targets.clear();
}

/// Finds row boundaries and the key field in COPY text or CSV data, the way
/// Postgres's COPY reads them: a row ends at a newline, a carriage return or
/// both (outside CSV quotes; in text format not after a backslash, which
/// escapes the next byte whatever it is).
pub(crate) struct RowSplitter {
    pending: BytesMut,
    csv: bool,
    delimiter: u8,
    key_pos: usize,
    /// The longest row accepted; data past it without a row end is an error.
    max_row: usize,
    /// How far `pending` has been read without finding a row end, and whether
    /// that point is inside CSV quotes: each byte is looked at once.
    scanned: usize,
    quoted: bool,
    /// Set by [`Self::finish`]: no more data comes.
    finished: bool,
    /// The end-of-data marker `\.` came: what follows it is ignored, as
    /// Postgres ignores it.
    ended: bool,
}

/// The key field of a row: `Some(Some(text))`, `Some(None)` for NULL, `None` for
/// the end-of-data marker `\.`.
pub(crate) type RowKey = Option<Option<String>>;

impl RowSplitter {
    pub(crate) fn new(info: &CopyInfo, key_pos: usize, max_row: usize) -> Self {
        let csv = info.format == CopyFormat::Csv;
        RowSplitter {
            pending: BytesMut::new(),
            csv,
            delimiter: info.delimiter.unwrap_or(if csv { b',' } else { b'\t' }),
            key_pos,
            max_row,
            scanned: 0,
            quoted: false,
            finished: false,
            ended: false,
        }
    }

    pub(crate) fn feed(&mut self, data: &[u8]) {
        if !self.ended {
            self.pending.extend_from_slice(data);
        }
    }

    /// The data has ended: a last row without a row end is still a row, and
    /// what cannot be one (an open CSV quote, a trailing backslash) comes back
    /// from [`Self::next_row`] as an error.
    pub(crate) fn finish(&mut self) {
        self.finished = true;
    }

    /// The bytes not yet returned as rows.
    pub(crate) fn pending(&self) -> &[u8] {
        &self.pending
    }

    /// The next complete row (with its row end, as it came) and its key.
    pub(crate) fn next_row(&mut self) -> Option<(Bytes, Result<RowKey, SqlError>)> {
        if self.pending.is_empty() {
            return None;
        }
        let (row, cut_off) = match self.row_end() {
            Ok(end) => (self.pending.split_to(end + 1).freeze(), false),
            Err(()) if self.finished => (self.pending.split().freeze(), true),
            Err(()) if self.pending.len() > self.max_row => {
                let e = SqlError::new("54000", format!("a COPY row is longer than {} bytes", self.max_row));
                return Some((self.pending.split().freeze(), Err(e)));
            }
            Err(()) => return None,
        };
        self.scanned = 0;
        let in_quotes = std::mem::take(&mut self.quoted);
        if cut_off && (in_quotes || (!self.csv && ends_in_escape(&row))) {
            let what = if in_quotes { "an unterminated CSV quoted field" } else { "a backslash" };
            return Some((row, Err(SqlError::new("22P04", format!("COPY data ends with {what}")))));
        }
        let line = row.strip_suffix(b"\n").unwrap_or(&row);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line == b"\\." {
            self.ended = true;
            self.pending.clear();
            return Some((row, Ok(None)));
        }
        let key = if self.csv { self.csv_field(line) } else { self.text_field(line) };
        Some((row, key.map(Some)))
    }

    /// The index of the last byte of the first pending row; Err when no whole
    /// row is pending (`scanned` and `quoted` then say where to go on from).
    fn row_end(&mut self) -> Result<usize, ()> {
        let b = &self.pending[..];
        let mut i = self.scanned;
        while let Some(&c) = b.get(i) {
            match c {
                b'\\' if !self.csv => {
                    if i + 1 >= b.len() {
                        break;
                    }
                    i += 2;
                }
                b'"' if self.csv => {
                    self.quoted = !self.quoted;
                    i += 1;
                }
                b'\n' if !self.quoted => return Ok(i),
                b'\r' if !self.quoted => match b.get(i + 1) {
                    Some(b'\n') => return Ok(i + 1),
                    Some(_) => return Ok(i),
                    // `\r\n` may come in two messages.
                    None if self.finished => return Ok(i),
                    None => break,
                },
                _ => i += 1,
            }
        }
        self.scanned = i;
        Err(())
    }

    fn missing(&self) -> SqlError {
        SqlError::new("22P04", format!("missing data for column {} of a COPY row", self.key_pos + 1))
    }

    fn text_field(&self, line: &[u8]) -> Result<Option<String>, SqlError> {
        let mut field = 0;
        let mut i = 0;
        let mut start = 0;
        while i <= line.len() {
            if i == line.len() || line[i] == self.delimiter {
                if field == self.key_pos {
                    let raw = &line[start..i];
                    if raw == b"\\N" {
                        return Ok(None);
                    }
                    return Ok(Some(unescape_text(raw)));
                }
                field += 1;
                start = i + 1;
            } else if line[i] == b'\\' {
                i += 1;
            }
            i += 1;
        }
        Err(self.missing())
    }

    fn csv_field(&self, line: &[u8]) -> Result<Option<String>, SqlError> {
        let mut field = 0;
        let mut i = 0;
        let mut value = Vec::new();
        let mut was_quoted = false;
        let mut quoted = false;
        loop {
            let at_end = i == line.len();
            if at_end || (!quoted && line[i] == self.delimiter) {
                if field == self.key_pos {
                    if value.is_empty() && !was_quoted {
                        return Ok(None);
                    }
                    return Ok(Some(String::from_utf8_lossy(&value).into_owned()));
                }
                if at_end {
                    return Err(self.missing());
                }
                field += 1;
                value.clear();
                was_quoted = false;
            } else if line[i] == b'"' {
                if quoted && line.get(i + 1) == Some(&b'"') {
                    value.push(b'"');
                    i += 1;
                } else {
                    quoted = !quoted;
                    was_quoted = true;
                }
            } else {
                value.push(line[i]);
            }
            i += 1;
        }
    }
}

/// Whether a text-format row ends in a backslash that escapes nothing.
fn ends_in_escape(row: &[u8]) -> bool {
    let mut i = 0;
    while i < row.len() {
        if row[i] == b'\\' {
            if i + 1 == row.len() {
                return true;
            }
            i += 1;
        }
        i += 1;
    }
    false
}

/// A text-format field's value, escapes decoded as Postgres's COPY does:
/// `\b \f \n \r \t \v`, one to three octal digits, `\x` and one or two hex
/// digits; a backslash before anything else stands for that byte.
fn unescape_text(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] != b'\\' || i + 1 == raw.len() {
            out.push(raw[i]);
            i += 1;
            continue;
        }
        i += 1;
        let c = raw[i];
        i += 1;
        let digits = |i: &mut usize, radix: u32, most: usize, mut v: u32| {
            for _ in 0..most {
                match raw.get(*i).and_then(|&d| char::from(d).to_digit(radix)) {
                    Some(d) => {
                        v = v * radix + d;
                        *i += 1;
                    }
                    None => break,
                }
            }
            (v & 0xff) as u8
        };
        out.push(match c {
            b'0'..=b'7' => digits(&mut i, 8, 2, u32::from(c - b'0')),
            b'x' if raw.get(i).is_some_and(u8::is_ascii_hexdigit) => digits(&mut i, 16, 2, 0),
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'v' => 0x0b,
            other => other,
        });
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(format: CopyFormat) -> CopyInfo {
        CopyInfo {
            from_stdin: true,
            per_shard: None,
            table: Some("t".into()),
            columns: None,
            format,
            delimiter: None,
            header: false,
        }
    }

    fn splitter(format: CopyFormat, key_pos: usize) -> RowSplitter {
        RowSplitter::new(&info(format), key_pos, 1 << 20)
    }

    /// Every row and key that `data` gives, fed at once and then finished.
    fn rows(format: CopyFormat, key_pos: usize, data: &[u8]) -> Vec<(String, Result<RowKey, String>)> {
        let mut s = splitter(format, key_pos);
        s.feed(data);
        s.finish();
        std::iter::from_fn(|| s.next_row())
            .map(|(row, key)| (String::from_utf8_lossy(&row).into_owned(), key.map_err(|e| e.to_string())))
            .collect()
    }

    fn key(k: &str) -> Result<RowKey, String> {
        Ok(Some(Some(k.into())))
    }

    #[test]
    fn text_rows_split_across_messages() {
        let mut s = splitter(CopyFormat::Text, 1);
        s.feed(b"a\t4");
        assert!(s.next_row().is_none());
        s.feed(b"2\tx\nb\t\\N\n\\.\n");
        let (row, k) = s.next_row().unwrap();
        assert_eq!(&row[..], b"a\t42\tx\n");
        assert_eq!(k.ok(), Some(Some(Some("42".into()))));
        assert_eq!(s.next_row().unwrap().1.ok(), Some(Some(None)));
        assert_eq!(s.next_row().unwrap().1.ok(), Some(None));
    }

    #[test]
    fn csv_quotes_hold_newlines_and_delimiters() {
        let mut s = splitter(CopyFormat::Csv, 1);
        s.feed(b"\"x,\ny\",\"7\",z\n1,,2\n");
        let (row, k) = s.next_row().unwrap();
        assert_eq!(&row[..], b"\"x,\ny\",\"7\",z\n");
        assert_eq!(k.ok(), Some(Some(Some("7".into()))));
        assert_eq!(s.next_row().unwrap().1.ok(), Some(Some(None)));
    }

    #[test]
    fn short_rows_are_errors() {
        let mut s = splitter(CopyFormat::Text, 3);
        s.feed(b"1\t2\n");
        assert!(s.next_row().unwrap().1.is_err());
    }

    /// Postgres reads `\061` as `1` and `\x41` as `A` (checked with COPY on
    /// Postgres 15): a key written with escapes goes where its value belongs.
    #[test]
    fn text_keys_decode_octal_hex_and_letter_escapes_as_postgres_does() {
        let got = rows(CopyFormat::Text, 1, b"a\t\\061\nb\t\\x41\\x4a\nc\t\\v\\b\\f\\x\\q\nd\t\\1010\n");
        let keys: Vec<_> = got.into_iter().map(|(_, k)| k).collect();
        assert_eq!(keys, vec![key("1"), key("AJ"), key("\u{b}\u{8}\u{c}xq"), key("A0")]);
    }

    /// A backslash escapes a newline in text format: `p\<newline>q` is one
    /// field of one row in Postgres, not the end of a row.
    #[test]
    fn an_escaped_newline_does_not_end_a_text_row() {
        let got = rows(CopyFormat::Text, 1, b"p\\\nq\t7\nr\t8\n");
        assert_eq!(got, vec![("p\\\nq\t7\n".into(), key("7")), ("r\t8\n".into(), key("8"))]);
    }

    /// Postgres takes a carriage return, a newline or both as a row end.
    #[test]
    fn carriage_returns_end_rows() {
        let got = rows(CopyFormat::Text, 1, b"r\t8\rs\t9\r\nt\t10\r");
        assert_eq!(
            got,
            vec![("r\t8\r".into(), key("8")), ("s\t9\r\n".into(), key("9")), ("t\t10\r".into(), key("10"))]
        );
        let got = rows(CopyFormat::Csv, 1, b"\"a\rb\",1\rc,2");
        assert_eq!(got, vec![("\"a\rb\",1\r".into(), key("1")), ("c,2".into(), key("2"))]);
        // `\r` then `\n` in the next message is one row end.
        let mut s = splitter(CopyFormat::Text, 0);
        s.feed(b"1\r");
        assert!(s.next_row().is_none());
        s.feed(b"\n2\n");
        assert_eq!(&s.next_row().unwrap().0[..], b"1\r\n");
    }

    /// Data that ends inside a CSV quote or after a backslash is an error, as
    /// in Postgres, not a row silently left out.
    #[test]
    fn data_cut_off_inside_a_row_is_an_error() {
        let got = rows(CopyFormat::Csv, 0, b"1,a\n2,\"open\n");
        assert_eq!(got[0], ("1,a\n".into(), key("1")));
        assert!(got[1].1.as_ref().is_err_and(|e| e.contains("unterminated")), "{got:?}");
        let got = rows(CopyFormat::Text, 0, b"1\ta\\");
        assert!(got[0].1.as_ref().is_err_and(|e| e.contains("backslash")), "{got:?}");
        // A last row without a row end is a row.
        assert_eq!(rows(CopyFormat::Text, 0, b"5\tz"), vec![("5\tz".into(), key("5"))]);
    }

    /// Postgres stops at `\.` and ignores the rest of the data (COPY 1 for
    /// `1\ta\n\\.\n2\tb\n` on Postgres 15): so does the splitter.
    #[test]
    fn rows_after_the_end_marker_are_ignored() {
        let got = rows(CopyFormat::Text, 0, b"1\ta\n\\.\n2\tb\n");
        assert_eq!(got, vec![("1\ta\n".into(), key("1")), ("\\.\n".into(), Ok(None))]);
        let mut s = splitter(CopyFormat::Csv, 0);
        s.feed(b"\\.\r\n3,c");
        assert_eq!(s.next_row().unwrap().1.ok(), Some(None));
        s.feed(b"4,d\n");
        s.finish();
        assert!(s.next_row().is_none());
    }

    /// A row may not grow without bound while its end is awaited.
    #[test]
    fn a_row_longer_than_the_limit_is_an_error() {
        let mut s = RowSplitter::new(&info(CopyFormat::Csv), 0, 100);
        s.feed(b"\"");
        for _ in 0..10 {
            s.feed(&[b'x'; 20]);
            if let Some((_, k)) = s.next_row() {
                assert!(k.is_err_and(|e| e.to_string().contains("longer than 100")));
                assert!(s.pending().is_empty());
                return;
            }
        }
        panic!("a 200-byte row passed a limit of 100");
    }
}

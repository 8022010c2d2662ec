//! `COPY table FROM STDIN` into a sharded table: rows are split by tenant as they
//! stream, each shard receiving its own rows through its own COPY.
//!
//! Text and CSV formats are read just enough to find row ends and the key field;
//! rows are forwarded byte for byte. Each shard's COPY commits on its own: a copy
//! that fails on one shard may have been applied on others (the error says which).

use bytes::{Bytes, BytesMut};
use shardgate_directory::{Directory, ShardId};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::context::RouterContext;
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
    dir: &Directory,
    stmt: &Statement,
    client: &mut Connection<S>,
) -> Result<String, CopyError> {
    let StatementKind::Copy(info) = &stmt.kind else {
        return Err(SqlError::new("XX000", "not a COPY".into()).into());
    };
    let table = info.table.clone().unwrap_or_default();
    if info.format == CopyFormat::Binary {
        return Err(SqlError::new("0A000", "COPY FROM STDIN in binary format is not split by tenant yet".into())
            .hint("use text or CSV format for sharded tables")
            .into());
    }
    let columns = match &info.columns {
        Some(c) => c.clone(),
        None => ctx.catalog.columns(&table).unwrap_or_default(),
    };
    let Some(key_pos) = columns.iter().position(|c| c.eq_ignore_ascii_case(&dir.key_column)) else {
        return Err(
            SqlError::new("23502", format!("COPY into sharded table {table} must include {}", dir.key_column)).into()
        );
    };

    // Start the COPY on every shard that owns rows (one added and not moved to
    // yet owns none, and may not have the table).
    let shard_ids: Vec<ShardId> = dir.owning_shards();
    let mut targets: Vec<(ShardId, Target)> = Vec::with_capacity(shard_ids.len());
    let mut copy_in_response: Option<Bytes> = None;
    for &s in &shard_ids {
        let pool = ctx.pool(s).ok_or_else(|| SqlError::new("XX000", format!("no pool for shard {s}")))?;
        let mut conn = pool.get().await.map_err(|e| SqlError::new(e.sqlstate(), e.to_string()))?;
        conn.conn.send(&messages::query(&stmt.text)).await.map_err(|e| lost(&mut conn, e))?;
        loop {
            let m = conn.conn.read().await.map_err(|e| lost(&mut conn, e))?;
            match m.tag() {
                b'G' => {
                    copy_in_response.get_or_insert(m.raw().clone());
                    break;
                }
                b'E' => {
                    let (code, msg) = error_summary(&m);
                    drain_ready(&mut conn).await;
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
    client.send(&resp).await.map_err(CopyError::Client)?;

    let mut splitter = RowSplitter::new(info, key_pos);
    let mut header_pending = info.header;
    loop {
        let m = client.read().await.map_err(CopyError::Client)?;
        match m.tag() {
            b'd' => {
                splitter.feed(m.body());
                while let Some((row, key)) = splitter.next_row() {
                    let row = row.map_err(CopyError::Sql);
                    let row = match row {
                        Ok(r) => r,
                        Err(e) => {
                            abort_all(&mut targets).await;
                            return Err(e);
                        }
                    };
                    if header_pending {
                        header_pending = false;
                        for (_, t) in targets.iter_mut() {
                            t.buf.extend_from_slice(&row);
                        }
                        continue;
                    }
                    let Some(key) = key else { continue }; // end-of-data marker
                    let shard = match key {
                        None => {
                            abort_all(&mut targets).await;
                            return Err(SqlError::new(
                                "23502",
                                format!("{} must not be NULL in a sharded table", dir.key_column),
                            )
                            .into());
                        }
                        Some(text) => match dir.key_type.parse_text(&text) {
                            Ok(k) => dir.shard_for(&k),
                            Err(e) => {
                                abort_all(&mut targets).await;
                                return Err(SqlError::new("22P02", format!("COPY {table}: {e}")).into());
                            }
                        },
                    };
                    if let Some((_, t)) = targets.iter_mut().find(|(s, _)| *s == shard) {
                        t.buf.extend_from_slice(&row);
                        if t.buf.len() >= FLUSH_AT {
                            send_buf(t).await.map_err(CopyError::Sql)?;
                        }
                    }
                }
            }
            b'c' => break,
            b'f' => {
                let reason = messages::Reader::new(m.body(), "CopyFail").cstr().unwrap_or("").to_string();
                abort_all(&mut targets).await;
                return Err(SqlError::new("57014", format!("COPY from stdin failed: {reason}")).into());
            }
            b'H' | b'S' => {}
            other => {
                abort_all(&mut targets).await;
                return Err(
                    SqlError::new("08P01", format!("unexpected message type {other} during COPY from stdin")).into()
                );
            }
        }
    }
    if splitter.has_partial_row() {
        // A last row without a newline is still a row.
        splitter.feed(b"\n");
        while let Some((row, key)) = splitter.next_row() {
            let row = row.map_err(CopyError::Sql)?;
            if let Some(Some(text)) = key {
                let k = dir.key_type.parse_text(&text).map_err(|e| SqlError::new("22P02", e.to_string()))?;
                let shard = dir.shard_for(&k);
                if let Some((_, t)) = targets.iter_mut().find(|(s, _)| *s == shard) {
                    t.buf.extend_from_slice(&row);
                }
            }
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
    match failure {
        Some(e) => Err(e.into()),
        None => Ok(format!("COPY {total}")),
    }
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
    }
    targets.clear();
}

/// Finds row boundaries and the key field in COPY text or CSV data.
struct RowSplitter {
    pending: BytesMut,
    csv: bool,
    delimiter: u8,
    key_pos: usize,
}

/// The key field of a row: `Some(Some(text))`, `Some(None)` for NULL, `None` for
/// the end-of-data marker `\.`.
type RowKey = Option<Option<String>>;

impl RowSplitter {
    fn new(info: &CopyInfo, key_pos: usize) -> Self {
        let csv = info.format == CopyFormat::Csv;
        RowSplitter {
            pending: BytesMut::new(),
            csv,
            delimiter: info.delimiter.unwrap_or(if csv { b',' } else { b'\t' }),
            key_pos,
        }
    }

    fn feed(&mut self, data: &[u8]) {
        self.pending.extend_from_slice(data);
    }

    fn has_partial_row(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The next complete row (with its newline) and its key.
    #[allow(clippy::type_complexity)]
    fn next_row(&mut self) -> Option<(Result<Bytes, SqlError>, RowKey)> {
        let end = self.row_end()?;
        let row = self.pending.split_to(end + 1).freeze();
        let line = row.strip_suffix(b"\n").unwrap_or(&row);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line == b"\\." {
            return Some((Ok(Bytes::new()), None));
        }
        let key = if self.csv { self.csv_field(line) } else { self.text_field(line) };
        match key {
            Ok(k) => Some((Ok(row), Some(k))),
            Err(e) => Some((Err(e), Some(None))),
        }
    }

    fn row_end(&self) -> Option<usize> {
        if !self.csv {
            return self.pending.iter().position(|&b| b == b'\n');
        }
        let mut quoted = false;
        for (i, &b) in self.pending.iter().enumerate() {
            match b {
                b'"' => quoted = !quoted,
                b'\n' if !quoted => return Some(i),
                _ => {}
            }
        }
        None
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

fn unescape_text(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'\\' && i + 1 < raw.len() {
            i += 1;
            out.push(match raw[i] {
                b'n' => b'\n',
                b't' => b'\t',
                b'r' => b'\r',
                other => other,
            });
        } else {
            out.push(raw[i]);
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(format: CopyFormat) -> CopyInfo {
        CopyInfo { from_stdin: true, table: Some("t".into()), columns: None, format, delimiter: None, header: false }
    }

    #[test]
    fn text_rows_split_across_messages() {
        let mut s = RowSplitter::new(&info(CopyFormat::Text), 1);
        s.feed(b"a\t4");
        assert!(s.next_row().is_none());
        s.feed(b"2\tx\nb\t\\N\n\\.\n");
        let (row, key) = s.next_row().unwrap();
        assert_eq!(&row.ok().unwrap()[..], b"a\t42\tx\n");
        assert_eq!(key, Some(Some("42".into())));
        assert_eq!(s.next_row().unwrap().1, Some(None));
        assert_eq!(s.next_row().unwrap().1, None);
    }

    #[test]
    fn csv_quotes_hold_newlines_and_delimiters() {
        let mut s = RowSplitter::new(&info(CopyFormat::Csv), 1);
        s.feed(b"\"x,\ny\",\"7\",z\n1,,2\n");
        let (row, key) = s.next_row().unwrap();
        assert_eq!(&row.ok().unwrap()[..], b"\"x,\ny\",\"7\",z\n");
        assert_eq!(key, Some(Some("7".into())));
        assert_eq!(s.next_row().unwrap().1, Some(None));
    }

    #[test]
    fn short_rows_are_errors() {
        let mut s = RowSplitter::new(&info(CopyFormat::Text), 3);
        s.feed(b"1\t2\n");
        assert!(s.next_row().unwrap().0.is_err());
    }
}

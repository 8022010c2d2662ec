//! `COPY … FROM STDIN (FORMAT binary)` read as it streams: the file header,
//! then tuples, each found whole and with its key field, then the trailer.
//!
//! The format (Postgres's "Binary Format" of COPY): an 11-byte signature, an
//! int32 of flags, an int32 header-extension length and that many bytes; then
//! per tuple an int16 field count (-1 for the trailer, the end of the data)
//! and per field an int32 length (-1 for NULL) and that many bytes. Integers
//! are big-endian. CopyData messages may cut the stream anywhere, so nothing
//! here assumes a message holds a whole header, tuple or length word.
//!
//! Only the framing is read: tuples go on byte for byte, and the key field is
//! handed back raw for the caller to decode by the key's type.

use std::borrow::Cow;
use std::ops::Range;

use bytes::{Buf, Bytes, BytesMut};

use crate::error::SqlError;

/// The signature that opens every binary COPY stream.
pub const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";
/// The signature, the flags and the extension length.
pub const HEADER_LEN: usize = 19;
/// The trailer: a field count of -1.
pub const TRAILER: [u8; 2] = [0xff, 0xff];

/// Flag bit 16: every tuple carries an OID, which no Postgres since 12 reads.
const WITH_OIDS: i32 = 1 << 16;

/// One piece of the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// The header (extension included), as it came: every shard's COPY needs it.
    Header(Bytes),
    /// One tuple as it came, and its key field's bytes (None for NULL).
    Tuple { row: Bytes, key: Option<Bytes> },
    /// The data has ended: the trailer came, or the stream stopped at a tuple
    /// boundary (Postgres takes both as the end).
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Header,
    Tuples,
    Ended,
    /// An error was returned: nothing more is read.
    Failed,
}

/// Splits a binary COPY stream into its header and tuples. Feed it CopyData
/// bodies with [`Self::feed`], take pieces with [`Self::next_piece`] until it
/// gives None, and call [`Self::finish`] at CopyDone so that a stream cut off
/// inside a header or tuple comes back as an error.
pub struct BinarySplitter {
    pending: BytesMut,
    stage: Stage,
    /// The fields every tuple must have (the shard's COPY column count).
    fields: usize,
    key_pos: usize,
    /// The largest header or tuple accepted: bounds what is held at once.
    max_row: usize,
    finished: bool,
}

fn bad_format(message: impl Into<String>) -> SqlError {
    SqlError::new("22P04", message.into())
}

fn i16_at(b: &[u8], at: usize) -> Option<i16> {
    Some(i16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn i32_at(b: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

impl BinarySplitter {
    pub fn new(fields: usize, key_pos: usize, max_row: usize) -> Self {
        BinarySplitter { pending: BytesMut::new(), stage: Stage::Header, fields, key_pos, max_row, finished: false }
    }

    pub fn feed(&mut self, data: &[u8]) {
        if self.stage != Stage::Failed {
            self.pending.extend_from_slice(data);
        }
    }

    /// The data has ended (CopyDone): what is pending must be whole.
    pub fn finish(&mut self) {
        self.finished = true;
    }

    /// The bytes read but not yet returned.
    pub fn pending(&self) -> &[u8] {
        &self.pending
    }

    /// The next whole piece, None until more data comes (or after the end, or
    /// an error). An error is returned once; the stream is then given up.
    pub fn next_piece(&mut self) -> Option<Result<Piece, SqlError>> {
        let got = match self.stage {
            Stage::Failed => return None,
            Stage::Header => self.header(),
            Stage::Tuples => self.tuple(),
            // Postgres reads on after the trailer and refuses anything there.
            Stage::Ended if self.pending.is_empty() => return None,
            Stage::Ended => Err(bad_format("received copy data after EOF marker")),
        };
        match got {
            Ok(piece) => piece.map(Ok),
            Err(e) => {
                self.stage = Stage::Failed;
                self.pending.clear();
                Some(Err(e))
            }
        }
    }

    /// The header, once it is all there. The messages are Postgres's
    /// (ReceiveCopyBinaryHeader), for a stream cut short as for a wrong one.
    fn header(&mut self) -> Result<Option<Piece>, SqlError> {
        let b = &self.pending[..];
        // A wrong signature is refused as soon as its first wrong byte comes,
        // not after 11 bytes: text sent as binary fails at once.
        let seen = b.len().min(SIGNATURE.len());
        if b[..seen] != SIGNATURE[..seen] || (self.finished && seen < SIGNATURE.len()) {
            return Err(bad_format("COPY file signature not recognized"));
        }
        let Some(flags) = i32_at(b, 11) else {
            return self.wait("invalid COPY file header (missing flags)");
        };
        if flags & WITH_OIDS != 0 {
            return Err(bad_format("invalid COPY file header (WITH OIDS)"));
        }
        // Bits 17-31 are critical: a reader that does not know one must refuse.
        if (flags & !WITH_OIDS) >> 16 != 0 {
            return Err(bad_format("unrecognized critical flags in COPY file header"));
        }
        let Some(extension) = i32_at(b, 15) else {
            return self.wait("invalid COPY file header (missing length)");
        };
        let Ok(extension) = usize::try_from(extension) else {
            return Err(bad_format("invalid COPY file header (missing length)"));
        };
        let len = HEADER_LEN.saturating_add(extension);
        if len > self.max_row {
            return Err(too_long("header", self.max_row));
        }
        if b.len() < len {
            return self.wait("invalid COPY file header (wrong length)");
        }
        self.stage = Stage::Tuples;
        Ok(Some(Piece::Header(self.pending.split_to(len).freeze())))
    }

    /// The next tuple or the end, once it is all there.
    fn tuple(&mut self) -> Result<Option<Piece>, SqlError> {
        let b = &self.pending[..];
        if b.is_empty() {
            if self.finished {
                self.stage = Stage::Ended;
                return Ok(Some(Piece::End));
            }
            return Ok(None);
        }
        // Postgres takes a lone last byte as the end of the data; it is a
        // field count cut short, and refused here.
        let Some(count) = i16_at(b, 0) else { return self.wait("unexpected EOF in COPY data") };
        if count == -1 {
            // Anything after it is refused by the next call, wherever the
            // messages cut: the same pieces, then the same error.
            self.pending.advance(TRAILER.len());
            self.stage = Stage::Ended;
            return Ok(Some(Piece::End));
        }
        if usize::try_from(count).ok() != Some(self.fields) {
            return Err(bad_format(format!("row field count is {count}, expected {}", self.fields)));
        }
        let mut at = 2usize;
        let mut key = None;
        for field in 0..self.fields {
            let Some(len) = i32_at(b, at) else { return self.wait("unexpected EOF in COPY data") };
            at += 4;
            if len == -1 {
                continue;
            }
            let Ok(len) = usize::try_from(len) else {
                return Err(bad_format("invalid field size"));
            };
            // Known before the bytes come: refused without waiting for them.
            if at.saturating_add(len) > self.max_row {
                return Err(too_long("row", self.max_row));
            }
            if b.len() < at + len {
                return self.wait("unexpected EOF in COPY data");
            }
            if field == self.key_pos {
                key = Some(at..at + len);
            }
            at += len;
        }
        let row = self.pending.split_to(at).freeze();
        let key = key.map(|r| row.slice(r));
        Ok(Some(Piece::Tuple { row, key }))
    }

    /// Not all there yet: wait for more, or, after CopyDone, the error for a
    /// stream cut off here.
    fn wait(&self, cut_off: &str) -> Result<Option<Piece>, SqlError> {
        if self.finished {
            Err(bad_format(cut_off))
        } else {
            Ok(None)
        }
    }
}

fn too_long(what: &str, max: usize) -> SqlError {
    SqlError::new("54000", format!("a binary COPY {what} is longer than {max} bytes"))
}

/// Joins several shards' binary `COPY … TO STDOUT` streams into one: the
/// first shard's header is kept and every later shard's dropped; every
/// shard's trailer is dropped but the last one's.
///
/// Each stream is followed byte by byte through its header, tuples and
/// trailer, so any cut of it into CopyData messages is read right; and the
/// messages keep the shape Postgres gives them, which some readers rely on
/// (tokio-postgres's `BinaryCopyOutStream` reads one tuple per message, the
/// header in the first): the header goes out with the first tuple of any
/// shard (or, with no rows anywhere, with the trailer), each message
/// otherwise carries what it carried, less what is dropped.
#[derive(Default)]
pub struct BinaryJoin {
    /// The first shard's header, held until something goes out with it.
    header: Vec<u8>,
    /// Whether the header went out.
    header_sent: bool,
    /// Where the current shard's stream is.
    at: At,
    /// Whether the current shard's header and trailer go to the client.
    keep_header: bool,
    keep_trailer: bool,
}

/// A place in one shard's binary COPY stream.
#[derive(Default)]
enum At {
    /// At the start.
    #[default]
    Header,
    /// In the fixed part of the header: the bytes of it seen so far.
    HeaderBytes(Vec<u8>),
    /// In the header extension: bytes left.
    Extension(usize),
    /// At the start of a tuple's field count, or past its first byte.
    Count(Option<u8>),
    /// In a field's length word: fields left (this one included), bytes seen.
    Length { fields: usize, seen: [u8; 4], n: usize },
    /// In a field's value: fields left (this one included), bytes left.
    Value { fields: usize, left: usize },
    /// Past the trailer's first byte.
    Trailer,
    /// After the trailer: nothing more is expected.
    Ended,
}

impl BinaryJoin {
    pub fn new() -> Self {
        BinaryJoin::default()
    }

    /// The next shard's stream begins: `first` keeps its header, `last` its
    /// trailer.
    pub fn start_shard(&mut self, first: bool, last: bool) {
        self.at = At::Header;
        self.keep_header = first;
        self.keep_trailer = last;
    }

    /// What of one CopyData body of the current shard goes to the client, as
    /// one message (empty: none).
    pub fn data<'a>(&mut self, body: &'a [u8]) -> Cow<'a, [u8]> {
        // Ranges of `body` that go out, in order.
        let mut kept: Vec<Range<usize>> = Vec::new();
        let mut i = 0;
        while i < body.len() {
            let rest = body.len() - i;
            match &mut self.at {
                At::Header => self.at = At::HeaderBytes(Vec::with_capacity(HEADER_LEN)),
                At::HeaderBytes(seen) => {
                    let k = (HEADER_LEN - seen.len()).min(rest);
                    seen.extend_from_slice(&body[i..i + k]);
                    if self.keep_header && !self.header_sent {
                        self.header.extend_from_slice(&body[i..i + k]);
                    }
                    i += k;
                    if seen.len() == HEADER_LEN {
                        // A shard's own stream: its extension length is sane.
                        let ext = i32_at(seen, 15).and_then(|e| usize::try_from(e).ok()).unwrap_or(0);
                        self.at = if ext > 0 { At::Extension(ext) } else { At::Count(None) };
                    }
                }
                At::Extension(left) => {
                    let k = (*left).min(rest);
                    if self.keep_header && !self.header_sent {
                        self.header.extend_from_slice(&body[i..i + k]);
                    }
                    i += k;
                    *left -= k;
                    if *left == 0 {
                        self.at = At::Count(None);
                    }
                }
                // A field count never starts with 0xff (at most 1600 fields):
                // the trailer (-1) does.
                At::Count(None) if body[i] == 0xff => {
                    if self.keep_trailer {
                        keep(i..i + 1, &mut kept);
                    }
                    i += 1;
                    self.at = At::Trailer;
                }
                At::Count(None) => {
                    keep(i..i + 1, &mut kept);
                    self.at = At::Count(Some(body[i]));
                    i += 1;
                }
                At::Count(Some(first)) => {
                    keep(i..i + 1, &mut kept);
                    let fields = usize::try_from(i16::from_be_bytes([*first, body[i]])).unwrap_or(0);
                    i += 1;
                    self.at = next_field(fields);
                }
                At::Length { fields, seen, n } => {
                    let k = (4 - *n).min(rest);
                    seen[*n..*n + k].copy_from_slice(&body[i..i + k]);
                    keep(i..i + k, &mut kept);
                    i += k;
                    *n += k;
                    if *n == 4 {
                        // -1 (NULL) and 0 have no value bytes.
                        self.at = match usize::try_from(i32::from_be_bytes(*seen)) {
                            Ok(len) if len > 0 => At::Value { fields: *fields, left: len },
                            _ => next_field(*fields - 1),
                        };
                    }
                }
                At::Value { fields, left } => {
                    let k = (*left).min(rest);
                    keep(i..i + k, &mut kept);
                    i += k;
                    *left -= k;
                    if *left == 0 {
                        self.at = next_field(*fields - 1);
                    }
                }
                At::Trailer => {
                    if self.keep_trailer {
                        keep(i..i + 1, &mut kept);
                    }
                    i += 1;
                    self.at = At::Ended;
                }
                // Nothing follows a trailer in a shard's stream; if anything
                // did, the client gets it rather than losing it.
                At::Ended => {
                    keep(i..body.len(), &mut kept);
                    i = body.len();
                }
            }
        }
        let glue = !self.header_sent && !kept.is_empty() && !self.header.is_empty();
        let out: Cow<'a, [u8]> = match &kept[..] {
            [] => Cow::Borrowed(&[]),
            [only] if !glue => Cow::Borrowed(&body[only.clone()]),
            _ => {
                let mut out = Vec::with_capacity(body.len() + self.header.len());
                if glue {
                    out.append(&mut self.header);
                }
                for r in kept {
                    out.extend_from_slice(&body[r]);
                }
                Cow::Owned(out)
            }
        };
        self.header_sent |= !out.is_empty();
        out
    }
}

/// Adds `r` to the ranges kept, joined to the last one where they meet.
fn keep(r: Range<usize>, kept: &mut Vec<Range<usize>>) {
    match kept.last_mut() {
        _ if r.is_empty() => {}
        Some(last) if last.end == r.start => last.end = r.end,
        _ => kept.push(r),
    }
}

/// Where a stream is after a tuple's field count or a field: at the next
/// field's length, or (none left) at the next tuple.
fn next_field(fields: usize) -> At {
    if fields == 0 {
        At::Count(None)
    } else {
        At::Length { fields, seen: [0; 4], n: 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(ext: &[u8]) -> Vec<u8> {
        let mut h = SIGNATURE.to_vec();
        h.extend_from_slice(&0i32.to_be_bytes());
        h.extend_from_slice(&(ext.len() as i32).to_be_bytes());
        h.extend_from_slice(ext);
        h
    }

    /// A tuple of the given fields (None for NULL).
    fn tuple(fields: &[Option<&[u8]>]) -> Vec<u8> {
        let mut t = (fields.len() as i16).to_be_bytes().to_vec();
        for f in fields {
            match f {
                None => t.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    t.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    t.extend_from_slice(v);
                }
            }
        }
        t
    }

    /// A stream of three two-field tuples (key second), header extension
    /// `ext`, and the trailer.
    fn stream(ext: &[u8]) -> (Vec<u8>, Vec<Vec<u8>>) {
        let rows = vec![
            tuple(&[Some(b"a"), Some(&7i64.to_be_bytes())]),
            tuple(&[Some(b""), None]),
            tuple(&[None, Some(&42i32.to_be_bytes())]),
        ];
        let mut s = header(ext);
        for r in &rows {
            s.extend_from_slice(r);
        }
        s.extend_from_slice(&TRAILER);
        (s, rows)
    }

    /// Every piece from `pieces` fed in turn, then finished; stops at an error.
    fn split(pieces: &[&[u8]], fields: usize, max_row: usize) -> Vec<Result<Piece, String>> {
        let mut s = BinarySplitter::new(fields, 1, max_row);
        let mut out = Vec::new();
        let drain = |s: &mut BinarySplitter, out: &mut Vec<Result<Piece, String>>| {
            while let Some(p) = s.next_piece() {
                out.push(p.map_err(|e| e.to_string()));
            }
        };
        for p in pieces {
            s.feed(p);
            drain(&mut s, &mut out);
        }
        s.finish();
        drain(&mut s, &mut out);
        out
    }

    fn expected(ext: &[u8]) -> Vec<Result<Piece, String>> {
        let (_, rows) = stream(ext);
        let keys: [Option<&[u8]>; 3] = [Some(&7i64.to_be_bytes()), None, Some(&42i32.to_be_bytes())];
        let mut want = vec![Ok(Piece::Header(header(ext).into()))];
        for (r, k) in rows.into_iter().zip(keys) {
            want.push(Ok(Piece::Tuple { row: r.into(), key: k.map(Bytes::copy_from_slice) }));
        }
        want.push(Ok(Piece::End));
        want
    }

    /// The same pieces however the stream is cut: at every byte boundary into
    /// two messages, and into messages of every size from 1 byte up.
    #[test]
    fn pieces_do_not_depend_on_where_messages_cut_the_stream() {
        for ext in [&b""[..], b"xyz"] {
            let (s, _) = stream(ext);
            let want = expected(ext);
            for cut in 0..=s.len() {
                assert_eq!(split(&[&s[..cut], &s[cut..]], 2, 1 << 20), want, "cut at {cut}");
            }
            for size in 1..=s.len() {
                let pieces: Vec<&[u8]> = s.chunks(size).collect();
                assert_eq!(split(&pieces, 2, 1 << 20), want, "messages of {size} bytes");
            }
        }
    }

    /// Cut off anywhere before its end, the stream is an error at CopyDone,
    /// never rows silently dropped; cut off at a tuple boundary, it ended (as
    /// in Postgres, which takes a missing trailer as the end).
    #[test]
    fn a_stream_cut_short_is_an_error_unless_cut_between_tuples() {
        let (s, rows) = stream(b"e");
        let mut boundaries = vec![header(b"e").len()];
        for r in &rows {
            boundaries.push(boundaries.last().unwrap() + r.len());
        }
        for cut in 0..s.len() - TRAILER.len() {
            let got = split(&[&s[..cut]], 2, 1 << 20);
            let last = got.last().unwrap();
            if boundaries.contains(&cut) {
                assert_eq!(last, &Ok(Piece::End), "cut at {cut}");
            } else {
                let e = last.as_ref().unwrap_err();
                assert!(e.starts_with("22P04"), "cut at {cut}: {e}");
            }
        }
        assert_eq!(split(&[&s[..0]], 2, 100), vec![Err("22P04: COPY file signature not recognized".into())]);
        assert_eq!(
            split(&[&s[..13]], 2, 100).last().unwrap(),
            &Err("22P04: invalid COPY file header (missing flags)".into())
        );
        assert_eq!(
            split(&[&s[..17]], 2, 100).last().unwrap(),
            &Err("22P04: invalid COPY file header (missing length)".into())
        );
        assert_eq!(
            split(&[&s[..19]], 2, 100).last().unwrap(),
            &Err("22P04: invalid COPY file header (wrong length)".into())
        );
        assert_eq!(split(&[&s[..21]], 2, 100).last().unwrap(), &Err("22P04: unexpected EOF in COPY data".into()));
    }

    #[test]
    fn bad_headers_are_refused_as_postgres_refuses_them() {
        let first = |data: &[u8]| split(&[data], 2, 1 << 20).into_iter().next().unwrap();
        // Text data sent as binary: refused at its first byte, before CopyDone.
        let mut s = BinarySplitter::new(2, 1, 100);
        s.feed(b"1\t");
        assert!(s.next_piece().unwrap().is_err_and(|e| e.message == "COPY file signature not recognized"));
        assert!(s.next_piece().is_none(), "an error is given once");
        let with_flags = |flags: i32| {
            let mut h = header(b"");
            h[11..15].copy_from_slice(&flags.to_be_bytes());
            h.extend_from_slice(&TRAILER);
            h
        };
        assert_eq!(first(&with_flags(1 << 16)), Err("22P04: invalid COPY file header (WITH OIDS)".into()));
        assert_eq!(first(&with_flags(1 << 20)), Err("22P04: unrecognized critical flags in COPY file header".into()));
        assert_eq!(first(&with_flags(i32::MIN)), Err("22P04: unrecognized critical flags in COPY file header".into()));
        // The low 16 bits are not critical: ignored, as Postgres ignores them.
        assert!(matches!(first(&with_flags(0xffff)), Ok(Piece::Header(_))));
        let mut h = header(b"");
        h[15..19].copy_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(first(&h), Err("22P04: invalid COPY file header (missing length)".into()));
        // An extension longer than the limit is refused before it comes.
        let mut h = header(b"");
        h[15..19].copy_from_slice(&1000i32.to_be_bytes());
        assert_eq!(split(&[&h], 2, 500)[0], Err("54000: a binary COPY header is longer than 500 bytes".into()));
    }

    #[test]
    fn bad_tuples_are_refused() {
        let with = |t: Vec<u8>| {
            let mut s = header(b"");
            s.extend_from_slice(&t);
            s.extend_from_slice(&TRAILER);
            split(&[&s], 2, 100).into_iter().nth(1).unwrap()
        };
        assert_eq!(with(tuple(&[Some(b"1")])), Err("22P04: row field count is 1, expected 2".into()));
        assert_eq!(with(tuple(&[None, None, None])), Err("22P04: row field count is 3, expected 2".into()));
        assert_eq!(with(vec![0x80, 0]), Err("22P04: row field count is -32768, expected 2".into()));
        let mut t = tuple(&[Some(b"1"), Some(b"2")]);
        t[2..6].copy_from_slice(&(-2i32).to_be_bytes());
        assert_eq!(with(t), Err("22P04: invalid field size".into()));
        // A field longer than the limit is refused from its length alone.
        let mut t = tuple(&[Some(b"1"), Some(b"2")]);
        t[7..11].copy_from_slice(&i32::MAX.to_be_bytes());
        assert_eq!(with(t), Err("54000: a binary COPY row is longer than 100 bytes".into()));
        assert!(with(tuple(&[Some(&[0; 80]), Some(b"2")])).is_ok());
        assert!(with(tuple(&[Some(&[0; 90]), Some(b"2")])).is_err());
    }

    #[test]
    fn data_after_the_trailer_is_refused() {
        let (mut s, _) = stream(b"");
        s.push(0);
        let got = split(&[&s], 2, 100);
        assert_eq!(got[got.len() - 2..], [Ok(Piece::End), Err("22P04: received copy data after EOF marker".into())]);
        // Also when it comes in a later message than the trailer.
        let (s, _) = stream(b"");
        let got = split(&[&s, b"\0\x02"], 2, 100);
        assert_eq!(got[got.len() - 2], Ok(Piece::End));
        assert_eq!(got.last().unwrap(), &Err("22P04: received copy data after EOF marker".into()));
    }

    /// A shard's stream of `rows` (header with extension `ext`, rows, trailer).
    fn shard_stream(rows: &[Vec<u8>], ext: &[u8]) -> Vec<u8> {
        let mut s = header(ext);
        for r in rows {
            s.extend_from_slice(r);
        }
        s.extend_from_slice(&TRAILER);
        s
    }

    /// The shards' streams joined, each cut into messages by `cut` (their
    /// ranges); the messages that go to the client.
    fn join(shards: &[Vec<u8>], cut: impl Fn(&[u8]) -> Vec<Range<usize>>) -> Vec<Vec<u8>> {
        let mut join = BinaryJoin::new();
        let mut out = Vec::new();
        for (i, s) in shards.iter().enumerate() {
            join.start_shard(i == 0, i + 1 == shards.len());
            for m in cut(s) {
                let data = join.data(&s[m]);
                if !data.is_empty() {
                    out.push(data.into_owned());
                }
            }
        }
        out
    }

    fn row(k: i64) -> Vec<u8> {
        tuple(&[Some(&k.to_be_bytes()), None, Some(b""), Some(&[0xff; 3])])
    }

    /// Joined wherever messages cut the shards' streams: one header, every
    /// row, one trailer, byte for byte.
    #[test]
    fn joined_shard_streams_are_one_stream_wherever_messages_cut() {
        let shards = [
            shard_stream(&[row(1), row(2)], b""),
            shard_stream(&[], b"ext"),
            shard_stream(&[row(3)], b""),
            shard_stream(&[], b""),
        ];
        let mut want = header(b"");
        for k in 1..=3 {
            want.extend_from_slice(&row(k));
        }
        want.extend_from_slice(&TRAILER);
        for size in 1..=60 {
            let sized = |s: &[u8]| (0..s.len()).step_by(size).map(|at| at..(at + size).min(s.len())).collect();
            assert_eq!(join(&shards, sized).concat(), want, "messages of {size} bytes");
        }
        for cut in 0..=shards[0].len() {
            let two = |s: &[u8]| {
                let at = cut.min(s.len());
                vec![0..at, at..s.len()]
            };
            assert_eq!(join(&shards, two).concat(), want, "cut at {cut}");
        }
    }

    /// Cut as Postgres sends a stream (the header with the first row, a
    /// message per row, the trailer alone; header and trailer together when
    /// there are no rows), the joined stream comes in the same shape.
    #[test]
    fn joined_messages_are_shaped_as_postgres_shapes_them() {
        let postgres = |s: &[u8]| {
            let mut out = Vec::new();
            let mut at = 0;
            let mut first = true;
            while at < s.len() {
                let len = if s.len() - at == HEADER_LEN + 2 || s.len() - at == 2 {
                    s.len() - at
                } else {
                    (if first { HEADER_LEN } else { 0 }) + row(0).len()
                };
                out.push(at..at + len);
                at += len;
                first = false;
            }
            out
        };
        let with_rows = |rows: &[&[i64]]| {
            let shards: Vec<Vec<u8>> =
                rows.iter().map(|r| shard_stream(&r.iter().map(|k| row(*k)).collect::<Vec<_>>(), b"")).collect();
            join(&shards, postgres)
        };
        let first = [header(b""), row(1)].concat();
        assert_eq!(with_rows(&[&[], &[1, 2], &[], &[3], &[]]), vec![first.clone(), row(2), row(3), TRAILER.to_vec()]);
        assert_eq!(with_rows(&[&[1], &[2]]), vec![first, row(2), TRAILER.to_vec()]);
        assert_eq!(with_rows(&[&[], &[], &[]]), vec![[header(b""), TRAILER.to_vec()].concat()]);
        assert_eq!(with_rows(&[&[]]), vec![[header(b""), TRAILER.to_vec()].concat()]);
    }
}

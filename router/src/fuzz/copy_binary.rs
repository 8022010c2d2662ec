//! The binary COPY splitter and the joiner of shards' binary streams.

use super::{chunks, Input};
use crate::copy_binary::{BinaryJoin, BinarySplitter, Piece, HEADER_LEN, SIGNATURE, TRAILER};

/// Binary COPY data, cut into messages by the input. Properties: the header
/// and tuples joined (and the trailer, if read) are exactly the data read,
/// in order; the pieces and the error are the same however the data is cut;
/// each key is the field at the key's position, read separately here; the
/// bytes held between messages stay within the row limit. Then the joiner:
/// the stream made of the tuples cut into shards' streams joins back into one
/// stream, byte for byte, however the messages cut them.
pub fn copy_binary(data: &[u8]) {
    let mut input = Input::new(data);
    let fields = 1 + input.below(4);
    let key_pos = input.below(fields);
    let max_row = 64 + input.below(4096);
    // Most inputs start with a good header, so that tuples are reached.
    let good_header = input.bool();
    let sizes = input.bytes(4).to_vec();
    let mut body = Vec::new();
    if good_header {
        body.extend_from_slice(SIGNATURE);
        body.extend_from_slice(&[0; 8]);
    }
    body.extend_from_slice(input.rest());

    let split = |pieces: &[&[u8]]| {
        let mut s = BinarySplitter::new(fields, key_pos, max_row);
        let mut out: Vec<Result<Piece, String>> = Vec::new();
        let drain = |s: &mut BinarySplitter, out: &mut Vec<Result<Piece, String>>| {
            while let Some(p) = s.next_piece() {
                out.push(p.map_err(|e| e.to_string()));
            }
        };
        for piece in pieces {
            s.feed(piece);
            drain(&mut s, &mut out);
            assert!(s.pending().len() <= max_row, "{} bytes held for a piece", s.pending().len());
        }
        s.finish();
        drain(&mut s, &mut out);
        assert!(out.last().is_some(), "the data ended without an end or an error");
        assert!(matches!(out.last(), Some(Err(_) | Ok(Piece::End))), "the data did not end: {out:?}");
        assert!(out.iter().filter(|p| p.is_err()).count() <= 1, "more than one error");
        out
    };
    let whole = split(&[&body]);
    let pieces = chunks(&body, &sizes);
    let cut = split(&pieces);
    // Only a too-long piece may be refused at a different point: how much of
    // it had come when the limit was passed depends on the cutting.
    let too_long =
        |out: &[Result<Piece, String>]| out.iter().any(|p| p.as_ref().is_err_and(|e| e.starts_with("54000")));
    if !too_long(&whole) && !too_long(&cut) {
        assert_eq!(whole, cut, "pieces depend on how the data is cut into messages");
    }

    // What was read is the data, in order; each key is its tuple's field.
    let mut read = Vec::new();
    let mut tuples = Vec::new();
    for p in &whole {
        match p {
            Ok(Piece::Header(h)) => {
                assert!(read.is_empty(), "a header after other data");
                assert_eq!(&h[..11], SIGNATURE);
                read.extend_from_slice(h);
            }
            Ok(Piece::Tuple { row, key }) => {
                assert_eq!(key.as_deref(), field(row, key_pos), "key of {row:?}");
                read.extend_from_slice(row);
                tuples.push(row.clone());
            }
            Ok(Piece::End) => {
                if body.len() > read.len() {
                    read.extend_from_slice(&TRAILER);
                }
            }
            Err(_) => {}
        }
    }
    assert!(body.starts_with(&read), "pieces are not the data");
    if matches!(whole.last(), Some(Ok(Piece::End))) {
        assert_eq!(read, body, "data left over after the end");
    }

    // The tuples spread over three shards' streams, each with its own header
    // and trailer, join back into one stream.
    if tuples.is_empty() {
        return;
    }
    let header = |ext: &[u8]| {
        let mut h = SIGNATURE.to_vec();
        h.extend_from_slice(&0i32.to_be_bytes());
        h.extend_from_slice(&(ext.len() as i32).to_be_bytes());
        h.extend_from_slice(ext);
        h
    };
    let mut shards = [header(b""), header(b"x"), header(b"")];
    for (i, t) in tuples.iter().enumerate() {
        shards[i % 3].extend_from_slice(t);
    }
    let mut want = header(b"");
    for (i, s) in shards.iter_mut().enumerate() {
        want.extend_from_slice(&s[if i == 1 { HEADER_LEN + 1 } else { HEADER_LEN }..]);
        s.extend_from_slice(&TRAILER);
    }
    want.extend_from_slice(&TRAILER);
    let mut joined = Vec::new();
    let mut join = BinaryJoin::new();
    for (i, s) in shards.iter().enumerate() {
        join.start_shard(i == 0, i == 2);
        for m in chunks(s, &sizes) {
            joined.extend_from_slice(&join.data(m));
        }
    }
    assert_eq!(joined, want, "shards' streams joined");
}

/// Field `pos` of a whole tuple (None for NULL), read on its own.
fn field(row: &[u8], mut pos: usize) -> Option<&[u8]> {
    let mut at = 2;
    loop {
        let len = i32::from_be_bytes(row[at..at + 4].try_into().unwrap());
        at += 4;
        let value = (len >= 0).then(|| &row[at..at + len as usize]);
        if pos == 0 {
            return value;
        }
        pos -= 1;
        at += len.max(0) as usize;
    }
}

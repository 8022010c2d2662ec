//! The COPY row splitter.

use super::{chunks, Input};
use crate::copy_in::{RowKey, RowSplitter};
use crate::sql::{CopyFormat, CopyInfo};

/// The delimiters tried: the defaults and a few that COPY allows.
const DELIMITERS: [u8; 4] = [b'\t', b',', b'|', b';'];

/// Rows of COPY text or CSV data, cut into messages by the input. Properties:
/// the rows joined are exactly the data up to the end-of-data marker, after
/// which nothing comes (nothing lost, duplicated or reordered; a cut-off last
/// row comes back as an error, not dropped); the
/// rows and keys are the same however the data is cut; the data held while a
/// row end is awaited stays within the row limit; and each text-format key is
/// the field Postgres would read (see [`postgres_text_key`]).
pub fn copy(data: &[u8]) {
    let mut input = Input::new(data);
    let csv = input.bool();
    let delimiter = DELIMITERS[input.below(DELIMITERS.len())];
    let key_pos = input.below(4);
    let max_row = 64 + input.below(4096);
    let sizes = input.bytes(4).to_vec();
    let body = input.rest();
    let info = CopyInfo {
        from_stdin: true,
        per_shard: None,
        table: Some("t".into()),
        columns: None,
        format: if csv { CopyFormat::Csv } else { CopyFormat::Text },
        delimiter: Some(delimiter),
        header: false,
    };
    let split = |pieces: &[&[u8]]| {
        let mut s = RowSplitter::new(&info, key_pos, max_row);
        let mut out: Vec<(Vec<u8>, Result<RowKey, String>)> = Vec::new();
        for piece in pieces {
            s.feed(piece);
            while let Some((row, key)) = s.next_row() {
                out.push((row.to_vec(), key.map_err(|e| e.to_string())));
            }
            assert!(s.pending().len() <= max_row, "{} bytes held for a row", s.pending().len());
        }
        s.finish();
        while let Some((row, key)) = s.next_row() {
            out.push((row.to_vec(), key.map_err(|e| e.to_string())));
        }
        assert!(s.pending().is_empty(), "data left over after the end");
        out
    };
    // The rows joined are the data, up to the end-of-data marker if there is one.
    let joined = |rows: &[(Vec<u8>, Result<RowKey, String>)]| {
        let all = rows.iter().map(|(r, _)| &r[..]).collect::<Vec<_>>().concat();
        match rows.last() {
            Some((_, Ok(None))) => assert!(body.starts_with(&all), "rows are not the data"),
            _ => assert_eq!(all, body, "rows are not the data"),
        }
        let marker = rows.iter().position(|(_, k)| matches!(k, Ok(None)));
        if let Some(i) = marker {
            assert_eq!(i + 1, rows.len(), "rows after the end-of-data marker");
        }
    };
    let whole = split(&[body]);
    joined(&whole);
    let pieces = chunks(body, &sizes);
    let cut = split(&pieces);
    // Only a row over the limit may come out differently: how much of it had
    // arrived when the limit was passed depends on the cutting.
    if !cut.iter().chain(&whole).any(|(_, k)| k.as_ref().is_err_and(|e| e.starts_with("54000"))) {
        assert_eq!(whole, cut, "rows depend on how the data is cut into messages");
    }
    joined(&cut);
    if !csv {
        for (row, key) in &whole {
            if let Ok(Some(key)) = key {
                assert_eq!(
                    *key,
                    postgres_text_key(row, delimiter, key_pos),
                    "key of {:?}",
                    String::from_utf8_lossy(row)
                );
            }
        }
    }
}

/// The key field of a text-format row as Postgres's COPY reads it (from the
/// rules of CopyReadAttributesText, written out separately from the router's
/// reading): None for `\N`.
fn postgres_text_key(row: &[u8], delimiter: u8, key_pos: usize) -> Option<String> {
    let line = row.strip_suffix(b"\n").unwrap_or(row);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut fields: Vec<(Vec<u8>, Vec<u8>)> = vec![(Vec::new(), Vec::new())];
    let mut i = 0;
    while i < line.len() {
        let c = line[i];
        i += 1;
        let (raw, value) = fields.last_mut().unwrap();
        if c == delimiter {
            fields.push((Vec::new(), Vec::new()));
            continue;
        }
        raw.push(c);
        if c != b'\\' || i == line.len() {
            value.push(c);
            continue;
        }
        let e = line[i];
        i += 1;
        raw.push(e);
        let byte = match e {
            b'0'..=b'7' => {
                let mut v = u32::from(e - b'0');
                for _ in 0..2 {
                    if let Some(&d @ b'0'..=b'7') = line.get(i) {
                        v = v * 8 + u32::from(d - b'0');
                        raw.push(d);
                        i += 1;
                    } else {
                        break;
                    }
                }
                v as u8
            }
            b'x' if line.get(i).is_some_and(u8::is_ascii_hexdigit) => {
                let mut v = 0u32;
                for _ in 0..2 {
                    match line.get(i).and_then(|&d| char::from(d).to_digit(16)) {
                        Some(d) => {
                            v = v * 16 + d;
                            raw.push(line[i]);
                            i += 1;
                        }
                        None => break,
                    }
                }
                v as u8
            }
            b'b' => 8,
            b'f' => 12,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'v' => 11,
            other => other,
        };
        value.push(byte);
    }
    let (raw, value) = fields.get(key_pos)?;
    (raw != b"\\N").then(|| String::from_utf8_lossy(value).into_owned())
}

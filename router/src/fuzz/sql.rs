//! SQL shape analysis, constant lifting and the analysis cache.

use super::Input;
use crate::sql::shape::{literal_text, shape, PieceKind, Shape};
use crate::sql::{analyze, quote, AnalysisCache};

/// Constants put in place of another text's constants.
const CONSTANTS: &[&str] = &[
    "0",
    "7",
    "42",
    "007",
    "2147483647",
    "2147483648",
    "9223372036854775807",
    "9223372036854775808",
    "1.5",
    "1e3",
    ".5",
    "'7'",
    "'x'",
    "'it''s'",
    "''",
    "E'\\x41'",
    "E'\\101\\n'",
    "E'a\\'b'",
    "$$dollar$$",
    "$t$7$t$",
    "'acme'",
];

/// The key column the targets analyze with.
const KEY: &str = "tenant_id";

/// The input (as UTF-8, lossily) as a query string, and a second text made from
/// it by putting other constants in place of its constants. Properties:
/// - the shape's pieces are in order, within the text, and its key is the
///   text with each piece replaced by its kind's placeholder;
/// - the analysis cache, having seen the first text, gives for the second
///   exactly what analyzing the second from scratch gives (whenever that
///   succeeds);
/// - a simple query's prepared form, with its parameters put back as
///   literals, parses to the same statement as the text it came from;
/// - quoting any part of the input as a literal or an identifier reads back
///   as that value.
pub fn sql(data: &[u8]) {
    let mut input = Input::new(data);
    let choices = input.bytes(8).to_vec();
    let text = String::from_utf8_lossy(input.rest()).into_owned();
    let Some(s) = shape(&text) else {
        let _ = analyze(&text, KEY);
        quoting(&text);
        return;
    };
    check_shape(&text, &s);
    let mut other = String::with_capacity(text.len() + 16);
    let mut copied = 0;
    let mut n = 0;
    for p in &s.pieces {
        if p.kind == PieceKind::Comment {
            continue;
        }
        let c = choices.get(n % choices.len().max(1)).copied().unwrap_or(0) as usize;
        n += 1;
        other.push_str(&text[copied..p.span.start]);
        // About one in four pieces keeps its text.
        if c & 3 == 0 {
            other.push_str(&text[p.span.clone()]);
        } else {
            other.push_str(CONSTANTS[(c / 4) % CONSTANTS.len()]);
        }
        copied = p.span.end;
    }
    other.push_str(&text[copied..]);
    if let Some(s2) = shape(&other) {
        check_shape(&other, &s2);
    }

    let cache = AnalysisCache::new(KEY, 64);
    let first = cache.get_simple(&text);
    if let Ok(fresh) = analyze(&text, KEY) {
        assert_eq!(first.as_ref().map(|(a, _)| &**a), Ok(&fresh), "the cache's first analysis differs");
    }
    for t in [&text, &other] {
        let cached = cache.get_simple(t);
        let Ok(fresh) = analyze(t, KEY) else { continue };
        let (analysis, form) = cached.unwrap_or_else(|e| panic!("the cache fails where analysis succeeds: {e}"));
        assert_eq!(*analysis, fresh, "the cache's analysis of {t:?} (after {text:?}) differs from a fresh one");
        if let Some(form) = form {
            check_form(t, &form.form.text, &form.form.types, &form.values);
        }
    }
    quoting(&text);
}

fn check_shape(text: &str, s: &Shape) {
    let mut key = String::new();
    let mut copied = 0;
    for p in &s.pieces {
        assert!(p.span.start >= copied && p.span.start < p.span.end && p.span.end <= text.len(), "{p:?}");
        let piece = text.get(p.span.clone()).expect("a piece is not on character boundaries");
        key.push_str(&text[copied..p.span.start]);
        key.push(match p.kind {
            PieceKind::Integer => '\u{1}',
            PieceKind::Numeric => '\u{2}',
            PieceKind::String => '\u{3}',
            PieceKind::Comment => '\u{4}',
        });
        copied = p.span.end;
        match p.kind {
            PieceKind::Integer => {
                assert!(piece.parse::<i32>().is_ok(), "integer piece {piece:?}");
                let v = literal_text(text, p, false).unwrap();
                assert_eq!(v.parse::<i32>().ok(), piece.parse::<i32>().ok());
                assert!(literal_text(text, p, true).is_some());
            }
            PieceKind::Numeric => {
                assert!(piece.bytes().next().is_some_and(|c| c.is_ascii_digit() || c == b'.'), "{piece:?}");
                assert_eq!(literal_text(text, p, false).as_deref(), Some(piece));
            }
            PieceKind::String => {
                let _ = literal_text(text, p, false);
            }
            PieceKind::Comment => assert!(piece.starts_with("--") || piece.starts_with("/*")),
        }
    }
    key.push_str(&text[copied..]);
    assert_eq!(key, s.key, "the shape's key is not its text with placeholders");
}

/// The form's text with each `$n` replaced by its value as a literal parses
/// to what `text` parses to.
fn check_form(text: &str, form: &str, types: &[i32], values: &[Vec<u8>]) {
    assert_eq!(types.len(), values.len(), "a value per parameter");
    let s = shape(form).unwrap_or_else(|| panic!("a prepared form the lexer cannot read: {form:?}"));
    let mut out = String::new();
    let mut i = 0;
    let b = form.as_bytes();
    let in_piece = |at: usize| s.pieces.iter().any(|p| p.span.contains(&at));
    while i < b.len() {
        if b[i] == b'"' && !in_piece(i) {
            // A quoted identifier: a `$1` in it is a name's characters.
            let mut j = i + 1;
            while j < b.len() && !(b[j] == b'"' && b.get(j + 1) != Some(&b'"')) {
                j += if b[j] == b'"' { 2 } else { 1 };
            }
            let end = (j + 1).min(b.len());
            out.push_str(&form[i..end]);
            i = end;
            continue;
        }
        let after_word =
            i > 0 && (b[i - 1].is_ascii_alphanumeric() || matches!(b[i - 1], b'_' | b'$') || b[i - 1] >= 0x80);
        if b[i] == b'$' && !after_word && !in_piece(i) && b.get(i + 1).is_some_and(u8::is_ascii_digit) {
            let mut j = i + 1;
            while b.get(j).is_some_and(u8::is_ascii_digit) {
                j += 1;
            }
            let n: usize = form[i + 1..j].parse().unwrap();
            let v = std::str::from_utf8(&values[n - 1]).expect("a value is UTF-8");
            match types[n - 1] {
                0 => out.push_str(&quote::literal(v)),
                _ => out.push_str(v),
            }
            i = j;
        } else {
            let c = form[i..].chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    // Parse trees compared with their locations left out. Not deparsed: the
    // deparser's debug build aborts on some trees the parser accepts.
    let tree = |t: &str| {
        pg_query::parse(t, 0).map(|p| crate::sql::without_locations(serde_json::to_value(&p.protobuf).unwrap()))
    };
    let want = tree(text).expect("the text parses");
    let got = tree(&out).unwrap_or_else(|e| panic!("the form {form:?} with its values is {out:?}: {e}"));
    assert!(got == want, "the prepared form of {text:?} means something else: {out:?}");
}

/// Quoting parts of `text` (between `;`s) reads back as they were.
fn quoting(text: &str) {
    for part in text.split(';').take(4) {
        if part.contains('\0') {
            continue;
        }
        let lit = quote::literal(part);
        assert_eq!(crate::sql::shape::string_value(&lit).as_deref(), Some(part), "literal {lit:?}");
        // Postgres cuts identifiers at 63 bytes; an empty one is no identifier.
        let name = if part.is_empty() || part.len() > 63 { "x" } else { part };
        let parsed = pg_query::parse(&format!("SELECT {lit} AS {}", quote::ident(name)), 0);
        let tree = serde_json::to_value(&parsed.unwrap_or_else(|e| panic!("{lit:?}: {e}")).protobuf).unwrap();
        let target = &tree["stmts"][0]["stmt"]["node"]["SelectStmt"]["target_list"][0]["node"]["ResTarget"];
        let sval = target["val"]["node"]["AConst"]["val"]["Sval"]["sval"].as_str();
        assert_eq!(sval.unwrap_or(""), part, "literal {lit:?}");
        assert_eq!(target["name"].as_str(), Some(name), "identifier {:?}", quote::ident(name));
    }
}

//! The shape of a query string: its text with every constant and comment taken
//! out, so that `… WHERE aid = 1` and `… WHERE aid = 2` share one cache entry.
//!
//! Applications that inline literals in simple queries send a different text for
//! every statement; keyed on the exact text, the analysis cache would parse each
//! of them again. The shape is the cache key instead, and the pieces it took out
//! (in order) are what an execution's literals are read from.
//!
//! This is a small lexer, not a parser: it knows only what it must to find
//! constants exactly where Postgres's scanner does — quoted identifiers,
//! standard, `E'…'` and dollar-quoted strings, numbers, `$n` parameters and
//! nested comments. Whatever it is not sure about (Unicode escapes, bit strings,
//! string continuation across lines, numbers with trailing letters, the bytes it
//! uses as placeholders) makes it give up, and the statement is cached under its
//! exact text as before.

use std::ops::Range;

/// What a piece the shape leaves out is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceKind {
    /// An integer that fits in 32 bits: the parser's integer constant.
    Integer,
    /// Any other number (too large, with a decimal point or an exponent): the
    /// parser keeps its text.
    Numeric,
    /// A string constant: `'…'`, `E'…'` or `$tag$…$tag$`.
    String,
    /// `-- …` or `/* … */`: whitespace to the parser, but a routing comment may
    /// name the tenant, so it is read from each execution's own text.
    Comment,
}

impl PieceKind {
    /// The byte standing for the piece in the shape. None of these can occur in a
    /// text the lexer accepts, so two texts have the same shape only if they
    /// differ in nothing but the contents of pieces of the same kinds.
    fn placeholder(self) -> char {
        match self {
            PieceKind::Integer => '\u{1}',
            PieceKind::Numeric => '\u{2}',
            PieceKind::String => '\u{3}',
            PieceKind::Comment => '\u{4}',
        }
    }
}

/// One constant or comment, by its byte range in the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub kind: PieceKind,
    pub span: Range<usize>,
}

/// A query string's shape and the pieces taken out of it, in text order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    pub key: String,
    pub pieces: Vec<Piece>,
}

/// The shape of `sql`, or None when the lexer cannot be sure it reads the text as
/// Postgres would.
pub fn shape(sql: &str) -> Option<Shape> {
    let b = sql.as_bytes();
    if b.iter().any(|&c| matches!(c, 0..=4)) {
        return None;
    }
    let mut key = String::with_capacity(sql.len());
    let mut pieces = Vec::new();
    // Start of the text not yet copied into the key.
    let mut copied = 0;
    let mut i = 0;
    let mut take = |kind: PieceKind, span: Range<usize>, key: &mut String, copied: &mut usize| {
        key.push_str(&sql[*copied..span.start]);
        key.push(kind.placeholder());
        *copied = span.end;
        pieces.push(Piece { kind, span });
    };
    while i < b.len() {
        let c = b[i];
        match c {
            b'-' if b.get(i + 1) == Some(&b'-') => {
                let end = b[i..].iter().position(|&c| c == b'\n' || c == b'\r').map_or(b.len(), |n| i + n);
                take(PieceKind::Comment, i..end, &mut key, &mut copied);
                i = end;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let end = block_comment_end(b, i)?;
                take(PieceKind::Comment, i..end, &mut key, &mut copied);
                i = end;
            }
            b'\'' => {
                // `U&'…'` takes Unicode escapes (and a UESCAPE clause): not read here.
                if i > 0 && b[i - 1] == b'&' {
                    return None;
                }
                let end = quoted_end(b, i, false)?;
                string_not_continued(b, end)?;
                take(PieceKind::String, i..end, &mut key, &mut copied);
                i = end;
            }
            b'"' => {
                if i > 0 && b[i - 1] == b'&' {
                    return None;
                }
                // A quoted identifier: part of the shape, `""` stands for `"`.
                let mut j = i + 1;
                loop {
                    match b.get(j)? {
                        b'"' if b.get(j + 1) == Some(&b'"') => j += 2,
                        b'"' => break,
                        _ => j += 1,
                    }
                }
                i = j + 1;
            }
            b'$' => match dollar_tag_end(b, i) {
                Some(tag_end) => {
                    let tag = &b[i..tag_end];
                    let body_end = find(&b[tag_end..], tag)? + tag_end;
                    take(PieceKind::String, i..body_end + tag.len(), &mut key, &mut copied);
                    i = body_end + tag.len();
                }
                // `$1`, or a lone `$`: part of the shape.
                None => {
                    i += 1;
                    while b.get(i).is_some_and(u8::is_ascii_digit) {
                        i += 1;
                    }
                }
            },
            b'0'..=b'9' => {
                let (end, kind) = number(sql, i)?;
                take(kind, i..end, &mut key, &mut copied);
                i = end;
            }
            b'.' if b.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                let (end, kind) = number(sql, i)?;
                take(kind, i..end, &mut key, &mut copied);
                i = end;
            }
            c if ident_start(c) => {
                let mut j = i + 1;
                while b.get(j).is_some_and(|&c| ident_cont(c)) {
                    j += 1;
                }
                if b.get(j) == Some(&b'\'') && j == i + 1 {
                    match c {
                        // E'…': backslash escapes.
                        b'e' | b'E' => {
                            let end = quoted_end(b, j, true)?;
                            string_not_continued(b, end)?;
                            take(PieceKind::String, i..end, &mut key, &mut copied);
                            i = end;
                            continue;
                        }
                        // B'…' and X'…' are bit strings; N'…' is a string after
                        // an NCHAR the shape keeps.
                        b'b' | b'B' | b'x' | b'X' => return None,
                        _ => {}
                    }
                }
                i = j;
            }
            _ => i += 1,
        }
    }
    key.push_str(&sql[copied..]);
    Some(Shape { key, pieces })
}

/// The value of a constant piece the way the analysis writes a literal key:
/// integers as the parser reads them (`007` is `7`), other numbers as written,
/// strings quoted with `''` for a quote; `negated` when the parser folded a
/// minus sign in front of it into the constant. None when this lexer cannot
/// decode it as Postgres would.
pub fn literal_text(sql: &str, piece: &Piece, negated: bool) -> Option<String> {
    let text = sql.get(piece.span.clone())?;
    match piece.kind {
        PieceKind::Integer => {
            let v: i32 = text.parse().ok()?;
            Some(if negated { (-v).to_string() } else { v.to_string() })
        }
        PieceKind::Numeric => Some(if negated { format!("-{text}") } else { text.to_string() }),
        PieceKind::String if !negated => {
            let value = string_value(text)?;
            Some(format!("'{}'", value.replace('\'', "''")))
        }
        PieceKind::String | PieceKind::Comment => None,
    }
}

/// A string constant's value: standard strings take `''` for a quote, `E''`
/// strings backslash escapes, dollar-quoted strings are taken as they are.
pub(crate) fn string_value(text: &str) -> Option<String> {
    if let Some(rest) = text.strip_prefix('$') {
        let tag_len = rest.find('$')? + 2;
        return Some(text.get(tag_len..text.len().checked_sub(tag_len)?)?.to_string());
    }
    if let Some(inner) = text.strip_prefix(['e', 'E']) {
        return escaped_value(inner.strip_prefix('\'')?.strip_suffix('\'')?);
    }
    Some(text.strip_prefix('\'')?.strip_suffix('\'')?.replace("''", "'"))
}

/// The value of an `E'…'` string's inside. Octal and hex escapes are decoded
/// only when they give an ASCII character other than NUL; Unicode escapes not
/// at all (None): the text is then parsed as it is.
fn escaped_value(inner: &str) -> Option<String> {
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                // `''` inside the string.
                chars.next();
                out.push('\'');
            }
            '\\' => {
                let e = chars.next()?;
                match e {
                    'b' => out.push('\u{8}'),
                    'f' => out.push('\u{c}'),
                    'n' => out.push('\n'),
                    'r' => out.push('\r'),
                    't' => out.push('\t'),
                    'u' | 'U' => return None,
                    '0'..='7' => {
                        let v = more_digits(&mut chars, e.to_digit(8)?, 8);
                        out.push(ascii_byte(v & 0xff)?);
                    }
                    'x' if chars.peek().is_some_and(char::is_ascii_hexdigit) => {
                        out.push(ascii_byte(more_digits(&mut chars, 0, 16))?);
                    }
                    other => out.push(other),
                }
            }
            c => out.push(c),
        }
    }
    Some(out)
}

/// `v` with up to two more digits of `radix` taken from `chars`: the rest of an
/// octal (`\101`) or hex (`\x41`) escape.
fn more_digits(chars: &mut std::iter::Peekable<std::str::Chars<'_>>, mut v: u32, radix: u32) -> u32 {
    for _ in 0..2 {
        match chars.peek().and_then(|c| c.to_digit(radix)) {
            Some(d) => {
                v = v * radix + d;
                chars.next();
            }
            None => break,
        }
    }
    v
}

fn ascii_byte(v: u32) -> Option<char> {
    (1..0x80).contains(&v).then(|| char::from(v as u8))
}

fn ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn ident_cont(c: u8) -> bool {
    ident_start(c) || c.is_ascii_digit() || c == b'$'
}

/// The end of a block comment starting at `start`; Postgres's nest.
fn block_comment_end(b: &[u8], start: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = start;
    while i + 1 < b.len() {
        match (b[i], b[i + 1]) {
            (b'/', b'*') => {
                depth += 1;
                i += 2;
            }
            (b'*', b'/') => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => i += 1,
        }
    }
    None
}

/// The end (after the closing quote) of a string whose opening quote is at
/// `quote`; `escapes` for `E''` strings, where a backslash escapes the next byte.
fn quoted_end(b: &[u8], quote: usize, escapes: bool) -> Option<usize> {
    let mut i = quote + 1;
    loop {
        match *b.get(i)? {
            b'\\' if escapes => i += 2,
            b'\'' if b.get(i + 1) == Some(&b'\'') => i += 2,
            b'\'' => return Some(i + 1),
            _ => i += 1,
        }
    }
}

/// Postgres joins `'a'` and `'b'` separated by a newline into one constant;
/// rather than follow that, give up when a string is followed (past whitespace
/// and comments) by another quote.
fn string_not_continued(b: &[u8], mut i: usize) -> Option<()> {
    loop {
        match b.get(i) {
            Some(c) if c.is_ascii_whitespace() => i += 1,
            Some(b'-') if b.get(i + 1) == Some(&b'-') => {
                i = b[i..].iter().position(|&c| c == b'\n').map_or(b.len(), |n| i + n);
            }
            Some(b'/') if b.get(i + 1) == Some(&b'*') => i = block_comment_end(b, i)?,
            Some(b'\'') => return None,
            _ => return Some(()),
        }
    }
}

/// The end of a dollar-quote opening tag (`$$`, `$tag$`) at `start`, if there
/// is one there.
fn dollar_tag_end(b: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    if b.get(i).is_some_and(|&c| ident_start(c)) {
        i += 1;
        while b.get(i).is_some_and(|&c| ident_start(c) || c.is_ascii_digit()) {
            i += 1;
        }
    }
    (b.get(i) == Some(&b'$')).then_some(i + 1)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A number at `start`: digits, an optional fraction, an optional exponent.
/// Anything that runs on into letters, digits or another dot (`0x1F`, `1_000`,
/// `1e`, `1..5`) is left to the parser.
fn number(sql: &str, start: usize) -> Option<(usize, PieceKind)> {
    let b = sql.as_bytes();
    let digits = |mut i: usize| {
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        i
    };
    let mut i = digits(start);
    let mut integer = true;
    if b.get(i) == Some(&b'.') {
        integer = false;
        i = digits(i + 1);
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        let mut j = i + 1;
        if matches!(b.get(j), Some(b'+' | b'-')) {
            j += 1;
        }
        if b.get(j).is_some_and(u8::is_ascii_digit) {
            integer = false;
            i = digits(j);
        }
    }
    if b.get(i).is_some_and(|&c| ident_cont(c) || c == b'.') {
        return None;
    }
    let kind = if integer && sql[start..i].parse::<i32>().is_ok() { PieceKind::Integer } else { PieceKind::Numeric };
    Some((i, kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape with readable placeholders, and the pieces' texts.
    fn show(sql: &str) -> (String, Vec<&str>) {
        let s = shape(sql).unwrap_or_else(|| panic!("no shape for {sql:?}"));
        let key =
            s.key.replace('\u{1}', "<int>").replace('\u{2}', "<num>").replace('\u{3}', "<str>").replace('\u{4}', "<c>");
        (key, s.pieces.iter().map(|p| &sql[p.span.clone()]).collect())
    }

    fn lit(sql: &str, i: usize, negated: bool) -> Option<String> {
        let s = shape(sql)?;
        literal_text(sql, &s.pieces[i], negated)
    }

    #[test]
    fn numbers_and_strings_become_placeholders_in_order() {
        let (key, pieces) = show("SELECT abalance FROM pgbench_accounts WHERE aid = 12345;");
        assert_eq!(key, "SELECT abalance FROM pgbench_accounts WHERE aid = <int>;");
        assert_eq!(pieces, vec!["12345"]);
        let (key, pieces) = show("insert into t values (1, 2.5, 'x''y', 1e3, .5, 99999999999)");
        assert_eq!(key, "insert into t values (<int>, <num>, <str>, <num>, <num>, <num>)");
        assert_eq!(pieces, vec!["1", "2.5", "'x''y'", "1e3", ".5", "99999999999"]);
        assert_eq!(shape("select 1").unwrap().key, shape("select 2").unwrap().key);
        assert_ne!(shape("select 1").unwrap().key, shape("select '1'").unwrap().key);
        assert_ne!(shape("select 1").unwrap().key, shape("select 1.0").unwrap().key);
    }

    #[test]
    fn identifiers_parameters_and_casts_stay_in_the_shape() {
        let (key, pieces) = show(r#"select "a'b""1", t1.x$2 from "weird 7" where id = $1 and k = '1'::bigint"#);
        assert_eq!(key, r#"select "a'b""1", t1.x$2 from "weird 7" where id = $1 and k = <str>::bigint"#);
        assert_eq!(pieces, vec!["'1'"]);
        let (key, _) = show("select x::numeric(10,2), bigint '5', n'abc'");
        assert_eq!(key, "select x::numeric(<int>,<int>), bigint <str>, n<str>");
    }

    #[test]
    fn minus_signs_stay_outside_the_constant() {
        let (key, pieces) = show("select * from t where tenant_id = -7 and a-1 > 0");
        assert_eq!(key, "select * from t where tenant_id = -<int> and a-<int> > <int>");
        assert_eq!(pieces, vec!["7", "1", "0"]);
        assert_eq!(lit("select -7", 0, true).as_deref(), Some("-7"));
        assert_eq!(lit("select -0", 0, true).as_deref(), Some("0"));
        assert_eq!(lit("select -2147483648", 0, true).as_deref(), Some("-2147483648"));
        assert_eq!(lit("select -1.5", 0, true).as_deref(), Some("-1.5"));
    }

    #[test]
    fn escaped_and_dollar_quoted_strings() {
        let (key, pieces) = show(r"select E'it\'s', e'a\\b', $$x'y$$, $tag$ $$ $tag$, 'c:\dir'");
        assert_eq!(key, "select <str>, <str>, <str>, <str>, <str>");
        assert_eq!(pieces, vec![r"E'it\'s'", r"e'a\\b'", "$$x'y$$", "$tag$ $$ $tag$", r"'c:\dir'"]);
        let sql = r"select E'it\'s', e'a\\b\n\101\x41', $$x'y$$, $tag$ $$ $tag$, 'c:\dir'";
        assert_eq!(lit(sql, 0, false).as_deref(), Some("'it''s'"));
        assert_eq!(lit(sql, 1, false).as_deref(), Some("'a\\b\nAA'"));
        assert_eq!(lit(sql, 2, false).as_deref(), Some("'x''y'"));
        assert_eq!(lit(sql, 3, false).as_deref(), Some("' $$ '"));
        assert_eq!(lit(sql, 4, false).as_deref(), Some(r"'c:\dir'"));
        // Unicode escapes and bytes that are not ASCII are left to the parser.
        assert_eq!(lit(r"select E'\u00e9'", 0, false), None);
        assert_eq!(lit(r"select E'\351'", 0, false), None);
        assert_eq!(lit(r"select E'\0'", 0, false), None);
    }

    #[test]
    fn comments_are_pieces_and_nest() {
        let (key, pieces) = show("/* tenant_id=42 */ select 1 -- done\n, /* a /* b */ c */ 2");
        assert_eq!(key, "<c> select <int> <c>\n, <c> <int>");
        assert_eq!(pieces, vec!["/* tenant_id=42 */", "1", "-- done", "/* a /* b */ c */", "2"]);
        // Not comments: inside strings and quoted identifiers.
        let (key, _) = show(r#"select '/* x */', "-- y""#);
        assert_eq!(key, r#"select <str>, "-- y""#);
        // A comment starts inside an operator, as in Postgres.
        assert_eq!(show("select 1*/**/2").0, "select <int>*<c><int>");
    }

    #[test]
    fn the_same_shape_means_the_same_text_around_the_pieces() {
        let a = shape("select a/**/b").unwrap();
        let b = shape("select ab").unwrap();
        assert_ne!(a.key, b.key);
        assert_eq!(shape("select 1 /* x */").unwrap().key, shape("select 2 /* tenant_id=9 */").unwrap().key);
    }

    #[test]
    fn unsure_texts_have_no_shape() {
        for sql in [
            "select 'unterminated",
            "select \"unterminated",
            "select /* unterminated",
            "select $$unterminated",
            "select U&'d\\0061t\\+000061'",
            "select U&\"d!0061t\" UESCAPE '!'",
            "select B'101', X'1F'",
            "select 0x1F",
            "select 1_000",
            "select 1e",
            "select 1..5",
            "select 123abc",
            "select 'foo'\n'bar'",
            "select 'foo' -- c\n 'bar'",
            "select '\u{1}'",
        ] {
            assert_eq!(shape(sql), None, "{sql:?}");
        }
    }

    #[test]
    fn constants_are_where_postgres_scanner_finds_them() {
        use pg_query::protobuf::Token;
        let texts = [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;",
            r#"select "q""1", x$1, $2, 'a''b', E'c\'d', $t$e$t$, 1.5e-3, 2147483647, 2147483648, .25, 7."#,
            "/* tenant_id=5 */ update t set a = -3 where tenant_id = '5'::bigint -- trailing",
            "select n'x', date '2020-01-01', interval '1 day', a::numeric(10, 2) from t where b in (1,2,3)",
            "select 1*/* c /* nested */ */2, 'é', \"é\", é1",
        ];
        for sql in texts {
            let ours: Vec<(Range<usize>, PieceKind)> =
                shape(sql).unwrap().pieces.into_iter().map(|p| (p.span, p.kind)).collect();
            let theirs: Vec<(Range<usize>, PieceKind)> = pg_query::scan(sql)
                .unwrap()
                .tokens
                .iter()
                .filter_map(|t| {
                    let kind = match Token::try_from(t.token).ok()? {
                        Token::Iconst => PieceKind::Integer,
                        Token::Fconst => PieceKind::Numeric,
                        Token::Sconst => PieceKind::String,
                        Token::SqlComment | Token::CComment => PieceKind::Comment,
                        _ => return None,
                    };
                    Some((t.start as usize..t.end as usize, kind))
                })
                .collect();
            assert_eq!(ours, theirs, "{sql}");
        }
    }
}

//! Simple queries run as prepared statements on the server.
//!
//! An application that inlines its constants (`SELECT … WHERE aid = 12345`) makes
//! Postgres parse and plan every statement afresh; most of a simple query's server
//! time goes there. The router already knows each text's shape (its constants
//! taken out), so it can send the shape once per server connection as a prepared
//! statement with the constants as parameters, and then only Bind and Execute:
//! what a driver using the extended protocol gets, for clients that do not.
//!
//! The constants become parameters of exactly the type Postgres gives the literal:
//! an integer that fits 32 bits is `int4`, one that fits 64 bits `int8`, any other
//! number `numeric`, and a string is left untyped, as a quoted literal is (its type
//! comes from where it stands). Constants whose being a literal matters stay in
//! the text: ordinals (`ORDER BY 1`, `GROUP BY 1`, `DISTINCT ON (1)`) and type
//! modifiers (`varchar(10)`); a statement that uses `$n`, `SELECT … INTO` or
//! `CYCLE … SET … TO` is not prepared at all. Where the server refuses the
//! prepared form (a literal the grammar needs, such as `DATE '…'`, or a string
//! whose type the context does not settle), nothing has run yet: the router sends
//! the original text instead, and does not prepare that shape again.
//!
//! Only statements outside a transaction block are sent this way, so that a
//! refusal at Bind (a cached plan whose result type changed after DDL) can always
//! be retried as the original text. See docs/routing.md.

use std::sync::atomic::{AtomicBool, Ordering};

use pg_query::protobuf::node::Node as N;
use serde_json::Value;

use super::shape::{string_value, Piece, PieceKind};

/// Type OIDs of the parameters (0: unspecified, as an untyped literal).
const INT4: i32 = 23;
const INT8: i32 = 20;
const NUMERIC: i32 = 1700;
const UNKNOWN: i32 = 0;

/// Where the parser placed the constants of `node` that may become parameters,
/// or None when the statement must not run as a prepared statement.
///
/// The tree is walked through its serialized form so that no node type is
/// missed: a constant under `ORDER BY`, `GROUP BY`, `DISTINCT ON` or in a type
/// modifier is left out wherever it stands.
pub(super) fn liftable_constants(node: &N) -> Option<Vec<usize>> {
    if !matches!(node, N::SelectStmt(_) | N::InsertStmt(_) | N::UpdateStmt(_) | N::DeleteStmt(_)) {
        return None;
    }
    let tree = serde_json::to_value(node).ok()?;
    let mut out = Vec::new();
    walk(&tree, false, &mut out)?;
    Some(out)
}

/// Keys whose subtree's constants stay literals.
const LITERAL_ONLY: &[&str] = &["SortBy", "group_clause", "distinct_clause", "typmods", "arrayBounds", "array_bounds"];

fn walk(v: &Value, literal_only: bool, out: &mut Vec<usize>) -> Option<()> {
    match v {
        Value::Array(items) => {
            for item in items {
                walk(item, literal_only, out)?;
            }
        }
        Value::Object(map) => {
            if let Some(c) = map.get("AConst") {
                let has_value = c.get("val").is_some_and(|v| !v.is_null());
                let is_null = c.get("isnull").and_then(Value::as_bool).unwrap_or(false);
                if !literal_only && has_value && !is_null {
                    let at = c.get("location").and_then(Value::as_i64).unwrap_or(-1);
                    if at >= 0 {
                        out.push(at as usize);
                    }
                }
                return Some(());
            }
            for (k, child) in map {
                match k.as_str() {
                    "ParamRef" => return None,
                    "into_clause" | "cycle_clause" if !child.is_null() => return None,
                    _ => {}
                }
                walk(child, literal_only || LITERAL_ONLY.contains(&k.as_str()), out)?;
            }
        }
        _ => {}
    }
    Some(())
}

/// What a piece of the text becomes in the prepared form.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    /// The n-th parameter, of this type.
    Param { piece: usize, ty: i32 },
    /// Kept as it is: every text of the shape must have the source's piece here.
    Fixed { piece: usize, text: Box<str> },
}

/// The prepared form of one statement shape.
#[derive(Debug)]
pub struct ServerForm {
    /// The text with parameters in place of the lifted constants.
    pub text: std::sync::Arc<str>,
    /// Types of `$1`, `$2`, … in order.
    pub types: Vec<i32>,
    /// Its name on server connections ([`statement_name`]).
    pub name: String,
    parts: Vec<Part>,
    /// Set once the server refused to prepare it: the shape runs as text.
    refused: AtomicBool,
}

/// A text ready to run as its shape's prepared statement.
pub struct SimpleForm {
    pub form: std::sync::Arc<ServerForm>,
    /// The parameters' values, in text format.
    pub values: Vec<Vec<u8>>,
}

impl ServerForm {
    /// The form of `sql` (whose shape has `pieces`), lifting the pieces listed in
    /// `lifted` (piece index, and whether the parser folded a minus sign before
    /// it into the constant). None if the text does not match the pieces.
    pub(super) fn new(sql: &str, pieces: &[Piece], lifted: &[(usize, bool)]) -> Option<ServerForm> {
        let mut text = String::with_capacity(sql.len() + 8);
        let mut parts = Vec::with_capacity(pieces.len());
        let mut types = Vec::new();
        let mut copied = 0;
        for (i, p) in pieces.iter().enumerate() {
            text.push_str(sql.get(copied..p.span.start)?);
            copied = p.span.end;
            let piece_text = sql.get(p.span.clone())?;
            let lift = lifted.iter().find(|(n, _)| *n == i).map(|&(_, negated)| negated);
            let ty = match (p.kind, lift) {
                (PieceKind::Comment, _) => {
                    // Whitespace to the parser; it varies (routing comments).
                    text.push(' ');
                    continue;
                }
                (_, None) => None,
                // `-2147483648` is an int4 literal but `- $1::int8` an int8:
                // negative integers of the numeric kind stay in the text.
                (PieceKind::Numeric, Some(true)) if is_integer(piece_text) => None,
                (PieceKind::String, Some(true)) => None,
                // A string right after a word is that word's literal: `N'…'`
                // (national character), `date'…'`; `N $1` would be another
                // statement, `date $1` none.
                (PieceKind::String, Some(_)) if p.span.start > 0 && is_word_byte(sql.as_bytes()[p.span.start - 1]) => {
                    None
                }
                (kind, Some(_)) => value_type(kind, piece_text),
            };
            match ty {
                Some(ty) if types.len() < i16::MAX as usize => {
                    types.push(ty);
                    // `date'…'` must not become the identifier `date$1`, nor
                    // `'a'b` (`'a' AS b`) the parameter `$1b`: a word next to
                    // the parameter stays a word of its own.
                    if text.as_bytes().last().is_some_and(|&c| is_word_byte(c)) {
                        text.push(' ');
                    }
                    text.push('$');
                    text.push_str(&types.len().to_string());
                    if sql.as_bytes().get(p.span.end).is_some_and(|&c| is_word_byte(c)) {
                        text.push(' ');
                    }
                    parts.push(Part::Param { piece: i, ty });
                }
                _ => {
                    text.push_str(piece_text);
                    parts.push(Part::Fixed { piece: i, text: piece_text.into() });
                }
            }
        }
        text.push_str(sql.get(copied..)?);
        let name = statement_name(&text, &types);
        Some(ServerForm { text: text.into(), types, name, parts, refused: AtomicBool::new(false) })
    }

    /// The parameters for `sql`, a text of the same shape with `pieces`; None
    /// when this text cannot use the form (a kept constant differs, or a value
    /// would have another type than the form's parameter).
    pub fn values(&self, sql: &str, pieces: &[Piece]) -> Option<Vec<Vec<u8>>> {
        let mut values = Vec::with_capacity(self.types.len());
        for part in &self.parts {
            match part {
                Part::Fixed { piece, text } => {
                    if sql.get(pieces.get(*piece)?.span.clone())? != &**text {
                        return None;
                    }
                }
                Part::Param { piece, ty } => {
                    let p = pieces.get(*piece)?;
                    let t = sql.get(p.span.clone())?;
                    if value_type(p.kind, t)? != *ty {
                        return None;
                    }
                    values.push(match p.kind {
                        PieceKind::String => string_value(t)?.into_bytes(),
                        _ => t.as_bytes().to_vec(),
                    });
                }
            }
        }
        Some(values)
    }

    pub fn is_refused(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
    }

    /// The server would not prepare this form: its shape runs as text from now on.
    pub fn refuse(&self) {
        self.refused.store(true, Ordering::Relaxed);
    }
}

/// The name a statement has on server connections: `sg_` and a hash of its
/// text and parameter types, so that every session (and a simple query's
/// prepared form) shares one server-side copy.
pub fn statement_name(sql: &str, types: &[i32]) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    sql.hash(&mut h);
    types.hash(&mut h);
    format!("sg_{:016x}", h.finish())
}

/// A byte that continues an identifier (or a `$n`) in Postgres's scanner.
fn is_word_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

fn is_integer(t: &str) -> bool {
    !t.is_empty() && t.bytes().all(|c| c.is_ascii_digit())
}

/// The type Postgres gives a literal of this kind and text.
fn value_type(kind: PieceKind, t: &str) -> Option<i32> {
    match kind {
        PieceKind::Integer => Some(INT4),
        PieceKind::Numeric if is_integer(t) => Some(if t.parse::<i64>().is_ok() { INT8 } else { NUMERIC }),
        PieceKind::Numeric => Some(NUMERIC),
        PieceKind::String => Some(UNKNOWN),
        PieceKind::Comment => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::AnalysisCache;
    use super::*;

    fn constants(sql: &str) -> Option<Vec<usize>> {
        let parsed = pg_query::parse(sql, 0).unwrap();
        let node = parsed.protobuf.stmts[0].stmt.as_ref().unwrap().node.as_ref().unwrap().clone();
        liftable_constants(&node)
    }

    /// The prepared form of `sql` as (text, types, values), from a cache that saw
    /// the shape once before.
    fn form(sql: &str) -> Option<(String, Vec<i32>, Vec<String>)> {
        let cache = AnalysisCache::new("tenant_id", 100);
        cache.get(sql).unwrap();
        let (_, f) = cache.get_simple(sql).unwrap();
        let f = f?;
        let values = f.values.iter().map(|v| String::from_utf8(v.clone()).unwrap()).collect();
        Some((f.form.text.to_string(), f.form.types.clone(), values))
    }

    #[test]
    fn constants_that_may_become_parameters() {
        let sql = "SELECT abalance FROM pgbench_accounts WHERE aid = 12345";
        assert_eq!(constants(sql), Some(vec![sql.find("12345").unwrap()]));
        // Ordinals and type modifiers stay literals.
        assert_eq!(constants("select a from t order by 1"), Some(vec![]));
        assert_eq!(constants("select a, count(*) from t group by 1"), Some(vec![]));
        assert_eq!(constants("select a, count(*) from t group by rollup (1)"), Some(vec![]));
        assert_eq!(constants("select distinct on (1) a from t"), Some(vec![]));
        let sql = "select a::varchar(10) from t where id = 3";
        assert_eq!(constants(sql), Some(vec![sql.find('3').unwrap()]));
        // VALUES rows and LIMIT are walked like the rest.
        let sql = "insert into t values (7, 'x') returning *";
        assert_eq!(constants(sql).map(|c| c.len()), Some(2));
        assert_eq!(constants("select * from t limit 10 offset 20").map(|c| c.len()), Some(2));
        assert_eq!(
            constants("select a from t where b in (1, 2, 3) and c = any(array[4, 5])").map(|c| c.len()),
            Some(5)
        );
        // Not prepared at all.
        assert_eq!(constants("select * from t where id = $1"), None);
        assert_eq!(constants("select 1 into newtable"), None);
        assert_eq!(constants("set work_mem = 100"), None);
        assert_eq!(
            constants("with recursive r(n) as (select 1 union all select n + 1 from r) cycle n set c to 1 default 0 using p select * from r"),
            None
        );
    }

    /// Found by the sql fuzz target: a typed literal written without a space
    /// (`date'…'`) became `date$1`, one identifier, in the prepared form; and
    /// `n''` (a national character string) became `n $1`, a literal of a type
    /// named n. A string right after a word stays in the text.
    #[test]
    fn a_parameter_next_to_a_word_stays_apart_from_it() {
        let (text, _, values) = form("select date'2026-12-04', 'a'b from t where tenant_id = 7").unwrap();
        assert_eq!(text, "select date'2026-12-04', $1 b from t where tenant_id = $2");
        assert_eq!(values, vec!["a", "7"]);
        let (text, _, values) = form("select max(n'x') from names where tenant_id = 7").unwrap();
        assert_eq!(text, "select max(n'x') from names where tenant_id = $1");
        assert_eq!(values, vec!["7"]);
    }

    #[test]
    fn forms_keep_each_literals_type() {
        let (text, types, values) = form("select abalance from pgbench_accounts where aid = 12345").unwrap();
        assert_eq!(text, "select abalance from pgbench_accounts where aid = $1");
        assert_eq!((types, values), (vec![INT4], vec!["12345".to_string()]));

        let (text, types, values) =
            form("select * from t where a = 9999999999 and b = 1.5 and c = 99999999999999999999 and d = 'it''s'")
                .unwrap();
        assert_eq!(text, "select * from t where a = $1 and b = $2 and c = $3 and d = $4");
        assert_eq!(types, vec![INT8, NUMERIC, NUMERIC, UNKNOWN]);
        assert_eq!(values, vec!["9999999999", "1.5", "99999999999999999999", "it's"]);

        // A minus sign stays in the text; -2147483648 (an int4 literal) stays whole.
        let (text, _, values) = form("select * from t where a = -5 and b = -2147483648").unwrap();
        assert_eq!(text, "select * from t where a = -$1 and b = -2147483648");
        assert_eq!(values, vec!["5"]);

        // Comments are whitespace; ordinals stay.
        let (text, _, values) = form("select /* tenant_id=3 */ a from t where x = E'a\\\\b' order by 1").unwrap();
        assert_eq!(text, "select   a from t where x = $1 order by 1");
        assert_eq!(values, vec!["a\\b"]);

        assert!(form("select 1; select 2").is_none());
        assert!(form("begin").is_none());
    }

    #[test]
    fn a_text_of_the_shape_uses_the_form_only_when_it_fits() {
        let cache = AnalysisCache::new("tenant_id", 100);
        cache.get("select * from t where a = 5 order by 1").unwrap();
        let (_, f) = cache.get_simple("select * from t where a = 6 order by 1").unwrap();
        assert_eq!(f.unwrap().values, vec![b"6".to_vec()]);
        // A kept literal that differs: runs as text.
        assert!(cache.get_simple("select * from t where a = 6 order by 2").unwrap().1.is_none());
        // A value of another type than the form's parameter: runs as text.
        cache.get("select * from t where a = 9999999999").unwrap();
        assert!(cache.get_simple("select * from t where a = 99999999999999999999").unwrap().1.is_none());
        // Once the server refused the form, the shape runs as text.
        let (_, f) = cache.get_simple("select * from t where a = 7 order by 1").unwrap();
        f.unwrap().form.refuse();
        assert!(cache.get_simple("select * from t where a = 8 order by 1").unwrap().1.is_none());
        // get() never builds one.
        assert!(cache.get("select * from t where a = 8 order by 1").is_ok());
    }
}

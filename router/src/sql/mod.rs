//! Reading SQL with the real Postgres grammar (`pg_query`) to learn what the
//! router needs: the kind of each statement, the tables it touches, and where its
//! tenant key comes from.
//!
//! Analysis is done once per distinct statement shape — the text with its
//! constants and comments taken out ([`shape`]) — and cached ([`AnalysisCache`]);
//! the result holds *where* a key is (a literal, the n-th bind parameter) rather
//! than the key itself, so one cached analysis serves every execution of a prepared
//! statement, and every text that differs only in its constants. Turning it into
//! keys is [`resolve`](crate::route) work at run time.

pub mod aggregates;
mod analyze;
mod cache;
mod colocation;
mod key_writes;
mod lift;
mod nested_writes;
mod pooled_state;
pub mod prepare_text;
pub mod quote;
mod restriction;
pub mod roles;
pub mod shape;
#[cfg(test)]
pub(crate) mod testing;

pub use analyze::{
    analyze, Analysis, CopyFormat, CopyInfo, Defaults, InsertInfo, KeyCandidates, KeyExpr, SettingChange, SqlPrepared,
    Statement, StatementKind, TxnControl,
};
pub use cache::AnalysisCache;
pub use colocation::{mixes_rows, NotLocal, Read};
pub use key_writes::{InsertSelect, Inserted, KeyChange};
pub use lift::{statement_name, ServerForm, SimpleForm};

/// The lexer's tokens of `sql` (`pg_query::scan_tokens`), empty when it cannot
/// lex it. A text of no token (only white space) is not handed to it: its C
/// side then answers a null token array, which `pg_query` turns into a slice
/// unchecked (a panic that aborts, in a debug build).
pub(crate) fn tokens(sql: &str) -> Vec<pg_query::protobuf::ScanToken> {
    if sql.trim().is_empty() {
        return Vec::new();
    }
    pg_query::scan_tokens(sql).unwrap_or_default()
}

/// `pg_query`'s deparser, for trees the router rewrote (a fan-out's shard
/// statement, an INSERT's rows for one shard). It refuses what Postgres
/// refuses and the deparser cannot write: a type modifier that is not a
/// constant, a parameter or a name (`numeric(1 + 1)`), on which its debug
/// build aborts the process. (Release builds compile libpg_query without
/// assertions: its build script turns them on only when Cargo's `PROFILE` is
/// "debug" or `DEBUG` is "1", and Cargo sets `DEBUG` to "true" or "false".)
pub fn deparse(tree: &pg_query::protobuf::ParseResult) -> Result<String, String> {
    fn simple_typmods(v: &serde_json::Value) -> bool {
        use serde_json::Value;
        match v {
            Value::Object(map) => {
                let typmods_ok = match map.get("typmods") {
                    Some(Value::Array(mods)) => mods.iter().all(|m| {
                        m.get("node").and_then(Value::as_object).is_some_and(|n| {
                            n.keys().all(|k| matches!(k.as_str(), "AConst" | "ParamRef" | "ColumnRef"))
                        })
                    }),
                    _ => true,
                };
                typmods_ok && map.values().all(simple_typmods)
            }
            Value::Array(items) => items.iter().all(simple_typmods),
            _ => true,
        }
    }
    let json = serde_json::to_value(tree).map_err(|e| e.to_string())?;
    if !simple_typmods(&json) {
        return Err("type modifiers must be simple constants or identifiers".into());
    }
    pg_query::deparse(tree, Default::default()).map_err(|e| e.to_string())
}

/// Whether two expressions are the same but for where they stand in the text,
/// as Postgres matches `ORDER BY count(*)` to the select list's `count(*)`.
pub fn same_expression(a: &pg_query::protobuf::Node, b: &pg_query::protobuf::Node) -> bool {
    match (serde_json::to_value(a), serde_json::to_value(b)) {
        (Ok(a), Ok(b)) => without_locations(a) == without_locations(b),
        _ => false,
    }
}

/// A parse tree (as JSON) with its positions in the text left out:
/// `location`, `stmt_len`, `list_start` ….
pub fn without_locations(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .filter(|(k, _)| {
                    !(k.ends_with("location") || k.ends_with("_start") || k.ends_with("_end") || k == "stmt_len")
                })
                .map(|(k, v)| (k, without_locations(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(without_locations).collect()),
        other => other,
    }
}

#[cfg(test)]
mod deparse_tests {
    #[test]
    fn a_type_modifier_the_deparser_cannot_write_is_refused_not_aborted() {
        let tree = |sql: &str| pg_query::parse(sql, 0).unwrap().protobuf;
        let e = super::deparse(&tree("SELECT avg(total)::numeric(1 + 1, 2) FROM orders")).unwrap_err();
        assert!(e.contains("type modifiers"), "{e}");
        let ok = super::deparse(&tree("SELECT avg(total)::numeric(10, 2), x::mytype(n) FROM orders")).unwrap();
        assert!(ok.contains("numeric(10, 2)"), "{ok}");
    }
}

//! Writing names and values into SQL text: the one place the router and the
//! migrator quote.
//!
//! Identifiers are quoted the way Postgres's own `quote_ident` does, only where
//! they must be: anything but a plain lower-case name, and every keyword that is
//! not unreserved ([`KEYWORDS`]). A bare lower-case name and the same name quoted
//! are one identifier, so this never changes what a statement means; it keeps
//! statements and messages readable (`public.accounts`, not
//! `"public"."accounts"`). Literals are quoted the way `quote_literal` does, which
//! reads the same whatever the connection's `standard_conforming_strings`.
//!
//! The migrator uses this module too (it depends on the router); `localpg`, which
//! sits below both, keeps its own always-quoting helper.

use shardgate_directory::{KeyType, TenantKey};

/// An identifier (a table, column, schema or slot name), quoted when it must be.
pub fn ident(name: &str) -> String {
    if is_plain(name) {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

/// `schema.name`, each part quoted when it must be.
pub fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", ident(schema), ident(name))
}

/// A table as the router's catalog names it (`name` for a table in `public`,
/// `schema.name` otherwise), quoted for SQL. The catalog writes a schema
/// without dots, so the first dot is the one between schema and name.
pub fn table(catalog_name: &str) -> String {
    match catalog_name.split_once('.') {
        Some((schema, name)) => qualified(schema, name),
        None => ident(catalog_name),
    }
}

/// A string literal. Quotes are doubled; a value with a backslash is written as
/// an escape string (`E'…'`, backslashes doubled), as `quote_literal` does, so it
/// reads the same whether or not the connection has `standard_conforming_strings`.
pub fn literal(value: &str) -> String {
    let quoted = value.replace('\'', "''");
    if value.contains('\\') {
        format!("E'{}'", quoted.replace('\\', "\\\\"))
    } else {
        format!("'{quoted}'")
    }
}

/// A tenant key as a literal of the key column's type (`42`, `'acme'`,
/// `'…'::uuid`), for a condition such as `tenant_id = …`.
pub fn key_literal(key: &TenantKey, key_type: KeyType) -> String {
    match (key, key_type) {
        (TenantKey::Int(v), _) => v.to_string(),
        (k, KeyType::Uuid) => format!("{}::uuid", literal(&k.to_string())),
        (k, _) => literal(&k.to_string()),
    }
}

/// Whether a name can stand bare: a lower-case letter or `_`, then lower-case
/// letters, digits and `_` (as Postgres's `quote_ident` decides: ASCII only, no
/// `$`), and not a keyword that would read as one.
fn is_plain(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && KEYWORDS.binary_search(&name).is_err()
}

/// Every Postgres keyword that is not unreserved (reserved, reserved but allowed
/// as a function or type name, and column-name keywords): the ones `quote_ident`
/// quotes. From the grammar of Postgres 18 (`kwlist.h`, the one `pg_query`
/// bundles), sorted; a test checks each against that grammar. Newer versions only
/// add keywords, and quoting a name an older server would take bare is harmless.
pub const KEYWORDS: &[&str] = &[
    "all",
    "analyse",
    "analyze",
    "and",
    "any",
    "array",
    "as",
    "asc",
    "asymmetric",
    "authorization",
    "between",
    "bigint",
    "binary",
    "bit",
    "boolean",
    "both",
    "case",
    "cast",
    "char",
    "character",
    "check",
    "coalesce",
    "collate",
    "collation",
    "column",
    "concurrently",
    "constraint",
    "create",
    "cross",
    "current_catalog",
    "current_date",
    "current_role",
    "current_schema",
    "current_time",
    "current_timestamp",
    "current_user",
    "dec",
    "decimal",
    "default",
    "deferrable",
    "desc",
    "distinct",
    "do",
    "else",
    "end",
    "except",
    "exists",
    "extract",
    "false",
    "fetch",
    "float",
    "for",
    "foreign",
    "freeze",
    "from",
    "full",
    "grant",
    "greatest",
    "group",
    "grouping",
    "having",
    "ilike",
    "in",
    "initially",
    "inner",
    "inout",
    "int",
    "integer",
    "intersect",
    "interval",
    "into",
    "is",
    "isnull",
    "join",
    "json",
    "json_array",
    "json_arrayagg",
    "json_exists",
    "json_object",
    "json_objectagg",
    "json_query",
    "json_scalar",
    "json_serialize",
    "json_table",
    "json_value",
    "lateral",
    "leading",
    "least",
    "left",
    "like",
    "limit",
    "localtime",
    "localtimestamp",
    "merge_action",
    "national",
    "natural",
    "nchar",
    "none",
    "normalize",
    "not",
    "notnull",
    "null",
    "nullif",
    "numeric",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "out",
    "outer",
    "overlaps",
    "overlay",
    "placing",
    "position",
    "precision",
    "primary",
    "real",
    "references",
    "returning",
    "right",
    "row",
    "select",
    "session_user",
    "setof",
    "similar",
    "smallint",
    "some",
    "substring",
    "symmetric",
    "system_user",
    "table",
    "tablesample",
    "then",
    "time",
    "timestamp",
    "to",
    "trailing",
    "treat",
    "trim",
    "true",
    "union",
    "unique",
    "user",
    "using",
    "values",
    "varchar",
    "variadic",
    "verbose",
    "when",
    "where",
    "window",
    "with",
    "xmlattributes",
    "xmlconcat",
    "xmlelement",
    "xmlexists",
    "xmlforest",
    "xmlnamespaces",
    "xmlparse",
    "xmlpi",
    "xmlroot",
    "xmlserialize",
    "xmltable",
];

#[cfg(test)]
mod tests {
    use super::*;
    use pg_query::protobuf::KeywordKind;

    fn keyword_kind(word: &str) -> KeywordKind {
        let tokens = crate::sql::tokens(word);
        match tokens.as_slice() {
            [t] => KeywordKind::try_from(t.keyword_kind).unwrap_or(KeywordKind::NoKeyword),
            _ => KeywordKind::NoKeyword,
        }
    }

    #[test]
    fn names_are_quoted_only_where_they_must_be() {
        assert_eq!(ident("accounts"), "accounts");
        assert_eq!(ident("_t1"), "_t1");
        assert_eq!(ident("Accounts"), r#""Accounts""#);
        assert_eq!(ident(r#"we"ird"#), r#""we""ird""#);
        assert_eq!(ident("1st"), r#""1st""#);
        assert_eq!(ident("two words"), r#""two words""#);
        assert_eq!(ident("a$b"), r#""a$b""#);
        assert_eq!(ident("café"), r#""café""#);
        assert_eq!(ident(""), r#""""#);
        // Keywords that are not unreserved; unreserved ones stand bare.
        assert_eq!(ident("user"), r#""user""#);
        assert_eq!(ident("order"), r#""order""#);
        assert_eq!(ident("between"), r#""between""#);
        assert_eq!(ident("left"), r#""left""#);
        assert_eq!(ident("name"), "name");
        assert_eq!(ident("data"), "data");
    }

    #[test]
    fn tables_are_qualified_part_by_part() {
        assert_eq!(qualified("public", "accounts"), "public.accounts");
        assert_eq!(qualified("Sales", "order"), r#""Sales"."order""#);
        assert_eq!(table("accounts"), "accounts");
        assert_eq!(table("billing.Invoices"), r#"billing."Invoices""#);
        assert_eq!(table("s.a.b"), r#"s."a.b""#);
    }

    #[test]
    fn literals_read_the_same_whatever_standard_conforming_strings() {
        assert_eq!(literal("acme"), "'acme'");
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(literal(""), "''");
        assert_eq!(literal(r"a\b"), r"E'a\\b'");
        assert_eq!(literal(r"it's a\b"), r"E'it''s a\\b'");
    }

    #[test]
    fn keys_are_literals_of_the_key_column_type() {
        assert_eq!(key_literal(&TenantKey::Int(-7), KeyType::Int), "-7");
        assert_eq!(key_literal(&TenantKey::Text("o'brien".into()), KeyType::Text), "'o''brien'");
        let u = uuid::Uuid::nil();
        assert_eq!(key_literal(&TenantKey::Uuid(u), KeyType::Uuid), format!("'{u}'::uuid"));
    }

    #[test]
    fn the_keyword_list_is_sorted_and_matches_the_grammar() {
        assert!(KEYWORDS.windows(2).all(|w| w[0] < w[1]), "sorted, for binary_search");
        for word in KEYWORDS {
            assert!(
                matches!(
                    keyword_kind(word),
                    KeywordKind::ReservedKeyword | KeywordKind::TypeFuncNameKeyword | KeywordKind::ColNameKeyword
                ),
                "{word} is not a keyword quote_ident quotes"
            );
        }
        // And a few the grammar has that need no quotes.
        for word in ["name", "data", "value", "text", "key", "type", "action", "tenant_id"] {
            assert!(matches!(keyword_kind(word), KeywordKind::UnreservedKeyword | KeywordKind::NoKeyword), "{word}");
            assert_eq!(ident(word), word);
        }
    }
}

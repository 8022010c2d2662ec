//! Statements that leave state on a server connection past their transaction,
//! which transaction pooling cannot carry: the next transaction of the same
//! client may run on another connection (or another shard), and the connection
//! goes to another client, who would inherit the state.
//!
//! - `LISTEN`: notifications would reach whichever client holds the connection
//!   next, and never this one;
//! - session advisory locks (`pg_advisory_lock` and its `try` and `shared`
//!   forms): held by a pooled connection after the client's transaction, so
//!   another client would hold it and this one could not release it;
//! - temporary tables, views and sequences (except `ON COMMIT DROP` tables,
//!   which end with their transaction): visible to the next client of the
//!   connection, and missing for this client's next transaction;
//! - cursors `WITH HOLD`: outlive the transaction on its connection;
//! - `SET ROLE` and `SET SESSION AUTHORIZATION` (not `SET LOCAL`): `RESET
//!   ALL` leaves them, so the next client of the connection would run as
//!   that role;
//!
//! These are refused with 0A000 and what to use instead ([`crate::route`]).
//! SQL `PREPARE` is carried by the session instead (session/sql_prepared.rs).

use pg_query::protobuf::node::Node as N;
use pg_query::protobuf::{a_const, IntoClause, OnCommitAction, VariableSetKind};
use pg_query::NodeRef;

/// Session advisory lock functions (their `_xact_` forms end with the
/// transaction and are fine).
const SESSION_LOCKS: [&str; 4] =
    ["pg_advisory_lock", "pg_try_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock_shared"];

/// `DECLARE … WITH HOLD` (Postgres's CURSOR_OPT_HOLD).
const CURSOR_OPT_HOLD: i32 = 0x0020;

/// The session state `node` would leave on its server connection, named as the
/// refusal names it; None when it leaves none.
pub(super) fn session_state(node: &N) -> Option<&'static str> {
    node.nodes().into_iter().find_map(|(n, ..)| match n {
        NodeRef::ListenStmt(_) => Some("LISTEN"),
        NodeRef::FuncCall(f) => {
            let name = f.funcname.last().and_then(|n| match &n.node {
                Some(N::String(s)) => Some(s.sval.as_str()),
                _ => None,
            })?;
            SESSION_LOCKS.contains(&name.to_ascii_lowercase().as_str()).then_some("a session-level advisory lock")
        }
        // The role a connection runs as: RESET ALL leaves it, so the next
        // client of the connection would run as this role.
        NodeRef::VariableSetStmt(v)
            if !v.is_local
                && v.kind == VariableSetKind::VarSetValue as i32
                && matches!(v.name.as_str(), "role" | "session_authorization") =>
        {
            Some("SET ROLE")
        }
        NodeRef::CreateStmt(c) => {
            let temp = c.relation.as_ref().is_some_and(|r| r.relpersistence == "t");
            let drops = c.oncommit == OnCommitAction::OncommitDrop as i32;
            (temp && !drops).then_some("a temporary table")
        }
        NodeRef::CreateTableAsStmt(c) => c.into.as_deref().and_then(temp_into),
        NodeRef::SelectStmt(s) => s.into_clause.as_deref().and_then(temp_into),
        NodeRef::ViewStmt(v) => v.view.as_ref().is_some_and(|r| r.relpersistence == "t").then_some("a temporary view"),
        NodeRef::CreateSeqStmt(s) => {
            s.sequence.as_ref().is_some_and(|r| r.relpersistence == "t").then_some("a temporary sequence")
        }
        NodeRef::DeclareCursorStmt(d) => (d.options & CURSOR_OPT_HOLD != 0).then_some("a cursor WITH HOLD"),
        _ => None,
    })
}

/// What a statement's function calls leave on, or read from, the server
/// connection's session, beyond the transaction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct SessionCalls {
    /// Calls `set_config(name, value, is_local)` with anything but a literal
    /// `true` as `is_local`: a setting that may outlive the transaction,
    /// which the router does not see (asyncpg turns `jit` off so around its
    /// type lookups). The server connection then starts from `RESET ALL` for
    /// whichever session borrows it next (`session/settings.rs`).
    pub sets_config: bool,
    /// Calls `currval()` or `lastval()`, which read what `nextval()` last gave
    /// in the server connection's session: in a transaction of its own that
    /// is another client's value (`route`).
    pub reads_last_value: bool,
    /// Calls `set_config('search_path', …)`.
    pub sets_search_path: bool,
}

/// [`SessionCalls`] of the statement `node`, whose text is `sql`.
pub(super) fn session_calls(node: &N, sql: &str) -> SessionCalls {
    let mut calls = SessionCalls { reads_last_value: calls_last_value(sql), ..SessionCalls::default() };
    for (n, ..) in node.nodes() {
        let NodeRef::FuncCall(f) = n else { continue };
        let Some(N::String(name)) = f.funcname.last().and_then(|n| n.node.as_ref()) else { continue };
        let name = name.sval.as_str();
        if name.eq_ignore_ascii_case("set_config") {
            let local = f.args.get(2).and_then(|a| a.node.as_ref()).is_some_and(
                |a| matches!(a, N::AConst(c) if matches!(&c.val, Some(a_const::Val::Boolval(b)) if b.boolval)),
            );
            calls.sets_config |= !local;
            let names_search_path = f.args.first().and_then(|a| a.node.as_ref()).is_some_and(
                |a| matches!(a, N::AConst(c) if matches!(&c.val, Some(a_const::Val::Sval(v)) if v.sval.eq_ignore_ascii_case("search_path"))),
            );
            calls.sets_search_path |= names_search_path;
        }
    }
    calls
}

/// Whether `sql` calls `currval` or `lastval`.
fn calls_last_value(sql: &str) -> bool {
    let lower = sql.to_ascii_lowercase();
    (lower.contains("currval") || lower.contains("lastval")) && first_call(sql, &["currval", "lastval"], &[]).is_some()
}

/// The first of `functions` that `sql` calls (a name, quoted or not, then
/// `(`), or of `keywords` it says (SQL's functions without parentheses). Read
/// from the lexer's tokens: the parse tree's walk does not reach every
/// expression (VALUES lists), and a string or comment that spells a name
/// is no call.
fn first_call(sql: &str, functions: &[&'static str], keywords: &[&'static str]) -> Option<&'static str> {
    let tokens = super::tokens(sql);
    let text = |i: usize| tokens.get(i).and_then(|t| sql.get(t.start as usize..t.end as usize));
    (0..tokens.len()).find_map(|i| {
        let word = text(i)?.trim_matches('"');
        let called = text(i + 1) == Some("(");
        let named = |list: &[&'static str]| list.iter().find(|v| v.eq_ignore_ascii_case(word)).copied();
        named(keywords).or_else(|| named(functions).filter(|_| called))
    })
}

/// Functions whose value differs from one call to the next, or from one
/// server's transaction to another's (`now()` is the transaction's start).
const VOLATILE: &[&str] = &[
    "random",
    "gen_random_uuid",
    "uuid_generate_v1",
    "uuid_generate_v1mc",
    "uuid_generate_v4",
    "clock_timestamp",
    "statement_timestamp",
    "transaction_timestamp",
    "timeofday",
    "now",
    "nextval",
];

/// The same, as SQL's keywords without parentheses.
const VOLATILE_KEYWORDS: &[&str] =
    &["current_timestamp", "current_time", "current_date", "localtimestamp", "localtime"];

/// The first call in `sql` of a function whose value would differ between
/// the shards if each computed it (a reference table's row is written on
/// every shard).
pub(super) fn volatile_call(sql: &str) -> Option<&'static str> {
    first_call(sql, VOLATILE, VOLATILE_KEYWORDS)
}

/// The temporary table, view or sequence `node` creates (as the walker names
/// tables), for session pooling to route the statements that use it.
pub(super) fn temp_relation(node: &N) -> Option<String> {
    let rel = match node {
        N::CreateStmt(c) => c.relation.as_ref(),
        N::CreateTableAsStmt(c) => c.into.as_ref().and_then(|i| i.rel.as_ref()),
        N::SelectStmt(s) => s.into_clause.as_ref().and_then(|i| i.rel.as_ref()),
        N::ViewStmt(v) => v.view.as_ref(),
        N::CreateSeqStmt(s) => s.sequence.as_ref(),
        _ => None,
    }?;
    (rel.relpersistence == "t").then(|| super::analyze::relname(rel))
}

/// `CREATE TEMP TABLE … AS`, `SELECT … INTO TEMP`: a temporary table unless
/// it is dropped at commit.
fn temp_into(i: &IntoClause) -> Option<&'static str> {
    let temp = i.rel.as_ref().is_some_and(|r| r.relpersistence == "t");
    let drops = i.on_commit == OnCommitAction::OncommitDrop as i32;
    (temp && !drops).then_some("a temporary table")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(sql: &str) -> Option<&'static str> {
        let parsed = pg_query::parse(sql, 0).unwrap();
        let node = parsed.protobuf.stmts[0].stmt.as_ref().unwrap().node.as_ref().unwrap().clone();
        session_state(&node)
    }

    #[test]
    fn state_a_pooled_connection_cannot_carry_is_named() {
        assert_eq!(state("LISTEN jobs"), Some("LISTEN"));
        assert_eq!(state("SELECT pg_advisory_lock(42)"), Some("a session-level advisory lock"));
        assert_eq!(state("SELECT 1 WHERE pg_try_advisory_lock_shared(1, 2)"), Some("a session-level advisory lock"));
        assert_eq!(state("CREATE TEMP TABLE x (a int)"), Some("a temporary table"));
        assert_eq!(state("CREATE TEMPORARY TABLE x AS SELECT 1"), Some("a temporary table"));
        assert_eq!(state("SELECT 1 AS a INTO TEMP x"), Some("a temporary table"));
        assert_eq!(state("CREATE TEMP VIEW v AS SELECT 1"), Some("a temporary view"));
        assert_eq!(state("CREATE TEMP SEQUENCE s"), Some("a temporary sequence"));
        assert_eq!(state("DECLARE c CURSOR WITH HOLD FOR SELECT 1"), Some("a cursor WITH HOLD"));
        assert_eq!(state("SET ROLE reporting"), Some("SET ROLE"));
        assert_eq!(state("SET SESSION AUTHORIZATION reporting"), Some("SET ROLE"));
    }

    fn calls(sql: &str) -> SessionCalls {
        let parsed = pg_query::parse(sql, 0).unwrap();
        session_calls(parsed.protobuf.stmts[0].stmt.as_ref().unwrap().node.as_ref().unwrap(), sql)
    }

    #[test]
    fn set_config_that_may_outlive_the_transaction_is_seen() {
        let sets = |sql: &str| calls(sql).sets_config;
        assert!(sets("SELECT set_config('timezone', 'Asia/Tokyo', false)"));
        assert!(sets("SELECT current_setting('jit') AS cur, set_config('jit', 'off', false) AS new"));
        assert!(sets("SELECT set_config('jit', $1, $2)"));
        assert!(!sets("SELECT set_config('timezone', 'UTC', true)"));
        assert!(!sets("SELECT current_setting('jit')"));
    }

    #[test]
    fn values_each_shard_would_compute_otherwise_are_seen() {
        assert_eq!(volatile_call("INSERT INTO plans VALUES (1, now())"), Some("now"));
        assert_eq!(volatile_call("INSERT INTO plans VALUES (1, CURRENT_TIMESTAMP)"), Some("current_timestamp"));
        assert_eq!(volatile_call("UPDATE plans SET key = gen_random_uuid()"), Some("gen_random_uuid"));
        assert_eq!(volatile_call("INSERT INTO plans SELECT 1, random()"), Some("random"));
        assert_eq!(volatile_call("INSERT INTO plans VALUES (1, 'now()')"), None);
        assert_eq!(volatile_call("INSERT INTO plans (id, random) VALUES (1, 2)"), None);
        assert_eq!(volatile_call("INSERT INTO plans VALUES (1, '2026-12-07'::timestamptz)"), None);
    }

    #[test]
    fn reads_of_the_sessions_last_sequence_value_are_seen() {
        let reads = |sql: &str| calls(sql).reads_last_value;
        assert!(reads("SELECT lastval()"));
        assert!(reads("SELECT currval('orders_id_seq')"));
        assert!(reads("SELECT pg_catalog.currval(pg_get_serial_sequence('orders', 'id'))"));
        assert!(reads("INSERT INTO items VALUES (1, currval('orders_id_seq'))"));
        assert!(!reads("SELECT nextval('orders_id_seq')"));
        assert!(!reads("SELECT last_value FROM orders_id_seq"));
        assert!(!reads("SELECT 'lastval()' AS t, currval FROM v /* currval( */"));
        assert!(!calls("SELECT lastval()").sets_config);
    }

    #[test]
    fn state_that_ends_with_the_transaction_is_fine() {
        assert_eq!(state("SELECT pg_advisory_xact_lock(42)"), None);
        assert_eq!(state("CREATE TEMP TABLE x (a int) ON COMMIT DROP"), None);
        assert_eq!(state("DECLARE c CURSOR FOR SELECT 1"), None);
        assert_eq!(state("CREATE TABLE x (a int)"), None);
        assert_eq!(state("UNLISTEN *"), None);
        assert_eq!(state("SELECT lock_this(1)"), None);
        assert_eq!(state("SET LOCAL ROLE reporting"), None);
        assert_eq!(state("RESET ROLE"), None);
        assert_eq!(state("SELECT set_config('timezone', 'UTC', false)"), None);
    }
}

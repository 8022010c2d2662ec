use std::ops::Range;
use std::sync::Arc;

use pg_query::protobuf::{self, a_const, node::Node as N, Node};

use super::colocation::Read;
use super::key_writes::{self, InsertSelect, KeyChange};
use super::nested_writes;

/// Where a tenant key's value comes from in a statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyExpr {
    /// A literal, in its SQL text form (`42`, `'acme'`).
    Literal(String),
    /// Bind parameter `$n`, zero-based here.
    Param(usize),
    /// Every element of array parameter `$n` (zero-based): `key = ANY($n)`.
    ParamArray(usize),
}

/// The keys a statement is restricted to, if any.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum KeyCandidates {
    /// No condition on the key column: every tenant may be touched.
    #[default]
    None,
    /// The statement touches only tenants among these (one for `=`, several for `IN`
    /// or `OR`).
    Any(Vec<KeyExpr>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnControl {
    Begin,
    Commit,
    Rollback,
    /// SAVEPOINT, RELEASE, ROLLBACK TO: inside a transaction, they follow it.
    Savepoint,
    /// PREPARE TRANSACTION and friends: two-phase commit is not routed.
    TwoPhase,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatementKind {
    Select,
    /// A SELECT whose WITH queries change data (`WITH x AS (INSERT …
    /// RETURNING *) SELECT …`): a write, routed by the writes it holds
    /// ([`Statement::nested_writes`]); never shadowed or read on several shards.
    SelectWithWrites,
    Insert,
    Update,
    Delete,
    /// `MERGE INTO …`: a write to its target table.
    Merge,
    Copy(CopyInfo),
    /// Schema changes: run on every shard.
    Ddl,
    Txn(TxnControl),
    /// `SET shardgate.tenant = …` (Some) or `RESET shardgate.tenant` (None).
    SetTenant(Option<String>),
    /// `SET`/`RESET` of a session setting (not `SET LOCAL`): the router keeps
    /// the session's settings and applies them to whichever server connection
    /// runs its next statement.
    SetVar(SettingChange),
    /// SHOW, SET LOCAL and other session utilities.
    Session,
    /// SQL-level `PREPARE`, `EXECUTE` (also under EXPLAIN or CREATE TABLE AS)
    /// and `DEALLOCATE`: see [`SqlPrepared`].
    SqlPrepared(SqlPrepared),
    /// State a pooled server connection cannot carry past the transaction
    /// (`LISTEN`, a session advisory lock, a temporary table, a cursor `WITH
    /// HOLD`), named: refused, see [`super::pooled_state`].
    SessionState(&'static str),
    /// `DECLARE … CURSOR FOR SELECT …`: a read whose rows come from one
    /// connection, so it must route to one shard.
    DeclareCursor,
    /// Anything else (EXPLAIN, VACUUM …): follows its tables, or any shard.
    Other,
}

/// A statement about SQL-level prepared statements. Alone in a simple query,
/// the session carries them (session/sql_prepared.rs); anywhere else routing
/// refuses them: they would reach a shard as written, where no statement of
/// that name is the session's (docs/routing.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SqlPrepared {
    Prepare {
        name: String,
    },
    Execute {
        name: String,
    },
    /// `DEALLOCATE name`; None for `DEALLOCATE ALL`.
    Deallocate {
        name: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettingChange {
    /// `SET name …`: replayed as this statement's text.
    Set { name: String },
    /// `RESET name` or `SET name TO DEFAULT`.
    Reset { name: String },
    /// `RESET ALL`.
    ResetAll,
    /// `DISCARD ALL`: the session starts over (settings and prepared
    /// statements); answered by the router, see `session/transaction.rs`.
    DiscardAll,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyInfo {
    pub from_stdin: bool,
    /// `COPY (query) TO`: what in the query (ORDER BY, LIMIT, aggregates,
    /// DISTINCT, set operations) a shard would apply to its own rows only,
    /// so that the shards' outputs put end to end are not the query's.
    pub per_shard: Option<&'static str>,
    pub table: Option<String>,
    /// The column list, if the statement names one.
    pub columns: Option<Vec<String>>,
    pub format: CopyFormat,
    pub delimiter: Option<u8>,
    pub header: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyFormat {
    Text,
    Csv,
    Binary,
}

/// An `INSERT … VALUES` whose rows may belong to different tenants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InsertInfo {
    pub table: String,
    pub columns: Option<Vec<String>>,
    /// For each row, the expression at every position (None where it is not a
    /// literal or parameter).
    pub rows: Vec<Vec<Option<KeyExpr>>>,
    pub has_returning: bool,
}

/// One statement of a query string: what this text says (its kind, text and
/// literals), and what every text of its shape says alike ([`Shared`], one
/// copy for all of them: the analysis cache instantiates a statement per
/// execution, and cloning these per statement cost the router measurable CPU).
/// Its fields read through [`Statement::shared`] as its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub kind: StatementKind,
    /// The statement's own text (a query string may hold several).
    pub text: String,
    pub keys: KeyCandidates,
    pub insert: Option<InsertInfo>,
    /// Assignments that may give rows a new key, anywhere in the statement.
    pub key_changes: Vec<KeyChange>,
    /// `INSERT … SELECT`: where the inserted keys come from.
    pub insert_select: Option<InsertSelect>,
    pub shared: Arc<Shared>,
}

/// What a statement's analysis says that does not depend on its literals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shared {
    /// Relations named anywhere in the statement, as `name` or `schema.name`.
    pub tables: Vec<String>,
    /// Relations the statement writes (INSERT/UPDATE/DELETE target, DDL
    /// objects); those its data-changing WITH queries write are in
    /// [`Self::nested_writes`].
    pub written: Vec<String>,
    /// A table this DDL creates that is or may be sharded (`CREATE TABLE`
    /// with the key column, or columns taken from elsewhere: LIKE, INHERITS,
    /// PARTITION OF, AS SELECT), or that it gives the key column (`ALTER
    /// TABLE … ADD COLUMN`). The router learns such a table's shape only once
    /// its creation has committed (`route::check_fresh_tables`).
    pub creates_sharded: Option<String>,
    /// A table this DDL takes the key column from (`ALTER TABLE … DROP
    /// COLUMN`, `RENAME COLUMN` of the key): refused for a sharded table
    /// (`route`), whose rows would be left scattered over the shards of a
    /// table routed as a reference table from then on.
    pub removes_key: Option<String>,
    /// `CREATE TABLE … AS`, `CREATE MATERIALIZED VIEW`, `SELECT … INTO`: a
    /// table filled with a query's rows, which over a sharded table each
    /// shard would fill with its own rows only (refused, `route`).
    pub copies_rows: bool,
    /// An INSERT, UPDATE or MERGE that calls a function each shard would
    /// compute otherwise (`now()`, `random()`): refused into a reference
    /// table (`route`). See `pooled_state::volatile_call`.
    pub volatile_call: Option<&'static str>,
    /// Calls `set_config(…, false)` (or with a third argument that is not
    /// the literal true): see `pooled_state::SessionCalls`.
    pub sets_config: bool,
    /// Calls `currval()` or `lastval()`: see `pooled_state::SessionCalls`.
    pub reads_last_value: bool,
    /// `DO` or `CALL`: code whose statements the router cannot see, run on
    /// the one shard of the tenant the session names (`route`).
    pub opaque_code: Option<&'static str>,
    /// The columns of its table a write may leave to their defaults (refused
    /// on a reference table where a default differs by shard, `route`).
    pub defaults: Defaults,
    /// `SET [LOCAL] search_path`, or `set_config('search_path', …)`: bare
    /// table names may mean tables of another schema from then on
    /// (`route::check_catalog_names`).
    pub sets_search_path: bool,
    /// The highest `$n` used.
    pub max_param: usize,
    /// A SELECT's (or `COPY (SELECT …) TO`'s) joins and subqueries, to tell
    /// whether running it on several shards answers it exactly (shared: the
    /// cache hands it to every text of the shape).
    pub read: Option<Arc<Read>>,
    /// The data-changing statements inside this one (its WITH queries' at any
    /// depth, the write EXPLAIN ANALYZE or COPY runs), each analysed as a
    /// statement of its own ([`super::nested_writes`]). When there are any,
    /// `tables`, `keys` and `read` describe the rest of the statement, outside
    /// them; `key_changes` and `max_param` the whole.
    pub nested_writes: Vec<Statement>,
    /// The cursor a `DECLARE`, `FETCH`, `MOVE` or `CLOSE` names (empty for
    /// `CLOSE ALL`): session pooling runs them where the cursor is.
    pub cursor: Option<String>,
    /// Tables the statement reads with no restriction to its keys
    /// ([`super::restriction`]): when one is sharded, the keys do not send it
    /// to one shard.
    pub unrestricted: Vec<String>,
}

impl std::ops::Deref for Statement {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.shared
    }
}

/// Writes go to this statement's own copy (the analysis builds a statement
/// through it, while the copy is its alone).
impl std::ops::DerefMut for Statement {
    fn deref_mut(&mut self) -> &mut Shared {
        Arc::make_mut(&mut self.shared)
    }
}

/// Everything the router learned from one query string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Analysis {
    pub statements: Vec<Statement>,
    /// The `/* tenant_id=… */` comment, if the text carries one.
    pub comment_key: Option<String>,
}

pub fn analyze(sql: &str, key_column: &str) -> Result<Analysis, String> {
    analyze_with_origins(sql, key_column).map(|(analysis, _)| analysis)
}

/// Where the literals of one statement's analysis stand in the query string: the
/// byte offsets the parser gives its constants (that of a folded minus sign, for
/// a negative number), so that the cache can read another execution's literals
/// in their place. `None` where the analysis holds no literal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origins {
    /// The statement's range in the query string, before trimming.
    pub span: Range<usize>,
    /// One per key candidate.
    pub keys: Vec<Option<usize>>,
    /// One per value of each `INSERT … VALUES` row.
    pub rows: Vec<Vec<Option<usize>>>,
    /// The value of `SET shardgate.tenant`.
    pub tenant: Option<usize>,
    /// The constants that may become parameters when the statement runs as a
    /// prepared statement; None when it may not ([`super::lift`]).
    pub constants: Option<Vec<usize>>,
    /// One per key change.
    pub key_changes: Vec<Option<usize>>,
    /// One per value of an `INSERT … SELECT`'s list.
    pub insert_select: Vec<Option<usize>>,
}

/// [`analyze`], and where each statement's literals came from.
pub fn analyze_with_origins(sql: &str, key_column: &str) -> Result<(Analysis, Vec<Origins>), String> {
    let parsed = pg_query::parse(sql, 0).map_err(|e| e.to_string())?;
    let mut statements = Vec::with_capacity(parsed.protobuf.stmts.len());
    let mut origins = Vec::with_capacity(parsed.protobuf.stmts.len());
    for raw in &parsed.protobuf.stmts {
        let Some(node) = raw.stmt.as_deref().and_then(|n| n.node.as_ref()) else {
            continue;
        };
        let start = raw.stmt_location.max(0) as usize;
        let end = if raw.stmt_len == 0 { sql.len() } else { start + raw.stmt_len as usize };
        let span = start..end.min(sql.len());
        let text = sql.get(span.clone()).unwrap_or(sql).trim().to_string();
        let (s, mut o) = statement(node, text, key_column);
        o.span = span;
        statements.push(s);
        origins.push(o);
    }
    Ok((Analysis { statements, comment_key: comment_key(sql, key_column) }, origins))
}

fn statement(node: &N, text: String, key_column: &str) -> (Statement, Origins) {
    if let N::DeclareCursorStmt(d) = node {
        // A cursor is its query, read from the one connection that declares
        // it: analysed as that query (its tables, its keys). Its constants stay
        // in the text (no lifting into a prepared statement).
        if let Some(query) = d.query.as_deref().and_then(|q| q.node.as_ref()) {
            let (mut s, _) = statement(query, text, key_column);
            s.cursor = Some(d.portalname.clone());
            s.kind = match super::pooled_state::session_state(node) {
                Some(state) => StatementKind::SessionState(state),
                None => StatementKind::DeclareCursor,
            };
            return (s, Origins::default());
        }
    }
    if !nested_writes::holds_write(node) {
        return statement_outside(node, node, text, key_column);
    }
    let mut outside = node.clone();
    let taken = nested_writes::take(&mut outside);
    let (mut s, origins) = statement_outside(&outside, node, text, key_column);
    for n in &taken {
        let (w, _) = statement(n, String::new(), key_column);
        s.max_param = s.max_param.max(w.max_param);
        s.nested_writes.push(w);
    }
    if s.kind == StatementKind::Select {
        s.kind = StatementKind::SelectWithWrites;
    }
    (s, origins)
}

/// The analysis of `node`, a statement with its nested writes taken out (or
/// `whole` itself); key changes and liftable constants are read from `whole`.
fn statement_outside(node: &N, whole: &N, text: String, key_column: &str) -> (Statement, Origins) {
    let mut origins = Origins::default();
    let mut s = Statement {
        kind: StatementKind::Other,
        text,
        keys: KeyCandidates::None,
        insert: None,
        key_changes: Vec::new(),
        insert_select: None,
        shared: Arc::new(Shared {
            tables: Vec::new(),
            written: Vec::new(),
            creates_sharded: None,
            removes_key: None,
            copies_rows: false,
            volatile_call: None,
            sets_config: false,
            reads_last_value: false,
            sets_search_path: false,
            defaults: Defaults::Nothing,
            opaque_code: None,
            max_param: 0,
            read: None,
            nested_writes: Vec::new(),
            cursor: None,
            unrestricted: Vec::new(),
        }),
    };
    match node {
        N::SelectStmt(sel) if sel.into_clause.is_some() => {
            // SELECT … INTO: CREATE TABLE … AS by another name.
            s.kind = StatementKind::Ddl;
            s.copies_rows = true;
            s.creates_sharded = sel.into_clause.as_ref().and_then(|i| i.rel.as_ref()).map(relname);
        }
        N::SelectStmt(sel) => {
            s.kind = StatementKind::Select;
            let r = super::restriction::of(node, key_column).unwrap_or_default();
            (s.keys, origins.keys) = split(r.keys);
            s.unrestricted = r.unrestricted;
            s.read = Some(Arc::new(Read::of(sel, key_column)));
        }
        N::InsertStmt(ins) => {
            s.kind = StatementKind::Insert;
            let table = ins.relation.as_ref().map(relname).unwrap_or_default();
            s.written.push(table.clone());
            let columns = if ins.cols.is_empty() {
                None
            } else {
                Some(
                    ins.cols
                        .iter()
                        .filter_map(|c| match &c.node {
                            Some(N::ResTarget(t)) => Some(t.name.clone()),
                            _ => None,
                        })
                        .collect::<Vec<_>>(),
                )
            };
            let rows = match ins.select_stmt.as_deref().and_then(|n| n.node.as_ref()) {
                Some(N::SelectStmt(sel)) if !sel.values_lists.is_empty() => {
                    let mut rows = Vec::with_capacity(sel.values_lists.len());
                    for row in &sel.values_lists {
                        let values: Vec<Option<Located>> = match &row.node {
                            Some(N::List(l)) => l.items.iter().map(located_value).collect(),
                            _ => Vec::new(),
                        };
                        origins.rows.push(values.iter().map(|v| v.as_ref().and_then(|(_, at)| *at)).collect());
                        rows.push(values.into_iter().map(|v| v.map(|(e, _)| e)).collect());
                    }
                    Some(rows)
                }
                Some(q @ N::SelectStmt(_)) => {
                    // INSERT … SELECT runs where the SELECT's key is; the
                    // inserted keys are checked against it when routing.
                    let r = super::restriction::of(q, key_column).unwrap_or_default();
                    (s.keys, origins.keys) = split(r.keys);
                    s.unrestricted = r.unrestricted;
                    if let Some((info, at)) = key_writes::insert_select(ins, columns.clone(), key_column) {
                        s.insert_select = Some(info);
                        origins.insert_select = at;
                    }
                    None
                }
                _ => None,
            };
            if let Some(rows) = rows {
                s.insert = Some(InsertInfo { table, columns, rows, has_returning: ins.returning_clause.is_some() });
            }
        }
        N::UpdateStmt(upd) => {
            s.kind = StatementKind::Update;
            s.written.extend(upd.relation.as_ref().map(relname));
            let r = super::restriction::of(node, key_column).unwrap_or_default();
            (s.keys, origins.keys) = split(r.keys);
            s.unrestricted = r.unrestricted;
            let exprs = upd.target_list.iter().chain(upd.returning_clause.iter().flat_map(|r| &r.exprs));
            let sel = write_as_select(upd.with_clause.as_ref(), upd.relation.as_ref(), &upd.from_clause, upd.where_clause.as_deref(), exprs);
            s.read = Some(Arc::new(Read::of(&sel, key_column)));
        }
        N::DeleteStmt(del) => {
            s.kind = StatementKind::Delete;
            s.written.extend(del.relation.as_ref().map(relname));
            let r = super::restriction::of(node, key_column).unwrap_or_default();
            (s.keys, origins.keys) = split(r.keys);
            s.unrestricted = r.unrestricted;
            let sel = write_as_select(del.with_clause.as_ref(), del.relation.as_ref(), &del.using_clause, del.where_clause.as_deref(), del.returning_clause.iter().flat_map(|r| &r.exprs));
            s.read = Some(Arc::new(Read::of(&sel, key_column)));
        }
        N::MergeStmt(m) => {
            // No key is looked for: MERGE into a sharded table is refused.
            s.kind = StatementKind::Merge;
            s.written.extend(m.relation.as_ref().map(relname));
        }
        N::CopyStmt(copy) => {
            s.kind = StatementKind::Copy(copy_info(copy));
            if let Some(q @ N::SelectStmt(sel)) = copy.query.as_deref().and_then(|n| n.node.as_ref()) {
                let r = super::restriction::of(q, key_column).unwrap_or_default();
                (s.keys, origins.keys) = split(r.keys);
                s.unrestricted = r.unrestricted;
                s.read = Some(Arc::new(Read::of(sel, key_column)));
            }
            if copy.is_from {
                s.written.extend(copy.relation.as_ref().map(relname));
            }
        }
        N::TransactionStmt(t) => {
            use protobuf::TransactionStmtKind as T;
            s.kind = StatementKind::Txn(match T::try_from(t.kind).unwrap_or(T::Undefined) {
                T::TransStmtBegin | T::TransStmtStart => TxnControl::Begin,
                T::TransStmtCommit => TxnControl::Commit,
                T::TransStmtRollback => TxnControl::Rollback,
                T::TransStmtSavepoint | T::TransStmtRelease | T::TransStmtRollbackTo => TxnControl::Savepoint,
                _ => TxnControl::TwoPhase,
            });
        }
        N::VariableSetStmt(v) if v.name.eq_ignore_ascii_case("shardgate.tenant") => {
            use protobuf::VariableSetKind as V;
            let value = match V::try_from(v.kind).unwrap_or(V::Undefined) {
                V::VarSetValue => v.args.first().and_then(located_value).and_then(|(e, at)| match e {
                    KeyExpr::Literal(l) => {
                        origins.tenant = at;
                        Some(unquote(&l))
                    }
                    KeyExpr::Param(_) | KeyExpr::ParamArray(_) => None,
                }),
                _ => None,
            };
            s.kind = StatementKind::SetTenant(value);
        }
        N::VariableSetStmt(v) if !v.is_local => {
            use protobuf::VariableSetKind as V;
            let name = v.name.to_ascii_lowercase();
            s.kind = match V::try_from(v.kind).unwrap_or(V::Undefined) {
                V::VarSetValue | V::VarSetCurrent => StatementKind::SetVar(SettingChange::Set { name }),
                V::VarSetDefault | V::VarReset => StatementKind::SetVar(SettingChange::Reset { name }),
                V::VarResetAll => StatementKind::SetVar(SettingChange::ResetAll),
                // SET TRANSACTION … and friends: scoped to the transaction.
                _ => StatementKind::Session,
            };
        }
        N::FetchStmt(f) => s.cursor = Some(f.portalname.clone()),
        N::ClosePortalStmt(c) => s.cursor = Some(c.portalname.clone()),
        N::DiscardStmt(d) if d.target == protobuf::DiscardMode::DiscardAll as i32 => {
            s.kind = StatementKind::SetVar(SettingChange::DiscardAll);
        }
        N::PrepareStmt(p) => s.kind = StatementKind::SqlPrepared(SqlPrepared::Prepare { name: p.name.clone() }),
        N::DeallocateStmt(d) => {
            let name = (!d.isall).then(|| d.name.clone());
            s.kind = StatementKind::SqlPrepared(SqlPrepared::Deallocate { name });
        }
        N::VariableSetStmt(_) | N::VariableShowStmt(_) | N::DiscardStmt(_) => s.kind = StatementKind::Session,
        N::CreateStmt(c) => {
            s.kind = StatementKind::Ddl;
            let table = c.relation.as_ref().map(relname).unwrap_or_default();
            let has_key = c.table_elts.iter().any(|e| match &e.node {
                Some(N::ColumnDef(d)) => d.colname == key_column,
                _ => false,
            });
            // Columns that come from elsewhere (LIKE, INHERITS, OF type,
            // PARTITION OF) may include the key.
            let borrows = c.table_elts.iter().any(|e| matches!(&e.node, Some(N::TableLikeClause(_))))
                || !c.inh_relations.is_empty()
                || c.partbound.is_some()
                || c.of_typename.is_some();
            if has_key || borrows {
                s.creates_sharded = Some(table.clone());
            }
            s.written.push(table);
        }
        N::DropStmt(d) => {
            s.kind = StatementKind::Ddl;
            // The relations dropped (the walker sees names, not RangeVars, here).
            let relations = [protobuf::ObjectType::ObjectTable, protobuf::ObjectType::ObjectView, protobuf::ObjectType::ObjectSequence];
            if relations.iter().any(|t| *t as i32 == d.remove_type) {
                for object in &d.objects {
                    let Some(N::List(l)) = &object.node else { continue };
                    let parts: Vec<&str> = l
                        .items
                        .iter()
                        .filter_map(|i| match &i.node {
                            Some(N::String(p)) => Some(p.sval.as_str()),
                            _ => None,
                        })
                        .collect();
                    s.written.push(parts.join("."));
                }
            }
        }
        N::AlterTableStmt(a) if adds_column(a, key_column) => {
            s.kind = StatementKind::Ddl;
            s.creates_sharded = a.relation.as_ref().map(relname);
        }
        N::AlterTableStmt(a) if drops_column(a, key_column) => {
            s.kind = StatementKind::Ddl;
            s.removes_key = a.relation.as_ref().map(relname);
        }
        N::RenameStmt(r)
            if r.rename_type == protobuf::ObjectType::ObjectTable as i32
                || r.rename_type == protobuf::ObjectType::ObjectColumn as i32 =>
        {
            s.kind = StatementKind::Ddl;
            let table = r.relation.as_ref().map(relname);
            if r.rename_type == protobuf::ObjectType::ObjectTable as i32 {
                // The table under its new name, in its schema: the router
                // knows it once the rename commits.
                let schema = r.relation.as_ref().map(|t| t.schemaname.as_str()).unwrap_or_default();
                s.creates_sharded =
                    Some(if schema.is_empty() { r.newname.clone() } else { format!("{schema}.{}", r.newname) });
            } else if r.newname == key_column {
                s.creates_sharded = table;
            } else if r.subname == key_column {
                s.removes_key = table;
            }
        }
        N::CreateTableAsStmt(c) => {
            // Its columns are its query's, which may include the key.
            s.kind = StatementKind::Ddl;
            s.copies_rows = true;
            s.creates_sharded = c.into.as_ref().and_then(|i| i.rel.as_ref()).map(relname);
        }
        N::AlterTableStmt(_)
        | N::TruncateStmt(_)
        | N::IndexStmt(_)
        | N::CreateSchemaStmt(_)
        | N::CreateSeqStmt(_)
        | N::AlterSeqStmt(_)
        | N::ViewStmt(_)
        | N::RenameStmt(_)
        | N::CommentStmt(_)
        | N::CreateFunctionStmt(_)
        | N::CreateExtensionStmt(_)
        | N::CreateEnumStmt(_)
        | N::CompositeTypeStmt(_)
        | N::DefineStmt(_)
        | N::GrantStmt(_)
        | N::CreateTrigStmt(_)
        | N::AlterObjectSchemaStmt(_)
        | N::CreateDomainStmt(_)
        // Roles belong to each shard's server: every shard gets them.
        | N::CreateRoleStmt(_)
        | N::AlterRoleStmt(_)
        | N::AlterRoleSetStmt(_)
        | N::DropRoleStmt(_)
        | N::GrantRoleStmt(_) => s.kind = StatementKind::Ddl,
        _ => {}
    }
    origins.constants = super::lift::liftable_constants(whole);
    let mut changes = Vec::new();
    key_writes::key_changes(whole, key_column, &mut changes);
    (s.key_changes, origins.key_changes) = changes.into_iter().unzip();
    let mut walker = Walker::default();
    walker.node(node);
    let mut tables = walker.tables;
    if let Some(read) = &s.read {
        read.add_tables_to(&mut tables);
    }
    s.tables = tables;
    s.max_param = walker.max_param;
    if let Some(name) = walker.executes {
        // `EXECUTE p`, also under EXPLAIN or CREATE TABLE AS.
        s.kind = StatementKind::SqlPrepared(SqlPrepared::Execute { name });
    }
    if matches!(s.kind, StatementKind::Insert | StatementKind::Update | StatementKind::Merge) {
        s.volatile_call = super::pooled_state::volatile_call(&s.text);
    }
    s.opaque_code = match node {
        N::DoStmt(_) => Some("a DO block"),
        N::CallStmt(_) => Some("CALL"),
        _ => None,
    };
    s.defaults = match node {
        N::InsertStmt(ins) => insert_defaults(ins, &s.text),
        N::UpdateStmt(_) if names_default(&s.text) => Defaults::Any,
        N::MergeStmt(_) => Defaults::Any,
        _ => Defaults::Nothing,
    };
    let calls = super::pooled_state::session_calls(whole, &s.text);
    (s.sets_config, s.reads_last_value) = (calls.sets_config, calls.reads_last_value);
    s.sets_search_path =
        calls.sets_search_path || matches!(whole, N::VariableSetStmt(v) if v.name.eq_ignore_ascii_case("search_path"));
    if let Some(state) = super::pooled_state::session_state(whole) {
        s.kind = StatementKind::SessionState(state);
        // What it creates is written (session pooling routes by it).
        if let Some(t) = super::pooled_state::temp_relation(whole).filter(|t| !s.written.contains(t)) {
            s.written.push(t);
        }
    }
    if s.kind == StatementKind::Ddl {
        // DDL targets are written on every shard; the walker found them.
        let shared = Arc::make_mut(&mut s.shared);
        for t in &shared.tables {
            if !shared.written.contains(t) {
                shared.written.push(t.clone());
            }
        }
    }
    (s, origins)
}

/// An `ALTER TABLE` that drops the key column.
fn drops_column(a: &protobuf::AlterTableStmt, key_column: &str) -> bool {
    a.cmds.iter().any(|c| match &c.node {
        Some(protobuf::node::Node::AlterTableCmd(cmd)) => {
            cmd.subtype == protobuf::AlterTableType::AtDropColumn as i32 && cmd.name == key_column
        }
        _ => false,
    })
}

/// An `ALTER TABLE` that adds the key column: the table becomes sharded.
fn adds_column(a: &protobuf::AlterTableStmt, key_column: &str) -> bool {
    a.cmds.iter().any(|c| match &c.node {
        Some(protobuf::node::Node::AlterTableCmd(cmd)) => {
            cmd.subtype == protobuf::AlterTableType::AtAddColumn as i32
                && matches!(cmd.def.as_deref().and_then(|d| d.node.as_ref()),
                    Some(protobuf::node::Node::ColumnDef(d)) if d.colname == key_column)
        }
        _ => false,
    })
}

pub(super) fn relname(r: &protobuf::RangeVar) -> String {
    if r.schemaname.is_empty() {
        r.relname.clone()
    } else {
        format!("{}.{}", r.schemaname, r.relname)
    }
}

pub(super) fn unquote(s: &str) -> String {
    match s.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')) {
        Some(inner) => inner.replace("''", "'"),
        None => s.to_string(),
    }
}

/// What of a query a shard would apply to its own rows only (see
/// [`CopyInfo::per_shard`]).
fn per_shard(sel: &protobuf::SelectStmt) -> Option<&'static str> {
    let union_all = sel.op == protobuf::SetOperation::SetopUnion as i32 && sel.all;
    if sel.op > 1 && !union_all {
        return Some("UNION, INTERSECT or EXCEPT");
    }
    if !sel.sort_clause.is_empty() {
        return Some("ORDER BY");
    }
    super::mixes_rows(sel)
}

fn copy_info(c: &protobuf::CopyStmt) -> CopyInfo {
    let mut info = CopyInfo {
        from_stdin: c.is_from && c.filename.is_empty() && !c.is_program,
        per_shard: match c.query.as_deref().and_then(|n| n.node.as_ref()) {
            Some(N::SelectStmt(sel)) => per_shard(sel),
            _ => None,
        },
        table: c.relation.as_ref().map(relname),
        columns: None,
        format: CopyFormat::Text,
        delimiter: None,
        header: false,
    };
    if !c.attlist.is_empty() {
        info.columns = Some(
            c.attlist
                .iter()
                .filter_map(|n| match &n.node {
                    Some(N::String(s)) => Some(s.sval.clone()),
                    _ => None,
                })
                .collect(),
        );
    }
    for opt in &c.options {
        let Some(N::DefElem(d)) = &opt.node else {
            continue;
        };
        let arg = d.arg.as_deref().and_then(|a| match &a.node {
            Some(N::String(s)) => Some(s.sval.clone()),
            Some(N::Boolean(b)) => Some(b.boolval.to_string()),
            Some(N::Integer(i)) => Some(i.ival.to_string()),
            _ => None,
        });
        match d.defname.as_str() {
            "format" => {
                info.format = match arg.as_deref().map(str::to_ascii_lowercase).as_deref() {
                    Some("csv") => CopyFormat::Csv,
                    Some("binary") => CopyFormat::Binary,
                    _ => CopyFormat::Text,
                }
            }
            "delimiter" => info.delimiter = arg.and_then(|a| a.bytes().next()),
            "header" => {
                info.header = !matches!(arg.as_deref(), Some("false" | "0" | "off"));
            }
            _ => {}
        }
    }
    info
}

/// A key expression and the offset of the constant it was read from.
pub(super) type Located = (KeyExpr, Option<usize>);

/// The key candidates of a condition while they are being found, each with its
/// origin; None when the condition does not restrict the key.
pub(super) type Found = Option<Vec<Located>>;

fn split(found: Found) -> (KeyCandidates, Vec<Option<usize>>) {
    match found {
        None => (KeyCandidates::None, Vec::new()),
        Some(v) => {
            let origins = v.iter().map(|(_, at)| *at).collect();
            (KeyCandidates::Any(v.into_iter().map(|(e, _)| e).collect()), origins)
        }
    }
}

/// A literal or parameter, as a potential key value, with the literal's offset.
pub(super) fn located_value(n: &Node) -> Option<Located> {
    match n.node.as_ref()? {
        N::AConst(c) => {
            let at = usize::try_from(c.location).ok();
            let literal = match c.val.as_ref()? {
                a_const::Val::Ival(i) => i.ival.to_string(),
                a_const::Val::Fval(f) => f.fval.clone(),
                a_const::Val::Sval(s) => format!("'{}'", s.sval.replace('\'', "''")),
                _ => return None,
            };
            Some((KeyExpr::Literal(literal), at))
        }
        N::ParamRef(p) if p.number >= 1 => Some((KeyExpr::Param(p.number as usize - 1), None)),
        N::TypeCast(t) => t.arg.as_deref().and_then(located_value),
        _ => None,
    }
}

/// The keys of `key = ANY(…)`: the elements of `ARRAY[…]` (each a literal or a
/// parameter), or every element of an array parameter.
fn array_keys(n: &Node) -> Found {
    match n.node.as_ref()? {
        N::AArrayExpr(a) => a.elements.iter().map(located_value).collect(),
        N::ParamRef(p) if p.number >= 1 => Some(vec![(KeyExpr::ParamArray(p.number as usize - 1), None)]),
        N::TypeCast(t) => t.arg.as_deref().and_then(array_keys),
        _ => None,
    }
}

/// Whether a column reference's fields name the relation being looked at.
pub(super) type NamesRelation<'a> = &'a dyn Fn(&[Node]) -> bool;

/// Finds conditions on the key column.
pub(super) struct KeyFinder<'a> {
    pub(super) column: &'a str,
    /// Counts only the key columns these fields name (a column reference's
    /// qualifier and name), when set: the key of one relation of several.
    pub(super) only: Option<NamesRelation<'a>>,
}

impl KeyFinder<'_> {
    fn is_key_column(&self, n: &Node) -> bool {
        match &n.node {
            Some(N::ColumnRef(c)) => {
                matches!(
                    c.fields.last().and_then(|f| f.node.as_ref()),
                    Some(N::String(s)) if s.sval == self.column
                ) && self.only.is_none_or(|only| only(&c.fields))
            }
            Some(N::TypeCast(t)) => t.arg.as_deref().is_some_and(|a| self.is_key_column(a)),
            _ => false,
        }
    }

    pub(super) fn where_keys(&self, n: Option<&Node>) -> Found {
        let n = n.and_then(|n| n.node.as_ref())?;
        match n {
            N::AExpr(e) => {
                let op = e.name.first().and_then(|n| match &n.node {
                    Some(N::String(s)) => Some(s.sval.as_str()),
                    _ => None,
                });
                let (Some(l), Some(r)) = (e.lexpr.as_deref(), e.rexpr.as_deref()) else {
                    return None;
                };
                use protobuf::AExprKind as K;
                match K::try_from(e.kind).unwrap_or(K::Undefined) {
                    K::AexprOp if op == Some("=") => {
                        if self.is_key_column(l) {
                            located_value(r).map(|v| vec![v])
                        } else if self.is_key_column(r) {
                            located_value(l).map(|v| vec![v])
                        } else {
                            None
                        }
                    }
                    K::AexprIn if op == Some("=") && self.is_key_column(l) => match &r.node {
                        Some(N::List(list)) => list.items.iter().map(located_value).collect(),
                        _ => None,
                    },
                    K::AexprOpAny if op == Some("=") && self.is_key_column(l) => array_keys(r),
                    _ => None,
                }
            }
            N::BoolExpr(b) => {
                use protobuf::BoolExprType as B;
                match B::try_from(b.boolop).unwrap_or(B::Undefined) {
                    B::AndExpr => b.args.iter().map(|a| self.where_keys(Some(a))).fold(None, intersect),
                    B::OrExpr => {
                        let mut all = Vec::new();
                        for a in &b.args {
                            all.extend(self.where_keys(Some(a))?);
                        }
                        Some(all)
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    }
}

/// Both conditions hold: the narrower one wins (keeping the first if both name keys;
/// `tenant_id = 1 AND tenant_id = 2` matches nothing, on whichever shard).
pub(super) fn intersect(a: Found, b: Found) -> Found {
    match (a, b) {
        (None, x) | (x, None) => x,
        (Some(x), Some(y)) => {
            if x.len() <= y.len() {
                Some(x)
            } else {
                Some(y)
            }
        }
    }
}

/// Collects relation names and the highest parameter number anywhere in a tree,
/// with pg_query's own node iterator.
#[derive(Default)]
struct Walker {
    tables: Vec<String>,
    max_param: usize,
    ctes: Vec<String>,
    /// The name of an `EXECUTE`d SQL prepared statement.
    executes: Option<String>,
}

impl Walker {
    fn node(&mut self, n: &N) {
        for (r, _, _, _) in n.nodes() {
            match r {
                pg_query::NodeRef::RangeVar(v) => {
                    let name = relname(v);
                    if !self.tables.contains(&name) && !self.ctes.contains(&name) {
                        self.tables.push(name);
                    }
                }
                pg_query::NodeRef::CommonTableExpr(c) => self.ctes.push(c.ctename.clone()),
                pg_query::NodeRef::ParamRef(p) => self.max_param = self.max_param.max(p.number.max(0) as usize),
                pg_query::NodeRef::ExecuteStmt(e) => self.executes = Some(e.name.clone()),
                _ => {}
            }
        }
        self.tables.retain(|t| !self.ctes.contains(t));
    }
}

/// Which columns of its table a write may leave to their defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Defaults {
    /// None: not an INSERT, or an UPDATE without `DEFAULT`.
    #[default]
    Nothing,
    /// Those not in an INSERT's column list (its `insert` or
    /// `insert_select` holds it).
    Unlisted,
    /// Those after the first n: an `INSERT … VALUES` without a column list,
    /// whose shortest row has n values.
    After(usize),
    /// Any: `DEFAULT VALUES`, a `DEFAULT` among the values or in a SET, an
    /// `INSERT … SELECT` without a column list, `MERGE`.
    Any,
}

fn insert_defaults(ins: &protobuf::InsertStmt, text: &str) -> Defaults {
    let Some(N::SelectStmt(sel)) = ins.select_stmt.as_deref().and_then(|n| n.node.as_ref()) else {
        return Defaults::Any; // DEFAULT VALUES
    };
    if names_default(text) {
        return Defaults::Any;
    }
    if !ins.cols.is_empty() {
        return Defaults::Unlisted;
    }
    let shortest = sel.values_lists.iter().map(|row| match &row.node {
        Some(N::List(l)) => l.items.len(),
        _ => 0,
    });
    match shortest.min() {
        Some(n) => Defaults::After(n),
        None => Defaults::Any,
    }
}

/// Whether the text says `DEFAULT` (a value left to its column's default),
/// read from the lexer's tokens.
fn names_default(text: &str) -> bool {
    if !text.to_ascii_lowercase().contains("default") {
        return false;
    }
    super::tokens(text).iter().any(|t| t.token == protobuf::Token::Default as i32)
}

/// An UPDATE or DELETE as the SELECT of the rows it changes: its target joined
/// to its FROM (USING), under its WHERE, with its SET values and RETURNING as
/// the output. Run on several shards, the write changes exactly the right rows
/// when this read would be answered exactly there ([`Read::check`]): an
/// `UPDATE a … FROM b` that pairs rows of two tenants on different shards
/// would find them on no shard.
fn write_as_select<'n>(
    with: Option<&protobuf::WithClause>,
    target: Option<&protobuf::RangeVar>,
    from: &[Node],
    cond: Option<&Node>,
    exprs: impl IntoIterator<Item = &'n Node>,
) -> protobuf::SelectStmt {
    let target = target.map(|r| Node { node: Some(N::RangeVar(r.clone())) });
    protobuf::SelectStmt {
        with_clause: with.cloned(),
        from_clause: target.into_iter().chain(from.iter().cloned()).collect(),
        where_clause: cond.map(|c| Box::new(c.clone())),
        target_list: exprs.into_iter().cloned().collect(),
        ..Default::default()
    }
}

/// The tables named anywhere under a node.
pub(super) fn tables_under(n: &N) -> Vec<String> {
    let mut walker = Walker::default();
    walker.node(n);
    walker.tables
}

/// The value of a `/* <key_column>=… */` comment anywhere in the text.
pub(super) fn comment_key(sql: &str, key_column: &str) -> Option<String> {
    if !sql.contains("/*") {
        return None;
    }
    // Only comments count: a `/*` may stand in a string, a quoted name or a
    // `--` comment, which Postgres's own lexer tells apart.
    let tokens = super::tokens(sql);
    tokens.iter().filter(|t| t.token == protobuf::Token::CComment as i32).find_map(|t| {
        let text = sql.get(t.start as usize..t.end as usize)?;
        let body = text.strip_prefix("/*")?;
        key_in_comment(body.strip_suffix("*/").unwrap_or(body), key_column)
    })
}

/// `key_column=value` in a comment's text.
fn key_in_comment(body: &str, key_column: &str) -> Option<String> {
    body.split([',', ' ', ';']).find_map(|part| {
        let (k, v) = part.split_once('=')?;
        let v = v.trim().trim_matches('\'').trim_matches('"');
        (k.trim().eq_ignore_ascii_case(key_column) && !v.is_empty()).then(|| v.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(sql: &str) -> Statement {
        let mut a = analyze(sql, "tenant_id").unwrap();
        assert_eq!(a.statements.len(), 1, "{sql}");
        a.statements.remove(0)
    }

    fn lit(s: &str) -> KeyExpr {
        KeyExpr::Literal(s.into())
    }

    #[test]
    fn key_from_where_equality_qualified_or_not() {
        assert_eq!(one("select * from orders where tenant_id = 5").keys, KeyCandidates::Any(vec![lit("5")]));
        assert_eq!(one("select * from orders o where 5 = o.tenant_id").keys, KeyCandidates::Any(vec![lit("5")]));
        assert_eq!(
            one("select * from orders where id = 3 and tenant_id = $2").keys,
            KeyCandidates::Any(vec![KeyExpr::Param(1)])
        );
        assert_eq!(one("select * from orders where tenant_id = 'a''b'").keys, KeyCandidates::Any(vec![lit("'a''b'")]));
        assert_eq!(
            one("select * from orders where tenant_id = 9999999999").keys,
            KeyCandidates::Any(vec![lit("9999999999")])
        );
        assert_eq!(one("select * from orders where tenant_id = -7").keys, KeyCandidates::Any(vec![lit("-7")]));
    }

    #[test]
    fn in_lists_and_or_give_several_keys() {
        assert_eq!(
            one("select * from orders where tenant_id in (1, 2, 3)").keys,
            KeyCandidates::Any(vec![lit("1"), lit("2"), lit("3")])
        );
        assert_eq!(
            one("select * from orders where tenant_id = 1 or tenant_id = 2").keys,
            KeyCandidates::Any(vec![lit("1"), lit("2")])
        );
        // One arm of the OR is unrestricted, so the whole is.
        assert_eq!(one("select * from orders where tenant_id = 1 or id = 2").keys, KeyCandidates::None);
    }

    #[test]
    fn key_in_join_condition() {
        let s = one("select * from orders o join items i on i.tenant_id = o.tenant_id and o.tenant_id = 4");
        assert_eq!(s.keys, KeyCandidates::Any(vec![lit("4")]));
        assert_eq!(s.tables, vec!["orders", "items"]);
    }

    #[test]
    fn a_key_in_an_outer_joins_on_restricts_nothing() {
        for sql in [
            "select * from orders o left join items i on o.tenant_id = i.tenant_id and i.tenant_id = 42",
            "select * from orders o left outer join items i on i.tenant_id = 42",
            "select * from items i right join orders o on o.tenant_id = i.tenant_id and i.tenant_id = 42",
            "select * from orders o full join items i on o.tenant_id = i.tenant_id and o.tenant_id = 42",
            "select * from orders o full join items i on o.tenant_id = i.tenant_id and i.tenant_id = 42",
            // An outer join nested in an inner one.
            "select * from (orders o left join items i on i.tenant_id = 42) join plans p on p.id = o.plan",
            "select * from plans p join (orders o left join items i on i.tenant_id = 42) on p.id = o.plan",
            // The nullable side's own inner join restricts only that side.
            "select * from orders o left join (items i join parts p on p.tenant_id = 42) on i.id = o.id",
            "select * from (items i join parts p on p.tenant_id = 42) right join orders o on i.id = o.id",
        ] {
            assert!(one(sql).unrestricted.contains(&"orders".to_string()), "{sql}");
        }
    }

    /// The keys every table of the statement is restricted to, taking every
    /// table as sharded; None when one is read unrestricted.
    fn restricted_to(s: &Statement) -> KeyCandidates {
        if s.unrestricted.is_empty() {
            match s.keys.clone() {
                KeyCandidates::Any(mut keys) => {
                    keys.dedup();
                    KeyCandidates::Any(keys)
                }
                none => none,
            }
        } else {
            KeyCandidates::None
        }
    }

    #[test]
    fn where_inner_joins_and_the_preserved_side_still_restrict() {
        let four = KeyCandidates::Any(vec![lit("4")]);
        for sql in [
            "select * from orders o left join items i on o.tenant_id = i.tenant_id where o.tenant_id = 4",
            // WHERE filters the joined rows, whichever side it names; it leaves
            // no row with no item, so the ON's tie holds for every order.
            "select * from orders o left join items i on o.tenant_id = i.tenant_id where i.tenant_id = 4",
            "select * from orders o join items i on i.tenant_id = o.tenant_id and o.tenant_id = 4 left join parts p on p.tenant_id = o.tenant_id",
            "select * from orders o, items i where i.tenant_id = o.tenant_id and o.tenant_id = 4",
            "select * from orders o join items i using (tenant_id) where o.tenant_id = 4",
            // A locking clause repeats a name; it is not another read.
            "select * from orders o where o.tenant_id = 4 for update of o",
        ] {
            assert_eq!(restricted_to(&one(sql)), four, "{sql}");
        }
        // Each table restricted, to different tenants.
        let s = one("select * from orders o left join items i on o.tenant_id = i.tenant_id and i.tenant_id = 9 where o.tenant_id = 4");
        assert_eq!(restricted_to(&s), KeyCandidates::Any(vec![lit("4"), lit("9")]));
    }

    #[test]
    fn a_table_the_key_does_not_restrict_keeps_the_statement_off_one_shard() {
        for (sql, free) in [
            // An inner join's ON names a tenant of one side only: the other
            // side's rows are any tenant's.
            ("select * from (orders o join items i on i.tenant_id = 4) left join parts p on p.tenant_id = 5", "orders"),
            ("select * from orders o cross join items i join parts p on p.tenant_id = 4", "orders"),
            ("select * from orders o join items i on i.tenant_id = o.tenant_id and o.tenant_id = 4 left join parts p on true", "parts"),
            ("select * from orders o join items i on i.order_id = o.id where o.tenant_id = 4", "items"),
            // A subquery over every tenant's rows.
            ("select * from orders where tenant_id = 4 and total > (select avg(total) from orders)", "orders"),
            ("select * from orders o where o.tenant_id = 4 and exists (select 1 from items i where i.order_id = o.id)", "items"),
            ("update orders set total = (select max(total) from orders) where tenant_id = 4", "orders"),
            ("delete from orders where tenant_id = 4 and id in (select order_id from items)", "items"),
            // A key on the outside of a body that mixes tenants' rows.
            ("select * from (select * from orders order by total limit 5) t where tenant_id = 4", "orders"),
            ("with t as (select tenant_id, sum(total) over () from orders) select * from t where tenant_id = 4", "orders"),
            ("select * from (select tenant_id from orders union all select tenant_id from items) u where tenant_id = 4", "orders"),
            ("select * from (select * from orders) as t(a, b) where a = 4", "orders"),
            // Something the walk does not look into.
            ("select * from orders where tenant_id = 4 and id = any(array(select id from items))", "items"),
        ] {
            let s = one(sql);
            assert!(s.unrestricted.contains(&free.to_string()), "{sql}: {:?}", s.unrestricted);
        }
    }

    #[test]
    fn keys_inside_with_queries_and_subqueries_restrict_what_reads_them() {
        let four = KeyCandidates::Any(vec![lit("4")]);
        for sql in [
            "with recent as (select * from orders where tenant_id = 4) select * from recent order by id",
            "select count(*) from (select * from orders where tenant_id = 4 and total > 1) t",
            "select * from orders o where o.tenant_id = 4 and exists (select 1 from items i where i.tenant_id = o.tenant_id and i.order_id = o.id)",
            "select * from orders o where o.tenant_id = 4 and o.total > (select avg(total) from orders x where x.tenant_id = o.tenant_id)",
            "select * from orders o where o.tenant_id = 4 and o.id in (select order_id from items where tenant_id = 4)",
            // A key outside a body that passes its key column through.
            "select * from (select * from orders) t where tenant_id = 4",
            "with t as (select tenant_id, count(*) from orders group by tenant_id) select * from t where tenant_id = 4",
            "select * from (select o.tenant_id, o.id, i.n from orders o join items i on i.tenant_id = o.tenant_id) t where t.tenant_id = 4",
            "update orders o set total = 0 from items i where i.tenant_id = o.tenant_id and i.id = o.id and o.tenant_id = 4",
            "delete from orders where tenant_id = 4 and id in (select order_id from items i where i.tenant_id = orders.tenant_id)",
        ] {
            assert_eq!(restricted_to(&one(sql)), four, "{sql}");
        }
    }

    #[test]
    fn insert_rows_are_kept_per_row() {
        let s = one("insert into orders (tenant_id, id, total) values (1, 10, 5.5), ($1, 11, now())");
        let ins = s.insert.clone().unwrap();
        assert_eq!(ins.columns.unwrap(), vec!["tenant_id", "id", "total"]);
        assert_eq!(ins.rows[0][0], Some(lit("1")));
        assert_eq!(ins.rows[1][0], Some(KeyExpr::Param(0)));
        assert_eq!(ins.rows[1][2], None);
        assert_eq!(s.written, vec!["orders"]);
    }

    #[test]
    fn several_statements_keep_their_own_text() {
        let a = analyze("begin; update orders set total = 1 where tenant_id = 3; commit", "tenant_id").unwrap();
        let kinds: Vec<_> = a.statements.iter().map(|s| s.kind.clone()).collect();
        assert_eq!(kinds[0], StatementKind::Txn(TxnControl::Begin));
        assert_eq!(kinds[1], StatementKind::Update);
        assert_eq!(a.statements[1].text, "update orders set total = 1 where tenant_id = 3");
        assert_eq!(kinds[2], StatementKind::Txn(TxnControl::Commit));
    }

    #[test]
    fn comment_and_set_give_keys() {
        let a = analyze("/* tenant_id=42 */ select * from orders", "tenant_id").unwrap();
        assert_eq!(a.comment_key.as_deref(), Some("42"));
        // Only a comment's: not a string's, a quoted name's or a `--`
        // comment's text that looks like one (a write routed by it ran on
        // that tenant's shard alone).
        for sql in [
            "update orders set total = 9 where id = 3 and 'x' <> '/* tenant_id=1 */'",
            "select count(*) from orders where $$/* tenant_id=1 */$$ <> ''",
            "select count(*) as \"/* tenant_id=1 */\" from orders",
            "select count(*) from orders -- /* tenant_id=1 */",
            "select E'\\' /* tenant_id=1 */' from orders",
        ] {
            assert_eq!(analyze(sql, "tenant_id").unwrap().comment_key, None, "{sql}");
        }
        let a = analyze("select '/*' /* tenant_id=7 */ from orders", "tenant_id").unwrap();
        assert_eq!(a.comment_key.as_deref(), Some("7"));
        assert_eq!(one("set shardgate.tenant = 17").kind, StatementKind::SetTenant(Some("17".into())));
        assert_eq!(one("set shardgate.tenant = 'acme'").kind, StatementKind::SetTenant(Some("acme".into())));
        assert_eq!(one("reset shardgate.tenant").kind, StatementKind::SetTenant(None));
    }

    #[test]
    fn session_settings_are_recognised() {
        assert_eq!(
            one("set search_path to app, public").kind,
            StatementKind::SetVar(SettingChange::Set { name: "search_path".into() })
        );
        assert_eq!(
            one("SET TimeZone = 'UTC'").kind,
            StatementKind::SetVar(SettingChange::Set { name: "timezone".into() })
        );
        assert_eq!(one("reset work_mem").kind, StatementKind::SetVar(SettingChange::Reset { name: "work_mem".into() }));
        assert_eq!(
            one("set work_mem to default").kind,
            StatementKind::SetVar(SettingChange::Reset { name: "work_mem".into() })
        );
        assert_eq!(one("reset all").kind, StatementKind::SetVar(SettingChange::ResetAll));
        assert_eq!(one("discard all").kind, StatementKind::SetVar(SettingChange::DiscardAll));
        assert_eq!(one("set local work_mem = '1MB'").kind, StatementKind::Session);
        assert_eq!(one("set transaction isolation level serializable").kind, StatementKind::Session);
    }

    #[test]
    fn create_table_with_key_column_is_sharded() {
        let s = one("create table orders (tenant_id bigint, id bigint, primary key (tenant_id, id))");
        assert_eq!(s.kind, StatementKind::Ddl);
        assert_eq!(s.creates_sharded.as_deref(), Some("orders"));
        assert_eq!(one("create table countries (code text)").creates_sharded, None);
    }

    #[test]
    fn drop_names_the_relations_it_drops() {
        let s = one("drop table if exists picks, app.orders cascade");
        assert_eq!(s.kind, StatementKind::Ddl);
        assert_eq!(s.written, ["picks", "app.orders"]);
        assert!(one("drop function f(int)").written.is_empty());
        // What a temporary table's creation writes (session pooling routes by it).
        assert_eq!(one("create temp table scratch (a int)").written, ["scratch"]);
        assert_eq!(one("create temp table s2 as select * from orders").written, ["s2"]);
    }

    #[test]
    fn copy_options_are_read() {
        let s = one("copy orders (tenant_id, id) from stdin with (format csv, header true)");
        let StatementKind::Copy(c) = s.kind else { panic!() };
        assert!(c.from_stdin);
        assert_eq!(c.format, CopyFormat::Csv);
        assert!(c.header);
        assert_eq!(c.columns.unwrap(), vec!["tenant_id", "id"]);
    }

    #[test]
    fn ctes_are_not_tables_and_params_are_counted() {
        let s = one("with x as (select 1) select * from x, orders where orders.id = $3");
        assert_eq!(s.tables, vec!["orders"]);
        assert_eq!(s.max_param, 3);
    }

    #[test]
    fn tables_inside_any_expression_are_found() {
        let s = one("select array[(select count(*) from orders)], coalesce((select 1 from items), 0) collate \"C\"");
        assert!(s.tables.contains(&"orders".to_string()) && s.tables.contains(&"items".to_string()), "{:?}", s.tables);
    }

    #[test]
    fn parse_errors_are_reported() {
        assert!(analyze("selec 1", "tenant_id").is_err());
    }
}

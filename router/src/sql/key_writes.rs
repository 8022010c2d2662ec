//! What a write does to the key column: the assignments that give rows a new
//! key (`UPDATE … SET tenant_id = …`, `ON CONFLICT DO UPDATE SET …`, `MERGE …
//! UPDATE SET …`), and where an `INSERT … SELECT` takes its rows' keys from.
//!
//! A row lives on the shard its key routes to. A statement runs where the
//! router sends it; if it gives a row a key that routes elsewhere, the row stays
//! behind on a shard that no longer answers for it — a stranded row. The router
//! therefore refuses such statements ([`crate::route`]); this module finds them,
//! without knowing yet which tables are sharded.

use pg_query::protobuf::{self, node::Node as N, Node};

use super::analyze::{located_value, relname, Located};
use super::KeyExpr;

/// An assignment to the key column of `table`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyChange {
    /// The table written, as named (`orders`, `app.orders`).
    pub table: String,
    /// The new key when it is a literal or a parameter (None: any other
    /// expression). Assignments that keep the key (`SET tenant_id =
    /// tenant_id`, `= EXCLUDED.tenant_id`) are not recorded at all.
    pub to: Option<KeyExpr>,
}

/// `INSERT … SELECT`: where the inserted rows' values come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InsertSelect {
    pub table: String,
    /// The column list, if the statement names one.
    pub columns: Option<Vec<String>>,
    /// What the SELECT gives at each position of its list; None when its list
    /// is a lone `*` (the positions are then the source table's columns).
    pub values: Option<Vec<Inserted>>,
    /// The one table the SELECT reads, when it reads exactly one plain table.
    pub source: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    /// The key column of the source table: each row keeps the key it has.
    SourceKey,
    /// A literal or a parameter.
    Value(KeyExpr),
    Other,
}

/// Finds the key assignments anywhere a data-changing statement can sit: the
/// statement itself, its `WITH` queries, `EXPLAIN`, `PREPARE`, `COPY (…) TO`.
pub(super) fn key_changes(node: &N, column: &str, out: &mut Vec<(KeyChange, Option<usize>)>) {
    let with = |w: &Option<protobuf::WithClause>, out: &mut Vec<(KeyChange, Option<usize>)>| {
        for cte in w.iter().flat_map(|w| &w.ctes) {
            if let Some(N::CommonTableExpr(c)) = &cte.node {
                if let Some(q) = c.ctequery.as_deref().and_then(|q| q.node.as_ref()) {
                    key_changes(q, column, out);
                }
            }
        }
    };
    let inner = |q: &Option<Box<Node>>, out: &mut Vec<(KeyChange, Option<usize>)>| {
        if let Some(q) = q.as_deref().and_then(|q| q.node.as_ref()) {
            key_changes(q, column, out);
        }
    };
    match node {
        N::UpdateStmt(u) => {
            with(&u.with_clause, out);
            if let Some(r) = &u.relation {
                assignments(r, &u.target_list, &[], column, out);
            }
        }
        N::InsertStmt(i) => {
            with(&i.with_clause, out);
            if let (Some(r), Some(c)) = (&i.relation, &i.on_conflict_clause) {
                if c.action == protobuf::OnConflictAction::OnconflictUpdate as i32 {
                    // EXCLUDED is the row proposed for insertion: it was routed by
                    // its own key, so giving its key to the existing row keeps that
                    // row where it is routed.
                    assignments(r, &c.target_list, &["excluded"], column, out);
                }
            }
            inner(&i.select_stmt, out);
        }
        N::MergeStmt(m) => {
            with(&m.with_clause, out);
            if let Some(r) = &m.relation {
                for w in &m.merge_when_clauses {
                    if let Some(N::MergeWhenClause(w)) = &w.node {
                        if w.command_type == protobuf::CmdType::CmdUpdate as i32 {
                            assignments(r, &w.target_list, &[], column, out);
                        }
                    }
                }
            }
        }
        N::DeleteStmt(d) => with(&d.with_clause, out),
        // Postgres takes data-changing WITH queries at the top level only.
        N::SelectStmt(s) => with(&s.with_clause, out),
        N::ExplainStmt(e) => inner(&e.query, out),
        N::PrepareStmt(p) => inner(&p.query, out),
        N::CopyStmt(c) => inner(&c.query, out),
        N::DeclareCursorStmt(c) => inner(&c.query, out),
        N::CreateTableAsStmt(c) => inner(&c.query, out),
        _ => {}
    }
}

/// The assignments of a SET list that give the key column a new value.
fn assignments(
    target: &protobuf::RangeVar,
    set: &[Node],
    also_unchanged: &[&str],
    column: &str,
    out: &mut Vec<(KeyChange, Option<usize>)>,
) {
    let refname = target.alias.as_ref().map(|a| a.aliasname.as_str()).unwrap_or(target.relname.as_str());
    for t in set {
        let Some(N::ResTarget(t)) = &t.node else { continue };
        // `SET tenant_id = …`, `SET (a, tenant_id) = …`; `SET t.tenant_id`
        // names a column `t`, which Postgres refuses itself.
        if t.name != column {
            continue;
        }
        let value = t.val.as_deref().and_then(|v| match &v.node {
            // `SET (a, tenant_id) = (1, 2)`: this column's own value; from a
            // subquery, unknown.
            Some(N::MultiAssignRef(m)) => match m.source.as_deref().map(|s| &s.node) {
                Some(Some(N::RowExpr(r))) => usize::try_from(m.colno).ok().and_then(|c| r.args.get(c.checked_sub(1)?)),
                _ => None,
            },
            _ => Some(v),
        });
        let unchanged = value.is_some_and(|v| is_key_of(v, column, refname, also_unchanged));
        if unchanged && t.indirection.is_empty() {
            continue;
        }
        let to = value.filter(|_| t.indirection.is_empty()).and_then(plain_value);
        let at = to.as_ref().and_then(|(_, at)| *at);
        out.push((KeyChange { table: relname(target), to: to.map(|(e, _)| e) }, at));
    }
}

/// `tenant_id`, `<target>.tenant_id` or `excluded.tenant_id` (when allowed).
fn is_key_of(v: &Node, column: &str, refname: &str, also: &[&str]) -> bool {
    let Some(N::ColumnRef(c)) = &v.node else { return false };
    let names: Vec<Option<&str>> = c
        .fields
        .iter()
        .map(|f| match &f.node {
            Some(N::String(s)) => Some(s.sval.as_str()),
            _ => None,
        })
        .collect();
    match names.as_slice() {
        [Some(k)] => *k == column,
        [Some(q), Some(k)] => *k == column && (*q == refname || also.contains(q)),
        _ => false,
    }
}

/// A literal or a parameter, possibly cast to a type that keeps its value as a
/// key reads it (no type modifier: `char(2)` would cut a text key short).
fn plain_value(n: &Node) -> Option<Located> {
    match n.node.as_ref()? {
        N::TypeCast(t) => {
            let ty = t.type_name.as_ref()?;
            let name = match ty.names.last().and_then(|n| n.node.as_ref()) {
                Some(N::String(s)) => s.sval.as_str(),
                _ => return None,
            };
            let keeps = ty.typmods.is_empty()
                && ty.array_bounds.is_empty()
                && matches!(name, "int2" | "int4" | "int8" | "text" | "varchar" | "uuid");
            if keeps {
                t.arg.as_deref().and_then(plain_value)
            } else {
                None
            }
        }
        N::AConst(_) | N::ParamRef(_) => located_value(n),
        _ => None,
    }
}

/// Where the rows of `INSERT … SELECT` come from; None for `INSERT … VALUES`
/// (routed row by row) and `DEFAULT VALUES`.
pub(super) fn insert_select(
    ins: &protobuf::InsertStmt,
    columns: Option<Vec<String>>,
    column: &str,
) -> Option<(InsertSelect, Vec<Option<usize>>)> {
    let table = ins.relation.as_ref().map(relname)?;
    let Some(N::SelectStmt(sel)) = ins.select_stmt.as_deref().and_then(|n| n.node.as_ref()) else { return None };
    if !sel.values_lists.is_empty() {
        return None;
    }
    let plain = sel.op <= 1 && sel.with_clause.is_none() && ins.with_clause.is_none();
    // The one plain table the SELECT reads, and the name its columns go by.
    let source = match sel.from_clause.as_slice() {
        [f] if plain => match &f.node {
            Some(N::RangeVar(v)) if v.alias.as_ref().is_none_or(|a| a.colnames.is_empty()) => {
                let refname = v.alias.as_ref().map(|a| a.aliasname.clone()).unwrap_or_else(|| v.relname.clone());
                Some((relname(v), refname))
            }
            _ => None,
        },
        _ => None,
    };
    let lone_star = |t: &Node| match &t.node {
        Some(N::ResTarget(r)) => matches!(
            r.val.as_deref().map(|v| &v.node),
            Some(Some(N::ColumnRef(c))) if c.fields.last().is_some_and(|f| matches!(f.node, Some(N::AStar(_))))
        ),
        _ => false,
    };
    let mut origins = Vec::new();
    let values = match sel.target_list.as_slice() {
        [t] if plain && lone_star(t) => None,
        list => Some(
            list.iter()
                .map(|t| {
                    let val = match &t.node {
                        Some(N::ResTarget(r)) if plain && !lone_star(t) => r.val.as_deref(),
                        _ => None,
                    };
                    let inserted = match val {
                        None => (Inserted::Other, None),
                        Some(v) => match (&source, plain_value(v)) {
                            (_, Some((e, at))) => (Inserted::Value(e), at),
                            (Some((_, refname)), None) if is_key_of(v, column, refname, &[]) => {
                                (Inserted::SourceKey, None)
                            }
                            _ => (Inserted::Other, None),
                        },
                    };
                    origins.push(inserted.1);
                    inserted.0
                })
                .collect(),
        ),
    };
    Some((InsertSelect { table, columns, values, source: source.map(|(t, _)| t) }, origins))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::analyze;

    fn changes(sql: &str) -> Vec<KeyChange> {
        let mut a = analyze(sql, "tenant_id").unwrap();
        a.statements.remove(0).key_changes
    }

    fn to(table: &str, to: Option<KeyExpr>) -> KeyChange {
        KeyChange { table: table.into(), to }
    }

    fn lit(s: &str) -> Option<KeyExpr> {
        Some(KeyExpr::Literal(s.into()))
    }

    #[test]
    fn every_form_that_assigns_the_key_is_found() {
        for (sql, found) in [
            ("update orders set tenant_id = 7 where tenant_id = 5", to("orders", lit("7"))),
            (
                "update orders set total = 1, \"tenant_id\" = $2 where tenant_id = $1",
                to("orders", Some(KeyExpr::Param(1))),
            ),
            ("update orders set TENANT_ID = -7", to("orders", lit("-7"))),
            ("update orders set tenant_id = $1::int8 where tenant_id = $1", to("orders", Some(KeyExpr::Param(0)))),
            ("update orders set tenant_id = '7'::char(1)", to("orders", None)),
            ("update orders set tenant_id = tenant_id + 1", to("orders", None)),
            ("update orders set tenant_id = default", to("orders", None)),
            ("update orders set tenant_id = null", to("orders", None)),
            ("update app.orders set (total, tenant_id) = (1, 8)", to("app.orders", lit("8"))),
            ("update orders set (total, tenant_id) = (select 1, 8)", to("orders", None)),
            ("update orders o set tenant_id = i.tenant_id from items i where i.id = o.id", to("orders", None)),
            ("update orders o set tenant_id = orders.tenant_id", to("orders", None)),
            ("insert into orders values (1, 2) on conflict (id) do update set tenant_id = 9", to("orders", lit("9"))),
            (
                "insert into orders values (1, 2) on conflict (id) do update set tenant_id = orders.tenant_id + 1",
                to("orders", None),
            ),
            (
                "merge into orders o using src s on o.id = s.id when matched then update set tenant_id = s.tenant_id",
                to("orders", None),
            ),
            ("with m as (update orders set tenant_id = 3 returning *) select * from m", to("orders", lit("3"))),
            ("explain analyze update orders set tenant_id = 3", to("orders", lit("3"))),
            ("prepare p as update orders set tenant_id = $1", to("orders", Some(KeyExpr::Param(0)))),
            ("copy (update orders set tenant_id = 3 returning id) to stdout", to("orders", lit("3"))),
        ] {
            assert_eq!(changes(sql), vec![found], "{sql}");
        }
    }

    #[test]
    fn assignments_that_keep_the_key_are_not_changes() {
        for sql in [
            "update orders set tenant_id = tenant_id, total = 1 where id = 2",
            "update orders o set tenant_id = o.tenant_id",
            "update orders set (tenant_id, total) = (tenant_id, 1)",
            "insert into orders values (1, 2) on conflict (tenant_id, id) do update set tenant_id = excluded.tenant_id",
            "insert into orders as o values (1, 2) on conflict do update set tenant_id = o.tenant_id",
            "merge into orders o using src s on o.id = s.id when matched then update set tenant_id = o.tenant_id",
            "update orders set total = 1 where tenant_id = 5",
            "insert into orders values (1, 2) on conflict do nothing",
        ] {
            assert_eq!(changes(sql), vec![], "{sql}");
        }
    }

    fn insert_select(sql: &str) -> InsertSelect {
        let mut a = analyze(sql, "tenant_id").unwrap();
        a.statements.remove(0).insert_select.expect("INSERT … SELECT")
    }

    #[test]
    fn insert_select_says_where_its_keys_come_from() {
        let i =
            insert_select("insert into archive (tenant_id, id) select tenant_id, id from orders where tenant_id = 5");
        assert_eq!(i.values, Some(vec![Inserted::SourceKey, Inserted::Other]));
        assert_eq!(i.source.as_deref(), Some("orders"));
        assert_eq!(i.columns, Some(vec!["tenant_id".to_string(), "id".to_string()]));
        let i = insert_select("insert into archive select o.tenant_id, 7, $1 from orders o");
        assert_eq!(
            i.values,
            Some(vec![
                Inserted::SourceKey,
                Inserted::Value(KeyExpr::Literal("7".into())),
                Inserted::Value(KeyExpr::Param(0))
            ])
        );
        let i = insert_select("insert into archive select * from orders where tenant_id = 5");
        assert_eq!((i.values, i.source.as_deref()), (None, Some("orders")));
        // Joined, renamed or from a CTE: the key column is not provably the source row's.
        for sql in [
            "insert into archive select o.tenant_id from orders o join items i on i.id = o.id",
            "insert into archive select tenant_id from orders o(tenant_id, x)",
            "with orders as (select 1 as tenant_id) insert into archive select tenant_id from orders",
            "insert into archive select tenant_id from orders union all select tenant_id from items",
            "insert into archive select i.tenant_id from orders o, items i",
        ] {
            let i = insert_select(sql);
            assert!(i.values.iter().flatten().all(|v| *v == Inserted::Other), "{sql}: {:?}", i.values);
        }
    }

    mod routed {
        use crate::error::SqlError;
        use crate::route::Target;
        use crate::sql::testing::cluster;

        fn refused_as_key_change(r: Result<Target, SqlError>, sql: &str) {
            let e = r.expect_err(sql);
            assert_eq!(e.code, "0A000", "{sql}: {e:?}");
            assert_eq!(
                e.message,
                "cannot change the sharding key tenant_id of rows in \"orders\": the row would stay on a shard its new key does not route to",
                "{sql}"
            );
            assert!(e.hint.as_deref().is_some_and(|h| h.contains("delete it and insert it again")), "{sql}");
        }

        #[test]
        fn a_write_that_changes_the_key_of_sharded_rows_is_refused() {
            let c = cluster();
            let (t, neighbour) = c.neighbours();
            for sql in [
                format!("update orders set tenant_id = 7 where tenant_id = {t}"),
                // Even to a tenant of the same shard: whether it stays would
                // depend on where buckets are placed today.
                format!("update orders set tenant_id = {neighbour} where tenant_id = {t}"),
                format!("update orders set total = 1, \"tenant_id\" = tenant_id + 1 where tenant_id = {t}"),
                format!("update orders set (total, tenant_id) = (1, 7) where tenant_id = {t}"),
                format!("update orders set (total, tenant_id) = (select 1, 7) where tenant_id = {t}"),
                format!("update orders set tenant_id = {t} where tenant_id in ({t}, {neighbour})"),
                format!("update orders set tenant_id = null where tenant_id = {t}"),
                format!("insert into orders values ({t}, 1, 1) on conflict (tenant_id, id) do update set tenant_id = 7"),
                format!("insert into orders values ({t}, 1, 1) on conflict (tenant_id, id) do update set tenant_id = {t}"),
                format!("merge into orders o using plans p on o.tenant_id = {t} and o.id = p.id when matched then update set tenant_id = 7"),
                format!("with m as (update orders set tenant_id = 7 where tenant_id = {t} returning id) select * from m"),
                format!("explain analyze update orders set tenant_id = 7 where tenant_id = {t}"),
                "prepare move_it as update orders set tenant_id = $1 where tenant_id = $2".to_string(),
            ] {
                refused_as_key_change(c.route(&sql), &sql);
            }
            // Bind parameters: the same refusal, whatever their values.
            let sql = "update orders set tenant_id = $2 where tenant_id = $1";
            refused_as_key_change(c.route_with(sql, &[Some(b"1"), Some(b"7")], None, false), sql);
            // The session's tenant does not make a different new key stay.
            let sql = "update orders set tenant_id = 7 where id = 1";
            refused_as_key_change(c.route_with(sql, &[], Some(t), false), sql);
            // A cross-shard UPDATE that is otherwise allowed still may not change keys.
            let sql = "update orders set tenant_id = 7";
            refused_as_key_change(c.route_with(sql, &[], None, true), sql);
        }

        #[test]
        fn assignments_that_keep_every_row_where_it_is_routed_are_allowed() {
            let c = cluster();
            let (t, _) = c.neighbours();
            for sql in [
                format!("update orders set tenant_id = tenant_id, total = 2 where tenant_id = {t}"),
                format!("update orders set tenant_id = {t}, total = 2 where tenant_id = {t} and id = 1"),
                format!("update orders set tenant_id = '{t}' where tenant_id = {t}"),
                format!("update orders set tenant_id = {t} where tenant_id in ({t}, {t})"),
                format!("insert into orders values ({t}, 1, 1) on conflict (tenant_id, id) do update set tenant_id = excluded.tenant_id"),
            ] {
                assert_eq!(c.route(&sql).unwrap(), c.shard_of(t), "{sql}");
            }
            let sql = "update orders set tenant_id = $1, total = $2 where tenant_id = $1";
            assert_eq!(c.route_with(sql, &[Some(b"1"), Some(b"3")], None, false).unwrap(), c.shard_of(1));
            // With the session's tenant, an ORM writing every column back.
            let sql = "update orders set tenant_id = $1, total = $2 where id = $3";
            assert_eq!(
                c.route_with(sql, &[Some(b"1"), Some(b"3"), Some(b"4")], Some(1), false).unwrap(),
                c.shard_of(1)
            );
            // Reference tables set a column of that name freely.
            assert_eq!(c.route("update plans set tenant_id = 7").unwrap(), Target::All);
        }

        #[test]
        fn texts_of_one_shape_are_each_checked_with_their_own_constants() {
            let c = cluster();
            let (t, neighbour) = c.neighbours();
            let keep = format!("update orders set tenant_id = {t} where tenant_id = {t}");
            let change = format!("update orders set tenant_id = {neighbour} where tenant_id = {t}");
            assert_eq!(c.route(&keep).unwrap(), c.shard_of(t));
            refused_as_key_change(c.route(&change), &change);
            assert_eq!(c.cache.len(), 1, "one shape");
            let keep = format!("insert into orders select {t}, id from orders where tenant_id = {t}");
            let change = format!("insert into orders select {neighbour}, id from orders where tenant_id = {t}");
            assert_eq!(c.route(&keep).unwrap(), c.shard_of(t));
            assert_eq!(c.route(&change).unwrap_err().code, "0A000", "{change}");
        }

        #[test]
        fn merge_into_a_sharded_table_is_refused() {
            let c = cluster();
            let e = c
                .route("merge into orders o using plans p on o.tenant_id = 1 and o.id = p.id when matched then delete")
                .unwrap_err();
            assert_eq!(e.code, "0A000");
            assert!(e.message.contains("MERGE into a sharded table (orders)"), "{}", e.message);
            // Even with the session's tenant: its inserts could carry any key.
            let sql =
                "merge into orders o using plans p on o.id = p.id when not matched then insert values (7, p.id, 0)";
            assert_eq!(c.route_with(sql, &[], Some(1), false).unwrap_err().code, "0A000");
            // Into a reference table, it runs on every shard.
            let sql = "merge into plans p using (values (1)) v(id) on p.id = v.id when matched then delete";
            assert_eq!(c.route(sql).unwrap(), Target::All);
        }

        #[test]
        fn insert_select_runs_only_where_every_inserted_key_belongs() {
            let c = cluster();
            let (t, neighbour) = c.neighbours();
            for sql in [
                // Rows made up for one tenant, named by a comment.
                format!("/* tenant_id={t} */ insert into orders select {t}, g, 0 from generate_series(1, 3) g"),
                format!("insert into orders (tenant_id, id) select tenant_id, id + 100 from orders where tenant_id = {t}"),
                format!("insert into orders select * from orders where tenant_id = {t}"),
                format!("insert into orders (id, tenant_id) select id + 100, {t} from orders where tenant_id = {t}"),
                format!("insert into orders (tenant_id, id) select o.tenant_id, 1 from orders o where o.tenant_id in ({t}, {neighbour})"),
            ] {
                assert_eq!(c.route(&sql).unwrap(), c.shard_of(t), "{sql}");
            }
            for sql in [
                // Another tenant's key, even one on the same shard today.
                format!("insert into orders (tenant_id, id) select {neighbour}, id from orders where tenant_id = {t}"),
                format!("insert into orders (tenant_id, id) select 7, id from orders where tenant_id = {t}"),
                format!(
                    "insert into orders (tenant_id, id) select tenant_id + 1, id from orders where tenant_id = {t}"
                ),
                // items' second column is its key, orders' second is id.
                format!("insert into orders select * from items where tenant_id = {t}"),
            ] {
                let e = c.route(&sql).unwrap_err();
                assert_eq!(e.code, "0A000", "{sql}: {e:?}");
                assert!(e.message.contains("INSERT … SELECT into the sharded table orders"), "{sql}: {}", e.message);
            }
            // A SELECT that reads items of any tenant: refused before its keys.
            let sql = format!("insert into orders (tenant_id, id) select i.tenant_id, o.id from orders o join items i on i.id = o.id where o.tenant_id = {t}");
            let e = c.route(&sql).unwrap_err();
            assert_eq!(e.code, "0A000", "{sql}: {e:?}");
            assert!(e.message.contains("the sharded table items without restricting it"), "{sql}: {}", e.message);
            // Every shard copying its own rows: not one shard, refused.
            let sql = "insert into orders select * from orders";
            assert_eq!(c.route_with(sql, &[], None, true).unwrap_err().code, "0A000");
            // The key column left to its default.
            let sql = format!("insert into orders (id) select id from orders where tenant_id = {t}");
            assert_eq!(c.route(&sql).unwrap_err().code, "23502");
            // Into a reference table, as before.
            assert_eq!(c.route("insert into plans select * from plans").unwrap(), Target::All);
        }
    }
}

//! Data-changing statements inside another: `WITH x AS (INSERT … RETURNING *)
//! SELECT …`, `WITH d AS (DELETE …) UPDATE …`, `EXPLAIN ANALYZE UPDATE …`,
//! `COPY (DELETE … RETURNING …) TO STDOUT`.
//!
//! Such a write runs wherever its statement runs. Routed by the rest of the
//! statement (the outer SELECT's key, a `/* tenant_id=… */` comment, the
//! session's tenant) an INSERT could land rows on a shard their keys do not
//! route to, and a statement that names no key would fan out as a read, running
//! the write on every shard. So the writes are taken out of the statement and
//! analysed as statements of their own, by their own keys (an INSERT by its
//! rows', never by the keys of a WITH query it only reads); the router runs the
//! whole on one shard only if every write and the rest of the statement belong
//! there ([`crate::route`]).

use pg_query::protobuf::{node::Node as N, Node};
use pg_query::NodeRef;

/// Whether a data-changing statement sits anywhere below `node`.
pub(super) fn holds_write(node: &N) -> bool {
    // The first node listed is `node` itself.
    node.nodes().iter().skip(1).any(|(n, ..)| is_write_ref(n))
}

/// Takes the data-changing statements out of `node`: out of its WITH queries (at
/// any depth) and out of the statement EXPLAIN, COPY or CREATE TABLE AS runs,
/// leaving an empty SELECT in their place. A write left anywhere else (Postgres
/// refuses those itself) is copied, not taken, so that it still constrains
/// where the statement may run.
pub(super) fn take(node: &mut N) -> Vec<N> {
    let mut out = Vec::new();
    take_into(node, &mut out);
    for (n, ..) in node.nodes().iter().skip(1) {
        if is_write_ref(n) {
            out.push(n.to_enum());
        }
    }
    out
}

fn is_write_ref(n: &NodeRef<'_>) -> bool {
    matches!(n, NodeRef::InsertStmt(_) | NodeRef::UpdateStmt(_) | NodeRef::DeleteStmt(_) | NodeRef::MergeStmt(_))
}

fn is_write(n: &N) -> bool {
    matches!(n, N::InsertStmt(_) | N::UpdateStmt(_) | N::DeleteStmt(_) | N::MergeStmt(_))
}

/// Takes the statement in `slot` if it is a write, else looks inside it.
fn take_from(slot: &mut Option<Box<Node>>, out: &mut Vec<N>) {
    let Some(inner) = slot.as_deref_mut().and_then(|n| n.node.as_mut()) else { return };
    if is_write(inner) {
        out.push(std::mem::replace(inner, N::SelectStmt(Box::default())));
    } else {
        take_into(inner, out);
    }
}

fn take_into(node: &mut N, out: &mut Vec<N>) {
    let with = match node {
        N::SelectStmt(s) => s.with_clause.as_mut(),
        N::InsertStmt(s) => {
            take_from(&mut s.select_stmt, out);
            s.with_clause.as_mut()
        }
        N::UpdateStmt(s) => s.with_clause.as_mut(),
        N::DeleteStmt(s) => s.with_clause.as_mut(),
        N::MergeStmt(s) => s.with_clause.as_mut(),
        N::ExplainStmt(e) => {
            take_from(&mut e.query, out);
            None
        }
        N::CopyStmt(c) => {
            take_from(&mut c.query, out);
            None
        }
        N::CreateTableAsStmt(c) => {
            take_from(&mut c.query, out);
            None
        }
        _ => None,
    };
    for cte in with.into_iter().flat_map(|w| w.ctes.iter_mut()) {
        if let Some(N::CommonTableExpr(c)) = cte.node.as_mut() {
            take_from(&mut c.ctequery, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::error::SqlError;
    use crate::route::Target;
    use crate::sql::testing::cluster;
    use crate::sql::{analyze, StatementKind};

    const SEVERAL: &str = "this statement changes data inside WITH (or under EXPLAIN ANALYZE or COPY) and would need several shards: it must run on one shard, where every row it writes or reads belongs";

    fn refused_as_several_shards(r: Result<Target, SqlError>, sql: &str) {
        let e = r.expect_err(sql);
        assert_eq!((e.code, e.message.as_str()), ("0A000", SEVERAL), "{sql}");
        assert!(e.hint.as_deref().is_some_and(|h| h.contains("send each write as a statement of its own")), "{sql}");
    }

    /// A tenant on the other shard than tenant 1.
    fn elsewhere(c: &crate::sql::testing::Cluster) -> i64 {
        (2..).find(|t| c.shard_of(*t) != c.shard_of(1)).unwrap_or_default()
    }

    #[test]
    fn a_select_whose_with_query_changes_data_is_a_write() {
        for sql in [
            "with x as (insert into orders values (1, 1, 0) returning *) select * from x",
            "with a as (select 1), d as (delete from orders where tenant_id = 1 returning *) select * from d, a",
        ] {
            let s = analyze(sql, "tenant_id").unwrap().statements.remove(0);
            assert_eq!(s.kind, StatementKind::SelectWithWrites, "{sql}");
            assert_eq!(s.nested_writes.len(), 1, "{sql}");
            // The rest of the statement reads no table of its own.
            assert!(s.tables.is_empty(), "{sql}: {:?}", s.tables);
        }
        let s = analyze("with x as (select * from orders) select * from x", "tenant_id").unwrap().statements.remove(0);
        assert_eq!((&s.kind, s.nested_writes.len()), (&StatementKind::Select, 0));
    }

    #[test]
    fn rows_inserted_by_a_with_query_go_to_their_own_tenants_shard() {
        let c = cluster();
        let (t, neighbour) = c.neighbours();
        let u = elsewhere(&c);
        for sql in [
            format!("with x as (insert into orders values ({u}, 1, 0) returning *) select * from x"),
            // Neither a comment's nor the outer SELECT's tenant sends the row elsewhere.
            format!("/* tenant_id={t} */ with x as (insert into orders values ({u}, 1, 0) returning *) select * from x"),
            format!("with x as (insert into orders values ({u}, 1, 0) returning *) select * from x where tenant_id = {t}"),
            format!("with x as (insert into orders (id, tenant_id) values (1, {u}), (2, {u}) returning id) select count(*) from x"),
        ] {
            assert_eq!(c.route(&sql).unwrap(), c.shard_of(u), "{sql}");
        }
        let sql = format!("with x as (insert into orders values ({u}, 1, 0) returning *) select * from x");
        assert_eq!(c.route_with(&sql, &[], Some(t), false).unwrap(), c.shard_of(u), "the session's tenant");
        let sql = "with x as (insert into orders values ($1, 1, 0) returning *) select * from x";
        assert_eq!(c.route_with(sql, &[Some(u.to_string().as_bytes())], Some(t), false).unwrap(), c.shard_of(u));
        // Reading the same shard's tenants beside the insert.
        let sql = format!(
            "with x as (insert into orders values ({t}, 1, 0) returning *) select * from orders where tenant_id = {neighbour}"
        );
        assert_eq!(c.route(&sql).unwrap(), c.shard_of(t), "{sql}");
        for sql in [
            // Rows for two shards: one statement cannot split.
            format!("with x as (insert into orders values ({t}, 1, 0), ({u}, 2, 0) returning *) select * from x"),
            // The rest of the statement reads another shard's tenant.
            format!("with x as (insert into orders values ({u}, 1, 0) returning *) select * from orders where tenant_id = {t}"),
            format!("/* tenant_id={t} */ with x as (insert into orders values ({u}, 1, 0) returning *) select * from orders"),
        ] {
            refused_as_several_shards(c.route(&sql), &sql);
        }
        // … or every shard: refused by the read's own rule (a WITH query).
        let sql = format!("with x as (insert into orders values ({u}, 1, 0) returning *) select * from orders");
        assert_eq!(c.route(&sql).unwrap_err().code, "0A000", "{sql}");
        // The key as an expression, as at the top level.
        let sql = "with x as (insert into orders values (1 + 1, 1, 0) returning *) select * from x";
        assert_eq!(c.route(sql).unwrap_err().code, "0A000");
    }

    #[test]
    fn an_update_or_delete_in_a_with_query_is_pinned_to_one_tenants_shard_or_refused() {
        let c = cluster();
        let (t, _) = c.neighbours();
        let u = elsewhere(&c);
        for sql in [
            format!("with d as (delete from orders where tenant_id = {u} returning *) select count(*) from d"),
            format!("/* tenant_id={t} */ with d as (delete from orders where tenant_id = {u} returning *) select count(*) from d"),
            format!("with x as (update orders set total = 0 where tenant_id = {u} and id = 1 returning *) select * from x"),
            format!("with d as (delete from orders where tenant_id = {u} returning id) update orders set total = 1 where tenant_id = {u} and id in (select id from d)"),
            format!("explain analyze delete from orders where tenant_id = {u}"),
        ] {
            assert_eq!(c.route(&sql).unwrap(), c.shard_of(u), "{sql}");
        }
        // No key of its own: the session's tenant, as for a top-level DELETE.
        let sql = "with d as (delete from orders where id = 1 returning *) select count(*) from d";
        assert_eq!(c.route_with(sql, &[], Some(u), false).unwrap(), c.shard_of(u));
        for sql in [
            sql.to_string(),
            format!("with x as (update orders set total = 0 where tenant_id in ({t}, {u}) returning *) select * from x"),
            format!("with d as (delete from orders where tenant_id = {u} returning id) update orders set total = 1 where tenant_id = {t}"),
            format!("with d as (delete from orders where tenant_id = {u} returning id) select * from orders where tenant_id = {t}"),
            "explain analyze delete from orders where id = 1".to_string(),
            "copy (delete from orders where id = 1 returning *) to stdout".to_string(),
        ] {
            refused_as_several_shards(c.route(&sql), &sql);
            // Running it on every shard would run the write on each.
            refused_as_several_shards(c.route_with(&sql, &[], None, true), &sql);
        }
    }

    #[test]
    fn keys_of_a_with_query_that_is_only_read_do_not_route_a_write() {
        let c = cluster();
        let (t, _) = c.neighbours();
        let sql =
            format!("with src as (select id from orders where tenant_id = {t}) update orders set total = 0 where id in (select id from src)");
        let s = analyze(&sql, "tenant_id").unwrap().statements.remove(0);
        assert!(s.unrestricted.contains(&"orders".to_string()), "the UPDATE itself names no tenant");
        let e = c.route(&sql).unwrap_err();
        assert_eq!(e.code, "0A000");
        assert!(e.message.contains("without restricting it"), "{}", e.message);
        let sql =
            format!("with src as (select * from orders where tenant_id = {t}) insert into orders select * from src");
        assert_eq!(c.route(&sql).unwrap_err().code, "0A000", "{sql}");
        let u = elsewhere(&c);
        let sql = format!(
            "with src as (select * from orders where tenant_id = {t}), x as (insert into orders values ({u}, 1, 0) returning *) select * from x, src"
        );
        assert_eq!(c.route(&sql).unwrap_err().code, "0A000", "{sql}");
        // Read on the writes' shard, by a comment naming another tenant: still refused.
        let sql = format!("/* tenant_id={t} */ {sql}");
        refused_as_several_shards(c.route(&sql), &sql);
    }

    #[test]
    fn a_with_query_that_writes_a_reference_table_runs_on_every_shard_alone() {
        let c = cluster();
        let sql = "with x as (insert into plans values (1) returning *) select * from x";
        assert_eq!(c.route(sql).unwrap(), Target::All);
        let sql = "with x as (insert into plans values (1) returning *) select * from orders where tenant_id = 1";
        refused_as_several_shards(c.route(sql), sql);
    }

    #[test]
    fn texts_of_one_shape_are_each_routed_by_their_own_inserted_rows() {
        let c = cluster();
        let u = elsewhere(&c);
        for t in [1, u, 1] {
            let sql = format!("with x as (insert into orders values ({t}, 1, 0) returning *) select * from x");
            assert_eq!(c.route(&sql).unwrap(), c.shard_of(t), "{sql}");
        }
    }
}

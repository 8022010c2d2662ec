//! From a SELECT's parse tree to the SQL each shard runs and the merge spec.

use pg_query::protobuf::{self, a_const, node::Node as N, Node};

use super::groups::groups_stay_on_their_shard;
use super::having::{self, Filter};
use super::outputs::{
    aggregate, has_aggregate, int_const, is_aggregate, outputs, plain_tables, Key, Names, OutputRef, Outputs,
};
use super::{refuse, ColumnMerge, FanoutError, FullMerge, MergeSpec, OutputName, SortKey, Star};

/// What to send to each shard and how to merge the answers.
pub struct FanoutPlan {
    pub shard_sql: String,
    pub merge: MergeSpec,
}

fn int_node(v: i64) -> Node {
    let val = match i32::try_from(v) {
        Ok(ival) => a_const::Val::Ival(protobuf::Integer { ival }),
        Err(_) => a_const::Val::Fval(protobuf::Float { fval: v.to_string() }),
    };
    Node { node: Some(N::AConst(protobuf::AConst { isnull: false, location: -1, val: Some(val) })) }
}

/// `COLLATE "C"` or `COLLATE "POSIX"` (also schema-qualified): byte order.
fn bytewise_collation(c: &protobuf::CollateClause) -> bool {
    c.collname.last().is_some_and(|n| matches!(&n.node, Some(N::String(s)) if s.sval == "C" || s.sval == "POSIX"))
}

/// Plans a SELECT that has no tenant key. `key_column` is the sharding key's
/// column name; `table_columns` the columns the catalog knows a sharded table
/// to have.
pub fn plan(
    sql: &str,
    key_column: &str,
    table_columns: &dyn Fn(&str) -> Option<Vec<String>>,
) -> Result<FanoutPlan, FanoutError> {
    let mut parsed = pg_query::parse(sql, 0).map_err(|e| FanoutError::Unsupported(e.to_string()))?;
    let [raw] = &mut parsed.protobuf.stmts[..] else { return Err(refuse("several statements")) };
    let Some(N::SelectStmt(sel)) = raw.stmt.as_deref_mut().and_then(|n| n.node.as_mut()) else {
        return Err(refuse("this kind of statement"));
    };
    check_statement(sel)?;
    let union = sel.op == protobuf::SetOperation::SetopUnion as i32 && sel.all;
    if sel.op > 1 && !union {
        return Err(refuse("UNION (without ALL), INTERSECT or EXCEPT"));
    }
    // The colocation checks passed: each `WITH` query, like each subquery in
    // FROM, runs on each shard over that shard's rows. A name in FROM may then
    // be a WITH query's, not a table's, so nothing here is taken from the
    // catalog by a FROM name.
    let with = sel.with_clause.is_some();
    let is_sharded_table = |t: &str| table_columns(t).is_some();
    let catalog = |t: &str| if with { None } else { table_columns(t) };
    let table_columns: &dyn Fn(&str) -> Option<Vec<String>> = &catalog;
    let table_width = &|t: &str| table_columns(t).map(|c| c.len());
    let plain = !union && !with && plain_tables(&sel.from_clause);
    let inputs = input_columns(&sel.from_clause, table_columns);
    // Groups by the key, over tables or over the one WITH query or subquery
    // FROM reads (which knows WITH queries from tables by name itself).
    let local_groups = !union && groups_stay_on_their_shard(sel, key_column, &is_sharded_table, inputs.as_deref());
    let key = Key { column: key_column, plain_tables: plain, local_groups };
    let mut out = if union { union_outputs(sel, &key)? } else { outputs(sel, &key)? };
    out.inputs = inputs;
    // Groups made whole on their shards come back as rows: only sorted, cut
    // and deduplicated. Their HAVING stays in the shards' statement.
    let grouped = !local_groups
        && (out.columns.iter().any(|c| *c != ColumnMerge::Key)
            || !sel.group_clause.is_empty()
            || sel.having_clause.is_some());
    let group = if grouped { check_grouping(sel, &out)? } else { Vec::new() };
    let visible = out.columns.len();
    let having = match sel.having_clause.take_if(|_| grouped) {
        Some(condition) => Some(plan_having(&condition, sel, &mut out, &key)?),
        None => None,
    };
    ask_for_averages_counts(sel, &mut out.columns);
    let mut order = Vec::new();
    let mut named = Vec::new();
    for s in &sel.sort_clause {
        let (key, name) = sort_key(s, &out)?;
        if let Some(name) = name {
            named.push((order.len(), name));
        }
        order.push(key);
    }
    let (distinct, star_width) = plan_distinct(sel, &out, grouped, &mut order, &mut named, table_width)?;
    let limit = match sel.limit_count.as_deref() {
        None => None,
        Some(n) if matches!(&n.node, Some(N::AConst(c)) if c.isnull) => None, // LIMIT ALL / NULL
        Some(n) => match int_const(n) {
            Some(v) if v >= 0 => Some(v as u64),
            _ => return Err(refuse("a LIMIT that is not a constant")),
        },
    };
    let offset = match sel.limit_offset.as_deref() {
        None => 0,
        Some(n) => match int_const(n) {
            Some(v) if v >= 0 => v as u64,
            _ => return Err(refuse("an OFFSET that is not a constant")),
        },
    };
    if !grouped && order.is_empty() && limit.is_none() && offset == 0 && distinct.is_none() {
        return Ok(FanoutPlan { shard_sql: sql.to_string(), merge: MergeSpec::Concat });
    }
    // Shards: keep ORDER BY (each returns its rows sorted); without grouping each
    // needs only its first offset+limit rows; with grouping, all its groups.
    sel.limit_offset = None;
    if grouped {
        sel.limit_count = None;
    } else if let Some(l) = limit {
        sel.limit_count = Some(Box::new(int_node((l + offset) as i64)));
    }
    let shard_sql = crate::sql::deparse(&parsed.protobuf).map_err(FanoutError::Unsupported)?;
    let star = out.star.map(|s| Star { at: s.at, table: s.table, named, width: star_width, group });
    Ok(FanoutPlan {
        shard_sql,
        merge: MergeSpec::Full(Box::new(FullMerge {
            columns: out.columns,
            visible,
            grouped,
            order,
            distinct,
            having,
            star,
            limit,
            offset,
        })),
    })
}

/// What no cross-shard read may have, whatever its select list.
fn check_statement(sel: &protobuf::SelectStmt) -> Result<(), FanoutError> {
    if sel.into_clause.is_some() || !sel.locking_clause.is_empty() {
        return Err(refuse("SELECT INTO or FOR UPDATE"));
    }
    if !sel.window_clause.is_empty() {
        return Err(refuse("window functions"));
    }
    if sel.limit_option == protobuf::LimitOption::WithTies as i32 {
        return Err(refuse("FETCH … WITH TIES"));
    }
    // A collation named in the select list decides how the shards compare
    // that column; the router can follow only byte order.
    let other_collation =
        sel.target_list.iter().filter_map(|t| t.node.as_ref()).flat_map(|t| t.nodes()).any(|(n, _, _, _)| match n {
            pg_query::NodeRef::CollateClause(c) => !bytewise_collation(c),
            _ => false,
        });
    if other_collation {
        return Err(refuse("COLLATE other than \"C\" in the select list"));
    }
    Ok(())
}

/// `UNION ALL` of reads that each only return rows: every shard runs every
/// arm, and the answers are concatenated (or merged by the ORDER BY over the
/// whole). The output columns are the first arm's.
fn union_outputs(sel: &protobuf::SelectStmt, key: &Key) -> Result<Outputs, FanoutError> {
    let mut arms = Vec::new();
    collect_arms(sel, &mut arms)?;
    for arm in &arms {
        check_statement(arm)?;
        let plain = arm.distinct_clause.is_empty()
            && arm.group_clause.is_empty()
            && arm.having_clause.is_none()
            && arm.sort_clause.is_empty()
            && arm.limit_count.is_none()
            && arm.limit_offset.is_none()
            && !arm.target_list.iter().any(has_aggregate);
        if !plain {
            return Err(refuse("a UNION ALL arm with DISTINCT, GROUP BY, aggregates, ORDER BY or LIMIT of its own"));
        }
    }
    outputs(arms[0], key)
}

/// The arms of `a UNION ALL b UNION ALL c`, first to last.
fn collect_arms<'a>(
    sel: &'a protobuf::SelectStmt,
    arms: &mut Vec<&'a protobuf::SelectStmt>,
) -> Result<(), FanoutError> {
    if sel.op <= 1 {
        arms.push(sel);
        return Ok(());
    }
    if sel.op != protobuf::SetOperation::SetopUnion as i32 || !sel.all {
        return Err(refuse("UNION (without ALL), INTERSECT or EXCEPT"));
    }
    for side in [&sel.larg, &sel.rarg] {
        let arm = side.as_deref().ok_or_else(|| refuse("this UNION ALL"))?;
        if arm.op > 1 && (arm.sort_clause.len() + arm.limit_count.iter().len()) > 0 {
            return Err(refuse("a UNION ALL arm with ORDER BY or LIMIT of its own"));
        }
        collect_arms(arm, arms)?;
    }
    Ok(())
}

/// Grouped reads: the router regroups by the output columns that are not
/// aggregates, so every grouping key must be one of them, and every plain
/// output column a grouping key.
///
/// With `*` (`SELECT o.*, count(i.id) … GROUP BY o.tenant_id, o.id`), the
/// keys it holds are named, bound to the shards' RowDescription, and its other
/// columns may be left out of GROUP BY: Postgres accepts them only when they
/// depend on the grouping keys (a primary key), so regrouping by them too
/// makes the same groups. Averages and HAVING, whose hidden columns would sit
/// past the `*`, are refused beside it. Returns the named keys.
fn check_grouping(sel: &protobuf::SelectStmt, out: &Outputs) -> Result<Vec<OutputName>, FanoutError> {
    if out.columns.is_empty() && out.star.is_none() {
        return Err(refuse("this select list"));
    }
    if out.star.is_some()
        && (sel.having_clause.is_some() || out.columns.iter().any(|c| matches!(c, ColumnMerge::Avg(_))))
    {
        return Err(refuse("avg() or HAVING beside * (name the columns)"));
    }
    let mut keys: Vec<usize> = Vec::new();
    let mut named = Vec::new();
    for g in &sel.group_clause {
        match out.reference(g, Names::InputFirst) {
            Some(OutputRef::At(i)) if out.columns[i] == ColumnMerge::Key => keys.push(i),
            Some(OutputRef::Named(n)) => named.push(n),
            _ => return Err(refuse("GROUP BY on expressions that are not plain output columns")),
        }
    }
    let plain = out.columns.iter().filter(|c| **c == ColumnMerge::Key).count();
    keys.sort();
    keys.dedup();
    if out.star.is_none() && keys.len() != plain {
        return Err(refuse("GROUP BY that does not list every plain output column"));
    }
    Ok(named)
}

/// HAVING over the combined groups: its aggregates become hidden columns of
/// the shards' answer (after the client's), its plain columns must be GROUP BY
/// columns of the select list.
fn plan_having(
    condition: &Node,
    sel: &mut protobuf::SelectStmt,
    out: &mut Outputs,
    key: &Key,
) -> Result<Filter, FanoutError> {
    // Parameters the rest of the statement uses (HAVING is out of `sel` now).
    let elsewhere: Vec<i32> = N::SelectStmt(Box::new(sel.clone()))
        .nodes()
        .into_iter()
        .filter_map(|(n, _, _, _)| match n {
            pg_query::NodeRef::ParamRef(p) => Some(p.number),
            _ => None,
        })
        .collect();
    let mut column = |n: &Node, within: Option<&Node>| -> Result<Option<usize>, FanoutError> {
        let hidden = |sel: &mut protobuf::SelectStmt, out: &mut Outputs, merge: ColumnMerge, val: Node| {
            let at = out.columns.len();
            out.columns.push(merge);
            sel.target_list.push(Node {
                node: Some(N::ResTarget(Box::new(protobuf::ResTarget {
                    name: format!("shardgate_having_{}", at + 1),
                    indirection: vec![],
                    val: Some(Box::new(val)),
                    location: -1,
                }))),
            });
            at
        };
        match (&n.node, within) {
            (Some(N::FuncCall(f)), _) if f.over.is_none() && is_aggregate(f) => {
                let merge = aggregate(f, key)?;
                Ok(Some(hidden(sel, out, merge, n.clone())))
            }
            (Some(N::ColumnRef(_)), _) => {
                Ok(out.find(n, Names::InputOnly).filter(|&i| out.columns[i] == ColumnMerge::Key))
            }
            // `count(*) > $1`: the shards return the parameter's value as a
            // hidden column, `CASE WHEN (count(*) > $1) IS NULL THEN $1 ELSE
            // $1 END`, where the comparison gives it the type it has in
            // HAVING (the statement's own analysis reads the select list
            // first). Used elsewhere too, it could be typed there first.
            (Some(N::ParamRef(p)), Some(comparison)) => {
                if elsewhere.contains(&p.number) {
                    return Err(refuse(&format!(
                        "a parameter (${}) used both in HAVING and elsewhere in the statement",
                        p.number
                    )));
                }
                let test = Node {
                    node: Some(N::NullTest(Box::new(protobuf::NullTest {
                        xpr: None,
                        arg: Some(Box::new(comparison.clone())),
                        nulltesttype: protobuf::NullTestType::IsNull as i32,
                        argisrow: false,
                        location: -1,
                    }))),
                };
                let when = Node {
                    node: Some(N::CaseWhen(Box::new(protobuf::CaseWhen {
                        xpr: None,
                        expr: Some(Box::new(test)),
                        result: Some(Box::new(n.clone())),
                        location: -1,
                    }))),
                };
                let case = Node {
                    node: Some(N::CaseExpr(Box::new(protobuf::CaseExpr {
                        xpr: None,
                        casetype: 0,
                        casecollid: 0,
                        arg: None,
                        args: vec![when],
                        defresult: Some(Box::new(n.clone())),
                        location: -1,
                    }))),
                };
                // The same value in every group of every shard: the first.
                Ok(Some(hidden(sel, out, ColumnMerge::Dependent, case)))
            }
            _ => Ok(None),
        }
    };
    having::plan(condition, &mut column)
}

/// Every column of the tables `from` reads, if the catalog knows each table
/// (plain tables and joins of them only).
fn input_columns(from: &[Node], table_columns: &dyn Fn(&str) -> Option<Vec<String>>) -> Option<Vec<String>> {
    let mut all = Vec::new();
    for n in from {
        match &n.node {
            Some(N::RangeVar(r)) => {
                let name =
                    if r.schemaname.is_empty() { r.relname.clone() } else { format!("{}.{}", r.schemaname, r.relname) };
                all.extend(table_columns(&name)?);
            }
            Some(N::JoinExpr(j)) => {
                for side in [&j.larg, &j.rarg] {
                    all.extend(input_columns(std::slice::from_ref(side.as_deref()?), table_columns)?);
                }
            }
            _ => return None,
        }
    }
    Some(all)
}

/// One ORDER BY item: its sort key, and its name when it is bound later.
fn sort_key(s: &Node, out: &Outputs) -> Result<(SortKey, Option<OutputName>), FanoutError> {
    let Some(N::SortBy(sb)) = &s.node else { return Err(refuse("this ORDER BY")) };
    let Some(mut item) = sb.node.as_deref() else { return Err(refuse("this ORDER BY")) };
    let mut bytewise = false;
    if let Some(N::CollateClause(c)) = &item.node {
        match (bytewise_collation(c), c.arg.as_deref()) {
            (true, Some(arg)) => {
                bytewise = true;
                item = arg;
            }
            _ => return Err(refuse("ORDER BY … COLLATE other than \"C\"")),
        }
    }
    let names = if bytewise { Names::InputOnly } else { Names::OutputFirst };
    let (column, name) = match out.reference(item, names) {
        Some(OutputRef::At(i)) => (i, None),
        Some(OutputRef::Named(n)) => (0, Some(n)),
        None => {
            return Err(refuse(
                "ORDER BY on expressions that are not output columns (name or number the output column)",
            ))
        }
    };
    use protobuf::{SortByDir as D, SortByNulls as Nl};
    let descending = match D::try_from(sb.sortby_dir).unwrap_or(D::Undefined) {
        D::SortbyDesc => true,
        D::SortbyUsing => return Err(refuse("ORDER BY … USING")),
        _ => false,
    };
    let nulls_first = match Nl::try_from(sb.sortby_nulls).unwrap_or(Nl::Undefined) {
        Nl::SortbyNullsFirst => true,
        Nl::SortbyNullsLast => false,
        _ => descending,
    };
    Ok((SortKey { column, descending, nulls_first, bytewise }, name))
}

/// DISTINCT and DISTINCT ON: how many leading sort keys make rows one.
///
/// DISTINCT sorts by every output column (those ORDER BY lacks are added, on
/// the shards too), so equal rows come out of the merge next to each other and
/// the router keeps one without remembering the rows it sent. DISTINCT ON keeps
/// the first row of each key in merge order; as in Postgres its expressions
/// must lead ORDER BY (without ORDER BY they become it). Grouped reads run
/// DISTINCT ON at the router only: a shard's partial groups are not the groups.
///
/// `SELECT DISTINCT t.*` sorts the shards by position, as many as the
/// catalog gives `t` columns; that count is returned too, and the merge
/// refuses shards that send another ([`FullMerge::bind`]).
fn plan_distinct(
    sel: &mut protobuf::SelectStmt,
    out: &Outputs,
    grouped: bool,
    order: &mut Vec<SortKey>,
    named: &mut Vec<(usize, OutputName)>,
    table_width: &dyn Fn(&str) -> Option<usize>,
) -> Result<(Option<usize>, Option<usize>), FanoutError> {
    if sel.distinct_clause.is_empty() {
        return Ok((None, None));
    }
    let plain_distinct = sel.distinct_clause.iter().all(|n| n.node.is_none());
    if plain_distinct {
        if grouped {
            // Group keys are output columns: the groups are distinct already.
            return Ok((None, None));
        }
        if let Some(star) = &out.star {
            let width = star.relation.as_deref().and_then(table_width).ok_or_else(|| {
                refuse("SELECT DISTINCT * of several tables, or of a table that is not sharded (name the columns)")
            })?;
            for p in 1..=out.columns.len() + width {
                named.push((order.len(), OutputName::Position(p)));
                order.push(SortKey { column: 0, descending: false, nulls_first: false, bytewise: false });
                sel.sort_clause.push(sort_by(int_node(p as i64)));
            }
            return Ok((Some(order.len()), Some(width)));
        }
        for i in 0..out.columns.len() {
            if !order.iter().any(|k| k.column == i) {
                order.push(SortKey { column: i, descending: false, nulls_first: false, bytewise: false });
                sel.sort_clause.push(sort_by(int_node(i as i64 + 1)));
            }
        }
        return Ok((Some(order.len()), None));
    }
    let mut on: Vec<OutputRef> = Vec::new();
    for item in &sel.distinct_clause {
        let r = out
            .reference(item, Names::OutputFirst)
            .ok_or_else(|| refuse("DISTINCT ON expressions that are not output columns"))?;
        if !on.contains(&r) {
            on.push(r);
        }
    }
    if order.is_empty() {
        for (i, r) in on.iter().enumerate() {
            let column = match r {
                OutputRef::At(c) => *c,
                OutputRef::Named(n) => {
                    named.push((i, n.clone()));
                    0
                }
            };
            order.push(SortKey { column, descending: false, nulls_first: false, bytewise: false });
        }
        let items: Vec<Node> = sel.distinct_clause.iter().cloned().map(sort_by).collect();
        sel.sort_clause = items;
    }
    let leading: Vec<OutputRef> = (0..on.len().min(order.len()))
        .map(|i| match named.iter().find(|(at, _)| *at == i) {
            Some((_, n)) => OutputRef::Named(n.clone()),
            None => OutputRef::At(order[i].column),
        })
        .collect();
    if leading.len() != on.len() || on.iter().any(|r| !leading.contains(r)) {
        return Err(refuse("DISTINCT ON whose expressions do not lead ORDER BY"));
    }
    if grouped {
        sel.distinct_clause.clear();
    }
    Ok((Some(on.len()), None))
}

fn sort_by(node: Node) -> Node {
    Node {
        node: Some(N::SortBy(Box::new(protobuf::SortBy {
            node: Some(Box::new(node)),
            sortby_dir: protobuf::SortByDir::SortbyDefault as i32,
            sortby_nulls: protobuf::SortByNulls::SortbyNullsDefault as i32,
            use_op: vec![],
            location: -1,
        }))),
    }
}

/// Each `avg(x)` in the select list becomes `sum(x)` under the same output name,
/// and `count(x)` is added at the end of the list: the router adds both up over
/// the shards and divides.
fn ask_for_averages_counts(sel: &mut protobuf::SelectStmt, columns: &mut Vec<ColumnMerge>) {
    for i in 0..columns.len() {
        if !matches!(columns[i], ColumnMerge::Avg(_)) {
            continue;
        }
        let Some(N::ResTarget(rt)) = sel.target_list[i].node.as_mut() else { continue };
        let Some(N::FuncCall(f)) = rt.val.as_deref_mut().and_then(|v| v.node.as_mut()) else { continue };
        let rename = |f: &mut protobuf::FuncCall, to: &str| {
            f.funcname = vec![Node { node: Some(N::String(protobuf::String { sval: to.into() })) }];
        };
        let mut count = f.clone();
        rename(&mut count, "count");
        rename(f, "sum");
        if rt.name.is_empty() {
            rt.name = "avg".into();
        }
        columns[i] = ColumnMerge::Avg(columns.len());
        columns.push(ColumnMerge::Count);
        sel.target_list.push(Node {
            node: Some(N::ResTarget(Box::new(protobuf::ResTarget {
                name: format!("shardgate_avg_count_{}", i + 1),
                indirection: vec![],
                val: Some(Box::new(Node { node: Some(N::FuncCall(count)) })),
                location: -1,
            }))),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_of(sql: &str) -> Result<FanoutPlan, FanoutError> {
        let orders = || ["tenant_id", "id", "region", "total", "qty"].map(String::from).to_vec();
        plan(sql, "tenant_id", &|t| (t == "orders").then(orders))
    }

    fn full(sql: &str) -> (String, FullMerge) {
        let p = plan_of(sql).unwrap();
        match p.merge {
            MergeSpec::Full(f) => (p.shard_sql, *f),
            MergeSpec::Concat => panic!("{sql}: expected a full merge"),
        }
    }

    #[test]
    fn plain_selects_concatenate() {
        assert_eq!(plan_of("select id from orders where total > 5").unwrap().merge, MergeSpec::Concat);
        assert_eq!(plan_of("select * from orders").unwrap().merge, MergeSpec::Concat);
    }

    #[test]
    fn limits_are_pushed_down_with_the_offset() {
        let (sql, m) = full("select id, total from orders order by total desc, 1 limit 5 offset 10");
        assert!(sql.contains("LIMIT 15") && !sql.contains("OFFSET"), "{sql}");
        assert_eq!(m.limit, Some(5));
        assert_eq!(m.offset, 10);
        assert_eq!(m.order[0], SortKey { column: 1, descending: true, nulls_first: true, bytewise: false });
        assert_eq!(m.order[1], SortKey { column: 0, descending: false, nulls_first: false, bytewise: false });
    }

    #[test]
    fn aggregates_and_groups_are_planned() {
        let (sql, m) =
            full("select region, count(*), sum(total) s, max(id) from orders group by region order by s limit 3");
        assert!(!sql.contains("LIMIT"), "grouped shards return all groups: {sql}");
        assert_eq!(m.columns, vec![ColumnMerge::Key, ColumnMerge::Count, ColumnMerge::Sum, ColumnMerge::Max]);
        assert_eq!(m.order[0].column, 2);
        let (_, m) = full("select count(*) from orders");
        assert!(m.grouped);
    }

    #[test]
    fn averages_run_as_sums_and_counts() {
        let (sql, m) = full("select region, avg(total), avg(qty) as q from orders group by region order by q");
        assert!(
            sql.contains("sum(total) AS avg")
                && sql.contains("sum(qty) AS q")
                && sql.contains("count(total) AS shardgate_avg_count_2")
                && sql.contains("count(qty) AS shardgate_avg_count_3")
                && !sql.contains("avg("),
            "{sql}"
        );
        assert_eq!(
            m.columns,
            vec![ColumnMerge::Key, ColumnMerge::Avg(3), ColumnMerge::Avg(4), ColumnMerge::Count, ColumnMerge::Count]
        );
        assert_eq!(m.visible, 3);
        assert_eq!(m.order[0].column, 2);
    }

    #[test]
    fn order_by_collate_c_sorts_by_bytes() {
        let (sql, m) =
            full("select id, region from orders order by region collate \"C\" desc, id collate pg_catalog.\"POSIX\"");
        assert!(sql.contains("COLLATE"), "{sql}");
        assert_eq!(m.order[0], SortKey { column: 1, descending: true, nulls_first: true, bytewise: true });
        assert_eq!(m.order[1], SortKey { column: 0, descending: false, nulls_first: false, bytewise: true });
        let (_, m) = full("select id, region from orders order by region");
        assert!(!m.order[0].bytewise);
    }

    #[test]
    fn star_sort_keys_are_named_until_the_row_description_binds_them() {
        let (_, m) =
            full("select i.qty, o.* from orders o join items i using (tenant_id) order by o.total desc, 1, id");
        let star = m.star.clone().unwrap();
        assert_eq!((star.at, star.table.as_deref()), (1, Some("o")));
        let names: Vec<String> = ["qty", "tenant_id", "id", "total", "qty"].map(String::from).to_vec();
        let bound = m.bind(&names).unwrap();
        assert_eq!(bound.order.iter().map(|k| k.column).collect::<Vec<_>>(), vec![3, 0, 2]);
        assert_eq!(bound.visible, 5);
        // A name two output columns have is refused, not guessed.
        let (_, m) = full("select * from orders o join items i using (tenant_id) order by qty");
        assert!(m.bind(&names).is_err());
        let (_, m) = full("select * from orders order by orders.total limit 2");
        assert_eq!(m.bind(&names).unwrap().order[0].column, 3);
    }

    #[test]
    fn distinct_sorts_by_every_output_column() {
        let (sql, m) = full("select distinct region, qty from orders order by qty desc limit 4");
        assert!(sql.contains("ORDER BY qty DESC, 1 LIMIT 4"), "{sql}");
        assert_eq!(m.order.iter().map(|k| k.column).collect::<Vec<_>>(), vec![1, 0]);
        assert_eq!(m.distinct, Some(2));
        let (sql, m) = full("select distinct on (region) region, id from orders");
        assert!(sql.contains("DISTINCT ON (region)") && sql.contains("ORDER BY region"), "{sql}");
        assert_eq!(m.distinct, Some(1));
        // Grouped: DISTINCT ON runs at the router, after the groups combine.
        let (sql, m) =
            full("select distinct on (region) region, qty, count(*) n from orders group by 1, 2 order by 1, n");
        assert!(!sql.contains("DISTINCT"), "{sql}");
        assert!(m.grouped && m.distinct == Some(1));
    }

    #[test]
    fn distinct_star_sorts_by_as_many_positions_as_the_catalog_knows() {
        let (sql, m) = full("select distinct o.* from orders o join items i using (tenant_id) order by total desc");
        assert!(sql.contains("ORDER BY total DESC, 1, 2, 3, 4, 5"), "{sql}");
        assert_eq!(m.distinct, Some(6));
        let names: Vec<String> = ["tenant_id", "id", "region", "total", "qty"].map(String::from).to_vec();
        let bound = m.bind(&names).unwrap();
        assert_eq!(bound.order.iter().map(|k| k.column).collect::<Vec<_>>(), vec![3, 0, 1, 2, 3, 4]);
        // A column the catalog has not seen yet: refused, not deduplicated short.
        let six: Vec<String> = ["tenant_id", "id", "region", "total", "qty", "added"].map(String::from).to_vec();
        assert!(m.bind(&six).is_err());
    }

    #[test]
    fn star_groups_bind_their_keys_to_the_row_description() {
        let (_, m) = full(
            "select count(i.id) n, o.*, max(i.qty) from orders o join items i using (tenant_id) \
                           group by o.id order by n desc, id",
        );
        let names: Vec<String> = ["n", "tenant_id", "id", "region", "total", "qty", "max"].map(String::from).to_vec();
        let bound = m.bind(&names).unwrap();
        use ColumnMerge::{Count, Dependent, Key, Max};
        assert_eq!(bound.columns, vec![Count, Dependent, Key, Dependent, Dependent, Dependent, Max]);
        assert_eq!((bound.visible, bound.order[0].column, bound.order[1].column), (7, 0, 2));
        // A grouping key the select list lacks would merge groups wrongly.
        let (_, m) = full("select o.*, count(*) from orders o group by o.id, o.nope");
        assert!(m.bind(&names[1..6]).is_err());
    }

    #[test]
    fn having_runs_at_the_router_on_hidden_aggregates() {
        let (sql, m) = full("select region from orders group by region having avg(qty) > 2 and count(*) >= 3");
        assert!(
            !sql.contains("HAVING") && sql.contains("shardgate_having_2") && sql.contains("shardgate_having_3"),
            "{sql}"
        );
        assert_eq!(m.visible, 1);
        assert_eq!(m.columns, vec![ColumnMerge::Key, ColumnMerge::Avg(3), ColumnMerge::Count, ColumnMerge::Count]);
        assert!(m.having.is_some());
    }

    #[test]
    fn a_having_parameter_comes_back_from_the_shards_typed_by_its_comparison() {
        let (sql, m) = full("select region from orders group by region having count(*) > $1 order by region");
        assert!(!sql.contains("HAVING"), "{sql}");
        assert!(sql.contains("CASE WHEN count(*) > $1 IS NULL THEN $1 ELSE $1 END AS shardgate_having_3"), "{sql}");
        assert_eq!(m.columns, vec![ColumnMerge::Key, ColumnMerge::Count, ColumnMerge::Dependent]);
        assert_eq!(m.visible, 1);
        let e = plan_of("select region from orders where qty > $1 group by region having count(*) > $1");
        assert!(e.is_err_and(|e| e.to_string().contains("both in HAVING and elsewhere")));
    }

    #[test]
    fn counts_of_distinct_sharding_keys_add_up() {
        let (sql, m) = full("select region, count(distinct tenant_id) from orders o group by region");
        assert!(sql.contains("count(DISTINCT tenant_id)"), "{sql}");
        assert_eq!(m.columns, vec![ColumnMerge::Key, ColumnMerge::Count]);
    }

    #[test]
    fn groups_by_the_sharding_key_are_answered_whole_by_their_shard() {
        // Every aggregate, HAVING with its parameter, DISTINCT inside: all
        // stay in the shards' statement; the router only sorts and cuts.
        let (sql, m) = full(
            "select tenant_id, count(distinct region), string_agg(region, ','), sum(total::float8) from orders \
             group by tenant_id having count(*) > $1 order by 2 desc, 1 limit 5",
        );
        assert!(sql.contains("HAVING count(*) > $1") && sql.contains("LIMIT 5"), "{sql}");
        assert!(!m.grouped && m.having.is_none() && m.visible == 4, "{m:?}");
        assert_eq!(m.columns, vec![ColumnMerge::Key; 4]);
        assert_eq!((m.order[0].column, m.order[1].column), (1, 0));
        // Through a join on the key, by the preserved side's key.
        let sql = "select o.tenant_id, o.id, avg(i.qty) from orders o left join orders i \
                   on i.tenant_id = o.tenant_id and i.id = o.id group by o.tenant_id, o.id";
        assert_eq!(plan_of(sql).unwrap().merge, MergeSpec::Concat);
        // By position, as long as no `*` before it shifts the positions.
        let sql = "select tenant_id, count(distinct region) from orders group by 1";
        assert_eq!(plan_of(sql).unwrap().merge, MergeSpec::Concat);
        assert!(plan_of("select *, count(distinct region) from orders group by 1").is_err());
        // Not the key, or the key of a table a row may lack: merged as before.
        assert!(full("select region, count(*) from orders group by region").1.grouped);
    }

    #[test]
    fn an_item_that_is_a_select_list_expression_names_that_column() {
        let (_, m) = full("select region, count(*) from orders group by region order by count(*) desc, region");
        assert_eq!((m.order[0].column, m.order[1].column), (1, 0));
        let (sql, m) = full("select lower(region), count(*) from orders group by lower(region) order by lower(region)");
        assert!(sql.contains("lower(region)"), "{sql}");
        assert_eq!(m.columns, vec![ColumnMerge::Key, ColumnMerge::Count]);
        assert_eq!(m.order[0].column, 0);
        assert!(plan_of("select count(*) from orders order by count(id)").is_err());
    }

    #[test]
    fn union_all_runs_whole_on_every_shard() {
        assert_eq!(plan_of("select id from orders union all select id from items").unwrap().merge, MergeSpec::Concat);
        let (sql, m) = full("select id, total from orders union all select id, qty from items order by 2 desc limit 3");
        assert!(sql.contains("UNION ALL") && sql.contains("LIMIT 3"), "{sql}");
        assert_eq!(m.order[0].column, 1);
    }

    #[test]
    fn what_cannot_be_merged_exactly_is_refused() {
        for sql in [
            "select avg(distinct total) from orders",
            "select avg(total) + 1 from orders",
            "select count(distinct id) from orders",
            "select count(distinct o.tenant_id) from orders o, generate_series(1, 3) g",
            "select count(distinct tenant_id) from orders as o(tenant_id)",
            "select sum(distinct tenant_id) from orders",
            "select id, count(*) from orders group by id, total",
            "select id from orders order by total + 1",
            "select row_number() over () from orders",
            "select id from orders union select id from orders",
            "select id from orders union all select max(id) from orders",
            "select id from orders intersect all select id from orders",
            "select distinct * from orders o join items i using (tenant_id)",
            "select distinct i.* from orders o join items i using (tenant_id)",
            "select distinct on (region) id, region from orders order by id",
            "select *, avg(total) from orders group by id",
            "select o.*, count(*) from orders o group by id having count(*) > 1",
            "select tenant_id, count(*), rank() over (order by count(*)) from orders group by tenant_id",
            "select count(distinct region) from orders group by rollup (tenant_id)",
            "select o.tenant_id, count(distinct i.region) from orders o left join orders i \
             on i.tenant_id = o.tenant_id group by i.tenant_id",
            "select id from orders o order by o.total",
            "select o.*, 1, i.* from orders o join items i using (tenant_id)",
            "select sum(total) + 1 from orders",
            "select id, count(*) from orders group by id having count(*) + 1 > 1",
            "select id, count(*) from orders group by id having stddev(total) > 1",
            "select id, region from orders order by region collate \"und-x-icu\"",
            "select id, region collate \"und-x-icu\" as r from orders order by id",
        ] {
            assert!(plan_of(sql).is_err(), "{sql} must be refused");
        }
    }
}

//! From a SELECT's parse tree to the SQL each shard runs and the merge spec.

use pg_query::protobuf::{self, a_const, node::Node as N, Node};

use super::{refuse, ColumnMerge, FanoutError, FullMerge, MergeSpec, SortKey};

/// What to send to each shard and how to merge the answers.
pub struct FanoutPlan {
    pub shard_sql: String,
    pub merge: MergeSpec,
}

fn funcname(f: &protobuf::FuncCall) -> String {
    f.funcname
        .last()
        .and_then(|n| match &n.node {
            Some(N::String(s)) => Some(s.sval.to_ascii_lowercase()),
            _ => None,
        })
        .unwrap_or_default()
}

const AGGREGATES: &[&str] = &[
    "count",
    "sum",
    "min",
    "max",
    "avg",
    "array_agg",
    "string_agg",
    "bool_and",
    "bool_or",
    "every",
    "json_agg",
    "jsonb_agg",
    "json_object_agg",
    "jsonb_object_agg",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "variance",
    "var_pop",
    "var_samp",
    "bit_and",
    "bit_or",
    "xmlagg",
    "percentile_cont",
    "percentile_disc",
    "mode",
];

/// Whether an aggregate or window function appears anywhere under `n`.
fn has_aggregate(n: &Node) -> bool {
    let Some(inner) = &n.node else { return false };
    inner.nodes().into_iter().any(|(r, _, _, _)| match r {
        pg_query::NodeRef::FuncCall(f) => f.over.is_some() || f.agg_star || AGGREGATES.contains(&funcname(f).as_str()),
        _ => false,
    })
}

/// A column reference's names: `["a", "id"]` for `a.id`.
fn column_ref(n: &Node) -> Option<Vec<String>> {
    match &n.node {
        Some(N::ColumnRef(c)) => c
            .fields
            .iter()
            .map(|f| match &f.node {
                Some(N::String(s)) => Some(s.sval.clone()),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

fn int_const(n: &Node) -> Option<i64> {
    match &n.node {
        Some(N::AConst(c)) => match c.val.as_ref()? {
            a_const::Val::Ival(i) => Some(i.ival as i64),
            a_const::Val::Fval(f) => f.fval.parse().ok(),
            _ => None,
        },
        _ => None,
    }
}

/// `COLLATE "C"` or `COLLATE "POSIX"` (also schema-qualified): byte order.
fn bytewise_collation(c: &protobuf::CollateClause) -> bool {
    c.collname.last().is_some_and(|n| matches!(&n.node, Some(N::String(s)) if s.sval == "C" || s.sval == "POSIX"))
}

/// What a bare name in ORDER BY or GROUP BY means, as Postgres decides: ORDER
/// BY takes an output column's name before an input column, GROUP BY an input
/// column before an output name, and inside an expression (`name COLLATE
/// "C"`) a name is only ever an input column.
#[derive(Clone, Copy, PartialEq)]
enum Names {
    OutputFirst,
    InputFirst,
    InputOnly,
}

/// An output column: its name, and the column it is when it is just one.
type Target = (String, Option<Vec<String>>);

/// The output column an ORDER BY or GROUP BY item names: a position, an
/// output name, or a column that is itself an output column.
fn output_column(item: &Node, targets: &[Target], names: Names) -> Option<usize> {
    if let Some(pos) = int_const(item) {
        return (names != Names::InputOnly && pos >= 1 && pos as usize <= targets.len()).then(|| pos as usize - 1);
    }
    let fields = column_ref(item)?;
    let by_name = || match &fields[..] {
        [name] if names != Names::InputOnly => targets.iter().position(|(alias, _)| alias == name),
        _ => None,
    };
    let by_column = || targets.iter().position(|(_, col)| col.as_deref().is_some_and(|c| same_column(c, &fields)));
    match names {
        Names::OutputFirst => by_name().or_else(by_column),
        Names::InputFirst | Names::InputOnly => by_column().or_else(by_name),
    }
}

/// Whether two column references name the same column: written alike, or one
/// bare with the other's name (Postgres took the bare one, so it is the only
/// column of that name in scope). `a.id` is never `b.id`.
fn same_column(a: &[String], b: &[String]) -> bool {
    a == b || (a.len() == 1 || b.len() == 1) && a.last() == b.last()
}

/// Plans a SELECT that has no tenant key.
pub fn plan(sql: &str) -> Result<FanoutPlan, FanoutError> {
    let mut parsed = pg_query::parse(sql, 0).map_err(|e| FanoutError::Unsupported(e.to_string()))?;
    let [raw] = &mut parsed.protobuf.stmts[..] else { return Err(refuse("several statements")) };
    let Some(N::SelectStmt(sel)) = raw.stmt.as_deref_mut().and_then(|n| n.node.as_mut()) else {
        return Err(refuse("this kind of statement"));
    };
    if sel.op > 1 {
        return Err(refuse("UNION/INTERSECT/EXCEPT"));
    }
    if !sel.distinct_clause.is_empty() {
        return Err(refuse("DISTINCT"));
    }
    if sel.having_clause.is_some() {
        return Err(refuse("HAVING"));
    }
    if sel.into_clause.is_some() || !sel.locking_clause.is_empty() {
        return Err(refuse("SELECT INTO or FOR UPDATE"));
    }
    if sel.with_clause.is_some() {
        return Err(refuse("WITH queries"));
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
    // Output columns: what each merges as, and the names ORDER BY may use.
    let mut columns = Vec::new();
    let mut names = Vec::new();
    for t in &sel.target_list {
        let Some(N::ResTarget(rt)) = &t.node else { return Err(refuse("this select list")) };
        let Some(val) = rt.val.as_deref() else { return Err(refuse("this select list")) };
        if let Some(N::ColumnRef(c)) = &val.node {
            if c.fields.iter().any(|f| matches!(f.node, Some(N::AStar(_)))) {
                if sel.group_clause.is_empty() && !has_aggregate(t) {
                    // SELECT * without aggregates: positions are unknown here,
                    // which only matters for sorting and grouping.
                    columns.clear();
                    names.clear();
                    break;
                }
                return Err(refuse("SELECT * with GROUP BY"));
            }
        }
        let merge = match &val.node {
            Some(N::FuncCall(f)) if f.over.is_none() && AGGREGATES.contains(&funcname(f).as_str()) => {
                if f.agg_distinct || f.agg_filter.is_some() || !f.agg_order.is_empty() || f.agg_within_group {
                    return Err(refuse("aggregates with DISTINCT, FILTER or ORDER BY"));
                }
                match funcname(f).as_str() {
                    "count" => ColumnMerge::Count,
                    "sum" => ColumnMerge::Sum,
                    "min" => ColumnMerge::Min,
                    "max" => ColumnMerge::Max,
                    "avg" => ColumnMerge::Avg(0), // its count's column is set below
                    other => return Err(refuse(&format!("{other}()"))),
                }
            }
            _ if has_aggregate(val) => return Err(refuse("expressions around aggregates or window functions")),
            _ => ColumnMerge::Key,
        };
        let col = column_ref(val);
        let alias = if rt.name.is_empty() {
            match &val.node {
                Some(N::FuncCall(f)) => funcname(f),
                _ => col.as_ref().and_then(|c| c.last().cloned()).unwrap_or_default(),
            }
        } else {
            rt.name.clone()
        };
        columns.push(merge);
        names.push((alias, col));
    }
    let grouped = columns.iter().any(|c| *c != ColumnMerge::Key) || !sel.group_clause.is_empty();
    if grouped {
        if columns.is_empty() {
            return Err(refuse("this select list"));
        }
        // Every grouping key must be an output column, and every plain output
        // column a grouping key: the router regroups by the keys it can see.
        let mut keys: Vec<usize> = Vec::new();
        for g in &sel.group_clause {
            match output_column(g, &names, Names::InputFirst) {
                Some(i) if columns[i] == ColumnMerge::Key => keys.push(i),
                _ => return Err(refuse("GROUP BY on expressions that are not plain output columns")),
            }
        }
        let plain = columns.iter().filter(|c| **c == ColumnMerge::Key).count();
        keys.sort();
        keys.dedup();
        if keys.len() != plain {
            return Err(refuse("GROUP BY that does not list every plain output column"));
        }
    }
    let visible = columns.len();
    ask_for_averages_counts(sel, &mut columns);
    let mut order = Vec::new();
    for s in &sel.sort_clause {
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
        let names_first = if bytewise { Names::InputOnly } else { Names::OutputFirst };
        let Some(column) = output_column(item, &names, names_first) else {
            return Err(refuse(
                "ORDER BY on expressions that are not output columns (name or number the output column)",
            ));
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
        order.push(SortKey { column, descending, nulls_first, bytewise });
    }
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
    if !grouped && order.is_empty() && limit.is_none() && offset == 0 {
        return Ok(FanoutPlan { shard_sql: sql.to_string(), merge: MergeSpec::Concat });
    }
    if columns.is_empty() && !order.is_empty() {
        return Err(refuse("ORDER BY with SELECT * (name the columns)"));
    }
    // Shards: keep ORDER BY (each returns its rows sorted); without grouping each
    // needs only its first offset+limit rows; with grouping, all its groups.
    sel.limit_offset = None;
    if grouped {
        sel.limit_count = None;
    } else if let Some(l) = limit {
        sel.limit_count = Some(Box::new(Node {
            node: Some(N::AConst(protobuf::AConst {
                isnull: false,
                location: -1,
                val: Some(a_const::Val::Fval(protobuf::Float { fval: (l + offset).to_string() })),
            })),
        }));
    }
    let shard_sql =
        pg_query::deparse(&parsed.protobuf, Default::default()).map_err(|e| FanoutError::Unsupported(e.to_string()))?;
    Ok(FanoutPlan {
        shard_sql,
        merge: MergeSpec::Full(Box::new(FullMerge { columns, visible, grouped, order, limit, offset })),
    })
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

    fn full(sql: &str) -> (String, FullMerge) {
        let p = plan(sql).unwrap();
        match p.merge {
            MergeSpec::Full(f) => (p.shard_sql, *f),
            MergeSpec::Concat => panic!("{sql}: expected a full merge"),
        }
    }

    #[test]
    fn plain_selects_concatenate() {
        assert_eq!(plan("select id from orders where total > 5").unwrap().merge, MergeSpec::Concat);
        assert_eq!(plan("select * from orders").unwrap().merge, MergeSpec::Concat);
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
            full("select tenant_id, count(*), sum(total) s, max(id) from orders group by tenant_id order by s limit 3");
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
    fn names_in_order_by_and_group_by_resolve_as_in_postgres() {
        // A qualified column is that column, never another table's of the same name.
        let (_, m) = full("select b.id, a.id from t a join t b on b.tenant_id = a.tenant_id order by a.id, b.id");
        assert_eq!((m.order[0].column, m.order[1].column), (1, 0));
        let (_, m) = full("select id, tenant_id from t order by t.id");
        assert_eq!(m.order[0].column, 0);
        // ORDER BY takes an output name before an input column …
        let (_, m) = full("select n_int as name, name as n_int from t order by n_int");
        assert_eq!(m.order[0].column, 1);
        // … GROUP BY an input column before an output name.
        let (_, m) = full("select name as n_int, n_int as name, count(*) from t group by n_int, name order by name");
        assert_eq!(m.order[0].column, 1);
        // Inside an expression a name is an input column, and a number a number.
        assert!(plan("select n_int as name, id from t order by name collate \"C\"").is_err());
        assert!(plan("select name, id from t order by 1 collate \"C\"").is_err());
    }

    #[test]
    fn what_cannot_be_merged_exactly_is_refused() {
        for sql in [
            "select avg(distinct total) from orders",
            "select avg(total) + 1 from orders",
            "select count(distinct id) from orders",
            "select distinct id from orders",
            "select id, count(*) from orders group by id, total",
            "select id from orders order by total + 1",
            "select row_number() over () from orders",
            "select id from orders union select id from orders",
            "select sum(total) + 1 from orders",
            "select id, count(*) from orders group by id having count(*) > 1",
            "select * from orders order by id",
            "select id, region from orders order by region collate \"und-x-icu\"",
            "select id, region collate \"und-x-icu\" as r from orders order by id",
        ] {
            assert!(plan(sql).is_err(), "{sql} must be refused");
        }
    }
}

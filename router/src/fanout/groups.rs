//! Groups made whole on one shard. When GROUP BY holds the sharding key of
//! rows every row of the answer has, a group's rows are one tenant's, all on
//! that tenant's shard (the colocation checks see to it that rows which join
//! live on the same shard before a read fans out), and what that shard
//! computes of the group, HAVING and every aggregate, is the group's answer.

use pg_query::protobuf::{self, node::Node as N, Node};

use super::outputs::{column_fields, int_const, plain_tables};

/// Whether each group of a grouped read is made on one shard: GROUP BY (a
/// plain list, no grouping sets) holds the sharding key column of
/// - a sharded table that every row of the answer has, one not on the
///   nullable side of an outer join (there a NULL key would be one group of
///   rows from every shard), when FROM reads tables only; or
/// - the one `WITH` query or subquery FROM reads, when that passes a sharded
///   table's key column through unchanged and each of its rows is one row of
///   its tables ([`keeps_the_key`]).
///
/// A GROUP BY item names the key by the column (`tenant_id`, `o.tenant_id`),
/// by its position in the select list (`GROUP BY 1`, no `*` before it), or by
/// its output alias (`tenant_id AS t … GROUP BY t`, when `inputs`, the FROM
/// tables' columns, are known and none is named `t`: as in Postgres, a
/// GROUP BY name is an input column's first). `table_columns` is the catalog
/// (sharded tables only); names of `WITH` queries are never taken for tables.
pub(super) fn groups_stay_on_their_shard(
    sel: &protobuf::SelectStmt,
    key_column: &str,
    is_sharded_table: &dyn Fn(&str) -> bool,
    inputs: Option<&[String]>,
) -> bool {
    if sel.group_clause.iter().any(|g| matches!(g.node, Some(N::GroupingSet(_)))) {
        return false;
    }
    let ctes = Ctes::of(sel);
    if ctes.recursive {
        return false;
    }
    let table = |name: &str| !ctes.has(name) && is_sharded_table(name);
    let from = &sel.from_clause;
    let only_tables = plain_tables(from) && range_vars(from).iter().all(|n| !ctes.has(n));
    let any_sharded = range_vars(from).iter().any(|n| table(n));
    // The one derived table FROM reads, and whether it keeps the key.
    let derived = match &from[..] {
        [one] => derived_item(one, &ctes).map(|(name, body)| (name, keeps_the_key(body, key_column, &table, &ctes))),
        _ => None,
    };
    let value = |n: &Node| match &n.node {
        Some(N::ResTarget(rt)) => rt.val.as_deref().cloned(),
        _ => None,
    };
    let by_alias = |g: &Node| -> Option<Vec<String>> {
        let [name] = column_fields(g)?.try_into().ok()?;
        if inputs?.contains(&name) {
            return None;
        }
        let mut named = sel.target_list.iter().filter(|t| matches!(&t.node, Some(N::ResTarget(rt)) if rt.name == name));
        let (Some(item), None) = (named.next(), named.next()) else { return None };
        column_fields(&value(item)?)
    };
    let by_position = |g: &Node| -> Option<Vec<String>> {
        let at = usize::try_from(int_const(g)?).ok()?.checked_sub(1)?;
        let items = sel.target_list.get(..=at)?;
        let starred =
            |n: &Node| value(n).and_then(|v| column_fields(&v)).is_some_and(|f| f.last().is_some_and(|c| c == "*"));
        if items.iter().any(starred) {
            return None;
        }
        column_fields(&value(&items[at])?)
    };
    sel.group_clause.iter().any(|g| {
        match by_alias(g).or_else(|| column_fields(g)).or_else(|| by_position(g)).as_deref() {
            Some([column]) if column == key_column => {
                (only_tables && any_sharded && !has_outer_join(from))
                    || derived.as_ref().is_some_and(|(_, keeps)| *keeps)
            }
            Some([.., q, column]) if column == key_column => {
                (only_tables && preserved(from, q).is_some_and(|t| table(&t)))
                    || derived.as_ref().is_some_and(|(name, keeps)| name == q && *keeps)
            }
            _ => false,
        }
    })
}

/// The `WITH` queries of a statement, by name.
struct Ctes<'a> {
    recursive: bool,
    list: Vec<&'a protobuf::CommonTableExpr>,
}

impl<'a> Ctes<'a> {
    fn of(sel: &'a protobuf::SelectStmt) -> Ctes<'a> {
        let Some(with) = &sel.with_clause else { return Ctes { recursive: false, list: Vec::new() } };
        let list = with
            .ctes
            .iter()
            .filter_map(|c| match &c.node {
                Some(N::CommonTableExpr(cte)) => Some(&**cte),
                _ => None,
            })
            .collect();
        Ctes { recursive: with.recursive, list }
    }

    fn has(&self, name: &str) -> bool {
        self.list.iter().any(|c| c.ctename == name)
    }

    fn body(&self, name: &str) -> Option<&'a protobuf::CommonTableExpr> {
        self.list.iter().rev().find(|c| c.ctename == name).copied()
    }
}

/// A FROM item that is a subquery, or a reference to a `WITH` query, with
/// the columns it gives not renamed: the name it goes by and its query.
fn derived_item<'a>(item: &'a Node, ctes: &Ctes<'a>) -> Option<(String, &'a protobuf::SelectStmt)> {
    match &item.node {
        Some(N::RangeSubselect(r)) if !r.lateral => {
            let alias = r.alias.as_ref().filter(|a| a.colnames.is_empty())?;
            match r.subquery.as_deref()?.node.as_ref()? {
                N::SelectStmt(body) => Some((alias.aliasname.clone(), &**body)),
                _ => None,
            }
        }
        Some(N::RangeVar(r)) if r.schemaname.is_empty() && ctes.has(&r.relname) => {
            let name = match &r.alias {
                Some(a) if !a.colnames.is_empty() => return None,
                Some(a) => a.aliasname.clone(),
                None => r.relname.clone(),
            };
            let cte = ctes.body(&r.relname).filter(|c| c.aliascolnames.is_empty())?;
            match cte.ctequery.as_deref()?.node.as_ref()? {
                N::SelectStmt(body) => Some((name, &**body)),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Whether a derived table's column named like the key is a sharded table's
/// key, unchanged, and each of its rows is one row of its tables: no set
/// operation, no `WITH` of its own, nothing that mixes rows (aggregates,
/// GROUP BY, DISTINCT, windows, LIMIT), tables only in FROM, and every output
/// of that name (`tenant_id`, `o.tenant_id`, or `*` / `o.*` over sharded
/// tables) a key of a table each of its rows has.
fn keeps_the_key(body: &protobuf::SelectStmt, key_column: &str, table: &dyn Fn(&str) -> bool, ctes: &Ctes) -> bool {
    if body.op > 1 || body.with_clause.is_some() || crate::sql::mixes_rows(body).is_some() {
        return false;
    }
    let from = &body.from_clause;
    let names = range_vars(from);
    if !plain_tables(from) || names.iter().any(|n| ctes.has(n)) {
        return false;
    }
    let mut keys = 0;
    for t in &body.target_list {
        let Some(N::ResTarget(rt)) = &t.node else { return false };
        let fields = rt.val.as_deref().and_then(column_fields);
        let keeps = match fields.as_deref() {
            // Every table's columns: each a sharded table with its key, none
            // on the nullable side of an outer join.
            Some([star]) if star == "*" => {
                if !names.iter().all(|n| table(n)) || has_outer_join(from) {
                    return false;
                }
                true
            }
            Some([.., q, star]) if star == "*" => match preserved(from, q) {
                Some(t) if table(&t) => true,
                // Another table's columns: not the key, unless named like it.
                _ => continue,
            },
            _ if rt.name.is_empty() && rt.val.as_deref().is_some_and(|v| cast_of(v, key_column)) => {
                // `tenant_id::text` is named `tenant_id` too, and is not it.
                return false;
            }
            _ => {
                let name = if rt.name.is_empty() {
                    fields.as_ref().and_then(|f| f.last().cloned())
                } else {
                    Some(rt.name.clone())
                };
                if name.as_deref() != Some(key_column) {
                    continue;
                }
                match fields.as_deref() {
                    Some([c]) if c == key_column => names.iter().any(|n| table(n)) && !has_outer_join(from),
                    Some([.., q, c]) if c == key_column => preserved(from, q).is_some_and(|t| table(&t)),
                    _ => return false,
                }
            }
        };
        if !keeps {
            return false;
        }
        keys += 1;
    }
    keys > 0
}

/// Whether `n` is a cast (of a cast …) of a column named `column`, which
/// Postgres names after the column.
fn cast_of(n: &Node, column: &str) -> bool {
    match &n.node {
        Some(N::TypeCast(c)) => c.arg.as_deref().is_some_and(|a| {
            column_fields(a).is_some_and(|f| f.last().is_some_and(|l| l == column)) || cast_of(a, column)
        }),
        _ => false,
    }
}

/// The names of the tables (or `WITH` queries) FROM reads, at any depth of
/// joins.
fn range_vars(from: &[Node]) -> Vec<String> {
    let mut out = Vec::new();
    for n in from {
        match &n.node {
            Some(N::RangeVar(r)) => out.push(if r.schemaname.is_empty() {
                r.relname.clone()
            } else {
                format!("{}.{}", r.schemaname, r.relname)
            }),
            Some(N::JoinExpr(j)) => {
                for side in [&j.larg, &j.rarg].into_iter().flatten() {
                    out.extend(range_vars(std::slice::from_ref(&**side)));
                }
            }
            _ => {}
        }
    }
    out
}
fn has_outer_join(from: &[Node]) -> bool {
    from.iter().any(|n| match &n.node {
        Some(N::JoinExpr(j)) => {
            j.jointype != protobuf::JoinType::JoinInner as i32
                || [&j.larg, &j.rarg].into_iter().flatten().any(|side| has_outer_join(std::slice::from_ref(&**side)))
        }
        _ => false,
    })
}

/// The table FROM reads under `name`, when each row of the join has a row of
/// it (it is not on the nullable side of an outer join).
fn preserved(from: &[Node], name: &str) -> Option<String> {
    from.iter().find_map(|n| match &n.node {
        Some(N::RangeVar(r)) if r.alias.as_ref().map_or(r.relname.as_str(), |a| a.aliasname.as_str()) == name => {
            Some(if r.schemaname.is_empty() { r.relname.clone() } else { format!("{}.{}", r.schemaname, r.relname) })
        }
        Some(N::JoinExpr(j)) => {
            use protobuf::JoinType as J;
            let sides = match J::try_from(j.jointype) {
                Ok(J::JoinInner) => vec![&j.larg, &j.rarg],
                Ok(J::JoinLeft) => vec![&j.larg],
                Ok(J::JoinRight) => vec![&j.rarg],
                _ => vec![],
            };
            sides.into_iter().flatten().find_map(|side| preserved(std::slice::from_ref(&**side), name))
        }
        _ => None,
    })
}

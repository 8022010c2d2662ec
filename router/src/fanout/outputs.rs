//! A SELECT's output columns: what each merges as, and which one an ORDER BY,
//! GROUP BY, DISTINCT ON or HAVING item names.

use pg_query::protobuf::{self, a_const, node::Node as N, Node};

pub(super) use crate::sql::aggregates::{funcname, has_aggregate, is_aggregate};

use super::{refuse, ColumnMerge, FanoutError, OutputName};

/// Whether a window function appears anywhere under `n`.
fn has_window(n: &Node) -> bool {
    let Some(inner) = &n.node else { return false };
    inner.nodes().into_iter().any(|(r, _, _, _)| matches!(r, pg_query::NodeRef::FuncCall(f) if f.over.is_some()))
}

/// A column reference's names (`o.total` → `["o", "total"]`), `*` as "*".
pub(super) fn column_fields(n: &Node) -> Option<Vec<String>> {
    let Some(N::ColumnRef(c)) = &n.node else { return None };
    c.fields
        .iter()
        .map(|f| match &f.node {
            Some(N::String(s)) => Some(s.sval.clone()),
            Some(N::AStar(_)) => Some("*".into()),
            _ => None,
        })
        .collect()
}

pub(super) fn int_const(n: &Node) -> Option<i64> {
    match &n.node {
        Some(N::AConst(c)) => match c.val.as_ref()? {
            a_const::Val::Ival(i) => Some(i.ival as i64),
            a_const::Val::Fval(f) => f.fval.parse().ok(),
            _ => None,
        },
        _ => None,
    }
}

/// One output column: the name Postgres gives it, and the column it shows
/// when it is a plain column reference.
pub(super) struct Target {
    pub(super) name: String,
    pub(super) column: Option<Vec<String>>,
    /// The expression, which an ORDER BY, GROUP BY or DISTINCT ON item that
    /// is neither a name nor a number names by being the same expression.
    pub(super) expr: Node,
}

/// The select list as the merge sees it.
pub(super) struct Outputs {
    pub(super) columns: Vec<ColumnMerge>,
    pub(super) targets: Vec<Target>,
    pub(super) star: Option<StarAt>,
    /// The columns of the tables FROM reads, when the catalog knows every one
    /// of them (None: a reference table, a subquery, a function …): tells
    /// whether a bare GROUP BY name is an input column.
    pub(super) inputs: Option<Vec<String>>,
}

/// What a bare name in ORDER BY, GROUP BY or HAVING means, as Postgres decides:
/// ORDER BY (and DISTINCT ON) takes an output column's name before an input
/// column; GROUP BY an input column before an output name; HAVING, and a name
/// inside an expression (`name COLLATE "C"`), only ever an input column, and
/// a number there is a number, not a position.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Names {
    OutputFirst,
    InputFirst,
    InputOnly,
}

/// Where `*` (or several next to each other) stands in the select list.
pub(super) struct StarAt {
    /// How many columns come before it.
    pub(super) at: usize,
    /// The name it reads through: `t` of `t.*`, or the one table of FROM.
    pub(super) table: Option<String>,
    /// The table that name is, as FROM writes it.
    pub(super) relation: Option<String>,
}

/// An ORDER BY or DISTINCT ON item: an output column by index, or, past a
/// `*`, by what names it (bound to the shards' RowDescription).
#[derive(Clone, PartialEq)]
pub(super) enum OutputRef {
    At(usize),
    Named(OutputName),
}

impl Outputs {
    /// The output column an ORDER BY, GROUP BY or DISTINCT ON item names: a
    /// position, an output column's name, or a column reference that is itself
    /// an output column (`o.total` for `total`, not for `i.total`).
    pub(super) fn find(&self, item: &Node, names: Names) -> Option<usize> {
        if let Some(pos) = int_const(item) {
            let position = names != Names::InputOnly && pos >= 1 && pos as usize <= self.targets.len();
            return position.then(|| pos as usize - 1);
        }
        let Some(fields) = column_fields(item) else {
            // An expression: the output column that is the same expression
            // (`ORDER BY count(*)`, `GROUP BY lower(region)`), as Postgres
            // matches it; the first, when several are.
            return self.targets.iter().position(|t| crate::sql::same_expression(&t.expr, item));
        };
        let (name, qualifier) = fields.split_last()?;
        if qualifier.is_empty() {
            let named = || self.targets.iter().position(|t| t.name == *name);
            // Past a `*`, whose output names are not known yet, the input
            // column cannot be found among the outputs.
            let column = || {
                let c = self.targets.iter().position(|t| t.column.as_deref().and_then(<[String]>::last) == Some(name));
                c.filter(|_| self.star.is_none())
            };
            return match names {
                Names::OutputFirst => match named() {
                    Some(i) => Some(i),
                    None if self.star.is_some() => None,
                    None => column(),
                },
                // An output name counts only when no input column has that
                // name: Postgres would group by the input column.
                Names::InputFirst => column().or_else(|| {
                    let input = self.inputs.as_ref().is_none_or(|cols| cols.iter().any(|c| c == name));
                    if input {
                        None
                    } else {
                        named()
                    }
                }),
                Names::InputOnly => column(),
            };
        }
        // A qualified name matches the same column, or an unqualified one of
        // that name (which Postgres resolved to the same table, else refused
        // it as ambiguous).
        self.targets.iter().position(|t| match t.column.as_deref().and_then(<[String]>::split_last) {
            Some((col, q)) => col == name && (q.is_empty() || q.ends_with(qualifier) || qualifier.ends_with(q)),
            None => false,
        })
    }

    /// An ORDER BY or DISTINCT ON item: found now, or bound later past a `*`.
    pub(super) fn reference(&self, item: &Node, names: Names) -> Option<OutputRef> {
        if self.star.is_none() {
            return self.find(item, names).map(OutputRef::At);
        }
        if let Some(pos) = int_const(item) {
            if names == Names::InputOnly {
                return None;
            }
            return usize::try_from(pos).ok().map(|p| OutputRef::Named(OutputName::Position(p)));
        }
        if let Some(i) = self.find(item, names) {
            return Some(OutputRef::At(i));
        }
        let fields = column_fields(item)?;
        let (name, qualifier) = fields.split_last()?;
        let table = qualifier.last().cloned();
        Some(OutputRef::Named(OutputName::Column { table, name: name.clone() }))
    }
}

/// What an aggregate of the select list or of HAVING merges as. `count(DISTINCT
/// key)` counts the sharding key column: each key's rows live on one shard, so
/// the shards' distinct counts add up; only over plain tables, where the name
/// surely is a table's key column.
pub(super) fn aggregate(f: &protobuf::FuncCall, key: &Key) -> Result<ColumnMerge, FanoutError> {
    let name = funcname(f);
    if f.agg_distinct {
        let counts_key = name == "count"
            && key.plain_tables
            && matches!(&f.args[..], [arg] if column_fields(arg).and_then(|c| c.last().cloned()).as_deref() == Some(key.column));
        return if counts_key {
            Ok(ColumnMerge::Count)
        } else if name == "count" {
            Err(refuse(&format!("count(DISTINCT …) of anything but the sharding key column {}", key.column)))
        } else {
            Err(refuse(&format!("{name}(DISTINCT …)")))
        };
    }
    if f.agg_filter.is_some() || !f.agg_order.is_empty() || f.agg_within_group {
        return Err(refuse("aggregates with FILTER or ORDER BY"));
    }
    Ok(match name.as_str() {
        "count" => ColumnMerge::Count,
        "sum" => ColumnMerge::Sum,
        "min" => ColumnMerge::Min,
        "max" => ColumnMerge::Max,
        "avg" => ColumnMerge::Avg(0), // its count's column is set later
        other => return Err(refuse(&format!("{other}()"))),
    })
}

/// The sharding key column, and whether FROM has only tables (no functions,
/// subqueries or column aliases that could name another column after it).
pub(super) struct Key<'a> {
    pub(super) column: &'a str,
    pub(super) plain_tables: bool,
    /// GROUP BY holds the sharding key of a table every row of the answer
    /// has ([`groups_stay_on_their_shard`]): each group is made on one shard.
    pub(super) local_groups: bool,
}

pub(super) fn plain_tables(from: &[Node]) -> bool {
    fn plain(n: &Node) -> bool {
        match &n.node {
            Some(N::RangeVar(r)) => r.alias.as_ref().is_none_or(|a| a.colnames.is_empty()),
            Some(N::JoinExpr(j)) => {
                j.alias.as_ref().is_none_or(|a| a.colnames.is_empty())
                    && [&j.larg, &j.rarg].into_iter().all(|s| s.as_deref().is_some_and(plain))
            }
            _ => false,
        }
    }
    from.iter().all(plain)
}

/// The select list: what each column merges as, and the names ORDER BY may use.
pub(super) fn outputs(sel: &protobuf::SelectStmt, key: &Key) -> Result<Outputs, FanoutError> {
    let mut out = Outputs { columns: Vec::new(), targets: Vec::new(), star: None, inputs: None };
    for t in &sel.target_list {
        let Some(N::ResTarget(rt)) = &t.node else { return Err(refuse("this select list")) };
        let Some(val) = rt.val.as_deref() else { return Err(refuse("this select list")) };
        let fields = column_fields(val);
        if let Some((_, qualifier)) = fields.as_deref().and_then(|f| f.split_last()).filter(|(c, _)| *c == "*") {
            let table = match qualifier.last() {
                Some(t) => Some(t.clone()),
                None => single_table(&sel.from_clause),
            };
            let relation = table.as_deref().and_then(|t| relation(&sel.from_clause, t));
            out.star = match out.star.take() {
                None => Some(StarAt { at: out.columns.len(), table, relation }),
                // `a.*, b.*`: one run of columns, of two tables.
                Some(s) if s.at == out.columns.len() => Some(StarAt { at: s.at, table: None, relation: None }),
                Some(_) => return Err(refuse("a select list with `*` in two places (name the columns)")),
            };
            continue;
        }
        let merge = match &val.node {
            // Every group is whole on its shard: what the shard computes of it
            // is the answer, whatever the expression, except a window over the
            // groups, which span the shards.
            _ if key.local_groups => {
                if has_window(val) {
                    return Err(refuse("window functions"));
                }
                ColumnMerge::Key
            }
            Some(N::FuncCall(f)) if f.over.is_none() && is_aggregate(f) => aggregate(f, key)?,
            _ if has_aggregate(val) => return Err(refuse("expressions around aggregates or window functions")),
            _ => ColumnMerge::Key,
        };
        let name = if rt.name.is_empty() {
            match (&val.node, fields.as_deref().and_then(<[String]>::last)) {
                (Some(N::FuncCall(f)), _) => funcname(f),
                (_, Some(col)) => col.clone(),
                _ => String::new(),
            }
        } else {
            rt.name.clone()
        };
        out.columns.push(merge);
        out.targets.push(Target { name, column: fields, expr: val.clone() });
    }
    Ok(out)
}

/// The table FROM reads under `name` (its alias, or its own name).
fn relation(from: &[Node], name: &str) -> Option<String> {
    from.iter().find_map(|n| match &n.node {
        Some(N::RangeVar(r)) if r.alias.as_ref().map_or(r.relname.as_str(), |a| a.aliasname.as_str()) == name => {
            Some(if r.schemaname.is_empty() { r.relname.clone() } else { format!("{}.{}", r.schemaname, r.relname) })
        }
        Some(N::JoinExpr(j)) => {
            let sides: Vec<Node> = [&j.larg, &j.rarg].into_iter().flatten().map(|b| (**b).clone()).collect();
            relation(&sides, name)
        }
        _ => None,
    })
}

/// The name `*` reads through when FROM is one table: its alias, else its name.
fn single_table(from: &[Node]) -> Option<String> {
    match from {
        [Node { node: Some(N::RangeVar(r)) }] => {
            Some(r.alias.as_ref().map_or(r.relname.clone(), |a| a.aliasname.clone()))
        }
        _ => None,
    }
}

//! Reading a SELECT into the shape [`Read`] records: its FROM items, the
//! key equalities that tie them, its subqueries, and what `WITH` queries and
//! subqueries in FROM pass through.

use std::collections::HashMap;

use pg_query::protobuf::{self, node::Node as N, Node};

use super::{Read, Source, Subquery};

/// One FROM item while it is being read: its shape, the tables in it by the
/// name conditions refer to them with, and whether a column named like the key
/// that it exposes can only be the key of one of its tables (so that `USING
/// (tenant_id)` joins keys).
struct Part {
    source: Source,
    names: Vec<(String, usize)>,
    clean: bool,
}

/// Relations joined by inner joins, while they are flattened into one
/// [`Source::Inner`].
#[derive(Default)]
struct InnerJoin<'n> {
    members: Vec<Source>,
    /// Which member each table instance is in.
    owner: HashMap<usize, usize>,
    names: Vec<(String, usize)>,
    ties: Vec<(usize, usize)>,
    clean: bool,
    /// ON conditions, resolved once every member is known.
    conditions: Vec<&'n Node>,
}

pub(super) struct Builder<'a> {
    column: &'a str,
    /// Table instances are numbered across the whole statement.
    next_id: usize,
    /// The names of the queries enclosing the one being read, innermost last.
    enclosing: Vec<Vec<(String, usize)>>,
    /// The `WITH` queries in scope, innermost last: what a reference to each
    /// reads, and whether it passes a key column through.
    ctes: Vec<(String, Source, bool)>,
}

impl<'a> Builder<'a> {
    pub(super) fn new(column: &'a str) -> Builder<'a> {
        Builder { column, next_id: 0, enclosing: Vec::new(), ctes: Vec::new() }
    }

    /// The shape of one SELECT, and the names of its FROM tables.
    pub(super) fn read(&mut self, sel: &protobuf::SelectStmt) -> (Read, Vec<(String, usize)>) {
        let Some(with) = &sel.with_clause else { return self.read_query(sel) };
        if with.recursive {
            // Not looked into.
            let tables = crate::sql::analyze::tables_under(&N::SelectStmt(Box::new(sel.clone())));
            return (Read { from: Source::Opaque(tables), subqueries: Vec::new(), unknown: false }, Vec::new());
        }
        let scope = self.ctes.len();
        for c in &with.ctes {
            let Some(N::CommonTableExpr(cte)) = &c.node else { continue };
            let (source, passes) = match cte.ctequery.as_deref().and_then(|q| q.node.as_ref()) {
                Some(N::SelectStmt(body)) => self.derived(body),
                Some(other) => (Source::Opaque(crate::sql::analyze::tables_under(other)), false),
                None => (Source::Opaque(Vec::new()), false),
            };
            self.ctes.push((cte.ctename.clone(), source, passes && cte.aliascolnames.is_empty()));
        }
        let read = self.read_query(sel);
        self.ctes.truncate(scope);
        read
    }

    /// A subquery or `WITH` query in FROM: its shape, and whether it passes
    /// a key column through (an output named like the key that is a table's
    /// key column, or `*`), when nothing in it mixes rows.
    fn derived(&mut self, body: &protobuf::SelectStmt) -> (Source, bool) {
        let mixes = mixes_rows(body);
        let passes = mixes.is_none() && body.op <= 1 && self.passes_key(body);
        let (read, _) = self.read(body);
        (Source::Derived { read: Box::new(read), mixes }, passes)
    }

    fn passes_key(&self, body: &protobuf::SelectStmt) -> bool {
        body.target_list.iter().any(|t| {
            let Some(N::ResTarget(t)) = &t.node else { return false };
            let Some(N::ColumnRef(c)) = t.val.as_deref().and_then(|v| v.node.as_ref()) else { return false };
            match c.fields.last().and_then(|f| f.node.as_ref()) {
                Some(N::AStar(_)) => true,
                Some(N::String(s)) => s.sval == self.column && (t.name.is_empty() || t.name == self.column),
                _ => false,
            }
        })
    }

    /// A `WITH` query a name in FROM refers to, innermost first.
    fn cte(&self, name: &str) -> Option<(Source, bool)> {
        self.ctes.iter().rev().find(|(n, _, _)| n == name).map(|(_, s, p)| (s.clone(), *p))
    }

    fn read_query(&mut self, sel: &protobuf::SelectStmt) -> (Read, Vec<(String, usize)>) {
        if sel.op == protobuf::SetOperation::SetopUnion as i32 && sel.all {
            let arms = [sel.larg.as_deref(), sel.rarg.as_deref()].into_iter().flatten().map(|a| self.read(a).0);
            let from = Source::UnionAll(arms.collect());
            return (Read { from, subqueries: Vec::new(), unknown: false }, Vec::new());
        }
        if sel.op > 1 {
            use protobuf::SetOperation as Op;
            let name = match Op::try_from(sel.op) {
                Ok(Op::SetopUnion) => "UNION",
                Ok(Op::SetopIntersect) => "INTERSECT",
                _ => "EXCEPT",
            };
            let tables = crate::sql::analyze::tables_under(&N::SelectStmt(Box::new(sel.clone())));
            return (
                Read { from: Source::SetOperation(name, tables), subqueries: Vec::new(), unknown: false },
                Vec::new(),
            );
        }
        let mut top = InnerJoin { clean: true, ..Default::default() };
        for item in &sel.from_clause {
            self.flatten(item, &mut top);
        }
        if let Some(w) = sel.where_clause.as_deref() {
            top.conditions.push(w);
        }
        let names = top.names.clone();
        let mut read = Read { from: Source::Opaque(Vec::new()), subqueries: Vec::new(), unknown: false };
        // Subqueries in ON conditions see the whole FROM too (LATERAL aside).
        let conditions = std::mem::take(&mut top.conditions);
        let mut ons = Vec::new();
        self.collect_ons(&sel.from_clause, &mut ons);
        self.enclosing.push(names.clone());
        let expressions = sel
            .target_list
            .iter()
            .chain(&sel.group_clause)
            .chain(&sel.sort_clause)
            .chain(&sel.distinct_clause)
            .chain(&sel.window_clause)
            .chain(&sel.values_lists)
            .chain(sel.where_clause.as_deref())
            .chain(sel.having_clause.as_deref())
            .chain(sel.limit_count.as_deref())
            .chain(sel.limit_offset.as_deref())
            .chain(ons);
        for e in expressions {
            self.expression(e, &mut read);
        }
        self.enclosing.pop();
        top.conditions = conditions;
        read.from = self.finish(top);
        (read, names)
    }

    /// ON conditions anywhere in the FROM tree (not inside subqueries).
    fn collect_ons<'n>(&self, items: &'n [Node], out: &mut Vec<&'n Node>) {
        for item in items {
            if let Some(N::JoinExpr(j)) = &item.node {
                out.extend(j.quals.as_deref());
                for side in [j.larg.as_deref(), j.rarg.as_deref()].into_iter().flatten() {
                    self.collect_ons(std::slice::from_ref(side), out);
                }
            }
        }
    }

    /// Adds a FROM item to an inner join being flattened.
    fn flatten<'n>(&mut self, n: &'n Node, acc: &mut InnerJoin<'n>) {
        if let Some(N::JoinExpr(j)) = &n.node {
            use protobuf::JoinType as J;
            if J::try_from(j.jointype) == Ok(J::JoinInner) && j.alias.is_none() {
                let start = acc.members.len();
                let clean_before = acc.clean;
                acc.clean = true;
                if let Some(l) = j.larg.as_deref() {
                    self.flatten(l, acc);
                }
                let left_clean = acc.clean;
                let middle = acc.members.len();
                acc.clean = true;
                if let Some(r) = j.rarg.as_deref() {
                    self.flatten(r, acc);
                }
                let right_clean = acc.clean;
                acc.clean = clean_before && left_clean && right_clean;
                if left_clean && right_clean && self.joins_on_key_by_name(j) {
                    for a in start..middle {
                        for b in middle..acc.members.len() {
                            acc.ties.push((a, b));
                        }
                    }
                }
                acc.conditions.extend(j.quals.as_deref());
                return;
            }
        }
        let part = self.part(n);
        let index = acc.members.len();
        for (_, id) in &part.names {
            acc.owner.insert(*id, index);
        }
        acc.names.extend(part.names);
        acc.clean &= part.clean;
        acc.members.push(part.source);
    }

    /// Resolves the key equalities of a flattened inner join.
    fn finish(&self, mut acc: InnerJoin<'_>) -> Source {
        for c in std::mem::take(&mut acc.conditions) {
            for (a, b) in self.key_equalities(c) {
                let (Some(a), Some(b)) = (resolve(&acc.names, &a), resolve(&acc.names, &b)) else { continue };
                if let (Some(&x), Some(&y)) = (acc.owner.get(&a), acc.owner.get(&b)) {
                    if x != y {
                        acc.ties.push((x, y));
                    }
                }
            }
        }
        if acc.members.len() == 1 {
            return acc.members.remove(0);
        }
        Source::Inner { members: acc.members, ties: acc.ties }
    }

    /// One FROM item that is not part of an enclosing inner join.
    fn part(&mut self, n: &Node) -> Part {
        match &n.node {
            Some(N::RangeVar(v)) if v.schemaname.is_empty() && self.cte(&v.relname).is_some() => {
                let (source, passes) = self.cte(&v.relname).unwrap_or((Source::Opaque(Vec::new()), false));
                let refname = v.alias.as_ref().map(|a| a.aliasname.clone()).unwrap_or_else(|| v.relname.clone());
                let renamed = v.alias.as_ref().is_some_and(|a| !a.colnames.is_empty());
                self.derived_part(source, refname, passes && !renamed)
            }
            Some(N::RangeSubselect(sub)) if !sub.lateral => {
                let (source, passes) = match sub.subquery.as_deref().and_then(|q| q.node.as_ref()) {
                    Some(N::SelectStmt(body)) => self.derived(body),
                    Some(other) => (Source::Opaque(crate::sql::analyze::tables_under(other)), false),
                    None => (Source::Opaque(Vec::new()), false),
                };
                let alias = sub.alias.as_ref();
                let renamed = alias.is_some_and(|a| !a.colnames.is_empty());
                let refname = alias.map(|a| a.aliasname.clone()).unwrap_or_default();
                self.derived_part(source, refname, passes && !renamed)
            }
            Some(N::RangeVar(v)) => {
                let id = self.next_id;
                self.next_id += 1;
                let name = crate::sql::analyze::relname(v);
                // Column aliases (`orders AS o(a, b)`) rename the columns: a
                // column named like the key may then be another one.
                let renamed = v.alias.as_ref().is_some_and(|a| !a.colnames.is_empty());
                let refname = v.alias.as_ref().map(|a| a.aliasname.clone()).unwrap_or_else(|| v.relname.clone());
                Part {
                    source: Source::Table(name),
                    names: if renamed { Vec::new() } else { vec![(refname, id)] },
                    clean: !renamed,
                }
            }
            Some(N::RangeTableSample(s)) => match s.relation.as_deref() {
                // Sampling happens on each shard's rows, as it would on all rows.
                Some(r) => self.part(r),
                None => Part { source: Source::Opaque(Vec::new()), names: Vec::new(), clean: false },
            },
            Some(N::JoinExpr(j)) => {
                use protobuf::JoinType as J;
                let kind = J::try_from(j.jointype).unwrap_or(J::Undefined);
                let (join, swap) = match kind {
                    J::JoinInner => {
                        // An aliased inner join: a unit of its own.
                        let mut acc = InnerJoin { clean: true, ..Default::default() };
                        self.flatten_sides(j, &mut acc);
                        let source = self.finish(acc);
                        return Part { source, names: Vec::new(), clean: false };
                    }
                    J::JoinLeft => ("LEFT JOIN", false),
                    J::JoinRight => ("RIGHT JOIN", true),
                    J::JoinFull => ("FULL JOIN", false),
                    _ => {
                        let tables = crate::sql::analyze::tables_under(&N::JoinExpr(j.clone()));
                        return Part { source: Source::Opaque(tables), names: Vec::new(), clean: false };
                    }
                };
                let left = j.larg.as_deref().map(|l| self.whole(l));
                let right = j.rarg.as_deref().map(|r| self.whole(r));
                let (Some(left), Some(right)) = (left, right) else {
                    return Part { source: Source::Opaque(Vec::new()), names: Vec::new(), clean: false };
                };
                let mut tied = left.clean && right.clean && self.joins_on_key_by_name(j);
                if let Some(q) = j.quals.as_deref() {
                    for (a, b) in self.key_equalities(q) {
                        let side = |name: &str| {
                            if let Some(id) = resolve(&left.names, name) {
                                Some((0, id))
                            } else {
                                resolve(&right.names, name).map(|id| (1, id))
                            }
                        };
                        if let (Some((x, _)), Some((y, _))) = (side(&a), side(&b)) {
                            tied |= x != y;
                        }
                    }
                }
                let clean = left.clean && right.clean && j.alias.is_none();
                let mut names = Vec::new();
                if j.alias.is_none() {
                    names.extend(left.names.iter().cloned());
                    names.extend(right.names.iter().cloned());
                }
                let (preserved, nullable) = if swap { (right, left) } else { (left, right) };
                Part {
                    source: Source::Outer {
                        join,
                        preserved: Box::new(preserved.source),
                        nullable: Box::new(nullable.source),
                        tied,
                    },
                    names,
                    clean,
                }
            }
            Some(other) => {
                // Subqueries, functions, VALUES, table functions.
                Part {
                    source: Source::Opaque(crate::sql::analyze::tables_under(other)),
                    names: Vec::new(),
                    clean: false,
                }
            }
            None => Part { source: Source::Opaque(Vec::new()), names: Vec::new(), clean: false },
        }
    }

    /// A subquery or `WITH` query as a FROM item: known by its name, for key
    /// equalities, when its key column is a table's key.
    fn derived_part(&mut self, source: Source, refname: String, keyed: bool) -> Part {
        let id = self.next_id;
        self.next_id += 1;
        Part { source, names: if keyed { vec![(refname, id)] } else { Vec::new() }, clean: keyed }
    }

    /// A FROM item as a whole: an inner join tree becomes one [`Source::Inner`].
    fn whole(&mut self, n: &Node) -> Part {
        let mut acc = InnerJoin { clean: true, ..Default::default() };
        self.flatten(n, &mut acc);
        let names = acc.names.clone();
        let clean = acc.clean;
        Part { source: self.finish(acc), names, clean }
    }

    fn flatten_sides<'n>(&mut self, j: &'n protobuf::JoinExpr, acc: &mut InnerJoin<'n>) {
        for side in [j.larg.as_deref(), j.rarg.as_deref()].into_iter().flatten() {
            self.flatten(side, acc);
        }
        acc.conditions.extend(j.quals.as_deref());
    }

    /// `USING (…, tenant_id, …)` or NATURAL (which joins on the key when both
    /// sides have it).
    fn joins_on_key_by_name(&self, j: &protobuf::JoinExpr) -> bool {
        j.is_natural || j.using_clause.iter().any(|u| matches!(&u.node, Some(N::String(s)) if s.sval == self.column))
    }

    /// `x.tenant_id = y.tenant_id` among the AND-ed conjuncts of a condition,
    /// as the pairs of qualifiers.
    fn key_equalities(&self, n: &Node) -> Vec<(String, String)> {
        let mut out = Vec::new();
        self.equalities_into(n, &mut out);
        out
    }

    fn equalities_into(&self, n: &Node, out: &mut Vec<(String, String)>) {
        match &n.node {
            Some(N::BoolExpr(b)) if b.boolop == protobuf::BoolExprType::AndExpr as i32 => {
                for a in &b.args {
                    self.equalities_into(a, out);
                }
            }
            Some(N::AExpr(e)) if e.kind == protobuf::AExprKind::AexprOp as i32 => {
                let is_eq =
                    matches!(e.name.as_slice(), [op] if matches!(&op.node, Some(N::String(s)) if s.sval == "="));
                if let (true, Some(l), Some(r)) = (is_eq, e.lexpr.as_deref(), e.rexpr.as_deref()) {
                    if let (Some(a), Some(b)) = (self.qualified_key(l), self.qualified_key(r)) {
                        out.push((a, b));
                    }
                }
            }
            _ => {}
        }
    }

    /// `q.tenant_id`: the qualifier `q`. No casts: a cast may lose information
    /// (`'abc'::char(2)`), and equal cast values do not prove equal keys.
    fn qualified_key(&self, n: &Node) -> Option<String> {
        let Some(N::ColumnRef(c)) = &n.node else { return None };
        match c.fields.as_slice() {
            [q, k] => match (&q.node, &k.node) {
                (Some(N::String(q)), Some(N::String(k))) if k.sval == self.column => Some(q.sval.clone()),
                _ => None,
            },
            _ => None,
        }
    }

    /// Finds the subqueries of an expression, each read as a query of its own.
    fn expression(&mut self, n: &Node, read: &mut Read) {
        let Some(node) = &n.node else { return };
        match node {
            N::SubLink(s) => {
                if let Some(t) = s.testexpr.as_deref() {
                    self.expression(t, read);
                }
                match s.subselect.as_deref().and_then(|n| n.node.as_ref()) {
                    Some(N::SelectStmt(sub)) => {
                        let (sub_read, names) = self.read(sub);
                        let tied = self.tied_to_enclosing(sub, &names);
                        read.subqueries.push(Subquery { read: sub_read, tied });
                    }
                    Some(other) => read.subqueries.push(Subquery {
                        read: Read {
                            from: Source::Opaque(crate::sql::analyze::tables_under(other)),
                            subqueries: Vec::new(),
                            unknown: false,
                        },
                        tied: false,
                    }),
                    None => {}
                }
            }
            _ => match expression_children(node) {
                Some(children) => {
                    for c in children {
                        self.expression(c, read);
                    }
                }
                None => read.unknown = true,
            },
        }
    }

    /// Whether the subquery's WHERE equates the key of one of its own tables
    /// with the key of a table of an enclosing query.
    fn tied_to_enclosing(&self, sub: &protobuf::SelectStmt, own: &[(String, usize)]) -> bool {
        let Some(w) = sub.where_clause.as_deref() else { return false };
        if sub.op > 1 || sub.with_clause.is_some() {
            return false;
        }
        let outer = |name: &str| {
            // The innermost enclosing query that has the name decides.
            self.enclosing
                .iter()
                .rev()
                .find(|names| names.iter().any(|(n, _)| n == name))
                .is_some_and(|names| resolve(names, name).is_some())
        };
        self.key_equalities(w).iter().any(|(a, b)| {
            (resolve(own, a).is_some() && resolve(own, b).is_none() && outer(b))
                || (resolve(own, b).is_some() && resolve(own, a).is_none() && outer(a))
        })
    }
}

/// The expressions directly under an expression node (a window's too), for
/// walkers that look for subqueries; None for a kind not looked into, which
/// might hide one. A SubLink's are its test expression only: its query is the
/// caller's to read.
pub(crate) fn expression_children(node: &N) -> Option<Vec<&Node>> {
    fn window(w: &protobuf::WindowDef) -> impl Iterator<Item = &Node> {
        w.partition_clause.iter().chain(&w.order_clause).chain(w.start_offset.as_deref()).chain(w.end_offset.as_deref())
    }
    Some(match node {
        N::SubLink(s) => s.testexpr.as_deref().into_iter().collect(),
        N::AExpr(e) => e.lexpr.as_deref().into_iter().chain(e.rexpr.as_deref()).collect(),
        N::BoolExpr(b) => b.args.iter().collect(),
        N::FuncCall(f) => f
            .args
            .iter()
            .chain(&f.agg_order)
            .chain(f.agg_filter.as_deref())
            .chain(f.over.as_deref().into_iter().flat_map(window))
            .collect(),
        N::WindowDef(w) => window(w).collect(),
        N::TypeCast(t) => t.arg.as_deref().into_iter().collect(),
        N::CollateClause(c) => c.arg.as_deref().into_iter().collect(),
        N::NullTest(t) => t.arg.as_deref().into_iter().collect(),
        N::BooleanTest(t) => t.arg.as_deref().into_iter().collect(),
        N::CaseExpr(c) => c.arg.as_deref().into_iter().chain(&c.args).chain(c.defresult.as_deref()).collect(),
        N::CaseWhen(w) => w.expr.as_deref().into_iter().chain(w.result.as_deref()).collect(),
        N::CoalesceExpr(c) => c.args.iter().collect(),
        N::MinMaxExpr(m) => m.args.iter().collect(),
        N::RowExpr(r) => r.args.iter().collect(),
        N::AArrayExpr(a) => a.elements.iter().collect(),
        N::AIndirection(a) => a.arg.as_deref().into_iter().chain(&a.indirection).collect(),
        N::AIndices(a) => a.lidx.as_deref().into_iter().chain(a.uidx.as_deref()).collect(),
        N::List(l) => l.items.iter().collect(),
        N::ResTarget(t) => t.val.as_deref().into_iter().chain(&t.indirection).collect(),
        N::MultiAssignRef(m) => m.source.as_deref().into_iter().collect(),
        N::NamedArgExpr(a) => a.arg.as_deref().into_iter().collect(),
        N::SortBy(s) => s.node.as_deref().into_iter().collect(),
        N::GroupingSet(g) => g.content.iter().collect(),
        N::GroupingFunc(g) => g.args.iter().collect(),
        N::XmlExpr(x) => x.named_args.iter().chain(&x.args).collect(),
        N::XmlSerialize(x) => x.expr.as_deref().into_iter().collect(),
        N::ColumnRef(_)
        | N::ParamRef(_)
        | N::AConst(_)
        | N::AStar(_)
        | N::SqlvalueFunction(_)
        | N::SetToDefault(_)
        | N::TypeName(_)
        | N::String(_)
        | N::Integer(_)
        | N::Float(_)
        | N::Boolean(_)
        | N::BitString(_) => Vec::new(),
        _ => return None,
    })
}

/// What in a subquery computes over many rows, which on each shard would be
/// that shard's rows only; None when each row it gives comes from one row of
/// each table it joins.
pub fn mixes_rows(sel: &protobuf::SelectStmt) -> Option<&'static str> {
    use crate::sql::aggregates::has_aggregate;
    if sel.op > 1 {
        let union_all = sel.op == protobuf::SetOperation::SetopUnion as i32 && sel.all;
        if !union_all {
            return None; // a set operation of its own, checked as one
        }
        if sel.limit_count.is_some() || sel.limit_offset.is_some() {
            return Some("LIMIT or OFFSET");
        }
        return [&sel.larg, &sel.rarg].into_iter().flatten().find_map(|arm| mixes_rows(arm));
    }
    if !sel.group_clause.is_empty() || sel.having_clause.is_some() {
        return Some("GROUP BY or HAVING");
    }
    if sel.target_list.iter().chain(&sel.sort_clause).any(has_aggregate) || !sel.window_clause.is_empty() {
        return Some("aggregates or window functions");
    }
    if !sel.distinct_clause.is_empty() {
        return Some("DISTINCT");
    }
    if sel.limit_count.is_some() || sel.limit_offset.is_some() {
        return Some("LIMIT or OFFSET");
    }
    None
}

/// The table instance a name refers to; None when it is unknown or ambiguous.
fn resolve(names: &[(String, usize)], name: &str) -> Option<usize> {
    let mut found = names.iter().filter(|(n, _)| n == name);
    let (_, id) = found.next()?;
    found.next().is_none().then_some(*id)
}

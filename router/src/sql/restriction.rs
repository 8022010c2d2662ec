//! Which tenants' rows a statement can read, relation by relation.
//!
//! A statement runs on one shard and answers what one Postgres would only when
//! every row of a sharded table it could read belongs to a tenant of that
//! shard. A key condition in the outer WHERE does not make it so on its own:
//! in `SELECT … FROM orders WHERE tenant_id = 5 AND total > (SELECT avg(total)
//! FROM orders)` the subquery reads every tenant's orders, and on tenant 5's
//! shard it would see only that shard's. Conversely a key may sit where the
//! outer WHERE does not show it: in a `WITH` query or a subquery in FROM.
//!
//! So each reference to a relation, wherever it stands (FROM at any depth,
//! subqueries, `WITH` queries, the target of UPDATE and DELETE), is
//! *restricted* when the rows it contributes are provably of given tenants:
//!
//! - a condition `ref.key = …` (`IN`, `= ANY`, `OR` of such) that filters it:
//!   a top-level conjunct of its own query's WHERE, of the ON of an inner join
//!   above it, or of the ON of an outer join on whose nullable side it is;
//! - or `ref.key = other.key` there, where `other` is restricted (in the same
//!   query, or an enclosing one for a correlated subquery);
//! - or it is read by a `WITH` query or a subquery in FROM whose output key is
//!   restricted outside, when that body passes its key column through from
//!   it and nothing in the body mixes tenants' rows (no window, `DISTINCT ON`,
//!   `LIMIT`/`OFFSET` or set operation).
//!
//! The statement's keys are those of every restriction; the tables referenced
//! with none are listed, and routing sends the statement to one shard by its
//! keys only when none of them is sharded (crate::route). Any part of the tree
//! this walk does not know is counted unrestricted, so it errs towards reading
//! every shard (where the cross-shard checks decide), never towards one.

use pg_query::protobuf::{self, node::Node as N, Node};

use super::analyze::{intersect, relname, Found, KeyFinder};
use super::colocation::expression_children;

/// What [`of`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Restrictions {
    /// Every key that restricts a relation; None when none is restricted.
    pub keys: Found,
    /// The tables read with no restriction, each once.
    pub unrestricted: Vec<String>,
}

/// The restrictions of a SELECT, UPDATE or DELETE (the statement node itself),
/// or None for other statements.
pub(super) fn of(node: &N, key_column: &str) -> Option<Restrictions> {
    let mut w = Walk { key: key_column, ..Default::default() };
    match node {
        N::SelectStmt(sel) => {
            w.select(sel, None);
        }
        N::UpdateStmt(u) => {
            let returning = u.returning_clause.iter().flat_map(|r| &r.exprs);
            let exprs: Vec<&Node> = u.target_list.iter().chain(returning).collect();
            let write = Write { with: u.with_clause.as_ref(), target: u.relation.as_ref(), from: &u.from_clause };
            w.write(write, u.where_clause.as_deref(), &exprs);
        }
        N::DeleteStmt(d) => {
            let exprs: Vec<&Node> = d.returning_clause.iter().flat_map(|r| &r.exprs).collect();
            let write = Write { with: d.with_clause.as_ref(), target: d.relation.as_ref(), from: &d.using_clause };
            w.write(write, d.where_clause.as_deref(), &exprs);
        }
        _ => return None,
    }
    Some(w.finish(node))
}

/// The parts of an UPDATE or DELETE that name relations.
struct Write<'n> {
    with: Option<&'n protobuf::WithClause>,
    target: Option<&'n protobuf::RangeVar>,
    /// UPDATE's FROM, DELETE's USING.
    from: &'n [Node],
}

#[derive(Default)]
struct Walk<'a> {
    key: &'a str,
    refs: Vec<Ref>,
    scopes: Vec<Scope>,
    /// `(a, b)`: `a` is restricted when `b` is.
    ties: Vec<(usize, usize)>,
    /// `(a, b)` from an outer join's ON, `a` on its preserved side: a tie once
    /// the WHERE restricts `b`, which then leaves no row without a `b`.
    outer_ties: Vec<(usize, usize)>,
    /// The RangeVar nodes seen (references, and names a locking clause
    /// repeats), by address in the tree, to check that none was missed.
    seen: std::collections::HashSet<*const protobuf::RangeVar>,
}

struct Ref {
    /// None for a `WITH` query or a subquery in FROM.
    table: Option<String>,
    alias: String,
    /// The keys conditions restrict it to (intersected).
    keys: Found,
    /// For a `WITH` query or subquery: the references in its body that give
    /// its key column, when a restriction of it carries over to them.
    passes_to: Option<Vec<usize>>,
}

#[derive(Default)]
struct Scope {
    parent: Option<usize>,
    /// The references of this query's FROM (the target of UPDATE/DELETE).
    refs: Vec<usize>,
    /// `WITH` queries by name, with the references their key passes to.
    ctes: Vec<(String, Option<Vec<usize>>)>,
}

impl Walk<'_> {
    fn scope(&mut self, parent: Option<usize>) -> usize {
        self.scopes.push(Scope { parent, ..Default::default() });
        self.scopes.len() - 1
    }

    fn add_ref(&mut self, table: Option<String>, alias: String, scope: usize, passes_to: Option<Vec<usize>>) -> usize {
        self.refs.push(Ref { table, alias, keys: None, passes_to });
        let id = self.refs.len() - 1;
        self.scopes[scope].refs.push(id);
        id
    }

    /// An UPDATE or DELETE: its target and FROM (USING) restricted by its
    /// WHERE; `exprs` (SET values, RETURNING) may hold subqueries.
    fn write(&mut self, write: Write<'_>, cond: Option<&Node>, exprs: &[&Node]) {
        let s = self.scope(None);
        self.with(write.with, s);
        let mut refs: Vec<usize> = write.target.iter().map(|r| self.range_var(r, s)).collect();
        for f in write.from {
            refs.extend(self.item(f, s));
        }
        self.where_clause(cond, &refs, s);
        for e in exprs {
            self.expr(e, s);
        }
    }

    /// A SELECT as a query of its own under `parent`; returns the references
    /// its output key column comes from, when a restriction of that output
    /// carries over to them.
    fn select(&mut self, sel: &protobuf::SelectStmt, parent: Option<usize>) -> Option<Vec<usize>> {
        let s = self.scope(parent);
        self.with(sel.with_clause.as_ref(), s);
        if sel.op > 1 {
            // UNION, INTERSECT, EXCEPT: each arm a query of its own.
            for arm in [sel.larg.as_deref(), sel.rarg.as_deref()].into_iter().flatten() {
                self.select(arm, Some(s));
            }
            return None;
        }
        let mut refs = Vec::new();
        for f in &sel.from_clause {
            refs.extend(self.item(f, s));
        }
        self.where_clause(sel.where_clause.as_deref(), &refs, s);
        for l in &sel.values_lists {
            self.expr(l, s);
        }
        let exprs = sel
            .target_list
            .iter()
            .chain(sel.having_clause.as_deref())
            .chain(&sel.group_clause)
            .chain(&sel.sort_clause)
            .chain(&sel.window_clause)
            .chain(&sel.distinct_clause)
            .chain(sel.limit_offset.as_deref())
            .chain(sel.limit_count.as_deref());
        for e in exprs {
            self.expr(e, s);
        }
        for l in &sel.locking_clause {
            if let Some(N::LockingClause(l)) = &l.node {
                // Names of this query's own references, not references.
                for r in &l.locked_rels {
                    if let Some(N::RangeVar(r)) = &r.node {
                        self.seen.insert(r as *const _);
                    }
                }
            }
        }
        self.passes_key(sel, s)
    }

    /// Which references of this (simple) query give its output key column,
    /// if a filter on that output restricts them: the body keeps each input
    /// row's tenant apart (no window, DISTINCT ON, LIMIT or OFFSET).
    fn passes_key(&self, sel: &protobuf::SelectStmt, s: usize) -> Option<Vec<usize>> {
        let plain_distinct = sel.distinct_clause.iter().all(|d| d.node.is_none());
        if !plain_distinct || sel.limit_count.is_some() || sel.limit_offset.is_some() || has_window(sel) {
            return None;
        }
        let mut out = Vec::new();
        for t in &sel.target_list {
            let Some(N::ResTarget(t)) = &t.node else { return None };
            let Some(N::ColumnRef(c)) = t.val.as_deref().and_then(|v| v.node.as_ref()) else { continue };
            let last = c.fields.last().and_then(|f| f.node.as_ref());
            let named_key = if t.name.is_empty() {
                matches!(last, Some(N::String(s)) if s.sval == self.key)
            } else {
                t.name == self.key && matches!(last, Some(N::String(s)) if s.sval == self.key)
            };
            if named_key || matches!(last, Some(N::AStar(_))) {
                out.extend(self.resolve(&c.fields, s));
            }
        }
        (!out.is_empty()).then_some(out)
    }

    fn with(&mut self, with: Option<&protobuf::WithClause>, s: usize) {
        let Some(with) = with else { return };
        for c in &with.ctes {
            let Some(N::CommonTableExpr(cte)) = &c.node else { continue };
            // Registered first: a recursive query names itself.
            self.scopes[s].ctes.push((cte.ctename.clone(), None));
            let passes = match cte.ctequery.as_deref().and_then(|q| q.node.as_ref()) {
                Some(N::SelectStmt(body)) => self.select(body, Some(s)),
                Some(other) => {
                    self.opaque(other, s);
                    None
                }
                None => None,
            };
            let renamed = !cte.aliascolnames.is_empty();
            if let Some(entry) = self.scopes[s].ctes.iter_mut().rev().find(|(n, _)| *n == cte.ctename) {
                entry.1 = passes.filter(|_| !renamed);
            }
        }
    }

    fn cte(&self, name: &str, mut s: usize) -> Option<Option<Vec<usize>>> {
        loop {
            if let Some((_, passes)) = self.scopes[s].ctes.iter().rev().find(|(n, _)| n == name) {
                return Some(passes.clone());
            }
            s = self.scopes[s].parent?;
        }
    }

    fn range_var(&mut self, r: &protobuf::RangeVar, s: usize) -> usize {
        self.seen.insert(r as *const _);
        let alias = r.alias.as_ref().map(|a| a.aliasname.clone()).unwrap_or_else(|| r.relname.clone());
        match r.schemaname.is_empty().then(|| self.cte(&r.relname, s)).flatten() {
            Some(passes) => self.add_ref(None, alias, s, passes),
            None => self.add_ref(Some(relname(r)), alias, s, None),
        }
    }

    /// One FROM item: the references in it.
    fn item(&mut self, n: &Node, s: usize) -> Vec<usize> {
        match &n.node {
            Some(N::RangeVar(r)) => vec![self.range_var(r, s)],
            Some(N::RangeSubselect(sub)) => {
                let passes = match sub.subquery.as_deref().and_then(|q| q.node.as_ref()) {
                    Some(N::SelectStmt(body)) => self.select(body, Some(s)),
                    Some(other) => {
                        self.opaque(other, s);
                        None
                    }
                    None => None,
                };
                let alias = sub.alias.as_ref();
                let renamed = alias.is_some_and(|a| !a.colnames.is_empty());
                let name = alias.map(|a| a.aliasname.clone()).unwrap_or_default();
                vec![self.add_ref(None, name, s, passes.filter(|_| !renamed))]
            }
            Some(N::JoinExpr(j)) => {
                let left = j.larg.as_deref().map(|l| self.item(l, s)).unwrap_or_default();
                let right = j.rarg.as_deref().map(|r| self.item(r, s)).unwrap_or_default();
                use protobuf::JoinType as J;
                // The references the join's ON filters.
                let filtered: Vec<usize> = match J::try_from(j.jointype).unwrap_or(J::Undefined) {
                    J::JoinInner => left.iter().chain(&right).copied().collect(),
                    J::JoinLeft => right.clone(),
                    J::JoinRight => left.clone(),
                    _ => Vec::new(),
                };
                self.condition(j.quals.as_deref(), &filtered, s);
                let using_key =
                    j.using_clause.iter().any(|u| matches!(&u.node, Some(N::String(c)) if c.sval == self.key));
                if using_key {
                    // `USING (key)` between two single references.
                    if let ([l], [r]) = (left.as_slice(), right.as_slice()) {
                        for (a, b) in [(*l, *r), (*r, *l)] {
                            if filtered.contains(&a) {
                                self.ties.push((a, b));
                            }
                        }
                    }
                }
                left.into_iter().chain(right).collect()
            }
            Some(other) => {
                // A function, VALUES, XMLTABLE …: what it reads is unrestricted.
                self.opaque(other, s);
                Vec::new()
            }
            None => Vec::new(),
        }
    }

    /// Every table under `n`, as unrestricted references.
    fn opaque(&mut self, n: &N, s: usize) {
        for (r, _, _, _) in n.nodes() {
            if let pg_query::NodeRef::RangeVar(v) = r {
                self.seen.insert(v as *const _);
                if self.cte(&v.relname, s).is_none() || !v.schemaname.is_empty() {
                    // Not in the query's scopes: no alias resolves to it.
                    self.refs.push(Ref { table: Some(relname(v)), alias: String::new(), keys: None, passes_to: None });
                }
            }
        }
    }

    /// An expression of query `s`: its subqueries are queries of their own.
    fn expr(&mut self, n: &Node, s: usize) {
        let Some(node) = &n.node else { return };
        if let N::SubLink(sub) = node {
            match sub.subselect.as_deref().and_then(|q| q.node.as_ref()) {
                Some(N::SelectStmt(q)) => {
                    self.select(q, Some(s));
                }
                Some(other) => self.opaque(other, s),
                None => {}
            }
        }
        match expression_children(node) {
            Some(children) => {
                for c in children {
                    self.expr(c, s);
                }
            }
            None => self.opaque(node, s),
        }
    }

    /// A condition of query `s` that filters the references `filtered`: their
    /// keys, and key equalities between references.
    fn condition(&mut self, cond: Option<&Node>, filtered: &[usize], s: usize) -> Vec<usize> {
        let Some(cond) = cond else { return Vec::new() };
        self.expr(cond, s);
        let mut restricted = Vec::new();
        for &r in filtered {
            let only = |fields: &[Node]| self.resolve(fields, s).contains(&r);
            let finder = KeyFinder { column: self.key, only: Some(&only) };
            let found = finder.where_keys(Some(cond));
            if found.is_some() {
                let keys = intersect(self.refs[r].keys.take(), found);
                self.refs[r].keys = keys;
                restricted.push(r);
            }
        }
        let mut conjuncts = Vec::new();
        and_parts(cond, &mut conjuncts);
        for c in conjuncts {
            let Some((a, b)) = self.key_equality(c) else { continue };
            let (a, b) = (self.resolve(a, s), self.resolve(b, s));
            for (to, from) in [(&a, &b), (&b, &a)] {
                for &x in to {
                    for &y in from.iter().filter(|&&y| y != x) {
                        if filtered.contains(&x) {
                            self.ties.push((x, y));
                        } else if filtered.contains(&y) {
                            self.outer_ties.push((x, y));
                        }
                    }
                }
            }
        }
        restricted
    }

    /// The WHERE of query `s` over its references `refs`.
    fn where_clause(&mut self, cond: Option<&Node>, refs: &[usize], s: usize) {
        let restricted = self.condition(cond, refs, s);
        let active: Vec<(usize, usize)> =
            self.outer_ties.iter().copied().filter(|(_, b)| restricted.contains(b)).collect();
        self.ties.extend(active);
    }

    /// `x.key = y.key`: the two column references' fields.
    fn key_equality<'n>(&self, n: &'n Node) -> Option<(&'n [Node], &'n [Node])> {
        let Some(N::AExpr(e)) = &n.node else { return None };
        let is_eq = protobuf::AExprKind::try_from(e.kind) == Ok(protobuf::AExprKind::AexprOp)
            && matches!(e.name.first().and_then(|n| n.node.as_ref()), Some(N::String(s)) if s.sval == "=");
        let key_ref = |n: Option<&'n Node>| match n.and_then(|n| n.node.as_ref()) {
            Some(N::ColumnRef(c)) if matches!(c.fields.last().and_then(|f| f.node.as_ref()), Some(N::String(s)) if s.sval == self.key) => {
                Some(c.fields.as_slice())
            }
            _ => None,
        };
        if !is_eq {
            return None;
        }
        Some((key_ref(e.lexpr.as_deref())?, key_ref(e.rexpr.as_deref())?))
    }

    /// The references a column reference of query `s` may name: an unqualified
    /// column any of that query's own (Postgres refuses one that two tables
    /// with the column could give), a qualified one the innermost reference
    /// of that name.
    fn resolve(&self, fields: &[Node], s: usize) -> Vec<usize> {
        let names: Vec<&str> = fields
            .iter()
            .filter_map(|f| match &f.node {
                Some(N::String(s)) => Some(s.sval.as_str()),
                _ => None,
            })
            .collect();
        let qualifier = match names.len() {
            0 | 1 if fields.len() <= 1 => return self.scopes[s].refs.clone(),
            // `t.*`: the qualifier is all there is.
            1 => names[0],
            n => names[n - 2],
        };
        let mut at = Some(s);
        while let Some(scope) = at {
            let found: Vec<usize> =
                self.scopes[scope].refs.iter().copied().filter(|&r| self.refs[r].alias == qualifier).collect();
            if !found.is_empty() {
                return found;
            }
            at = self.scopes[scope].parent;
        }
        Vec::new()
    }

    fn finish(mut self, node: &N) -> Restrictions {
        // Restrictions carry along ties and into the bodies that pass a key.
        let mut restricted: Vec<bool> = self.refs.iter().map(|r| r.keys.is_some()).collect();
        loop {
            let mut changed = false;
            for &(to, from) in &self.ties {
                if restricted[from] && !restricted[to] {
                    restricted[to] = true;
                    changed = true;
                }
            }
            for r in 0..self.refs.len() {
                if restricted[r] {
                    for &t in self.refs[r].passes_to.iter().flatten() {
                        if !restricted[t] {
                            restricted[t] = true;
                            changed = true;
                        }
                    }
                }
            }
            if !changed {
                break;
            }
        }
        let all_seen = node.nodes().iter().all(|(r, ..)| match r {
            pg_query::NodeRef::RangeVar(v) => self.seen.contains(&(*v as *const _)),
            _ => true,
        });
        let mut out = Restrictions::default();
        for (r, restricted) in self.refs.iter_mut().zip(restricted) {
            if let Some(keys) = r.keys.take() {
                out.keys.get_or_insert_with(Vec::new).extend(keys);
            }
            if let Some(t) = &r.table {
                if (!restricted || !all_seen) && !out.unrestricted.contains(t) {
                    out.unrestricted.push(t.clone());
                }
            }
        }
        out
    }
}

/// The top-level conjuncts of a condition.
fn and_parts<'n>(n: &'n Node, out: &mut Vec<&'n Node>) {
    match &n.node {
        Some(N::BoolExpr(b)) if protobuf::BoolExprType::try_from(b.boolop) == Ok(protobuf::BoolExprType::AndExpr) => {
            for a in &b.args {
                and_parts(a, out);
            }
        }
        _ => out.push(n),
    }
}

/// Whether the query has a window function in its target list (or any
/// window at all).
fn has_window(sel: &protobuf::SelectStmt) -> bool {
    !sel.window_clause.is_empty()
        || sel.target_list.iter().any(|t| {
            t.node.as_ref().is_some_and(|n| {
                n.nodes().iter().any(|(r, ..)| matches!(r, pg_query::NodeRef::FuncCall(f) if f.over.is_some()))
            })
        })
}

#[cfg(test)]
mod tests {
    use super::super::analyze;

    /// The deepest nesting Postgres's own parser accepts is analysed on a
    /// thread with a router worker's stack, without running out of it.
    #[test]
    fn deep_nesting_fits_a_worker_stack() {
        for depth in [10usize, 20, 30, 40, 60, 100, 1000] {
            let subqueries = format!(
                "SELECT * FROM orders WHERE tenant_id = 1 AND id IN {}(SELECT 1){}",
                "(SELECT id FROM orders WHERE tenant_id = 1 AND id IN ".repeat(depth),
                ")".repeat(depth)
            );
            let parens = format!(
                "SELECT * FROM orders WHERE tenant_id = 1 AND id = {}1{}",
                "(".repeat(depth),
                ")".repeat(depth)
            );
            let froms = format!(
                "SELECT * FROM {}orders{} WHERE tenant_id = 1",
                "(SELECT * FROM ".repeat(depth),
                ") t".repeat(depth)
            );
            for sql in [subqueries, parens, froms] {
                let done = std::thread::Builder::new()
                    .stack_size(2 << 20)
                    .spawn(move || {
                        analyze(&sql, "tenant_id").map(|_| ()).map_err(|e| e.chars().take(80).collect::<String>())
                    })
                    .unwrap()
                    .join();
                // Deeper trees than the decoder takes are an error, not a crash.
                assert!(done.is_ok(), "depth {depth}");
            }
        }
    }
}

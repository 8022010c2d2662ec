//! Whether a read that runs on several shards is answered exactly by running it
//! on each shard and putting the answers together.
//!
//! Each shard holds its tenants' rows of the sharded tables and every row of the
//! reference tables. Concatenating what each shard answers gives what one
//! Postgres holding every row would answer only when each row of the answer is
//! made from the rows of one shard, and by that shard alone:
//!
//! - two sharded tables joined together must be joined on the key
//!   (`a.tenant_id = b.tenant_id`): rows that join then always live on the same
//!   shard. For an inner join the equality may sit in its ON or in the WHERE;
//!   for an outer join it must sit in its own ON, which is all that decides
//!   which rows it joins;
//! - an outer join must not keep the rows of reference tables (the same on
//!   every shard) while the rows it joins to them are sharded: every shard
//!   would add its own copy of each reference row it finds no match for;
//! - a subquery (`EXISTS`, `IN`, a scalar subquery) that reads a sharded table
//!   must be tied to the outer row by the key in its WHERE
//!   (`i.tenant_id = o.tenant_id`), else each shard sees only its own part of
//!   the subquery's rows;
//! - a subquery or `WITH` query in FROM that reads a sharded table must make
//!   each of its rows from rows of one shard, as a table's are: no aggregates,
//!   GROUP BY, DISTINCT, window functions, LIMIT or OFFSET of its own, which
//!   would compute over one shard's rows only. Its rows are then like a
//!   table's, and its key column, when it passes one through unchanged, like
//!   a table's key for joins. A function in FROM, a LATERAL subquery or a
//!   recursive `WITH` that reads a sharded table is not looked into, and
//!   refused.
//!
//! The analysis ([`Read::of`]) records the shape of a SELECT's FROM clause and
//! its key equalities; which tables are sharded is known only when routing,
//! from the catalog ([`Read::check`]).

use std::collections::HashMap;

use pg_query::protobuf::{self, node::Node as N, Node};

/// How the relations of one SELECT combine, for [`Read::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    from: Source,
    subqueries: Vec<Subquery>,
    /// An expression of a kind this module does not look into (it might hide
    /// a subquery).
    unknown: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Subquery {
    read: Read,
    /// Its WHERE equates the key of one of its tables with the key of a table
    /// of an enclosing query.
    tied: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    Table(String),
    /// Joined by inner joins, cross joins or commas; `ties` are the key
    /// equalities between members (from their ON conditions and, at the top,
    /// the WHERE), as pairs of member indexes.
    Inner {
        members: Vec<Source>,
        ties: Vec<(usize, usize)>,
    },
    /// `preserved LEFT JOIN nullable` (a RIGHT JOIN with its sides turned
    /// around), or a FULL JOIN; `tied` when its own ON (or USING) equates a key
    /// of one side with a key of the other.
    Outer {
        join: &'static str,
        preserved: Box<Source>,
        nullable: Box<Source>,
        tied: bool,
    },
    /// A subquery or `WITH` query in FROM; `mixes` names what in it computes
    /// over many rows (aggregates, DISTINCT, LIMIT …), if anything does.
    Derived {
        read: Box<Read>,
        mixes: Option<&'static str>,
    },
    /// A FROM item not looked into (a function, VALUES, a LATERAL subquery, a
    /// recursive `WITH`): the tables it reads.
    Opaque(Vec<String>),
    /// The arms of `UNION ALL`, each a read of its own: every shard runs every
    /// arm, so each must be split over the shards (or each the same everywhere).
    UnionAll(Vec<Read>),
    /// `UNION` (removing duplicates), `INTERSECT` or `EXCEPT`, which compare
    /// rows of different shards: named, and the tables they read.
    SetOperation(&'static str, Vec<String>),
}

/// Why a read cannot be split over the shards, in words for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotLocal {
    pub message: String,
    pub hint: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Locality {
    /// The same rows on every shard (reference tables only).
    Replicated,
    /// Each row made on one shard only, from that shard's rows.
    Partitioned,
}

impl Read {
    /// The shape of `sel`, a statement's top-level SELECT.
    pub fn of(sel: &protobuf::SelectStmt, key_column: &str) -> Read {
        let mut b = Builder { column: key_column, next_id: 0, enclosing: Vec::new(), ctes: Vec::new() };
        b.read(sel).0
    }

    /// Whether running the read on every shard and concatenating the answers
    /// gives exactly the answer of one Postgres holding every row.
    /// `statement_tables` are the tables the statement names anywhere: one that
    /// is sharded and that this shape did not see is refused too.
    pub fn check(
        &self,
        statement_tables: &[String],
        is_sharded: &dyn Fn(&str) -> bool,
        key_column: &str,
    ) -> Result<(), NotLocal> {
        let c = Checker { is_sharded, key: key_column };
        c.read(self)?;
        let mut seen = Vec::new();
        self.tables(&mut seen);
        if let Some(t) = statement_tables.iter().find(|t| is_sharded(t) && !seen.contains(t)) {
            return Err(c.unseen(t));
        }
        Ok(())
    }

    /// Adds the tables the read names that `names` lacks (the statement's
    /// table list comes from a walk that skips some expressions).
    pub fn add_tables_to(&self, names: &mut Vec<String>) {
        let mut mine = Vec::new();
        self.tables(&mut mine);
        for t in mine {
            if !names.contains(t) {
                names.push(t.clone());
            }
        }
    }

    fn tables<'a>(&'a self, out: &mut Vec<&'a String>) {
        self.from.tables(out);
        for s in &self.subqueries {
            s.read.tables(out);
        }
    }
}

impl Source {
    fn tables<'a>(&'a self, out: &mut Vec<&'a String>) {
        match self {
            Source::Table(t) => out.push(t),
            Source::Opaque(ts) => out.extend(ts),
            Source::Derived { read, .. } => read.tables(out),
            Source::UnionAll(arms) => arms.iter().for_each(|a| a.tables(out)),
            Source::SetOperation(_, ts) => out.extend(ts),
            Source::Inner { members, .. } => members.iter().for_each(|m| m.tables(out)),
            Source::Outer { preserved, nullable, .. } => {
                preserved.tables(out);
                nullable.tables(out);
            }
        }
    }
}

struct Checker<'a> {
    is_sharded: &'a dyn Fn(&str) -> bool,
    key: &'a str,
}

impl Checker<'_> {
    fn read(&self, r: &Read) -> Result<Locality, NotLocal> {
        let mut locality = self.source(&r.from)?;
        for s in &r.subqueries {
            if self.read(&s.read)? == Locality::Partitioned {
                if !s.tied {
                    let t = self.first_sharded(&s.read.from).map_or("", String::as_str);
                    return Err(NotLocal {
                        message: format!(
                            "a subquery reads the sharded table {t} without tying it to the outer row by {key}, so each shard would see only its own part of {t}",
                            key = self.key
                        ),
                        hint: format!(
                            "add {t}.{key} = <outer table>.{key} to the subquery's WHERE, or name one tenant",
                            key = self.key
                        ),
                    });
                }
                locality = Locality::Partitioned;
            }
        }
        if r.unknown {
            return Err(NotLocal {
                message: "this read has an expression shardgate does not look into, which may hide a subquery"
                    .to_string(),
                hint: format!("name one tenant (WHERE {} = …) so that the read runs on one shard", self.key),
            });
        }
        Ok(locality)
    }

    fn source(&self, s: &Source) -> Result<Locality, NotLocal> {
        match s {
            Source::Table(t) => Ok(if (self.is_sharded)(t) { Locality::Partitioned } else { Locality::Replicated }),
            Source::Opaque(tables) => match tables.iter().find(|t| (self.is_sharded)(t)) {
                None => Ok(Locality::Replicated),
                Some(t) => Err(NotLocal {
                    message: format!(
                        "a function, LATERAL subquery or recursive WITH query in FROM reads the sharded table {t}, which shardgate does not split across shards"
                    ),
                    hint: format!(
                        "join {t} directly (on {key}), or name one tenant (WHERE {key} = …)",
                        key = self.key
                    ),
                }),
            },
            Source::Derived { read, mixes } => match (self.read(read)?, mixes) {
                (Locality::Partitioned, Some(what)) => {
                    let t = self.first_sharded(&read.from).map_or("", String::as_str);
                    Err(NotLocal {
                        message: format!(
                            "a subquery or WITH query in FROM computes {what} over the sharded table {t}: each shard would compute it over its own rows only"
                        ),
                        hint: format!(
                            "compute it in the outer query, or name one tenant (WHERE {} = …)",
                            self.key
                        ),
                    })
                }
                (locality, _) => Ok(locality),
            },
            Source::UnionAll(arms) => self.union_all(arms),
            Source::SetOperation(name, tables) => match tables.iter().find(|t| (self.is_sharded)(t)) {
                None => Ok(Locality::Replicated),
                Some(t) => Err(NotLocal {
                    message: format!("{name} compares rows of the sharded table {t} that live on different shards"),
                    hint: format!("use UNION ALL, or name one tenant (WHERE {} = …)", self.key),
                }),
            },
            Source::Inner { members, ties } => {
                let mut partitioned = Vec::new();
                for (i, m) in members.iter().enumerate() {
                    if self.source(m)? == Locality::Partitioned {
                        partitioned.push(i);
                    }
                }
                let Some(&first) = partitioned.first() else { return Ok(Locality::Replicated) };
                // Members reachable from the first one through key equalities.
                let mut reached = vec![first];
                let mut grew = true;
                while grew {
                    grew = false;
                    for &(a, b) in ties {
                        for (x, y) in [(a, b), (b, a)] {
                            if reached.contains(&x) && !reached.contains(&y) && partitioned.contains(&y) {
                                reached.push(y);
                                grew = true;
                            }
                        }
                    }
                }
                match partitioned.iter().find(|i| !reached.contains(i)) {
                    None => Ok(Locality::Partitioned),
                    Some(&other) => Err(self.not_joined_on_key(&members[first], &members[other], "join")),
                }
            }
            Source::Outer { join, preserved, nullable, tied } => {
                let full = *join == "FULL JOIN";
                match (self.source(preserved)?, self.source(nullable)?) {
                    (Locality::Replicated, Locality::Replicated) => Ok(Locality::Replicated),
                    (Locality::Partitioned, Locality::Replicated) if !full => Ok(Locality::Partitioned),
                    (Locality::Partitioned, Locality::Partitioned) if *tied => Ok(Locality::Partitioned),
                    (Locality::Partitioned, Locality::Partitioned) => Err(self.not_joined_on_key(preserved, nullable, join)),
                    (p, _) => {
                        let (kept, joined) = if p == Locality::Replicated { (preserved, nullable) } else { (nullable, preserved) };
                        let kept = self.first_table(kept).map_or("", String::as_str);
                        let joined = self.first_sharded(joined).map_or("", String::as_str);
                        Err(NotLocal {
                            message: format!(
                                "the {join} keeps every row of {kept}, a reference table that every shard holds, while the rows it joins come from the sharded table {joined}: every shard would return its own copy of the {kept} rows it finds no match for"
                            ),
                            hint: format!(
                                "name one tenant for the whole statement (WHERE {key} = …, or a /* {key}=… */ comment), or read {kept} and {joined} separately",
                                key = self.key
                            ),
                        })
                    }
                }
            }
        }
    }

    /// Arms that all read sharded tables (each shard answers its rows of
    /// each), or none (the same rows everywhere). An arm of reference tables
    /// only beside sharded ones would be answered by every shard.
    fn union_all(&self, arms: &[Read]) -> Result<Locality, NotLocal> {
        let localities = arms.iter().map(|a| self.read(a)).collect::<Result<Vec<_>, _>>()?;
        let Some(at) = localities.iter().position(|l| *l == Locality::Replicated) else {
            return Ok(Locality::Partitioned);
        };
        if localities.iter().all(|l| *l == Locality::Replicated) {
            return Ok(Locality::Replicated);
        }
        let table = self.first_table(&arms[at].from).map_or("", String::as_str);
        Err(NotLocal {
            message: format!(
                "an arm of this UNION ALL reads only reference tables ({table}), which every shard holds: each shard would return its rows"
            ),
            hint: format!(
                "read the reference tables in a statement of their own, or name one tenant (WHERE {} = …)",
                self.key
            ),
        })
    }

    fn not_joined_on_key(&self, a: &Source, b: &Source, join: &str) -> NotLocal {
        let a = self.first_sharded(a).map_or("", String::as_str);
        let b = self.first_sharded(b).map_or("", String::as_str);
        NotLocal {
            message: format!(
                "the sharded tables {a} and {b} are joined without {a}.{key} = {b}.{key} in the {join}'s condition, so rows that join may live on different shards",
                key = self.key
            ),
            hint: format!(
                "join sharded tables on {key} (ON {a}.{key} = {b}.{key} AND …), or name one tenant (WHERE {key} = …)",
                key = self.key
            ),
        }
    }

    fn unseen(&self, t: &str) -> NotLocal {
        NotLocal {
            message: format!(
                "the sharded table {t} is read in a part of this statement that shardgate does not split across shards"
            ),
            hint: format!("name one tenant (WHERE {} = …) so that the read runs on one shard", self.key),
        }
    }

    fn first_sharded<'s>(&self, s: &'s Source) -> Option<&'s String> {
        let mut all = Vec::new();
        s.tables(&mut all);
        all.into_iter().find(|t| (self.is_sharded)(t))
    }

    fn first_table<'s>(&self, s: &'s Source) -> Option<&'s String> {
        let mut all = Vec::new();
        s.tables(&mut all);
        all.into_iter().next()
    }
}

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

struct Builder<'a> {
    column: &'a str,
    /// Table instances are numbered across the whole statement.
    next_id: usize,
    /// The names of the queries enclosing the one being read, innermost last.
    enclosing: Vec<Vec<(String, usize)>>,
    /// The `WITH` queries in scope, innermost last: what a reference to each
    /// reads, and whether it passes a key column through.
    ctes: Vec<(String, Source, bool)>,
}

impl Builder<'_> {
    /// The shape of one SELECT, and the names of its FROM tables.
    fn read(&mut self, sel: &protobuf::SelectStmt) -> (Read, Vec<(String, usize)>) {
        let Some(with) = &sel.with_clause else { return self.read_query(sel) };
        if with.recursive {
            // Not looked into.
            let tables = super::analyze::tables_under(&N::SelectStmt(Box::new(sel.clone())));
            return (Read { from: Source::Opaque(tables), subqueries: Vec::new(), unknown: false }, Vec::new());
        }
        let scope = self.ctes.len();
        for c in &with.ctes {
            let Some(N::CommonTableExpr(cte)) = &c.node else { continue };
            let (source, passes) = match cte.ctequery.as_deref().and_then(|q| q.node.as_ref()) {
                Some(N::SelectStmt(body)) => self.derived(body),
                Some(other) => (Source::Opaque(super::analyze::tables_under(other)), false),
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
                Some(N::String(s)) => {
                    s.sval.eq_ignore_ascii_case(self.column)
                        && (t.name.is_empty() || t.name.eq_ignore_ascii_case(self.column))
                }
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
            let tables = super::analyze::tables_under(&N::SelectStmt(Box::new(sel.clone())));
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
                    Some(other) => (Source::Opaque(super::analyze::tables_under(other)), false),
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
                let name = super::analyze::relname(v);
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
                        let tables = super::analyze::tables_under(&N::JoinExpr(j.clone()));
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
                Part { source: Source::Opaque(super::analyze::tables_under(other)), names: Vec::new(), clean: false }
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
        j.is_natural
            || j.using_clause
                .iter()
                .any(|u| matches!(&u.node, Some(N::String(s)) if s.sval.eq_ignore_ascii_case(self.column)))
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
                (Some(N::String(q)), Some(N::String(k))) if k.sval.eq_ignore_ascii_case(self.column) => {
                    Some(q.sval.clone())
                }
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
                            from: Source::Opaque(super::analyze::tables_under(other)),
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
pub(super) fn expression_children(node: &N) -> Option<Vec<&Node>> {
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
    use super::aggregates::has_aggregate;
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

#[cfg(test)]
mod tests {
    use crate::sql::analyze;

    /// `orders`, `items` and `parts` are sharded; `plans` is a reference table.
    fn check(sql: &str) -> Result<(), String> {
        let a = analyze(sql, "tenant_id").unwrap();
        let s = &a.statements[0];
        let read = s.read.as_ref().expect("a read");
        read.check(&s.tables, &|t| matches!(t, "orders" | "items" | "parts" | "public.orders"), "tenant_id")
            .map_err(|e| e.message)
    }

    #[test]
    fn joins_of_sharded_tables_on_the_key_split_over_the_shards() {
        for sql in [
            "select * from orders",
            "select * from orders o join items i on i.tenant_id = o.tenant_id and i.order_id = o.id",
            "select * from orders o, items i where o.tenant_id = i.tenant_id and i.order_id = o.id",
            "select * from orders o join items i on i.order_id = o.id where i.tenant_id = o.tenant_id",
            "select * from orders join items using (tenant_id, id)",
            "select * from orders natural join items",
            "select * from orders o join plans p on p.id = o.plan",
            "select * from orders o left join plans p on p.id = o.plan",
            "select * from plans p right join orders o on p.id = o.plan",
            "select * from orders o left join items i on o.tenant_id = i.tenant_id and i.tenant_id = 42",
            "select * from items i right join orders o on o.tenant_id = i.tenant_id and i.tenant_id = 42",
            "select * from orders o full join items i on o.tenant_id = i.tenant_id",
            "select * from orders o left join items i using (tenant_id)",
            // Three tables, tied in a chain; an outer join inside an inner one.
            "select * from orders o join items i on i.tenant_id = o.tenant_id join parts p on p.tenant_id = i.tenant_id",
            "select * from (orders o left join items i on i.tenant_id = o.tenant_id) join parts p on p.tenant_id = o.tenant_id",
            "select * from orders o left join (items i join parts p on p.tenant_id = i.tenant_id) on i.tenant_id = o.tenant_id",
            "select * from plans p join (orders o left join items i on i.tenant_id = o.tenant_id) on p.id = o.plan",
            // Subqueries over reference tables, or tied to the outer row by the key.
            "select * from orders o where o.plan in (select id from plans)",
            "select * from orders o where exists (select 1 from items i where i.tenant_id = o.tenant_id and i.order_id = o.id)",
            "select o.id, (select count(*) from items i where o.tenant_id = i.tenant_id) from orders o",
            "select * from orders o, generate_series(1, 3) g",
            "select * from public.orders",
            "select id from orders union all select id from items union all select id from parts",
            "select id from plans union all select id from plans",
            // Subqueries and WITH queries in FROM whose rows are each of one
            // shard: like tables, and tied by the key they pass through.
            "select count(*) from (select * from orders where total > 5) t",
            "with x as (select * from orders where total > 5) select region, count(*) from x group by region",
            "with x as (select tenant_id, id from orders) select * from x join items i on i.tenant_id = x.tenant_id",
            "select * from (select o.tenant_id, o.id from orders o) a join (select * from items) b using (tenant_id)",
            "with x as (select id from orders union all select id from items) select count(*) from x",
            "with p as (select id, count(*) from plans group by id) select * from orders o join p on p.id = o.plan",
            "with x as (select * from orders), y as (select * from x where total > 1) select * from y",
        ] {
            assert_eq!(check(sql), Ok(()), "{sql}");
        }
    }

    #[test]
    fn what_each_shard_cannot_answer_alone_is_refused() {
        for (sql, says) in [
            ("select * from orders o join items i on i.order_id = o.id", "joined without"),
            ("select * from orders o, items i where i.order_id = o.id", "joined without"),
            ("select * from orders o left join items i on i.order_id = o.id", "joined without"),
            // The key equality of an outer join must be in its own ON.
            ("select * from orders o left join items i on i.order_id = o.id where i.tenant_id = o.tenant_id", "joined without"),
            ("select * from orders o full join items i on i.order_id = o.id", "joined without"),
            // A cast may lose information; equal casts do not prove equal keys.
            ("select * from orders o join items i on i.tenant_id::text = o.tenant_id::text", "joined without"),
            // Reference rows kept by an outer join would come from every shard.
            ("select * from plans p left join orders o on o.plan = p.id and o.tenant_id = 42", "keeps every row of plans"),
            ("select * from orders o right join plans p on o.plan = p.id", "keeps every row of plans"),
            ("select * from orders o full join plans p on o.plan = p.id", "keeps every row of plans"),
            ("select * from plans p full join orders o on o.plan = p.id", "keeps every row of plans"),
            // An outer join whose left side joins on an untied nullable table.
            (
                "select * from orders o left join items i on i.order_id = o.id left join parts p on p.tenant_id = i.tenant_id and p.tenant_id = o.tenant_id",
                "joined without",
            ),
            // Subqueries that see only their shard's rows.
            ("select * from orders where total > (select avg(total) from orders)", "subquery"),
            ("select * from orders o where exists (select 1 from items i where i.order_id = o.id)", "subquery"),
            ("select * from plans p where exists (select 1 from orders o where o.plan = p.id)", "subquery"),
            ("select * from (select count(*) from orders) c", "computes aggregates or window functions over the sharded table orders"),
            ("select * from (select region from orders group by region) c", "computes GROUP BY or HAVING"),
            ("with x as (select distinct region from orders) select count(*) from x", "computes DISTINCT"),
            ("select * from (select * from orders order by total limit 3) t", "computes LIMIT or OFFSET"),
            ("with x as (select * from orders) select * from x where x.total > (select max(total) from x)", "subquery"),
            ("select * from plans p, lateral (select * from orders o where o.plan = p.id) x", "in FROM"),
            ("with recursive x as (select * from orders) select * from x", "recursive WITH"),
            // Keys that are not the tables' keys do not tie.
            ("with x as (select id as tenant_id from orders) select * from x join items i on i.tenant_id = x.tenant_id", "joined without"),
            ("select * from (select tenant_id, id from orders) a(t, i) join items b on b.tenant_id = a.t", "joined without"),
            ("with x(t) as (select tenant_id from orders) select * from x join items i on i.tenant_id = x.t", "joined without"),
            ("select array[(select count(*) from orders)]", "subquery"),
            // Every shard would return the reference arm's rows.
            ("select id from orders union all select id from plans", "reads only reference tables (plans)"),
            ("select id from orders union all select o.id from orders o join items i on i.id = o.id", "joined without"),
            ("select id from orders union select id from items", "UNION compares rows"),
            ("select id from orders intersect all select id from items", "INTERSECT compares rows"),
        ] {
            match check(sql) {
                Err(message) => assert!(message.contains(says), "{sql}: {message}"),
                Ok(()) => panic!("{sql} must be refused"),
            }
        }
    }

    #[test]
    fn an_outer_join_whose_on_names_a_tenant_is_read_from_every_shard() {
        let c = crate::sql::testing::cluster();
        let every = crate::route::Target::Fanout(c.dir.owning_shards());
        for sql in [
            "select o.id, i.id from orders o left join items i on o.tenant_id = i.tenant_id and i.tenant_id = 42",
            "select o.id, i.id from items i right join orders o on o.tenant_id = i.tenant_id and i.tenant_id = $1",
            "select o.id, i.id from orders o full join items i on o.tenant_id = i.tenant_id and o.tenant_id = 42",
        ] {
            assert_eq!(c.route_with(sql, &[Some(b"42")], None, false).unwrap(), every, "{sql}");
        }
        // A tenant in the ON of a join that keeps the reference rows: every
        // plan is in the answer, and the tenant's shard has every plan.
        let sql = "select p.id, o.id from plans p left join orders o on o.id = p.id and o.tenant_id = 42";
        assert_eq!(c.route(sql).unwrap(), c.shard_of(42));
        // In WHERE, the same condition names the shard.
        let sql =
            "select o.id, i.id from orders o left join items i on o.tenant_id = i.tenant_id where o.tenant_id = 42";
        assert_eq!(c.route(sql).unwrap(), c.shard_of(42));
    }

    #[test]
    fn a_read_that_no_shard_answers_alone_is_refused_with_the_reason() {
        let c = crate::sql::testing::cluster();
        for (sql, says) in [
            ("select p.id, o.id from plans p left join orders o on o.id = p.id", "keeps every row of plans"),
            ("select o.id from orders o join items i on i.id = o.id", "joined without"),
            (
                "select o.id from orders o join items i on i.id = o.id where o.tenant_id in (1, 2, 3, 4, 5)",
                "joined without",
            ),
            // A subquery in an expression the statement's table walk skips.
            ("select array[(select count(*) from orders)]", "subquery"),
        ] {
            let e = c.route(sql).unwrap_err();
            assert_eq!(e.code, "0A000", "{sql}");
            assert!(e.message.starts_with("cannot answer this read across shards exactly: "), "{}", e.message);
            assert!(e.message.contains(says), "{sql}: {}", e.message);
            assert!(e.hint.is_some(), "{sql}");
        }
        // One tenant of one of the two: the other's rows that join may be
        // any tenant's, on any shard.
        let e = c.route("select o.id from orders o join items i on i.id = o.id where o.tenant_id = 1").unwrap_err();
        assert!(e.message.contains("joined without"), "{}", e.message);
        // One tenant of both: its shard holds every row the read needs.
        assert_eq!(
            c.route("select o.id from orders o join items i on i.id = o.id and i.tenant_id = o.tenant_id where o.tenant_id = 1")
                .unwrap(),
            c.shard_of(1)
        );
        // The session's tenant, too.
        let sql = "select p.id, o.id from plans p left join orders o on o.id = p.id and o.tenant_id = 42";
        assert_eq!(c.route_with(sql, &[], Some(42), false).unwrap(), c.shard_of(42));
    }
}

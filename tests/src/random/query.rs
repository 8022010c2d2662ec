//! Random reads of the random table, from the grammar cross-shard reads
//! merge (filters, ORDER BY, LIMIT/OFFSET, aggregates, GROUP BY, groups by the
//! sharding key with any aggregate and HAVING, ORDER BY and GROUP BY items
//! written as a select-list expression, WITH queries and subqueries in FROM
//! whose rows are each one row of the table) and the parts being added
//! (HAVING, DISTINCT, DISTINCT ON, `SELECT *`, UNION ALL, count(DISTINCT)),
//! each with what comparing its answers needs.

use std::collections::BTreeSet;
use std::sync::OnceLock;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

use super::table::{Column, Kind, Table};

/// A part of the grammar a query uses, for counting answers and refusals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Feature {
    Filter,
    OneTenant,
    SomeTenants,
    OrderBy,
    CollateC,
    Limit,
    Aggregate,
    GroupBy,
    Having,
    Distinct,
    DistinctOn,
    Star,
    UnionAll,
    CountDistinct,
    /// A join of the table with itself on the key, inner or left.
    Join,
    /// GROUP BY `tenant_id` (maybe with `id` or another column): each group is
    /// whole on its tenant's shard.
    GroupByKey,
    /// An aggregate cross-shard groups cannot merge, in groups by the key:
    /// count(DISTINCT x), string_agg, bool_or, bool_and, stddev, variance.
    AnyAggregate,
    /// HAVING of groups by the key, which the shards run.
    KeyHaving,
    /// A bind parameter in HAVING (groups by the key; inlined in the simple
    /// protocol).
    HavingParam,
    /// An ORDER BY item that is a select-list expression written out again
    /// (`ORDER BY count(*) DESC`).
    OrderByExpression,
    /// A GROUP BY item that is a select-list expression written out again
    /// (`GROUP BY tenant_id % 3`).
    GroupByExpression,
    /// A WITH query or a subquery in FROM whose rows are each one row of
    /// `items`, read by an outer query.
    Derived,
    /// The derived table is a WITH query (else a subquery in FROM).
    WithQuery,
    /// Groups by the key column a derived table passes through, which the
    /// shards answer whole.
    KeyGroupsOfDerived,
    /// GROUP BY names the key column by its position or its alias (over
    /// plain tables, the router sees these as groups by the key too).
    KeyByPosition,
}

impl Feature {
    /// Whether docs/routing.md says cross-shard reads merge it today; the
    /// others are being added and may still be refused. Groups by the key
    /// (any aggregate, HAVING with parameters), expressions as ORDER BY and
    /// GROUP BY names, groups by the key named by position or alias, derived
    /// tables whose rows are each one row of `items`, and groups by the key
    /// they pass through are merged today.
    pub fn merged_today(self) -> bool {
        !matches!(
            self,
            Feature::Having
                | Feature::Distinct
                | Feature::DistinctOn
                | Feature::Star
                | Feature::UnionAll
                | Feature::CountDistinct
        )
    }
}

/// A generated read and what comparing its answers needs.
#[derive(Debug, Clone)]
pub struct Query {
    /// The text for the extended protocol; `$1` … stand for `params`.
    pub sql: String,
    /// Values bound as int8 parameters: tenant keys and ids.
    pub params: Vec<i64>,
    pub features: BTreeSet<Feature>,
    /// ORDER BY fixes the order of every row; otherwise rows compare as a
    /// multiset.
    pub ordered: bool,
    /// Per output column: compared by value, not by text (see [`Kind::loose`]).
    pub loose: Vec<bool>,
    /// The WHERE names one tenant under AND: the statement runs on one shard
    /// as it is, so a refusal is as wrong as a different answer.
    pub one_tenant: bool,
}

impl Query {
    /// A query written by hand (regression cases): parameters none, every
    /// column compared by its text.
    pub fn fixed(sql: &str, ordered: bool) -> Query {
        Query {
            sql: sql.to_string(),
            params: Vec::new(),
            features: BTreeSet::new(),
            ordered,
            loose: Vec::new(),
            one_tenant: false,
        }
    }

    /// The text for the simple protocol: the parameters written in.
    pub fn simple_sql(&self) -> String {
        let mut sql = self.sql.clone();
        // From the last, so that `$1` does not eat the start of `$10`.
        for (i, p) in self.params.iter().enumerate().rev() {
            sql = sql.replace(&format!("${}", i + 1), &p.to_string());
        }
        sql
    }

    /// Whether the query uses only what cross-shard reads merge today.
    pub fn merged_today(&self) -> bool {
        self.features.iter().all(|f| f.merged_today())
    }
}

/// One output column of the query being built.
struct Out {
    expr: String,
    /// `c1`, `c2` … ([`alias`]) or another column's name: 'static, so that
    /// a derived table's columns can carry it.
    alias: Option<&'static str>,
    /// The table column, when `expr` is just its name.
    column: Option<Column>,
    loose: bool,
}

impl Out {
    fn column(c: Column) -> Out {
        Out { expr: c.name.to_string(), alias: None, column: Some(c), loose: false }
    }

    /// A column of one side of a join: `a.name`.
    fn qualified(c: Column, side: &str) -> Out {
        Out { expr: format!("{side}.{}", c.name), alias: None, column: Some(c), loose: false }
    }

    /// The name the client sees, and ORDER BY may use.
    fn name(&self) -> String {
        match (self.alias, self.column) {
            (Some(a), _) => a.to_string(),
            (None, Some(c)) => c.name.to_string(),
            (None, None) => self.expr.split('(').next().unwrap_or_default().to_string(),
        }
    }

    fn select_item(&self) -> String {
        match self.alias {
            Some(a) => format!("{} AS {a}", self.expr),
            None => self.expr.clone(),
        }
    }
}

/// Which ORDER BY forms the statement allows: `COLLATE` is an expression,
/// which DISTINCT, DISTINCT ON and UNION accept only as an output column.
#[derive(Clone, Copy, PartialEq)]
enum Collate {
    Allowed,
    Not,
}

/// Which clause names an output column ([`Gen::reference`]).
#[derive(Clone, Copy, PartialEq)]
enum Clause {
    OrderBy,
    GroupBy,
}

/// A random read of `table`.
pub fn random(rng: &mut StdRng, table: &Table) -> Query {
    let mut g = Gen {
        rng,
        table,
        params: Vec::new(),
        features: BTreeSet::new(),
        aliases: 0,
        side: "",
        from: "items".into(),
        tenants: true,
    };
    let (sql, outs, ordered, one_tenant) = match g.rng.gen_range(0..100) {
        0..=21 => g.rows(),
        22..=29 => g.aggregates(),
        30..=47 => g.grouped(),
        48..=59 => g.grouped_by_key(),
        60..=71 => g.derived(),
        72..=78 => g.distinct(),
        79..=84 => g.distinct_on(),
        85..=90 => g.star(),
        91..=94 => g.union_all(),
        95..=97 => g.join(),
        _ => g.count_distinct(),
    };
    Query {
        sql,
        params: g.params,
        features: g.features,
        ordered,
        loose: outs.iter().map(|o| o.loose).collect(),
        one_tenant,
    }
}

/// What a shape returns: the text, its output columns, whether ORDER BY fixes
/// the order, whether it names one tenant.
type Shape = (String, Vec<Out>, bool, bool);

struct Gen<'a> {
    rng: &'a mut StdRng,
    table: &'a Table,
    params: Vec<i64>,
    features: BTreeSet<Feature>,
    aliases: usize,
    /// What filters put before a column name: `a.` in a join.
    side: &'static str,
    /// What the shapes read: `items`, or a derived table of it.
    from: String,
    /// Whether filters may name tenants (not over a derived table whose body
    /// names some already: the read would name two).
    tenants: bool,
}

/// The alias `c{n}`, as a 'static name.
fn alias(n: usize) -> &'static str {
    static NAMES: OnceLock<Vec<String>> = OnceLock::new();
    let names = NAMES.get_or_init(|| (1..=100).map(|i| format!("c{i}")).collect());
    names[n - 1].as_str()
}

impl Gen<'_> {
    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        *from.choose(self.rng).expect("a choice")
    }

    /// `n` distinct columns other than the key and id.
    fn value_columns(&mut self, n: usize) -> Vec<Column> {
        let mut all = self.table.values();
        all.shuffle(self.rng);
        all.truncate(n);
        all
    }

    fn key_columns(&self) -> [Out; 2] {
        let col = |name| *self.table.columns.iter().find(|c| c.name == name).expect("key columns");
        [Out::column(col("tenant_id")), Out::column(col("id"))]
    }

    /// Whether the table read has `tenant_id` and `id` (a derived table may
    /// not pass them through).
    fn has_keys(&self) -> bool {
        self.table.has(Kind::Key) && self.table.has(Kind::Id)
    }

    fn next_alias(&mut self) -> &'static str {
        self.aliases += 1;
        alias(self.aliases)
    }

    /// A plain column as an output, now and then under an alias.
    fn output(&mut self, c: Column) -> Out {
        let mut out = Out::column(c);
        if self.rng.gen_bool(0.15) {
            out.alias = Some(self.next_alias());
        }
        out
    }

    /// Gives some aliased outputs the name of another table column instead
    /// (`name AS n_int`), one no other output has (nor `others`, nor the
    /// key columns, which sorts add): a bare name in ORDER BY is then the
    /// output's, as Postgres reads it, not the input column's.
    fn rename_some(&mut self, outs: &mut [Out], others: &[String]) {
        for i in 0..outs.len() {
            if outs[i].alias.is_none() || !self.rng.gen_bool(0.4) {
                continue;
            }
            let taken: Vec<String> = outs.iter().map(Out::name).chain(others.iter().cloned()).collect();
            let free: Vec<&str> =
                self.table.values().iter().map(|c| c.name).filter(|n| !taken.iter().any(|t| t == n)).collect();
            if let Some(n) = free.choose(self.rng) {
                outs[i].alias = Some(n);
            }
        }
    }

    /// Plain rows: some columns, a filter, maybe sorted and cut.
    fn rows(&mut self) -> Shape {
        let n = self.rng.gen_range(1..=4);
        let cols = self.value_columns(n);
        let mut outs: Vec<Out> = cols.into_iter().map(|c| self.output(c)).collect();
        self.rename_some(&mut outs, &[]);
        let ordered = self.rng.gen_bool(0.7);
        if ordered || self.rng.gen_bool(0.3) {
            for k in self.key_columns() {
                let at = self.rng.gen_range(0..=outs.len());
                outs.insert(at, k);
            }
        }
        let (filter, one_tenant) = self.filter();
        let mut sql = format!("SELECT {} FROM {}{filter}", list(&outs), self.from);
        if ordered {
            let keys: Vec<usize> = (0..outs.len()).filter(|&i| outs[i].column.is_some_and(is_key)).collect();
            sql += &self.sorted(&outs, &keys, Collate::Allowed);
        }
        (sql, outs, ordered, one_tenant)
    }

    /// `SELECT *`, maybe sorted by any columns and then the primary key.
    fn star(&mut self) -> Shape {
        self.features.insert(Feature::Star);
        let outs: Vec<Out> = self.table.columns.iter().map(|&c| Out::column(c)).collect();
        let (filter, one_tenant) = self.filter();
        let mut sql = format!("SELECT * FROM items{filter}");
        let ordered = self.maybe_sorted(&mut sql, &outs, &[0, 1], Collate::Allowed);
        (sql, outs, ordered, one_tenant)
    }

    /// Aggregates over every row that passes the filter: one row.
    fn aggregates(&mut self) -> Shape {
        let n = self.rng.gen_range(1..=4);
        let outs: Vec<Out> = (0..n).map(|_| self.aggregate()).collect();
        let (filter, one_tenant) = self.filter();
        let mut sql = format!("SELECT {} FROM {}{filter}", list(&outs), self.from);
        if self.rng.gen_bool(0.15) {
            sql += &self.limit();
        }
        (sql, outs, true, one_tenant)
    }

    /// Groups: one or two keys (columns, or `tenant_id % 3`), aggregates,
    /// maybe HAVING, maybe sorted by an aggregate and then every key.
    fn grouped(&mut self) -> Shape {
        self.features.insert(Feature::GroupBy);
        let mut keys: Vec<Out> = Vec::new();
        let n = self.rng.gen_range(1..=2);
        for c in self.value_columns(n) {
            let mut k = self.output(c);
            k.loose = c.kind.loose();
            keys.push(k);
        }
        if self.table.has(Kind::Key) && self.rng.gen_bool(0.2) {
            keys[0] = Out { expr: "tenant_id % 3".into(), alias: Some(self.next_alias()), column: None, loose: false };
        }
        let n = self.rng.gen_range(1..=3);
        let mut outs: Vec<Out> = (0..n).map(|_| self.aggregate()).collect();
        // Only aggregates: GROUP BY an alias that is also an input column is
        // a known bug (group_by_an_alias_that_is_also_an_input_column_…).
        let key_names: Vec<String> = keys.iter().map(Out::name).collect();
        self.rename_some(&mut outs, &key_names);
        let mut key_at = Vec::new();
        for k in keys {
            let at = self.rng.gen_range(0..=outs.len());
            key_at.iter_mut().for_each(|i: &mut usize| *i += usize::from(*i >= at));
            key_at.push(at);
            outs.insert(at, k);
        }
        let (filter, one_tenant) = self.filter();
        let group: Vec<String> = key_at.iter().map(|&i| self.reference(&outs, i, Clause::GroupBy)).collect();
        let mut sql = format!("SELECT {} FROM {}{filter} GROUP BY {}", list(&outs), self.from, group.join(", "));
        if self.rng.gen_bool(0.25) {
            self.features.insert(Feature::Having);
            sql += &format!(" HAVING {}", self.having());
        }
        let ordered = self.maybe_sorted(&mut sql, &outs, &key_at, Collate::Allowed);
        (sql, outs, ordered, one_tenant)
    }

    /// `SELECT DISTINCT` of one or two columns, maybe sorted by all of them.
    fn distinct(&mut self) -> Shape {
        self.features.insert(Feature::Distinct);
        let n = self.rng.gen_range(1..=2);
        let mut outs: Vec<Out> = Vec::new();
        for c in self.value_columns(n) {
            let mut o = self.output(c);
            o.loose = c.kind.loose();
            outs.push(o);
        }
        self.rename_some(&mut outs, &[]);
        let (filter, one_tenant) = self.filter();
        let mut sql = format!("SELECT DISTINCT {} FROM {}{filter}", list(&outs), self.from);
        let ordered = self.maybe_sorted(&mut sql, &outs, &(0..outs.len()).collect::<Vec<_>>(), Collate::Not);
        (sql, outs, ordered, one_tenant)
    }

    /// `SELECT DISTINCT ON (a) a, b, tenant_id, id … ORDER BY a, b, tenant_id,
    /// id`: the first row of each `a` is fixed by the whole sort.
    fn distinct_on(&mut self) -> Shape {
        self.features.insert(Feature::DistinctOn);
        let cols = self.value_columns(2);
        let mut outs: Vec<Out> = cols.iter().map(|&c| Out::column(c)).collect();
        outs.extend(self.key_columns());
        let (filter, one_tenant) = self.filter();
        let on = outs[0].expr.clone();
        let sort: Vec<String> = (0..outs.len()).map(|i| format!("{}{}", outs[i].expr, self.direction())).collect();
        let mut sql =
            format!("SELECT DISTINCT ON ({on}) {} FROM items{filter} ORDER BY {}", list(&outs), sort.join(", "));
        self.features.insert(Feature::OrderBy);
        sql += &self.limit();
        (sql, outs, true, one_tenant)
    }

    /// Two filtered reads of the same columns, one after the other, maybe
    /// sorted by every column (rows equal in all of them are interchangeable).
    fn union_all(&mut self) -> Shape {
        self.features.insert(Feature::UnionAll);
        let n = self.rng.gen_range(0..=2);
        let mut outs: Vec<Out> = self.key_columns().into();
        outs.extend(self.value_columns(n).into_iter().map(Out::column));
        outs.shuffle(self.rng);
        let (a, _) = self.filter();
        let (b, _) = self.filter();
        let mut sql = format!("SELECT {0} FROM items{a} UNION ALL SELECT {0} FROM items{b}", list(&outs));
        let ordered = self.maybe_sorted(&mut sql, &outs, &(0..outs.len()).collect::<Vec<_>>(), Collate::Not);
        (sql, outs, ordered, false)
    }

    /// Rows of a join of the table with itself on the key (inner or left,
    /// on the next id, the same or every earlier one), maybe sorted by both
    /// sides' keys, which single out one joined row.
    fn join(&mut self) -> Shape {
        self.features.insert(Feature::Join);
        let kind = self.pick(&["JOIN", "LEFT JOIN"]);
        let on = self.pick(&["b.id = a.id", "b.id = a.id + 1", "b.id < a.id"]);
        let [t, id] = self.key_columns().map(|k| k.column.expect("key column"));
        let mut outs = vec![Out::qualified(t, "a"), Out::qualified(id, "a"), Out::qualified(id, "b")];
        let n = self.rng.gen_range(0..=2);
        for c in self.value_columns(n) {
            let side = self.pick(&["a", "b"]);
            outs.push(Out::qualified(c, side));
        }
        for o in &mut outs {
            if self.rng.gen_bool(0.15) {
                o.alias = Some(self.next_alias());
            }
        }
        self.rename_some(&mut outs[3..], &[]);
        outs.shuffle(self.rng);
        self.side = "a.";
        let (filter, one_tenant) = self.filter();
        self.side = "";
        let mut sql =
            format!("SELECT {} FROM items a {kind} items b ON b.tenant_id = a.tenant_id AND {on}{filter}", list(&outs));
        let keys: Vec<usize> = (0..outs.len()).filter(|&i| outs[i].column.is_some_and(is_key)).collect();
        let ordered = self.maybe_sorted(&mut sql, &outs, &keys, Collate::Allowed);
        (sql, outs, ordered, one_tenant)
    }

    /// count(DISTINCT x), alone or per group.
    fn count_distinct(&mut self) -> Shape {
        self.features.insert(Feature::CountDistinct);
        self.features.insert(Feature::Aggregate);
        let c = self.value_columns(1)[0];
        let mut outs =
            vec![Out { expr: format!("count(DISTINCT {})", c.name), alias: None, column: None, loose: false }];
        if self.rng.gen_bool(0.5) {
            outs.push(self.aggregate());
        }
        let (filter, one_tenant) = self.filter();
        if self.rng.gen_bool(0.5) {
            return (format!("SELECT {} FROM items{filter}", list(&outs)), outs, true, one_tenant);
        }
        self.features.insert(Feature::GroupBy);
        let key = self.value_columns(1)[0];
        let mut k = Out::column(key);
        k.loose = key.kind.loose();
        outs.insert(0, k);
        let sql = format!(
            "SELECT {} FROM items{filter} GROUP BY 1{}",
            list(&outs),
            self.order_by(&outs, &[0], Collate::Allowed)
        );
        (sql, outs, true, one_tenant)
    }

    /// Groups by the sharding key, now and then with `id` or another column:
    /// each group is whole on its tenant's shard, so the aggregates are any
    /// whose answer one server gives whatever order it reads the rows in,
    /// HAVING may hold anything (parameters too); mostly sorted by an
    /// aggregate written out again and then by the keys, which single out a
    /// group.
    fn grouped_by_key(&mut self) -> Shape {
        self.features.insert(Feature::GroupByKey);
        let [mut tenant, id] = self.key_columns();
        if self.rng.gen_bool(0.15) {
            tenant.alias = Some(self.next_alias());
        }
        let mut keys = vec![tenant];
        match self.rng.gen_range(0..10) {
            0..=5 => {}
            6..=7 => keys.push(id),
            _ => {
                let c = self.value_columns(1)[0];
                let mut k = self.output(c);
                k.loose = c.kind.loose();
                keys.push(k);
            }
        }
        let n = self.rng.gen_range(1..=3);
        let mut outs: Vec<Out> = (0..n).map(|_| self.any_aggregate()).collect();
        let key_names: Vec<String> = keys.iter().map(Out::name).collect();
        self.rename_some(&mut outs, &key_names);
        // Mostly the key is in the select list: without it the order of the
        // groups cannot be fixed, and they compare as a multiset.
        let shown = self.rng.gen_bool(0.85);
        let mut key_at = Vec::new();
        for (j, k) in keys.into_iter().enumerate() {
            if j == 0 && !shown {
                continue;
            }
            let at = self.rng.gen_range(0..=outs.len());
            key_at.iter_mut().for_each(|i: &mut usize| *i += usize::from(*i >= at));
            key_at.push(at);
            outs.insert(at, k);
        }
        let (filter, one_tenant) = self.filter();
        // Mostly by the column's name, by which the router sees groups by the
        // key.
        let mut group = vec!["tenant_id".to_string()];
        if shown && self.rng.gen_bool(0.1) {
            self.features.insert(Feature::KeyByPosition);
            group[0] = match outs[key_at[0]].alias {
                Some(a) if self.rng.gen_bool(0.5) => a.to_string(),
                _ => (key_at[0] + 1).to_string(),
            };
        }
        if let Some(&other) = key_at.get(usize::from(shown)) {
            group.push(self.reference(&outs, other, Clause::GroupBy));
        }
        let first = self.rng.gen_range(0..group.len());
        group.rotate_left(first);
        let mut sql = format!("SELECT {} FROM {}{filter} GROUP BY {}", list(&outs), self.from, group.join(", "));
        if self.rng.gen_bool(0.3) {
            sql += &format!(" HAVING {}", self.key_having(1));
        }
        let ordered = shown && self.rng.gen_bool(0.8);
        if ordered {
            let aggregates: Vec<usize> = (0..outs.len()).filter(|i| !key_at.contains(i)).collect();
            let mut items = Vec::new();
            if self.rng.gen_bool(0.8) {
                let i = self.pick(&aggregates);
                let by = if self.rng.gen_bool(0.7) {
                    self.features.insert(Feature::OrderByExpression);
                    outs[i].expr.clone()
                } else {
                    self.reference(&outs, i, Clause::OrderBy)
                };
                items.push(format!("{by}{}", self.direction()));
            }
            items.extend(self.order_items(&outs, &key_at, Collate::Allowed));
            sql += &format!(" ORDER BY {}", items.join(", "));
            sql += &self.limit();
        }
        (sql, outs, ordered, one_tenant)
    }

    /// An aggregate whose value one server gives whatever order it reads a
    /// group's rows in: the mergeable ones, and count(DISTINCT x),
    /// string_agg ordered by value and id, bool_or, bool_and, stddev and
    /// variance of integers and numerics (no sums or averages of floats).
    fn any_aggregate(&mut self) -> Out {
        let values = self.table.values();
        let summable: Vec<Column> = self.table.columns.iter().copied().filter(|c| c.kind.summable()).collect();
        let wide = |expr: String| Out { expr, alias: None, column: None, loose: false };
        let out = match self.rng.gen_range(0..9) {
            0 => {
                let c = self.pick(&values);
                wide(format!("count(DISTINCT {})", c.name))
            }
            1 => {
                let c = self.pick(&values);
                wide(format!("string_agg({0}::text, ',' ORDER BY {0}::text, id)", c.name))
            }
            2 => {
                let f = self.pick(&["bool_or", "bool_and", "every"]);
                match self.table.columns.iter().find(|c| c.kind == Kind::Bool) {
                    Some(flag) if self.rng.gen_bool(0.7) => wide(format!("{f}({})", flag.name)),
                    _ => {
                        let c = self.pick(&values);
                        wide(format!("{f}({} IS NULL)", c.name))
                    }
                }
            }
            3 => {
                let c = self.pick(&summable);
                let f = self.pick(&["stddev", "stddev_pop", "var_samp", "variance"]);
                wide(format!("{f}({})", c.name))
            }
            _ => return self.aggregate(),
        };
        self.features.insert(Feature::AnyAggregate);
        self.maybe_aliased(out)
    }

    /// A HAVING condition of groups by the key, which the shards run: any
    /// aggregate, compared with a constant or a parameter, under AND and OR.
    fn key_having(&mut self, depth: u32) -> String {
        self.features.insert(Feature::KeyHaving);
        if depth > 0 && self.rng.gen_bool(0.25) {
            let (a, b) = (self.key_having(depth - 1), self.key_having(depth - 1));
            return format!("({a} {} {b})", self.pick(&["AND", "OR"]));
        }
        let values = self.table.values();
        let op = self.pick(&["=", "<>", "<", "<=", ">", ">="]);
        match self.rng.gen_range(0..6) {
            0 => format!("count(*) {op} {}", self.number(0..5)),
            1 => {
                let c = self.pick(&values);
                format!("count(DISTINCT {}) {op} {}", c.name, self.rng.gen_range(0..4))
            }
            2 => {
                let c = self.pick(&values);
                format!("{}(({} IS NULL))", self.pick(&["bool_or", "bool_and", "NOT bool_or"]), c.name)
            }
            3 if values.iter().any(|c| c.kind.has_min_max()) => {
                let ordered: Vec<Column> = values.into_iter().filter(|c| c.kind.has_min_max()).collect();
                let c = self.pick(&ordered);
                format!("{}({}) {op} {}", self.pick(&["min", "max"]), c.name, c.kind.value(self.rng))
            }
            3 | 4 => format!("{}(id) {op} {}", self.pick(&["min", "max", "sum"]), self.number(0..7)),
            _ => {
                let c = self.pick(&values);
                format!(
                    "length(string_agg({0}::text, ',' ORDER BY {0}::text, id)) {op} {1}",
                    c.name,
                    self.number(0..12)
                )
            }
        }
    }

    /// A small number, as a constant or, now and then, as a parameter.
    fn number(&mut self, range: std::ops::Range<i64>) -> String {
        let n = self.rng.gen_range(range);
        if self.rng.gen_bool(0.4) {
            self.features.insert(Feature::HavingParam);
            self.params.push(n);
            format!("${}", self.params.len())
        } else {
            n.to_string()
        }
    }

    /// A read of a derived table: a WITH query or a subquery in FROM whose
    /// rows are each one row of `items` ([`Gen::body`]), read by one of the
    /// other shapes over the body's output columns, under their names.
    fn derived(&mut self) -> Shape {
        self.features.insert(Feature::Derived);
        let (body, columns, body_one_tenant) = self.body();
        let with = self.rng.gen_bool(0.5);
        let from = if with {
            self.features.insert(Feature::WithQuery);
            "f".to_string()
        } else {
            format!("({body}) t")
        };
        let view = Table { columns, tenants: self.table.tenants.clone(), rows: Vec::new() };
        let body_tenants = self.features.contains(&Feature::OneTenant) || self.features.contains(&Feature::SomeTenants);
        let mut outer = Gen {
            rng: &mut *self.rng,
            table: &view,
            params: std::mem::take(&mut self.params),
            features: std::mem::take(&mut self.features),
            aliases: self.aliases,
            side: "",
            from,
            tenants: !body_tenants,
        };
        let keyed = outer.has_keys();
        let (sql, outs, ordered, one_tenant) = match outer.rng.gen_range(0..100) {
            0..=29 if keyed => outer.rows(),
            30..=44 => outer.aggregates(),
            45..=74 => outer.grouped(),
            75..=84 if keyed => outer.distinct(),
            85..=99 if keyed => {
                outer.features.insert(Feature::KeyGroupsOfDerived);
                outer.grouped_by_key()
            }
            _ => outer.aggregates(),
        };
        let (params, features, aliases) = (outer.params, outer.features, outer.aliases);
        (self.params, self.features, self.aliases) = (params, features, aliases);
        let sql = if with { format!("WITH f AS ({body}) {sql}") } else { sql };
        (sql, outs, ordered, one_tenant || body_one_tenant)
    }

    /// The body of a derived table: `SELECT *` or some columns (some
    /// renamed, some under `coalesce`), mostly with `tenant_id` and `id`,
    /// filtered; no ORDER BY or LIMIT, nothing that mixes rows. Its text, its
    /// output columns, whether it names one tenant.
    fn body(&mut self) -> (String, Vec<Column>, bool) {
        let (filter, one_tenant) = self.filter();
        if self.rng.gen_bool(0.3) {
            return (format!("SELECT * FROM items{filter}"), self.table.columns.clone(), one_tenant);
        }
        let n = self.rng.gen_range(1..=4);
        let mut outs = Vec::new();
        for c in self.value_columns(n) {
            let mut o = self.output(c);
            if self.rng.gen_bool(0.2) {
                // A char(3) literal is padded as the column's values are:
                // `'a'` beside `'a  '` would be one group, one DISTINCT value,
                // written either way as the rows come.
                let cast = if c.kind == Kind::Char { "::char(3)" } else { "" };
                o.expr = format!("coalesce({}, {}{cast})", c.name, c.kind.value(self.rng));
                o.alias = o.alias.or_else(|| Some(self.next_alias()));
            }
            outs.push(o);
        }
        self.rename_some(&mut outs, &[]);
        if self.rng.gen_bool(0.9) {
            for k in self.key_columns() {
                let at = self.rng.gen_range(0..=outs.len());
                outs.insert(at, k);
            }
        }
        let columns = outs
            .iter()
            .map(|o| {
                let c = o.column.expect("a column");
                Column { name: o.alias.unwrap_or(c.name), kind: c.kind }
            })
            .collect();
        (format!("SELECT {} FROM items{filter}", list(&outs)), columns, one_tenant)
    }

    /// An aggregate of a random column.
    fn aggregate(&mut self) -> Out {
        self.features.insert(Feature::Aggregate);
        let cols = self.table.columns.clone();
        // A derived table may lack columns of a kind: count(*) then.
        let summable: Vec<Column> = cols.iter().copied().filter(|c| c.kind.summable()).collect();
        let ordered: Vec<Column> = cols.iter().copied().filter(|c| c.kind.has_min_max()).collect();
        let out = match self.rng.gen_range(0..5) {
            1 => {
                let c = self.pick(&cols);
                Out { expr: format!("count({})", c.name), alias: None, column: None, loose: false }
            }
            2 | 3 if !summable.is_empty() => {
                let c = self.pick(&summable);
                let f = self.pick(&["sum", "avg"]);
                Out { expr: format!("{f}({})", c.name), alias: None, column: None, loose: false }
            }
            4 if !ordered.is_empty() => {
                let c = self.pick(&ordered);
                let f = self.pick(&["min", "max"]);
                Out { expr: format!("{f}({})", c.name), alias: None, column: None, loose: c.kind.loose() }
            }
            _ => Out { expr: "count(*)".into(), alias: None, column: None, loose: false },
        };
        self.maybe_aliased(out)
    }

    /// `out`, now and then under an alias.
    fn maybe_aliased(&mut self, mut out: Out) -> Out {
        if self.rng.gen_bool(0.3) {
            out.alias = Some(self.next_alias());
        }
        out
    }

    /// A HAVING condition on an aggregate, in the select list or not.
    fn having(&mut self) -> String {
        let ordered: Vec<Column> = self.table.values().into_iter().filter(|c| c.kind.has_min_max()).collect();
        match self.rng.gen_range(0..3) {
            2 if !ordered.is_empty() => {
                let c = self.pick(&ordered);
                let (f, op) = (self.pick(&["min", "max"]), self.pick(&["<", ">=", "<>"]));
                format!("{f}({}) {op} {}", c.name, c.kind.value(self.rng))
            }
            1 => {
                let c = self.pick(&self.table.values());
                format!("count({}) {} {}", c.name, self.pick(&["=", "<", ">="]), self.rng.gen_range(0..3))
            }
            _ => format!("count(*) > {}", self.rng.gen_range(0..3)),
        }
    }

    /// Mostly [`Gen::sorted`] appended to `sql`, now and then the order left
    /// open: whether the order is fixed.
    fn maybe_sorted(&mut self, sql: &mut String, outs: &[Out], ties: &[usize], collate: Collate) -> bool {
        let ordered = self.rng.gen_bool(0.7);
        if ordered {
            *sql += &self.sorted(outs, ties, collate);
        }
        ordered
    }

    /// ORDER BY (see [`Gen::order_by`]), and maybe LIMIT and OFFSET.
    fn sorted(&mut self, outs: &[Out], ties: &[usize], collate: Collate) -> String {
        let order = self.order_by(outs, ties, collate);
        order + &self.limit()
    }

    /// ORDER BY: up to two random outputs, then those at `ties` (which
    /// together single out one row), each in a random direction and NULLS
    /// placement.
    fn order_by(&mut self, outs: &[Out], ties: &[usize], collate: Collate) -> String {
        format!(" ORDER BY {}", self.order_items(outs, ties, collate).join(", "))
    }

    /// The items of [`Gen::order_by`].
    fn order_items(&mut self, outs: &[Out], ties: &[usize], collate: Collate) -> Vec<String> {
        self.features.insert(Feature::OrderBy);
        let mut items: Vec<usize> = Vec::new();
        for _ in 0..self.rng.gen_range(0..=2) {
            let i = self.rng.gen_range(0..outs.len());
            if !items.contains(&i) && !ties.contains(&i) {
                items.push(i);
            }
        }
        let mut ties = ties.to_vec();
        ties.shuffle(self.rng);
        items.extend(ties);
        let sort: Vec<String> = items
            .iter()
            .map(|&i| {
                let by = match outs[i].column {
                    Some(c)
                        if collate == Collate::Allowed
                            && c.kind.is_text()
                            && outs[i].alias.is_none()
                            && self.rng.gen_bool(0.3) =>
                    {
                        self.features.insert(Feature::CollateC);
                        format!("{} COLLATE \"C\"", outs[i].expr)
                    }
                    _ => self.reference(outs, i, Clause::OrderBy),
                };
                format!("{by}{}", self.direction())
            })
            .collect();
        sort
    }

    /// An output column as ORDER BY or GROUP BY names it: by position, by its
    /// alias, by the column's own name, or, for an expression, by writing it
    /// out again (Postgres takes it for that output column).
    fn reference(&mut self, outs: &[Out], i: usize, clause: Clause) -> String {
        let o = &outs[i];
        if self.rng.gen_bool(0.3) {
            return (i + 1).to_string();
        }
        if o.column.is_none() && self.rng.gen_bool(0.5) {
            self.features.insert(match clause {
                Clause::OrderBy => Feature::OrderByExpression,
                Clause::GroupBy => Feature::GroupByExpression,
            });
            return o.expr.clone();
        }
        match (o.alias, o.column) {
            (Some(a), _) => a.to_string(),
            (None, Some(_)) => o.expr.clone(),
            (None, None) => (i + 1).to_string(),
        }
    }

    fn direction(&mut self) -> String {
        let dir = self.pick(&["", " ASC", " DESC"]);
        let nulls = self.pick(&["", "", " NULLS FIRST", " NULLS LAST"]);
        format!("{dir}{nulls}")
    }

    fn limit(&mut self) -> String {
        let (limit, offset) = (self.rng.gen_range(0..15), self.rng.gen_range(0..20));
        let cut = match self.rng.gen_range(0..10) {
            0..=4 => return String::new(),
            5..=7 => format!(" LIMIT {limit}"),
            8 => format!(" LIMIT {limit} OFFSET {offset}"),
            _ => format!(" OFFSET {offset}"),
        };
        self.features.insert(Feature::Limit);
        cut
    }

    /// A WHERE clause (or none), and whether it names one tenant under AND.
    fn filter(&mut self) -> (String, bool) {
        let keyed = self.table.has(Kind::Key) && self.tenants;
        let tenant = match self.rng.gen_range(0..100) {
            0..=19 if keyed => Some((self.one_tenant(), true)),
            20..=27 if keyed => Some((self.some_tenants(), false)),
            _ => None,
        };
        let condition = match self.rng.gen_range(0..10) {
            0..=2 => None,
            _ => {
                self.features.insert(Feature::Filter);
                Some(self.condition(2))
            }
        };
        match (tenant, condition) {
            (None, None) => (String::new(), false),
            (None, Some(c)) => (format!(" WHERE {c}"), false),
            (Some((t, one)), None) => (format!(" WHERE {t}"), one),
            (Some((t, one)), Some(c)) if self.rng.gen_bool(0.5) => (format!(" WHERE {t} AND ({c})"), one),
            (Some((t, one)), Some(c)) => (format!(" WHERE ({c}) AND {t}"), one),
        }
    }

    /// A tenant key: mostly one with rows, now and then one without.
    fn tenant(&mut self) -> String {
        let table = self.table;
        let t = if self.rng.gen_bool(0.9) { self.pick(&table.tenants) } else { self.rng.gen_range(100_000..200_000) };
        if self.rng.gen_bool(0.5) {
            self.params.push(t);
            format!("${}", self.params.len())
        } else {
            t.to_string()
        }
    }

    fn one_tenant(&mut self) -> String {
        self.features.insert(Feature::OneTenant);
        let key = self.tenant();
        format!("{}tenant_id = {key}", self.side)
    }

    /// Two or three tenants, as IN or as OR.
    fn some_tenants(&mut self) -> String {
        self.features.insert(Feature::SomeTenants);
        let n = self.rng.gen_range(2..=3);
        let keys: Vec<String> = (0..n).map(|_| self.tenant()).collect();
        if self.rng.gen_bool(0.5) {
            format!("{}tenant_id IN ({})", self.side, keys.join(", "))
        } else {
            let eq: Vec<String> = keys.iter().map(|k| format!("{}tenant_id = {k}", self.side)).collect();
            format!("({})", eq.join(" OR "))
        }
    }

    /// A condition on the other columns: comparisons, IN, IS NULL, BETWEEN,
    /// under AND, OR and NOT.
    fn condition(&mut self, depth: u32) -> String {
        if depth > 0 && self.rng.gen_bool(0.35) {
            let (a, b) = (self.condition(depth - 1), self.condition(depth - 1));
            return format!("({a} {} {b})", self.pick(&["AND", "OR"]));
        }
        if depth > 0 && self.rng.gen_bool(0.1) {
            return format!("NOT ({})", self.condition(depth - 1));
        }
        let mut cols = self.table.values();
        cols.extend(self.table.columns.iter().copied().find(|c| c.kind == Kind::Id));
        let c = self.pick(&cols);
        let (k, name) = (c.kind, format!("{}{}", self.side, c.name));
        match self.rng.gen_range(0..10) {
            0 => format!("{name} IS NULL"),
            1 => format!("{name} IS NOT NULL"),
            2 if k != Kind::Bool => format!("{name} BETWEEN {} AND {}", k.value(self.rng), k.value(self.rng)),
            3 => format!("{name} IN ({}, {}, {})", k.value(self.rng), k.value(self.rng), k.value(self.rng)),
            _ => {
                let ops: &[&str] = if k == Kind::Bool { &["=", "<>"] } else { &["=", "<>", "<", "<=", ">", ">="] };
                let op = self.pick(ops);
                // An id compared with a parameter: the extended protocol then
                // binds a value the fan-out passes to every shard.
                if k == Kind::Id && self.rng.gen_bool(0.5) {
                    self.params.push(self.rng.gen_range(-1..5));
                    return format!("{name} {op} ${}", self.params.len());
                }
                format!("{name} {op} {}", k.value(self.rng))
            }
        }
    }
}

fn is_key(c: Column) -> bool {
    matches!(c.kind, Kind::Key | Kind::Id)
}

fn list(outs: &[Out]) -> String {
    outs.iter().map(Out::select_item).collect::<Vec<_>>().join(", ")
}

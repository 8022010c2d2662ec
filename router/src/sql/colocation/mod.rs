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

mod build;

pub(crate) use build::expression_children;
pub use build::mixes_rows;
use build::Builder;

use pg_query::protobuf;

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
        let mut b = Builder::new(key_column);
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

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use super::analyze::{analyze_with_origins, comment_key, unquote, Origins};
use super::lift::{ServerForm, SimpleForm};
use super::shape::{literal_text, shape, Piece, PieceKind, Shape};
use super::{Analysis, Inserted, KeyCandidates, KeyExpr, Statement, StatementKind};

/// A bounded map from statement shape to its analysis, shared by all sessions.
///
/// Parsing is the most expensive thing the router does per statement; applications
/// send the same few hundred statements over and over, but often with their
/// constants inlined (`… WHERE aid = 12345`), so the map is keyed on the text's
/// [`shape`](super::shape) — constants and comments taken out — and one analysis
/// serves every text of that shape: its literals (tenant keys among them) are read
/// by position from each execution's own text. A text whose shape the lexer cannot
/// take, or whose analysis holds something it cannot place, is keyed on its exact
/// text as before.
///
/// When the cap is reached the map is cleared — crude, but O(1), and a workload
/// with more distinct shapes than the cap gains little from any eviction policy.
pub struct AnalysisCache {
    key_column: String,
    capacity: usize,
    entries: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    shapes: HashMap<Box<str>, Arc<Template>>,
    texts: HashMap<Arc<str>, Arc<Analysis>>,
}

impl AnalysisCache {
    pub fn new(key_column: impl Into<String>, capacity: usize) -> Self {
        AnalysisCache { key_column: key_column.into(), capacity: capacity.max(1), entries: Mutex::default() }
    }

    /// The analysis of `sql`, parsing it on a miss. A parse error is not cached:
    /// the statement goes to a shard, which reports the error in Postgres's words.
    pub fn get(&self, sql: &str) -> Result<Arc<Analysis>, String> {
        self.lookup(sql, false).map(|(a, _)| a)
    }

    /// [`Self::get`], and the text's prepared form ([`super::lift`]) when its
    /// shape has one the server has not refused.
    pub fn get_simple(&self, sql: &str) -> Result<(Arc<Analysis>, Option<SimpleForm>), String> {
        self.lookup(sql, true)
    }

    fn lookup(&self, sql: &str, want_form: bool) -> Result<(Arc<Analysis>, Option<SimpleForm>), String> {
        let shape = shape(sql);
        if let Some(shape) = &shape {
            let template = self.lock().shapes.get(shape.key.as_str()).cloned();
            if let Some(t) = template {
                let form = |pieces: &[Piece]| {
                    let form = t.form.as_ref().filter(|f| want_form && !f.is_refused())?;
                    Some(SimpleForm { form: form.clone(), values: form.values(sql, pieces)? })
                };
                if *t.source == *sql {
                    return Ok((t.analysis.clone(), form(&t.pieces)));
                }
                if let Some(a) = t.instantiate(sql, &shape.pieces, &self.key_column) {
                    return Ok((Arc::new(a), form(&shape.pieces)));
                }
            }
        }
        if let Some(a) = self.lock().texts.get(sql) {
            return Ok((a.clone(), None));
        }
        let (analysis, origins) = analyze_with_origins(sql, &self.key_column)?;
        let analysis = Arc::new(analysis);
        let template = shape.and_then(|s| Template::new(sql, s, analysis.clone(), &origins, &self.key_column));
        let mut entries = self.lock();
        if entries.shapes.len() + entries.texts.len() >= self.capacity {
            entries.shapes.clear();
            entries.texts.clear();
        }
        match template {
            Some((key, t)) if !entries.shapes.contains_key(key.as_str()) => {
                entries.shapes.insert(key.into_boxed_str(), Arc::new(t));
            }
            _ => {
                entries.texts.insert(Arc::from(sql), analysis.clone());
            }
        }
        // The next execution of the shape gets the form; this one runs as text.
        Ok((analysis, None))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        // A panic while holding the lock cannot leave the maps inconsistent (single
        // insert or clear), so a poisoned lock is still usable.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn len(&self) -> usize {
        let entries = self.lock();
        entries.shapes.len() + entries.texts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The analysis of one text, with what in it came from the text's pieces, so that
/// another text of the same shape gets its own.
struct Template {
    source: Box<str>,
    /// The source's pieces, for placing statement boundaries in another text.
    pieces: Vec<Piece>,
    analysis: Arc<Analysis>,
    statements: Vec<StatementSlots>,
    /// How a text of this shape runs as a prepared statement, if it may.
    form: Option<Arc<ServerForm>>,
}

/// Where a literal of the analysis comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Not a literal, or one that is part of the shape (`SET shardgate.tenant =
    /// acme`): the same for every text of the shape.
    Fixed,
    /// The n-th piece, negated when the parser folded a minus sign into it.
    Piece(usize, bool),
}

struct StatementSlots {
    span: Range<usize>,
    keys: Vec<Slot>,
    rows: Vec<Vec<Slot>>,
    tenant: Slot,
    /// One per key change.
    key_changes: Vec<Slot>,
    /// One per value of an `INSERT … SELECT`'s list.
    insert_select: Vec<Slot>,
}

impl Template {
    /// A template for `sql`'s shape, or None if some literal of the analysis
    /// cannot be placed among the pieces (or a COPY's options may be constants).
    fn new(
        sql: &str,
        shape: Shape,
        analysis: Arc<Analysis>,
        origins: &[Origins],
        key_column: &str,
    ) -> Option<(String, Template)> {
        let has_constants = shape.pieces.iter().any(|p| p.kind != PieceKind::Comment);
        if has_constants && analysis.statements.iter().any(|s| matches!(s.kind, StatementKind::Copy(_))) {
            return None;
        }
        // Nested writes hold literals of their own: keyed on the exact text.
        if analysis.statements.iter().any(|s| !s.nested_writes.is_empty()) {
            return None;
        }
        let slot = |at: Option<usize>| slot_of(sql, &shape.pieces, at);
        let mut statements = Vec::with_capacity(origins.len());
        for (s, o) in analysis.statements.iter().zip(origins) {
            let keys = match &s.keys {
                KeyCandidates::None => Vec::new(),
                KeyCandidates::Any(exprs) => exprs
                    .iter()
                    .zip(&o.keys)
                    .map(|(e, at)| if matches!(e, KeyExpr::Literal(_)) { slot(*at) } else { Some(Slot::Fixed) })
                    .collect::<Option<_>>()?,
            };
            let rows = match &s.insert {
                None => Vec::new(),
                Some(ins) => ins
                    .rows
                    .iter()
                    .zip(&o.rows)
                    .map(|(row, ats)| {
                        row.iter()
                            .zip(ats)
                            .map(|(e, at)| match e {
                                Some(KeyExpr::Literal(_)) => slot(*at),
                                _ => Some(Slot::Fixed),
                            })
                            .collect::<Option<Vec<_>>>()
                    })
                    .collect::<Option<_>>()?,
            };
            let tenant = match &s.kind {
                StatementKind::SetTenant(Some(_)) => slot(o.tenant)?,
                _ => Slot::Fixed,
            };
            let key_changes = s
                .key_changes
                .iter()
                .zip(&o.key_changes)
                .map(|(c, at)| if matches!(c.to, Some(KeyExpr::Literal(_))) { slot(*at) } else { Some(Slot::Fixed) })
                .collect::<Option<_>>()?;
            let insert_select =
                match s.insert_select.as_ref().and_then(|i| i.values.as_ref()) {
                    None => Vec::new(),
                    Some(values) => values
                        .iter()
                        .zip(&o.insert_select)
                        .map(|(v, at)| {
                            if matches!(v, Inserted::Value(KeyExpr::Literal(_))) {
                                slot(*at)
                            } else {
                                Some(Slot::Fixed)
                            }
                        })
                        .collect::<Option<_>>()?,
                };
            statements.push(StatementSlots { span: o.span.clone(), keys, rows, tenant, key_changes, insert_select });
        }
        let form = match (&analysis.statements[..], origins) {
            ([s], [Origins { constants: Some(constants), .. }])
                if matches!(
                    s.kind,
                    StatementKind::Select | StatementKind::Insert | StatementKind::Update | StatementKind::Delete
                ) =>
            {
                let lifted: Vec<(usize, bool)> = constants
                    .iter()
                    .filter_map(|&at| match slot_of(sql, &shape.pieces, Some(at)) {
                        Some(Slot::Piece(i, negated)) => Some((i, negated)),
                        _ => None,
                    })
                    .collect();
                ServerForm::new(sql, &shape.pieces, &lifted).map(Arc::new)
            }
            _ => None,
        };
        let template = Template { source: sql.into(), pieces: shape.pieces, analysis, statements, form };
        // The template must give back the analysis it was made from.
        let again = template.instantiate(sql, &template.pieces, key_column)?;
        (again == *template.analysis).then_some((shape.key, template))
    }

    /// The analysis of `sql`, a text of the same shape with `pieces`. None when a
    /// literal of it cannot be read as the parser would.
    fn instantiate(&self, sql: &str, pieces: &[Piece], key_column: &str) -> Option<Analysis> {
        let literal = |slot: Slot, fixed: &KeyExpr| -> Option<KeyExpr> {
            match slot {
                Slot::Fixed => Some(fixed.clone()),
                Slot::Piece(i, negated) => Some(KeyExpr::Literal(literal_text(sql, pieces.get(i)?, negated)?)),
            }
        };
        let mut statements = Vec::with_capacity(self.statements.len());
        for (s, slots) in self.analysis.statements.iter().zip(&self.statements) {
            let span = self.place(slots.span.start, pieces)?..self.place(slots.span.end, pieces)?;
            let keys = match &s.keys {
                KeyCandidates::None => KeyCandidates::None,
                KeyCandidates::Any(exprs) => KeyCandidates::Any(
                    exprs.iter().zip(&slots.keys).map(|(e, &slot)| literal(slot, e)).collect::<Option<_>>()?,
                ),
            };
            let insert = match &s.insert {
                None => None,
                Some(ins) => {
                    let mut ins = ins.clone();
                    for (row, row_slots) in ins.rows.iter_mut().zip(&slots.rows) {
                        for (e, &slot) in row.iter_mut().zip(row_slots) {
                            if let Some(e) = e {
                                *e = literal(slot, e)?;
                            }
                        }
                    }
                    Some(ins)
                }
            };
            let kind = match (&s.kind, slots.tenant) {
                (StatementKind::SetTenant(Some(_)), Slot::Piece(i, negated)) => {
                    StatementKind::SetTenant(Some(unquote(&literal_text(sql, pieces.get(i)?, negated)?)))
                }
                (kind, _) => kind.clone(),
            };
            let mut key_changes = s.key_changes.clone();
            for (c, &slot) in key_changes.iter_mut().zip(&slots.key_changes) {
                if let Some(to) = &mut c.to {
                    *to = literal(slot, to)?;
                }
            }
            let mut insert_select = s.insert_select.clone();
            if let Some(values) = insert_select.as_mut().and_then(|i| i.values.as_mut()) {
                for (v, &slot) in values.iter_mut().zip(&slots.insert_select) {
                    if let Inserted::Value(e) = v {
                        *e = literal(slot, e)?;
                    }
                }
            }
            statements.push(Statement {
                kind,
                text: sql.get(span).unwrap_or(sql).trim().to_string(),
                keys,
                insert,
                key_changes,
                insert_select,
                shared: s.shared.clone(),
            });
        }
        Some(Analysis { statements, comment_key: comment_key(sql, key_column) })
    }

    /// Where offset `at` of the source (outside any piece) falls in a text of the
    /// same shape with `pieces`: the text between pieces is the same in both.
    fn place(&self, at: usize, pieces: &[Piece]) -> Option<usize> {
        let mut shift = 0isize;
        for (mine, theirs) in self.pieces.iter().zip(pieces) {
            if mine.span.end <= at {
                shift += theirs.span.len() as isize - mine.span.len() as isize;
            } else if mine.span.start < at {
                return None;
            } else {
                break;
            }
        }
        at.checked_add_signed(shift)
    }
}

/// The slot of a literal the parser placed at `at`: a piece that starts there, a
/// number after a minus sign there, or a word of the shape.
fn slot_of(sql: &str, pieces: &[Piece], at: Option<usize>) -> Option<Slot> {
    let at = at?;
    let constant = |p: &Piece| p.kind != PieceKind::Comment;
    if let Some(i) = pieces.iter().position(|p| p.span.start == at) {
        return constant(&pieces[i]).then_some(Slot::Piece(i, false));
    }
    if pieces.iter().any(|p| p.span.contains(&at)) {
        return None;
    }
    let b = sql.as_bytes();
    match *b.get(at)? {
        b'-' => {
            // Only whitespace and comments between the sign and the number.
            let mut i = at + 1;
            loop {
                match pieces.iter().position(|p| p.span.start == i) {
                    Some(n) if pieces[n].kind == PieceKind::Comment => i = pieces[n].span.end,
                    Some(n) if matches!(pieces[n].kind, PieceKind::Integer | PieceKind::Numeric) => {
                        return Some(Slot::Piece(n, true));
                    }
                    Some(_) => return None,
                    None if b.get(i)?.is_ascii_whitespace() => i += 1,
                    None => return None,
                }
            }
        }
        c if c.is_ascii_alphabetic() || c == b'_' || c == b'"' || c >= 0x80 => Some(Slot::Fixed),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{self, Rules, Target};
    use crate::sql::analyze;
    use crate::sql::InsertInfo;
    use shardgate_directory::{Directory, KeyType, Shard};

    fn lit(s: &str) -> KeyExpr {
        KeyExpr::Literal(s.into())
    }

    /// Every text analysed through a warm cache is analysed as from scratch.
    fn same_as_parsed(cache: &AnalysisCache, sql: &str) -> Arc<Analysis> {
        let cached = cache.get(sql).unwrap();
        assert_eq!(*cached, analyze(sql, "tenant_id").unwrap(), "{sql}");
        cached
    }

    #[test]
    fn texts_differing_in_constants_share_one_entry() {
        let cache = AnalysisCache::new("tenant_id", 100);
        for aid in [1, 12345, 7, 2147483647] {
            same_as_parsed(&cache, &format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid};"));
        }
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn literals_come_from_each_execution_text() {
        let cache = AnalysisCache::new("tenant_id", 100);
        let a = same_as_parsed(&cache, "select * from orders where tenant_id = 5 and id = 1");
        assert_eq!(a.statements[0].keys, KeyCandidates::Any(vec![lit("5")]));
        let b = same_as_parsed(&cache, "select * from orders where tenant_id = 77 and id = 2");
        assert_eq!(b.statements[0].keys, KeyCandidates::Any(vec![lit("77")]));
        assert_eq!(b.statements[0].text, "select * from orders where tenant_id = 77 and id = 2");
        let c = same_as_parsed(&cache, "select * from orders where tenant_id = 0012 and id = 3");
        assert_eq!(c.statements[0].keys, KeyCandidates::Any(vec![lit("12")]));
        assert_eq!(cache.len(), 1);
    }

    /// Both texts are analysed as from scratch, through one cache entry.
    fn share_one_entry(a: &str, b: &str) {
        let cache = AnalysisCache::new("tenant_id", 100);
        same_as_parsed(&cache, a);
        same_as_parsed(&cache, b);
        assert_eq!(cache.len(), 1, "{a} / {b}");
    }

    #[test]
    fn negative_cast_escaped_and_dollar_quoted_keys() {
        let q = "select * from orders where tenant_id = ";
        for (a, b) in [
            ("-7", "-8"),
            ("- 8", "- 9"),
            ("-/* c */9", "-/* d */10"),
            ("-2147483648", "-2147483649"),
            ("-0", "-12"),
            ("'1'::bigint", "'2'::bigint"),
            ("bigint '3'", "bigint '4'"),
            ("E'a\\'b'", "E'c\\\\d'"),
            ("E'x\\ty'", "e'\\101\\x42'"),
            ("$$e'f$$", "$x$g$x$"),
            ("'h''i'", "'j'"),
            ("1.5", "2.5e3"),
            ("-1.5", "-2.5e-3"),
            ("99999999999", "2147483648"),
        ] {
            share_one_entry(&format!("{q}{a}"), &format!("{q}{b}"));
        }
        share_one_entry(
            "select * from orders where tenant_id in (1, 2, -3) or tenant_id = 4",
            "select * from orders where tenant_id in (5, 6, -7) or tenant_id = 8",
        );
        share_one_entry(
            "select * from orders where (tenant_id = 1 or tenant_id = 2) and tenant_id = 3",
            "select * from orders where (tenant_id = 4 or tenant_id = 5) and tenant_id = 6",
        );
        let cache = AnalysisCache::new("tenant_id", 100);
        same_as_parsed(&cache, &format!("{q}E'a\\'b'"));
        let a = same_as_parsed(&cache, &format!("{q}E'x\\ty'"));
        assert_eq!(a.statements[0].keys, KeyCandidates::Any(vec![lit("'x\ty'")]));
        // A Unicode escape is left to the parser, the entry stays.
        same_as_parsed(&cache, &format!("{q}E'\\u00e9'"));
    }

    #[test]
    fn several_statements_inserts_and_settings_follow_the_text() {
        let cache = AnalysisCache::new("tenant_id", 100);
        for (a, b) in [
            (
                "begin; update orders set total = 1 where tenant_id = 3; commit",
                "begin; update orders set total = 22 where tenant_id = 456; commit",
            ),
            (
                "insert into orders (tenant_id, id, total) values (1, 10, 5.5), ($1, 11, now())",
                "insert into orders (tenant_id, id, total) values (3, 100, 5.75), ($1, 11111, now())",
            ),
            (
                "insert into orders (tenant_id, id, total) values (-1, 10, 5.5), ($1, 11, now())",
                "insert into orders (tenant_id, id, total) values (-2, 100, 5.75), ($1, 11111, now())",
            ),
            ("set shardgate.tenant = 17", "set shardgate.tenant = 1234"),
            ("set shardgate.tenant = 'acme'", "set shardgate.tenant = 'a''b'"),
            ("SET work_mem = '64MB'", "SET work_mem = '1GB'"),
            ("/* tenant_id=42 */ select * from orders", "/* tenant_id=4321 */ select * from orders"),
            (
                "select * from orders /* tenant_id=44 */ where id = 1; select 2",
                "select * from orders /* tenant_id=5 */ where id = 100; select 3",
            ),
            ("select '/* tenant_id=45 */' from orders", "select '/* tenant_id=46 */' from orders"),
        ] {
            share_one_entry(a, b);
            same_as_parsed(&cache, a);
            same_as_parsed(&cache, b);
        }
        same_as_parsed(&cache, "set shardgate.tenant = acme");
        let a =
            cache.get("insert into orders (tenant_id, id, total) values (-2, 100, 5.75), ($1, 11111, now())").unwrap();
        let Some(InsertInfo { rows, .. }) = &a.statements[0].insert else { panic!() };
        assert_eq!(rows[0][0], Some(lit("-2")));
        assert_eq!(rows[1][0], Some(KeyExpr::Param(0)));
        assert_eq!(cache.get("SET work_mem = '1GB'").unwrap().statements[0].text, "SET work_mem = '1GB'");
    }

    #[test]
    fn copy_with_constants_is_cached_by_its_text() {
        let cache = AnalysisCache::new("tenant_id", 100);
        same_as_parsed(&cache, "copy orders from stdin with (delimiter '|')");
        same_as_parsed(&cache, "copy orders from stdin with (delimiter ',')");
        assert_eq!(cache.len(), 2);
    }

    fn two_shards() -> Directory {
        let shard = |name: &str| Shard::new(name, format!("postgres://u@{name}/db"));
        Directory::new("tenant_id", KeyType::Int, 64, vec![shard("a"), shard("b")]).unwrap()
    }

    #[test]
    fn texts_differing_only_in_the_tenant_route_to_their_shards() {
        let dir = two_shards();
        let catalog = crate::context::Catalog::default();
        catalog
            .replace([("orders".to_string(), vec!["tenant_id".to_string(), "id".to_string()])], ["orders".to_string()]);
        let rules = Rules::default();
        let cache = AnalysisCache::new("tenant_id", 100);
        let route = |sql: &str| {
            let a = cache.get(sql).unwrap();
            route::route(&a.statements[0], None, None, &dir, &catalog, &rules, &mut Vec::new()).unwrap()
        };
        let shard_of = |k: i64| Target::Shard(dir.shard_for(&shardgate_directory::TenantKey::Int(k)));
        let (on_a, on_b) = {
            let mut keys = (1..).map(|k| (k, dir.shard_for(&shardgate_directory::TenantKey::Int(k))));
            let a = keys.find(|(_, s)| *s == 0).unwrap().0;
            let b = keys.find(|(_, s)| *s == 1).unwrap().0;
            (a, b)
        };
        for sql in ["select * from orders where tenant_id = {k}", "update orders set id = 1 where tenant_id = '{k}'"] {
            let first = route(&sql.replace("{k}", &on_a.to_string()));
            let second = route(&sql.replace("{k}", &on_b.to_string()));
            assert_eq!(first, shard_of(on_a), "{sql}");
            assert_eq!(second, shard_of(on_b), "{sql}");
            assert_ne!(first, second);
        }
        assert_eq!(cache.len(), 2, "each shape was parsed once");
    }
}

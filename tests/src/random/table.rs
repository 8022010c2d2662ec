//! The random table: its columns, what a query may do with each, and rows of
//! awkward values (NULLs, ties, extremes, equal values written differently)
//! spread over many tenants.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

/// The kinds of values the table holds; each decides which operations a
/// generated query may apply to a column of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `tenant_id`, the sharding key.
    Key,
    /// `id`: with the key, the primary key, so it breaks every tie.
    Id,
    Int,
    Big,
    Numeric,
    Float,
    /// Text in the database's default collation.
    Text,
    /// Text declared `COLLATE "C"`.
    TextC,
    /// Text in ICU's root collation, where `a` sorts before `B`.
    TextIcu,
    Char,
    Timestamp,
    TimestampTz,
    Date,
    Bool,
}

impl Kind {
    fn sql_type(self) -> &'static str {
        match self {
            Kind::Key | Kind::Id | Kind::Big => "bigint",
            Kind::Int => "int",
            Kind::Numeric => "numeric",
            Kind::Float => "double precision",
            Kind::Text => "text",
            Kind::TextC => "text COLLATE \"C\"",
            Kind::TextIcu => "text COLLATE \"und-x-icu\"",
            Kind::Char => "char(3)",
            Kind::Timestamp => "timestamp",
            Kind::TimestampTz => "timestamptz",
            Kind::Date => "date",
            Kind::Bool => "boolean",
        }
    }

    /// sum() and avg() are exact for it. Floats are left out on purpose:
    /// Postgres adds floats in the order it reads the rows, so one server's
    /// own sum of the same rows changes with their physical order, and no
    /// router could match it bit for bit.
    pub fn summable(self) -> bool {
        matches!(self, Kind::Key | Kind::Id | Kind::Int | Kind::Big | Kind::Numeric)
    }

    /// min() and max() exist for it (not for booleans).
    pub fn has_min_max(self) -> bool {
        self != Kind::Bool
    }

    pub fn is_text(self) -> bool {
        matches!(self, Kind::Text | Kind::TextC | Kind::TextIcu | Kind::Char)
    }

    /// Equal values of this kind can be written differently (`1.5` and
    /// `1.50`, `0` and `-0`), and which of them one server returns for a
    /// group, a DISTINCT value, a min or a max depends on the order it read
    /// the rows in. Such outputs are compared by value.
    pub fn loose(self) -> bool {
        matches!(self, Kind::Numeric | Kind::Float)
    }

    /// Literals of this kind as SQL text, NULL last. Few, so that rows tie.
    pub fn literals(self) -> &'static [&'static str] {
        match self {
            Kind::Key | Kind::Id => &["0", "1", "2", "-3", "NULL"],
            Kind::Int => &["0", "1", "-1", "7", "42", "-2147483648", "2147483647", "NULL"],
            Kind::Big => &["0", "5", "-5", "123456789012", "-9223372036854775808", "9223372036854775807", "NULL"],
            Kind::Numeric => &[
                "1.5",
                "1.50",
                "1.500",
                "-0.0",
                "0",
                "2",
                "2.0",
                "-0.000001",
                "123456789012345678901234567890.123",
                "-99999999999999999999",
                "'NaN'",
                "'Infinity'",
                "'-Infinity'",
                "NULL",
            ],
            Kind::Float => {
                &["0", "'-0'", "1.5", "0.1", "3", "1e308", "-2.5e-300", "'NaN'", "'Infinity'", "'-Infinity'", "NULL"]
            }
            Kind::Text | Kind::TextC | Kind::TextIcu => &[
                "''",
                "'a'",
                "'A'",
                "'ab'",
                "'Ab'",
                "'a '",
                "' a'",
                "'e'",
                "'é'",
                "'E'",
                "'É'",
                "'ß'",
                "'z'",
                "'O''Brien'",
                "'日本'",
                "'😀'",
                "NULL",
            ],
            Kind::Char => &["''", "'a'", "'a  '", "'ab'", "'Ab'", "'é'", "'z'", "NULL"],
            Kind::Timestamp => &[
                "'2026-12-06 10:00:00'",
                "'2026-12-06 10:00:00.5'",
                "'1999-12-31 23:59:59.999999'",
                "'1970-01-01 00:00:00'",
                "'0044-03-15 10:00:00 BC'",
                "'10000-01-01 00:00:00'",
                "'infinity'",
                "'-infinity'",
                "NULL",
            ],
            Kind::TimestampTz => &[
                "'2026-12-06 10:00:00+00'",
                "'2026-12-06 11:00:00+01'",
                "'2026-03-29 01:30:00+00'",
                "'1999-12-31 23:59:59.5-08'",
                "'infinity'",
                "'-infinity'",
                "NULL",
            ],
            Kind::Date => &["'2026-12-06'", "'2000-02-29'", "'9999-12-31'", "'0044-03-15 BC'", "'infinity'", "NULL"],
            Kind::Bool => &["true", "false", "NULL"],
        }
    }

    /// A literal of this kind, not NULL.
    pub fn value(self, rng: &mut StdRng) -> &'static str {
        let l = self.literals();
        l[rng.gen_range(0..l.len() - 1)]
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Column {
    pub name: &'static str,
    pub kind: Kind,
}

/// Every column a table may have; `tenant_id` and `id` always, the rest by
/// chance (the ICU column switches the router's text sorts off, which a
/// table without it must not suffer from).
const COLUMNS: &[Column] = &[
    Column { name: "tenant_id", kind: Kind::Key },
    Column { name: "id", kind: Kind::Id },
    Column { name: "n_int", kind: Kind::Int },
    Column { name: "n_big", kind: Kind::Big },
    Column { name: "amount", kind: Kind::Numeric },
    Column { name: "ratio", kind: Kind::Float },
    Column { name: "name", kind: Kind::Text },
    Column { name: "name_c", kind: Kind::TextC },
    Column { name: "name_icu", kind: Kind::TextIcu },
    Column { name: "code", kind: Kind::Char },
    Column { name: "at", kind: Kind::Timestamp },
    Column { name: "at_tz", kind: Kind::TimestampTz },
    Column { name: "day", kind: Kind::Date },
    Column { name: "flag", kind: Kind::Bool },
];

/// Tenant keys at the edges of bigint, always among the tenants.
const EDGE_TENANTS: &[i64] = &[i64::MIN, -1, 0, 2147483648, i64::MAX];

/// A table named `items` with random columns and rows, the same on the single
/// server and through the router.
pub struct Table {
    pub columns: Vec<Column>,
    /// Every tenant that has rows, and a few that have none.
    pub tenants: Vec<i64>,
    /// Each row's values as SQL literals, in `columns` order.
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn random(rng: &mut StdRng) -> Table {
        let with_icu = rng.gen_bool(0.3);
        let columns: Vec<Column> = COLUMNS
            .iter()
            .copied()
            .filter(|c| match c.kind {
                Kind::Key | Kind::Id => true,
                Kind::TextIcu => with_icu,
                _ => rng.gen_bool(0.8),
            })
            .collect();
        let mut tenants: Vec<i64> = EDGE_TENANTS.to_vec();
        while tenants.len() < 40 {
            let t = rng.gen_range(-1000..100_000);
            if !tenants.contains(&t) {
                tenants.push(t);
            }
        }
        tenants.shuffle(rng);
        let mut rows = Vec::new();
        for &t in &tenants {
            // Some tenants have no rows: a query naming one must still agree.
            for id in 1..=rng.gen_range(0..=6) {
                let row = columns
                    .iter()
                    .map(|c| match c.kind {
                        Kind::Key => t.to_string(),
                        Kind::Id => id.to_string(),
                        // NULL more often than the other literals, so every
                        // column has some.
                        _ if rng.gen_bool(0.12) => "NULL".to_string(),
                        k => k.value(rng).to_string(),
                    })
                    .collect();
                rows.push(row);
            }
        }
        // Rows go in in a random order, not tenant by tenant.
        rows.shuffle(rng);
        Table { columns, tenants, rows }
    }

    pub fn create_sql(&self) -> String {
        let cols: Vec<String> = self.columns.iter().map(|c| format!("{} {}", c.name, c.kind.sql_type())).collect();
        format!("CREATE TABLE items ({}, PRIMARY KEY (tenant_id, id))", cols.join(", "))
    }

    /// INSERT statements of at most 50 rows each (the router splits each by
    /// tenant).
    pub fn insert_sql(&self) -> Vec<String> {
        let names: Vec<&str> = self.columns.iter().map(|c| c.name).collect();
        self.rows
            .chunks(50)
            .map(|chunk| {
                let values: Vec<String> = chunk.iter().map(|r| format!("({})", r.join(", "))).collect();
                format!("INSERT INTO items ({}) VALUES {}", names.join(", "), values.join(", "))
            })
            .collect()
    }

    pub fn has(&self, kind: Kind) -> bool {
        self.columns.iter().any(|c| c.kind == kind)
    }

    /// Columns other than the key and id, the ones queries filter, sort and
    /// group by.
    pub fn values(&self) -> Vec<Column> {
        self.columns.iter().copied().filter(|c| !matches!(c.kind, Kind::Key | Kind::Id)).collect()
    }
}

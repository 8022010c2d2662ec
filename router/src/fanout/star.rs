//! Select lists with `*`: sort keys bound to the columns of the shards'
//! RowDescription.
//!
//! `SELECT * FROM orders ORDER BY total DESC LIMIT 3` sorts by an output column
//! the router cannot number from the statement alone. It is not expanded from
//! the router's table catalog but from the shards' own answer: the catalog is
//! refreshed only after DDL this router forwards (a column added by another
//! router, or straight on a shard, would be missing), and expanding `*` at the
//! router would repeat Postgres's rules for joins (`USING` and `NATURAL` merge
//! columns), column aliases and functions in FROM. The RowDescription is what
//! the shards expanded and what the client receives, so the names matched
//! here are the output column names Postgres itself matches ORDER BY against.

use super::{refuse, ColumnMerge, FanoutError, FullMerge};

/// Where a `*` (or several next to each other) stands in a select list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Star {
    /// How many of the merge's columns come before the `*`.
    pub at: usize,
    /// The table it reads (`t.*`, or `*` over one table): a qualified name
    /// `t.col` in ORDER BY is looked up among its columns only.
    pub table: Option<String>,
    /// Sort keys known by name or position only: their index in the merge's
    /// `order`, and what names them.
    pub named: Vec<(usize, OutputName)>,
    /// How many columns the plan took `*` to stand for (`SELECT DISTINCT t.*`
    /// sorts the shards by each, by position, from the catalog's count).
    pub width: Option<usize>,
    /// GROUP BY keys among the `*` columns: each must be one of them.
    pub group: Vec<OutputName>,
}

/// An output column named in ORDER BY, GROUP BY or DISTINCT ON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputName {
    /// `ORDER BY 3`.
    Position(usize),
    /// `ORDER BY total` or `ORDER BY o.total`.
    Column { table: Option<String>, name: String },
}

impl FullMerge {
    /// This merge with the columns of its `*` in place, from the names of the
    /// shards' columns (their RowDescription). A merge without `*` is itself.
    pub fn bind(&self, names: &[String]) -> Result<FullMerge, FanoutError> {
        let Some(star) = &self.star else { return Ok(self.clone()) };
        let width = names
            .len()
            .checked_sub(self.columns.len())
            .ok_or_else(|| FanoutError::Unsupported("a shard's row description does not fit the select list".into()))?;
        if star.width.is_some_and(|w| w != width) {
            return Err(FanoutError::Unsupported(format!(
                "the shards sent {width} columns for {}.*, the router's catalog knows {}; name the columns",
                star.table.as_deref().unwrap_or_default(),
                star.width.unwrap_or_default()
            )));
        }
        let mut bound = self.clone();
        bound.star = None;
        // The `*` columns are values: when grouped, its GROUP BY keys, and
        // columns that depend on them. The plan allows no hidden columns
        // beside a `*`, so every column is the client's.
        let plain = if self.grouped { ColumnMerge::Dependent } else { ColumnMerge::Key };
        bound.columns.splice(star.at..star.at, std::iter::repeat_n(plain, width));
        bound.visible = names.len();
        for key in bound.order.iter_mut().filter(|k| k.column >= star.at) {
            key.column += width;
        }
        for (i, name) in &star.named {
            bound.order[*i].column = star.resolve(name, names, width)?;
        }
        for name in &star.group {
            let column = &mut bound.columns[star.resolve(name, names, width)?];
            if !matches!(column, ColumnMerge::Key | ColumnMerge::Dependent) {
                return Err(refuse("GROUP BY on expressions that are not plain output columns"));
            }
            *column = ColumnMerge::Key;
        }
        Ok(bound)
    }
}

impl Star {
    /// The column `name` stands for: one output column of that name (as
    /// Postgres matches an ORDER BY name), or of that table's `*`.
    fn resolve(&self, name: &OutputName, names: &[String], width: usize) -> Result<usize, FanoutError> {
        let found: Vec<usize> = match name {
            OutputName::Position(p) => (1..=names.len()).filter(|i| i == p).map(|i| i - 1).collect(),
            OutputName::Column { table: None, name } => (0..names.len()).filter(|&i| names[i] == *name).collect(),
            OutputName::Column { table: Some(t), name } if self.table.as_ref() == Some(t) => {
                (self.at..self.at + width).filter(|&i| names[i] == *name).collect()
            }
            OutputName::Column { .. } => Vec::new(),
        };
        match found[..] {
            [i] => Ok(i),
            [] => Err(refuse(
                "ORDER BY or GROUP BY on expressions that are not output columns (name or number the output column)",
            )),
            _ => Err(refuse("ORDER BY or GROUP BY on a name that several output columns have (name the columns)")),
        }
    }
}

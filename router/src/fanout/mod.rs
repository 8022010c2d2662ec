//! Statements without a tenant key that run on every shard, and merging their results.
//!
//! A read that names no tenant goes to every shard; the shards' answers are merged
//! so that the client gets exactly what one Postgres holding all rows would return:
//! rows concatenated, sorted by ORDER BY (a merge of the shards' sorted results),
//! cut by LIMIT/OFFSET, deduplicated for DISTINCT and DISTINCT ON (adjacent
//! in the merged order), count/sum/min/max/avg combined per GROUP BY group
//! (avg runs on the shards as sum and count, and is divided as Postgres's
//! numeric division does it) and then filtered by HAVING; `UNION ALL` arms all
//! run on each shard. Groups by the sharding key are whole on their tenant's
//! shard, so the shards answer them entirely (any aggregate, HAVING) and the
//! router only sorts and cuts them. `WITH` queries and subqueries in FROM run
//! on each shard over its rows, once the colocation checks
//! (crate::sql::Read) have found that each of their rows is one shard's. What cannot be merged exactly is refused with a clear
//! error, never answered wrong: sums and averages of floating-point values
//! (their order changes the result), window functions, other set operations,
//! sorts on expressions that are not output columns, and text sorts unless the
//! shards use the C collation.
//!
//! Values arrive in the text format (the shards are asked for text in the
//! extended protocol too) and are compared by the column's type from the
//! RowDescription; columns a client asked for in binary are converted at the end
//! ([`in_formats`]) for the types whose binary form follows from the text alone.

mod groups;
mod having;
mod merge;
mod outputs;
mod plan;
mod star;
mod stream;
pub mod value;

pub use having::Filter;
pub use merge::{bound, in_formats, merge, sort_keys, types_of, ClientFormats, Merged, Row, ShardResult};
pub use plan::{plan, FanoutPlan};
pub use star::{OutputName, Star};
pub use stream::{read_shard, Event, Heads, ShardRows, QUEUE};
pub use value::avg_decimal;

/// How shard results combine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MergeSpec {
    /// Rows concatenated, nothing else.
    Concat,
    /// Aggregates, grouping, sorting and limits.
    Full(Box<FullMerge>),
}

impl MergeSpec {
    /// For a merge whose rows can stream (no grouping or aggregates): the sort,
    /// DISTINCT, LIMIT and OFFSET to apply as they pass (nothing, for rows only
    /// concatenated).
    pub fn streamed(&self) -> Option<FullMerge> {
        match self {
            MergeSpec::Concat => Some(FullMerge::default()),
            MergeSpec::Full(f) if !f.grouped => Some((**f).clone()),
            MergeSpec::Full(_) => None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FullMerge {
    /// One entry per column the shards return: the client's columns, then the
    /// aggregates HAVING needs, then the counts that averages need.
    pub columns: Vec<ColumnMerge>,
    /// How many of `columns` the client sees.
    pub visible: usize,
    /// Whether rows are grouped (aggregates present).
    pub grouped: bool,
    pub order: Vec<SortKey>,
    /// Rows equal under the first this many sort keys are one row, the first
    /// in merge order: DISTINCT (every output column is a sort key, so equal
    /// rows come out next to each other) and DISTINCT ON (its expressions lead
    /// the sort).
    pub distinct: Option<usize>,
    /// HAVING, evaluated on the combined groups.
    pub having: Option<Filter>,
    /// The select list has `*`: the columns it stands for are known from the
    /// shards' RowDescription ([`FullMerge::bind`]).
    pub star: Option<Star>,
    pub limit: Option<u64>,
    pub offset: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnMerge {
    /// A plain value (a GROUP BY key when grouped).
    Key,
    /// A column of a `*` grouped by its table's primary key, which it depends
    /// on: the group's first value, never compared (its type need not be one
    /// the router can group by).
    Dependent,
    Count,
    Sum,
    Min,
    Max,
    /// avg(x), which the shards answer as sum(x); the count of x that divides it
    /// is the hidden column at this index.
    Avg(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SortKey {
    pub column: usize,
    pub descending: bool,
    pub nulls_first: bool,
    /// `ORDER BY col COLLATE "C"`: text compares by bytes whatever the
    /// database's collation.
    pub bytewise: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum FanoutError {
    #[error("{0}")]
    Unsupported(String),
    /// The client's messages do not fit the statement (08P01).
    #[error("{0}")]
    Protocol(String),
}

impl FanoutError {
    pub fn sqlstate(&self) -> &'static str {
        match self {
            FanoutError::Unsupported(_) => "0A000",
            FanoutError::Protocol(_) => "08P01",
        }
    }
}

fn refuse(what: &str) -> FanoutError {
    FanoutError::Unsupported(format!(
        "cannot merge {what} across shards; add a tenant_id condition so the query runs on one shard"
    ))
}

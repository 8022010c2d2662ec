//! Statements without a tenant key that run on every shard, and merging their results.
//!
//! This first version merges only what concatenation answers exactly: a plain
//! SELECT with no ORDER BY, LIMIT/OFFSET, DISTINCT, aggregate, GROUP BY, HAVING,
//! window or set operation. Everything else is refused with a clear error rather
//! than answered wrong; sorting, limits and aggregates come next.

use bytes::Bytes;
use pg_query::protobuf::node::Node as N;

/// What to send to each shard and how to merge the answers.
pub struct FanoutPlan {
    pub shard_sql: String,
    pub merge: MergeSpec,
}

/// How shard results combine. Only concatenation so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MergeSpec {
    Concat,
}

#[derive(Debug, thiserror::Error)]
pub enum FanoutError {
    #[error("{0}")]
    Unsupported(String),
}

/// One shard's answer: its RowDescription and DataRow messages, raw.
pub struct ShardResult {
    pub row_description: Bytes,
    pub rows: Vec<Bytes>,
}

pub struct Merged {
    pub row_description: Bytes,
    pub rows: Vec<Bytes>,
    pub command_tag: String,
}

const AGGREGATES: &[&str] = &[
    "count",
    "sum",
    "min",
    "max",
    "avg",
    "array_agg",
    "string_agg",
    "bool_and",
    "bool_or",
    "every",
    "json_agg",
    "jsonb_agg",
    "json_object_agg",
    "jsonb_object_agg",
    "stddev",
    "variance",
];

fn refuse(what: &str) -> FanoutError {
    FanoutError::Unsupported(format!(
        "cannot merge {what} across shards yet; add a tenant_id condition so the query runs on one shard"
    ))
}

/// Plans a SELECT that has no tenant key.
pub fn plan(sql: &str) -> Result<FanoutPlan, FanoutError> {
    let parsed = pg_query::parse(sql, 0).map_err(|e| FanoutError::Unsupported(e.to_string()))?;
    let [raw] = &parsed.protobuf.stmts[..] else {
        return Err(refuse("several statements"));
    };
    let Some(N::SelectStmt(sel)) = raw.stmt.as_deref().and_then(|n| n.node.as_ref()) else {
        return Err(refuse("this kind of statement"));
    };
    if sel.op > 1 {
        return Err(refuse("UNION/INTERSECT/EXCEPT"));
    }
    if !sel.sort_clause.is_empty() {
        return Err(refuse("ORDER BY"));
    }
    if sel.limit_count.is_some() || sel.limit_offset.is_some() {
        return Err(refuse("LIMIT/OFFSET"));
    }
    if !sel.distinct_clause.is_empty() {
        return Err(refuse("DISTINCT"));
    }
    if !sel.group_clause.is_empty() || sel.having_clause.is_some() {
        return Err(refuse("GROUP BY/HAVING"));
    }
    if sel.into_clause.is_some() || !sel.locking_clause.is_empty() {
        return Err(refuse("SELECT INTO or FOR UPDATE"));
    }
    for target in &sel.target_list {
        for (node, _, _, _) in target.node.as_ref().map(|n| n.nodes()).unwrap_or_default() {
            if let pg_query::NodeRef::FuncCall(f) = node {
                if f.over.is_some() {
                    return Err(refuse("window functions"));
                }
                let name = f.funcname.last().and_then(|n| match &n.node {
                    Some(N::String(s)) => Some(s.sval.to_ascii_lowercase()),
                    _ => None,
                });
                if name.is_some_and(|n| AGGREGATES.contains(&n.as_str())) || f.agg_star {
                    return Err(refuse("aggregates"));
                }
            }
        }
    }
    Ok(FanoutPlan { shard_sql: sql.to_string(), merge: MergeSpec::Concat })
}

/// Merges the shards' answers.
pub fn merge(spec: &MergeSpec, results: Vec<ShardResult>) -> Result<Merged, FanoutError> {
    let MergeSpec::Concat = spec;
    let mut it = results.into_iter();
    let first = it.next().ok_or_else(|| FanoutError::Unsupported("no shard answered".into()))?;
    let mut rows = first.rows;
    for r in it {
        rows.extend(r.rows);
    }
    Ok(Merged { command_tag: format!("SELECT {}", rows.len()), row_description: first.row_description, rows })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_selects_concatenate_and_the_rest_is_refused() {
        assert!(plan("select id, total from orders where total > 5").is_ok());
        for sql in [
            "select count(*) from orders",
            "select sum(total) from orders",
            "select * from orders order by id",
            "select * from orders limit 5",
            "select distinct id from orders",
            "select id, count(*) from orders group by id",
            "select row_number() over () from orders",
            "select id from orders union select id from orders",
        ] {
            assert!(plan(sql).is_err(), "{sql} must be refused");
        }
    }
}

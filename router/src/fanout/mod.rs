//! Statements without a tenant key that run on every shard, and merging their results.
//! (Interface stub: being filled in; signatures are fixed.)

use bytes::Bytes;

pub struct FanoutPlan {
    pub shard_sql: String,
    pub merge: MergeSpec,
}

pub struct MergeSpec;

#[derive(Debug, thiserror::Error)]
pub enum FanoutError {
    #[error("{0}")]
    Unsupported(String),
}

pub struct ShardResult {
    pub row_description: Bytes,
    pub rows: Vec<Bytes>,
}

pub struct Merged {
    pub row_description: Bytes,
    pub rows: Vec<Bytes>,
    pub command_tag: String,
}

pub fn plan(sql: &str) -> Result<FanoutPlan, FanoutError> {
    Ok(FanoutPlan {
        shard_sql: sql.to_string(),
        merge: MergeSpec,
    })
}

pub fn merge(_spec: &MergeSpec, results: Vec<ShardResult>) -> Result<Merged, FanoutError> {
    let mut it = results.into_iter();
    let first = it
        .next()
        .ok_or_else(|| FanoutError::Unsupported("no shards".into()))?;
    let mut rows = first.rows;
    for r in it {
        rows.extend(r.rows);
    }
    Ok(Merged {
        command_tag: format!("SELECT {}", rows.len()),
        row_description: first.row_description,
        rows,
    })
}

//! Splitting a multi-row `INSERT … VALUES` whose rows belong to different shards
//! into one INSERT per shard, through the parse tree (never by string surgery).

use pg_query::protobuf::node::Node as N;
use shardgate_directory::ShardId;

use crate::error::SqlError;

/// One INSERT text per shard, keeping only that shard's rows (by index).
pub fn insert_per_shard(sql: &str, parts: &[(ShardId, Vec<usize>)]) -> Result<Vec<(ShardId, String)>, SqlError> {
    let internal = |m: String| SqlError::new("XX000", format!("cannot split the INSERT by shard: {m}"));
    let parsed = pg_query::parse(sql, 0).map_err(|e| internal(e.to_string()))?;
    let mut out = Vec::with_capacity(parts.len());
    for (shard, rows) in parts {
        let mut tree = parsed.protobuf.clone();
        let Some(N::InsertStmt(ins)) =
            tree.stmts.get_mut(0).and_then(|s| s.stmt.as_mut()).and_then(|s| s.node.as_mut())
        else {
            return Err(internal("not an INSERT".into()));
        };
        let Some(N::SelectStmt(sel)) = ins.select_stmt.as_mut().and_then(|s| s.node.as_mut()) else {
            return Err(internal("no VALUES list".into()));
        };
        let all = std::mem::take(&mut sel.values_lists);
        sel.values_lists = all.into_iter().enumerate().filter(|(i, _)| rows.contains(i)).map(|(_, r)| r).collect();
        let text = pg_query::deparse(&tree, Default::default()).map_err(|e| internal(e.to_string()))?;
        out.push((*shard, text));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_go_to_their_shards() {
        let sql = "INSERT INTO orders (tenant_id, id) VALUES (1, 10), (2, 20), (3, 30) RETURNING id";
        let parts = vec![(0, vec![0, 2]), (1, vec![1])];
        let out = insert_per_shard(sql, &parts).unwrap();
        assert_eq!(out[0].1, "INSERT INTO orders (tenant_id, id) VALUES (1, 10), (3, 30) RETURNING id");
        assert_eq!(out[1].1, "INSERT INTO orders (tenant_id, id) VALUES (2, 20) RETURNING id");
    }
}

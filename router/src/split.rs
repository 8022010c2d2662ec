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
        sel.values_lists =
            all.into_iter().enumerate().filter(|(i, _)| rows.binary_search(i).is_ok()).map(|(_, r)| r).collect();
        let text = crate::sql::deparse(&tree).map_err(internal)?;
        out.push((*shard, text));
    }
    Ok(out)
}

/// The RETURNING rows of a split INSERT's parts put back in the order of the
/// statement's VALUES rows, as one Postgres returns them (drivers pair them
/// with the rows they sent: Django's `bulk_create`, Rails' `insert_all`).
/// `rows[p]` are what part `p` of `parts` returned, in the order of its own
/// rows (`parts[p].1`, ascending). A part that returned another number of rows
/// than it inserted (`ON CONFLICT DO NOTHING` skipped some, or a `WHERE` on
/// `DO UPDATE`) gives no way to tell which row is which: the parts' rows then
/// follow one another, each part's in its own order.
pub fn in_values_order<T>(parts: &[(ShardId, Vec<usize>)], rows: Vec<Vec<T>>) -> Vec<T> {
    let n: usize = parts.iter().map(|(_, i)| i.len()).sum();
    let one_each = parts.len() == rows.len()
        && parts.iter().zip(&rows).all(|((_, at), r)| at.len() == r.len() && at.iter().all(|&i| i < n));
    if !one_each {
        return rows.into_iter().flatten().collect();
    }
    let mut slots: Vec<Option<T>> = std::iter::repeat_with(|| None).take(n).collect();
    for ((_, at), r) in parts.iter().zip(rows) {
        for (&i, row) in at.iter().zip(r) {
            slots[i] = Some(row);
        }
    }
    slots.into_iter().flatten().collect()
}

/// A statement with parameters whose text kept some of them (one shard's
/// rows of a multi-row INSERT): the text with its `$n` renumbered from 1, in
/// order, and for each new number the parameter it was (0-based).
pub fn renumber_params(sql: &str) -> Result<(String, Vec<usize>), SqlError> {
    let internal = |m: String| SqlError::new("XX000", format!("cannot renumber the INSERT's parameters: {m}"));
    // The scanner's parameter tokens: every `$n` of the text, wherever it
    // stands (the parse tree's walk misses some, RETURNING's).
    let scanned = pg_query::scan(sql).map_err(|e| internal(e.to_string()))?;
    let mut refs: Vec<(usize, i32)> = Vec::new();
    for t in scanned.tokens.iter().filter(|t| t.token == pg_query::protobuf::Token::Param as i32) {
        let text = sql.get(t.start as usize..t.end as usize).unwrap_or_default();
        let number = text.strip_prefix('$').and_then(|n| n.parse::<i32>().ok()).filter(|n| *n >= 1);
        refs.push((t.start as usize, number.ok_or_else(|| internal(format!("unreadable parameter {text}")))?));
    }
    let mut used: Vec<i32> = refs.iter().map(|r| r.1).collect();
    used.sort_unstable();
    used.dedup();
    refs.sort_unstable_by_key(|r| std::cmp::Reverse(r.0));
    let mut out = sql.to_string();
    for (at, number) in refs {
        let old = format!("${number}");
        if out.get(at..at + old.len()) != Some(old.as_str()) {
            return Err(internal(format!("${number} is not where the parser put it")));
        }
        let new = used.binary_search(&number).map_err(|_| internal("lost a parameter".into()))? + 1;
        out.replace_range(at..at + old.len(), &format!("${new}"));
    }
    Ok((out, used.iter().map(|n| *n as usize - 1).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shards_rows_keep_their_parameters_renumbered() {
        let sql = "INSERT INTO t (tenant_id, v) VALUES ($1, $2), ($3, $4), ($5, $2::text || $12) RETURNING v, $13";
        let parts = vec![(0, vec![0]), (1, vec![1, 2])];
        let out = insert_per_shard(sql, &parts).unwrap();
        let (zero, kept) = renumber_params(&out[0].1).unwrap();
        assert_eq!(zero, "INSERT INTO t (tenant_id, v) VALUES ($1, $2) RETURNING v, $3");
        assert_eq!(kept, [0, 1, 12]);
        let (one, kept) = renumber_params(&out[1].1).unwrap();
        assert_eq!(one, "INSERT INTO t (tenant_id, v) VALUES ($2, $3), ($4, $1::text || $5) RETURNING v, $6");
        assert_eq!(kept, [1, 2, 3, 4, 11, 12]);
    }

    #[test]
    fn rows_go_to_their_shards() {
        let sql = "INSERT INTO orders (tenant_id, id) VALUES (1, 10), (2, 20), (3, 30) RETURNING id";
        let parts = vec![(0, vec![0, 2]), (1, vec![1])];
        let out = insert_per_shard(sql, &parts).unwrap();
        assert_eq!(out[0].1, "INSERT INTO orders (tenant_id, id) VALUES (1, 10), (3, 30) RETURNING id");
        assert_eq!(out[1].1, "INSERT INTO orders (tenant_id, id) VALUES (2, 20) RETURNING id");
    }

    #[test]
    fn returned_rows_come_back_in_values_order_unless_a_part_skipped_some() {
        let parts = vec![(1, vec![1, 3]), (0, vec![0, 2, 4])];
        assert_eq!(in_values_order(&parts, vec![vec!["b", "d"], vec!["a", "c", "e"]]), ["a", "b", "c", "d", "e"]);
        // DO NOTHING skipped a row of the second part: which one is unknown.
        assert_eq!(in_values_order(&parts, vec![vec!["b", "d"], vec!["a", "e"]]), ["b", "d", "a", "e"]);
        // No RETURNING: no rows.
        assert!(in_values_order::<&str>(&parts, vec![vec![], vec![]]).is_empty());
    }
}

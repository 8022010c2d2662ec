//! Which function calls aggregate rows, by name: what decides whether a query
//! computes over many rows (and so over one shard's rows only, when it runs
//! on each shard).

use pg_query::protobuf::{self, node::Node as N, Node};

pub fn funcname(f: &protobuf::FuncCall) -> String {
    f.funcname
        .last()
        .and_then(|n| match &n.node {
            Some(N::String(s)) => Some(s.sval.to_ascii_lowercase()),
            _ => None,
        })
        .unwrap_or_default()
}

/// Postgres 15's aggregates (`pg_proc.prokind = 'a'` in `pg_catalog`), and
/// `any_value` of Postgres 16.
const BUILT_IN: &[&str] = &[
    "any_value",
    "array_agg",
    "avg",
    "bit_and",
    "bit_or",
    "bit_xor",
    "bool_and",
    "bool_or",
    "corr",
    "count",
    "covar_pop",
    "covar_samp",
    "cume_dist",
    "dense_rank",
    "every",
    "json_agg",
    "json_object_agg",
    "jsonb_agg",
    "jsonb_object_agg",
    "max",
    "min",
    "mode",
    "percent_rank",
    "percentile_cont",
    "percentile_disc",
    "range_agg",
    "range_intersect_agg",
    "rank",
    "regr_avgx",
    "regr_avgy",
    "regr_count",
    "regr_intercept",
    "regr_r2",
    "regr_slope",
    "regr_sxx",
    "regr_sxy",
    "regr_syy",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "string_agg",
    "sum",
    "var_pop",
    "var_samp",
    "variance",
    "xmlagg",
];

/// Aggregates the shards define beyond the built-in ones (`CREATE AGGREGATE`),
/// by name, from the last catalog refresh. Process-wide: a name that is an
/// aggregate anywhere is taken as one everywhere, which can only refuse more.
static DEFINED: std::sync::LazyLock<arc_swap::ArcSwap<Vec<String>>> =
    std::sync::LazyLock::new(|| arc_swap::ArcSwap::from_pointee(Vec::new()));

/// Records the aggregates the shards define (their names, lower case).
pub fn set_defined(names: Vec<String>) {
    DEFINED.store(std::sync::Arc::new(names));
}

/// Whether a call to this function (by its unqualified name) aggregates rows.
pub fn is_aggregate(f: &protobuf::FuncCall) -> bool {
    let name = funcname(f);
    f.agg_star || BUILT_IN.binary_search(&name.as_str()).is_ok() || DEFINED.load().contains(&name)
}

/// Whether an aggregate or window function appears anywhere under `n`.
pub fn has_aggregate(n: &Node) -> bool {
    let Some(inner) = &n.node else { return false };
    inner.nodes().into_iter().any(|(r, _, _, _)| match r {
        pg_query::NodeRef::FuncCall(f) => f.over.is_some() || is_aggregate(f),
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_built_in_list_is_sorted_for_its_binary_search() {
        assert!(super::BUILT_IN.windows(2).all(|w| w[0] < w[1]));
    }
}

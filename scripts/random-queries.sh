#!/usr/bin/env bash
# The long form of the randomized differential test
# (tests/tests/random_queries.rs): many seeds, more reads each. CI runs the
# short form (two fixed seeds and one from the clock). Each seed is printed
# before its reads; a failure names the seed and the read, and
# SHARDGATE_RANDOM_SEED=<seed> replays it. Exits non-zero if any batch fails.
#
#   scripts/random-queries.sh                       # 50 seeds from the clock, 2000 reads each
#   SEEDS=200 QUERIES=5000 scripts/random-queries.sh
#   FIRST=1234 SEEDS=10 scripts/random-queries.sh   # seeds 1234 … 1243
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
seeds=${SEEDS:-50}
queries=${QUERIES:-2000}
first=${FIRST:-$(date +%s)}
# Ten seeds per run: one cluster for the batch, and each run well inside the
# long profile's timeout.
failed=0
for start in $(seq "$first" 10 $((first + seeds - 1))); do
    last=$((start + 9 < first + seeds - 1 ? start + 9 : first + seeds - 1))
    echo "== seeds $start … $last, $queries reads each"
    SHARDGATE_RANDOM_SEED=$(seq -s, "$start" "$last") SHARDGATE_RANDOM_QUERIES=$queries \
        cargo nextest run --profile long -p shardgate-tests --test random_queries --success-output final \
        -E 'test(random_reads_match_one_postgres_or_are_refused)' || failed=1
done
if [ "$failed" -ne 0 ]; then
    echo "random queries: a batch failed (its seed and read are above)"
    exit 1
fi
echo "random queries: $seeds seeds from $first passed"

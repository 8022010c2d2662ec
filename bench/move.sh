#!/usr/bin/env bash
# The move benchmark: copy rate beside a plain COPY pipe, the cutover pause
# clients feel with three routers and about 1,000 writes/s on the moving bucket,
# and a hot tenant (about 1,000 writes/s on it) moved with an automatic cutover:
# whether it completes, the statements held per the routers, and the worst write
# beside the same writes before the move.
# Prints a small table; record a run in docs/benchmarks.md.
#
#   bench/move.sh                 # 400,000 rows per bucket
#   MOVE_BENCH_ROWS=1000000 bench/move.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release -p shardgate --test move_bench -- --ignored --nocapture 2>&1 \
    | grep -E '^(MOVE BENCH|copy|load|cutovers|writes|extra|hot) ' || {
        echo "the benchmark failed; run: cargo test --release -p shardgate --test move_bench -- --ignored --nocapture" >&2
        exit 1
    }

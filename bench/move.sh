#!/usr/bin/env bash
# The move benchmark: copy rate beside a plain COPY pipe, and the cutover pause
# clients feel with three routers and about 1,000 writes/s on the moving bucket.
# Prints a small table; record a run in docs/benchmarks.md.
#
#   bench/move.sh                 # 400,000 rows per bucket
#   MOVE_BENCH_ROWS=1000000 bench/move.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release -p shardgate --test move_bench -- --ignored --nocapture 2>&1 \
    | grep -E '^(MOVE BENCH|copy|load|cutovers|writes|extra) ' || {
        echo "the benchmark failed; run: cargo test --release -p shardgate --test move_bench -- --ignored --nocapture" >&2
        exit 1
    }

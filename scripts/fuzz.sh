#!/usr/bin/env bash
# Runs the fuzz targets longer than a test run does: SECS seconds each
# (default 600), then the live-router test for as long. A failure prints the
# input and saves it under target/fuzz-crashes/<target>/ (see docs/fuzzing.md).
#   scripts/fuzz.sh [SECS] [TARGET…]   targets: frames startup sql copy copy_binary values scram live
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-600}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(frames startup sql copy copy_binary values scram live)
export SHARDGATE_FUZZ_SECS="$secs"
# cargo test, not nextest: the nextest profile ends any test after three minutes.
for t in "${targets[@]}"; do
  if [ "$t" = live ]; then
    cargo test -p shardgate-tests --test fuzz_live -- --nocapture
  else
    cargo test -p shardgate-router --lib "fuzz::tests::fuzz_$t" -- --exact --nocapture
  fi
done

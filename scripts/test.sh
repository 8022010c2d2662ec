#!/usr/bin/env bash
# The whole test suite: unit tests and end-to-end tests against real Postgres
# servers that the tests start themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo nextest run --workspace --no-fail-fast "$@"
cargo test --workspace --doc

#!/usr/bin/env bash
# The demo: builds shardgate and runs `shardgate up` (two local Postgres shards and
# a router on 127.0.0.1:6432). Arguments go to `shardgate up` (e.g. --shards 3).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release -p shardgate
exec target/release/shardgate up "$@"

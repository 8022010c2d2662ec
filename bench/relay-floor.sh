#!/usr/bin/env bash
# The floor under any proxy on this machine: a 64-byte request/response over
# loopback TCP, straight and through a relay that only copies bytes, once for each
# way a relay can wait for its sockets (epoll as pgbouncer and tokio do, io_uring
# with the send and the next receive in one system call, blocking threads, a busy
# poller). Interleaved rounds; prints the median round trip of each and what the
# relay adds. No Postgres involved: this is what the kernel and the machine charge
# for one extra hop, which no proxy can beat by its own code
# (docs/benchmarks.md, "the floor under a proxy").
#
#   bench/relay-floor.sh              # 7 rounds x 20,000 round trips: about a minute
#   bench/relay-floor.sh 11 50000     # ROUNDS ROUND_TRIPS
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/relay-floor}
echo "building bench/relay-floor (cargo build --release)" >&2
cargo build --release --quiet --manifest-path bench/relay-floor/Cargo.toml
exec "$CARGO_TARGET_DIR/release/relay-floor" run "${1:-7}" "${2:-20000}"

#!/usr/bin/env bash
# Router memory during a large cross-shard read, side by side in one run: the
# router's peak resident memory (VmHWM) after loading the rows, then after a
# client reads them all across the shards, with and without ORDER BY, in the
# simple protocol and in the extended protocol (what most drivers use). A
# streamed read holds a few hundred rows in the router whatever the result's
# size, so the numbers stay close; a read gathered whole adds about the
# result's size.
#
#   bench/fanout-memory.sh                        # 500,000 rows of ~210 bytes
#   ROWS=2000000 bench/fanout-memory.sh
#   SHARDGATE=target/debug/shardgate bench/fanout-memory.sh
#
# Starts a scratch cluster with `shardgate up` (2 shards) in a temp dir on
# ports 16432/16433, and removes it on exit. Needs psql, pgbench and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${ROWS:-500000}
BIN=${SHARDGATE:-target/release/shardgate}
if [ -z "${SHARDGATE:-}" ]; then
  cargo build --release -q -p shardgate
fi
DIR=$(mktemp -d /tmp/shardgate-fanout-memory.XXXXXX)
chmod 755 "$DIR" # Postgres runs as the postgres user when started by root
UP=
cleanup() {
  if [ -n "$UP" ]; then kill -TERM "$UP" 2>/dev/null || true; wait "$UP" 2>/dev/null || true; fi
  rm -rf "$DIR"
}
trap cleanup EXIT
"$BIN" up --data-dir "$DIR/cluster" --port 16432 --admin-port 16433 >"$DIR/up.log" 2>&1 &
UP=$!
for _ in $(seq 1 240); do
  grep -q '^ready:' "$DIR/up.log" && break
  kill -0 "$UP" 2>/dev/null || break
  sleep 0.5
done
grep -q '^ready:' "$DIR/up.log" || { echo "shardgate up did not become ready:"; cat "$DIR/up.log"; exit 1; }
URL="postgres://postgres@127.0.0.1:16432/app"
psql -qX "$URL" -c "CREATE TABLE big (tenant_id bigint, id bigint, pad text)"
python3 - "$ROWS" <<'PY' | psql -qX "$URL" -c "COPY big FROM STDIN"
import sys
pad = "x" * 200
out = sys.stdout.write
for i in range(1, int(sys.argv[1]) + 1):
    out(f"{i % 1000}\t{i}\t{pad}\n")
PY
size=$(psql -qXtA "$URL" -c "SELECT sum(length(pad) + 16) FROM big")
echo "SELECT tenant_id, id, pad FROM big ORDER BY id;" >"$DIR/ordered.sql"
echo "SELECT tenant_id, id, pad FROM big WHERE id > 0;" >"$DIR/plain.sql"
peak() { awk '/VmHWM/ {print $2}' "/proc/$UP/status"; }
read_all() { # MODE SCRIPT
  pgbench -n -M "$1" -t 1 -f "$DIR/$2.sql" "$URL" >"$DIR/$1-$2.log" 2>&1 || { cat "$DIR/$1-$2.log"; exit 1; }
  peak
}
loaded=$(peak)
simple_ordered=$(read_all simple ordered)
simple_plain=$(read_all simple plain)
extended_ordered=$(read_all extended ordered)
extended_plain=$(read_all extended plain)
mb() { echo $(($1 / 1024)); }
printf '%-44s %12s\n' "rows read (2 shards)" "$ROWS"
printf '%-44s %9d MB\n' "result size (values)" $((size / 1000000))
echo "router peak RSS (VmHWM, cumulative):"
printf '%-44s %9d MB\n' "  after the load" "$(mb "$loaded")"
printf '%-44s %9d MB\n' "  + simple protocol, ORDER BY id" "$(mb "$simple_ordered")"
printf '%-44s %9d MB\n' "  + simple protocol, no ORDER BY" "$(mb "$simple_plain")"
printf '%-44s %9d MB\n' "  + extended protocol, ORDER BY id" "$(mb "$extended_ordered")"
printf '%-44s %9d MB\n' "  + extended protocol, no ORDER BY" "$(mb "$extended_plain")"
printf '%-44s %12s\n' "peak after extended / after simple" "$(python3 -c "print(f'{$extended_plain / $simple_plain:.2f}x')")"

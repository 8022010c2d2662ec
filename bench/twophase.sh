#!/usr/bin/env bash
# Cross-shard transactions, side by side in one run: a pgbench transfer between
# two tenants on different shards (two-phase commit: PREPARE, the decision,
# COMMIT PREPARED) beside the same transfer between two tenants on one shard
# (one-phase commit), through one shardgate over two shards (`shardgate up`).
#
# Tenants 1..TENANTS/2 are pinned to shard_0 and the rest to shard_1, so a
# pgbench script picks its pair by arithmetic. Each transfer updates the lower
# tenant first: no deadlock in either script (a deadlock across shards is not
# detected; see docs/transactions.md).
#
# Machines here are noisy, so the two scripts are interleaved: every round runs
# each (mode, clients) cell for both, in an order that alternates from round to
# round, and the table shows per-cell medians and the ratio measured in this
# same run. Compare ratios, never absolute numbers from another run.
#
#   bench/twophase.sh                               # 3 rounds x 5 s per run: about 3 minutes
#   ROUNDS=5 SECONDS_PER_RUN=10 bench/twophase.sh   # longer, steadier
#   BIN=/path/to/shardgate bench/twophase.sh        # a build of your own
#
# Needs root or the postgres OS user; builds target/release/shardgate. Every
# process and temp dir it starts is removed on exit, Ctrl-C included.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
T=${SECONDS_PER_RUN:-5}
TENANTS=${TENANTS:-400}
MODES=(simple prepared)
CLIENTS=(1 16)
HALF=$((TENANTS / 2))

scripts/install-deps.sh --bench >/dev/null
if [ -z "${BIN:-}" ]; then
  echo "building shardgate (cargo build --release -p shardgate)" >&2
  cargo build --release -q -p shardgate
  BIN=$PWD/target/release/shardgate
fi

work=$(mktemp -d /tmp/shardgate-2pc.XXXXXX)
chmod 755 "$work"
up_pid=""
cleanup() {
  set +e
  trap - EXIT INT TERM
  if [ -n "$up_pid" ]; then
    kill "$up_pid" 2>/dev/null
    wait "$up_pid" 2>/dev/null
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT
trap 'exit 143' TERM
die() { echo "twophase.sh: $*" >&2; exit 1; }

read -r SG_PORT ADMIN_PORT < <(python3 -c '
import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(*(x.getsockname()[1] for x in s))')

echo "starting shardgate up (2 shards)" >&2
"$BIN" up --data-dir "$work/data" --port "$SG_PORT" --admin-port "$ADMIN_PORT" >"$work/up.log" 2>&1 &
up_pid=$!
for _ in $(seq 240); do
  grep -q '^ready:' "$work/up.log" && break
  kill -0 "$up_pid" 2>/dev/null || { cat "$work/up.log" >&2; die "shardgate up exited"; }
  sleep 0.5
done
grep -q '^ready:' "$work/up.log" || { cat "$work/up.log" >&2; die "shardgate up did not get ready"; }
URL="postgres://postgres@127.0.0.1:$SG_PORT/app"
sg() { "$BIN" --data-dir "$work/data" "$@"; }

echo "pinning $TENANTS tenants: 1..$HALF on shard_0, the rest on shard_1" >&2
for t in $(seq 1 "$TENANTS"); do
  if [ "$t" -le "$HALF" ]; then s=shard_0; else s=shard_1; fi
  sg tenant pin "$t" --to "$s" >/dev/null || die "could not pin tenant $t"
done
psql -q -v ON_ERROR_STOP=1 "$URL" -c \
  "CREATE TABLE acct (tenant_id bigint, id int, bal bigint NOT NULL, PRIMARY KEY (tenant_id, id))"
values=$(seq 1 "$TENANTS" | sed 's/.*/(&, 1, 1000)/' | paste -sd, -)
psql -q -v ON_ERROR_STOP=1 "$URL" -c "INSERT INTO acct VALUES $values"

cat >"$work/same.sql" <<EOF
\set a random(1, $HALF)
\set b random(1, $HALF)
\set lo least(:a, :b)
\set hi greatest(:a, :b)
BEGIN;
UPDATE acct SET bal = bal - 1 WHERE tenant_id = :lo AND id = 1;
UPDATE acct SET bal = bal + 1 WHERE tenant_id = :hi AND id = 1;
COMMIT;
EOF
cat >"$work/cross.sql" <<EOF
\set lo random(1, $HALF)
\set hi random($((HALF + 1)), $TENANTS)
BEGIN;
UPDATE acct SET bal = bal - 1 WHERE tenant_id = :lo AND id = 1;
UPDATE acct SET bal = bal + 1 WHERE tenant_id = :hi AND id = 1;
COMMIT;
EOF

# One pgbench run; prints "ok <tps> <latency ms>" or "FAIL <first error line>".
run() {
  local script=$1 mode=$2 clients=$3 j out
  j=$((clients < 2 ? clients : 2))
  out=$(timeout --foreground $((T + 60)) pgbench -n -f "$work/$script.sql" -M "$mode" -c "$clients" -j "$j" -T "$T" \
    "$URL" 2>&1) || { echo "FAIL $(echo "$out" | grep -m1 -i error)"; return; }
  local tps lat
  tps=$(echo "$out" | awk '/^tps = / { print $3; exit }')
  lat=$(echo "$out" | awk '/^latency average = / { print $4; exit }')
  [ -n "$tps" ] && echo "ok $tps $lat" || echo "FAIL no tps in pgbench output"
}

raw="$work/raw.tsv"
printf 'round\tscript\tmode\tclients\ttps\tlatency_ms\n' >"$raw"
for round in $(seq 1 "$ROUNDS"); do
  for mode in "${MODES[@]}"; do
    for clients in "${CLIENTS[@]}"; do
      if [ $((round % 2)) = 1 ]; then order=(same cross); else order=(cross same); fi
      for script in "${order[@]}"; do
        read -r status a b < <(run "$script" "$mode" "$clients")
        [ "$status" = ok ] || die "round $round $script $mode $clients: $a $b"
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$script" "$mode" "$clients" "$a" "$b" >>"$raw"
        echo "round $round/$ROUNDS  $script  -M $mode  -c $clients: $a tps, $b ms" >&2
      done
    done
  done
done

left=0
# Each shard's URL from the SQL console (no password in it: `up` trusts loopback).
for shard_url in $(psql -At -F ' ' "postgres://postgres@127.0.0.1:$SG_PORT/shardgate" -c "SHOW SHARDS" | awk '{ print $2 }'); do
  n=$(psql -At "$shard_url" -c "SELECT count(*) FROM pg_prepared_xacts") || die "cannot ask $shard_url"
  left=$((left + n))
done
total=$(psql -At "$URL" -c "SELECT sum(bal) FROM acct")

python3 - "$raw" "$ROUNDS" "$T" "$TENANTS" "$total" "$((TENANTS * 1000))" "$left" <<'EOF'
import csv, statistics, sys
raw, rounds, secs, tenants, total, want, left = sys.argv[1:]
rows = list(csv.DictReader(open(raw), delimiter="\t"))
cells = {}
for r in rows:
    cells.setdefault((r["mode"], int(r["clients"]), r["script"]), []).append((float(r["tps"]), float(r["latency_ms"])))
print(f"Transfers between two tenants: same shard (one-phase) vs different shards (two-phase), "
      f"{rounds} rounds x {secs} s, {tenants} tenants, medians of this run")
print()
print("| mode | clients | same-shard TPS | cross-shard TPS | ratio | same-shard latency ms | cross-shard latency ms | added ms |")
print("|---|---|---|---|---|---|---|---|")
for mode in ("simple", "prepared"):
    for clients in (1, 16):
        s = cells.get((mode, clients, "same"), [])
        c = cells.get((mode, clients, "cross"), [])
        if not s or not c:
            continue
        st, sl = statistics.median(x for x, _ in s), statistics.median(y for _, y in s)
        ct, cl = statistics.median(x for x, _ in c), statistics.median(y for _, y in c)
        print(f"| {mode} | {clients} | {st:.0f} | {ct:.0f} | {ct / st:.2f} | {sl:.3f} | {cl:.3f} | {cl - sl:+.3f} |")
print()
print(f"money: {total} (expected {want}); prepared transactions left on the shards: {left}")
if total != want or left != "0":
    sys.exit("twophase.sh: the books do not balance or something was left prepared")
EOF

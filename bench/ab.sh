#!/usr/bin/env bash
# Two shardgate builds side by side in one run: pgbench select-only (-S) through
# each, in front of the same Postgres, rounds interleaved (A then B, B then A,
# …), and the median over the rounds of each build's TPS and their ratio. For a
# change that should not cost throughput (a refactor): the machines here are too
# noisy to compare runs of bench/proxy.sh taken minutes apart.
#
# Each build's CPU per transaction is measured too: its process's utime+stime
# (/proc/PID/stat) around each of its runs, divided by the transactions, and
# the table shows the medians ("us/tx") and their ratio.
#
#   bench/ab.sh OLD_BINARY NEW_BINARY                  # 8 rounds x 4 s per cell
#   ROUNDS=12 SECONDS_PER_RUN=5 bench/ab.sh old new
#   CELLS="simple:1 simple:16 prepared:1" bench/ab.sh old new
#   WORKLOAD=tenant bench/ab.sh old new                # tenant-keyed lookups, 2 shards
#
# WORKLOAD=tenant routes by tenant over two shards (two databases of the one
# Postgres, each holding every row of a table t of 10,000 tenants, so any shard
# answers alike): `SELECT v FROM t WHERE tenant_id = :t AND id = 1`, the query
# of bench/cpu.sh. The default, pgbench -S on pgbench_accounts (no tenant_id),
# is a reference-table read to the one shard.
#
# Build the old binary from a worktree of the old commit, e.g.
#   git worktree add /tmp/old COMMIT && (cd /tmp/old && cargo build --release -p shardgate)
#
# Needs root or the postgres OS user, like bench/proxy.sh; removes everything it
# started on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 2 ] || { echo "usage: bench/ab.sh OLD_BINARY NEW_BINARY" >&2; exit 2; }
A=$(readlink -f "$1")
B=$(readlink -f "$2")
[ -x "$A" ] && [ -x "$B" ] || { echo "ab.sh: both arguments must be shardgate binaries" >&2; exit 2; }
ROUNDS=${ROUNDS:-8}
T=${SECONDS_PER_RUN:-4}
CELLS=${CELLS:-"simple:1 simple:16 extended:1 extended:16 prepared:1 prepared:16"}
WORKLOAD=${WORKLOAD:-pgbench}
HZ=$(getconf CLK_TCK)
export PGSSLMODE=disable
PGBIN=/usr/lib/postgresql/15/bin
[ -x "$PGBIN/initdb" ] || PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)

work=$(mktemp -d /tmp/shardgate-ab.XXXXXX)
chmod 755 "$work"
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" != 0 ] || chown postgres "$work"
pids=()
pg_started=""
cleanup() {
  set +e
  trap - EXIT INT TERM
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  [ -z "$pg_started" ] || as_pg "$PGBIN/pg_ctl" -D "$work/pg" -m immediate -w stop >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

read -r PG_PORT A_PORT B_PORT A_ADMIN B_ADMIN < <(python3 -c '
import socket
s = [socket.socket() for _ in range(5)]
for x in s: x.bind(("127.0.0.1", 0))
print(*(x.getsockname()[1] for x in s))')

as_pg "$PGBIN/initdb" -D "$work/pg" -U postgres -A trust --locale C -E UTF8 >/dev/null
pg_started=1
as_pg "$PGBIN/pg_ctl" -D "$work/pg" -l "$work/pg.log" -w -o "-p $PG_PORT -k $work \
  -c listen_addresses=127.0.0.1 -c max_connections=200 -c shared_buffers=256MB" start >/dev/null
psql -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -c 'CREATE DATABASE app' >/dev/null
pgbench -i -q -s 10 -h 127.0.0.1 -p "$PG_PORT" -U postgres app >"$work/init.log" 2>&1
second_shard=""
if [ "$WORKLOAD" = tenant ]; then
  psql -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -c 'CREATE DATABASE app1' >/dev/null
  for db in app app1; do
    psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres "$db" -c \
      "CREATE TABLE t (tenant_id bigint, id int, v text NOT NULL, PRIMARY KEY (tenant_id, id));
       INSERT INTO t SELECT g, 1, 'v' || g FROM generate_series(1, 10000) g" >/dev/null
  done
  second_shard="[[shards]]
name = \"s1\"
url = \"postgres://postgres@127.0.0.1:$PG_PORT/app1\""
  printf '\\set t random(1, 10000)\nSELECT v FROM t WHERE tenant_id = :t AND id = 1;\n' >"$work/tenant.sql"
fi

start_router() { # name binary port admin_port
  cat >"$work/$1.toml" <<TOML
[router]
listen = "127.0.0.1:$3"
[router.pool]
size = 20
[admin]
listen = "127.0.0.1:$4"
[[shards]]
name = "s0"
url = "postgres://postgres@127.0.0.1:$PG_PORT/app"
$second_shard
TOML
  SHARDGATE_LOG=warn "$2" serve --config "$work/$1.toml" >"$work/$1.out" 2>"$work/$1.log" &
  pids+=($!)
  eval "${1}_pid=\$!"
  for _ in $(seq 1 150); do
    psql -X -q -h 127.0.0.1 -p "$3" -U postgres app -c 'SELECT 1' >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  cat "$work/$1.log" >&2
  echo "ab.sh: the $1 build does not answer" >&2
  exit 1
}
start_router old "$A" "$A_PORT" "$A_ADMIN"
start_router new "$B" "$B_PORT" "$B_ADMIN"

# One run: prints "<tps> <CPU us per transaction of the router>".
tps() { # port mode clients pid
  local j=$(( $3 < 2 ? $3 : 2 )) out c0 c1 what=(-S)
  [ "$WORKLOAD" != tenant ] || what=(-f "$work/tenant.sql")
  c0=$(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$4/stat")
  out=$(pgbench -n "${what[@]}" -M "$2" -c "$3" -j "$j" -T "$T" -h 127.0.0.1 -p "$1" -U postgres app 2>/dev/null)
  c1=$(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$4/stat")
  awk -v t="$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p' <<<"$out")" \
    -v n="$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")" \
    -v c=$((c1 - c0)) -v hz="$HZ" 'BEGIN { if (t == "" || n + 0 == 0) print "0 0"; else printf "%s %.2f\n", t, c * 1e6 / hz / n }'
}
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

for cell in $CELLS; do
  tps "$A_PORT" "${cell%%:*}" "${cell##*:}" "$old_pid" >/dev/null
  tps "$B_PORT" "${cell%%:*}" "${cell##*:}" "$new_pid" >/dev/null
done
printf '%s, %s rounds x %ss, workload %s, load %s, old %s, new %s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')" "$ROUNDS" "$T" \
  "$WORKLOAD" "$(cut -d' ' -f1-3 /proc/loadavg)" "$A" "$B"
printf '%-9s %3s | %9s %9s | %7s %-38s | %9s %9s %7s\n' mode c old new new/old "(per-round new/old: median, quartiles)" \
  "old us/tx" "new us/tx" new/old
for cell in $CELLS; do
  mode=${cell%%:*}; c=${cell##*:}
  : >"$work/a"; : >"$work/b"; : >"$work/r"; : >"$work/ca"; : >"$work/cb"
  for r in $(seq 1 "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then read -r a ca < <(tps "$A_PORT" "$mode" "$c" "$old_pid"); read -r b cb < <(tps "$B_PORT" "$mode" "$c" "$new_pid")
    else read -r b cb < <(tps "$B_PORT" "$mode" "$c" "$new_pid"); read -r a ca < <(tps "$A_PORT" "$mode" "$c" "$old_pid"); fi
    echo "${a:-0}" >>"$work/a"; echo "${b:-0}" >>"$work/b"; echo "${ca:-0}" >>"$work/ca"; echo "${cb:-0}" >>"$work/cb"
    awk -v a="${a:-0}" -v b="${b:-0}" 'BEGIN { if (a > 0) printf "%.4f\n", b / a }' >>"$work/r"
  done
  ma=$(median <"$work/a"); mb=$(median <"$work/b"); mca=$(median <"$work/ca"); mcb=$(median <"$work/cb")
  q=$(sort -g "$work/r" | awk '{a[NR]=$1} END {printf "%.3f (%.3f-%.3f)", a[int((NR+1)/2)], a[int(NR/4)+1], a[int(3*NR/4)+(NR%4?1:0)]}')
  printf '%-9s %3s | %9.0f %9.0f | %6.3fx %-38s | %9.1f %9.1f %6.3fx\n' "$mode" "$c" "$ma" "$mb" \
    "$(awk -v a="$ma" -v b="$mb" 'BEGIN{print b/a}')" "$q" "$mca" "$mcb" "$(awk -v a="$mca" -v b="$mcb" 'BEGIN{print (a > 0 ? b/a : 0)}')"
done

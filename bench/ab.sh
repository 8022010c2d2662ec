#!/usr/bin/env bash
# Two shardgate builds side by side in one run: pgbench select-only (-S) through
# each, in front of the same Postgres, rounds interleaved (A then B, B then A,
# …), and the median over the rounds of each build's TPS and their ratio. For a
# change that should not cost throughput (a refactor): the machines here are too
# noisy to compare runs of bench/proxy.sh taken minutes apart.
#
#   bench/ab.sh OLD_BINARY NEW_BINARY                  # 8 rounds x 4 s per cell
#   ROUNDS=12 SECONDS_PER_RUN=5 bench/ab.sh old new
#   CELLS="simple:1 simple:16 prepared:1" bench/ab.sh old new
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
TOML
  SHARDGATE_LOG=warn "$2" serve --config "$work/$1.toml" >"$work/$1.out" 2>"$work/$1.log" &
  pids+=($!)
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

tps() { # port mode clients
  local j=$(( $3 < 2 ? $3 : 2 ))
  pgbench -n -S -M "$2" -c "$3" -j "$j" -T "$T" -h 127.0.0.1 -p "$1" -U postgres app 2>/dev/null \
    | sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p'
}
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

for cell in $CELLS; do tps "$A_PORT" "${cell%%:*}" "${cell##*:}" >/dev/null; tps "$B_PORT" "${cell%%:*}" "${cell##*:}" >/dev/null; done
printf '%s, %s rounds x %ss, old %s, new %s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')" "$ROUNDS" "$T" "$A" "$B"
printf '%-9s %3s | %9s %9s | %7s %s\n' mode c old new new/old "(per-round new/old: median, quartiles)"
for cell in $CELLS; do
  mode=${cell%%:*}; c=${cell##*:}
  : >"$work/a"; : >"$work/b"; : >"$work/r"
  for r in $(seq 1 "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then a=$(tps "$A_PORT" "$mode" "$c"); b=$(tps "$B_PORT" "$mode" "$c")
    else b=$(tps "$B_PORT" "$mode" "$c"); a=$(tps "$A_PORT" "$mode" "$c"); fi
    echo "${a:-0}" >>"$work/a"; echo "${b:-0}" >>"$work/b"
    awk -v a="${a:-0}" -v b="${b:-0}" 'BEGIN { if (a > 0) printf "%.4f\n", b / a }' >>"$work/r"
  done
  ma=$(median <"$work/a"); mb=$(median <"$work/b")
  q=$(sort -g "$work/r" | awk '{a[NR]=$1} END {printf "%.3f (%.3f-%.3f)", a[int((NR+1)/2)], a[int(NR/4)+1], a[int(3*NR/4)+(NR%4?1:0)]}')
  printf '%-9s %3s | %9.0f %9.0f | %6.3fx %s\n' "$mode" "$c" "$ma" "$mb" "$(awk -v a="$ma" -v b="$mb" 'BEGIN{print b/a}')" "$q"
done

#!/usr/bin/env bash
# Many clients on one router, beside pgbouncer in the same run: IDLE client
# connections are opened and left idle (connect rate, and the memory the proxy
# process gained per idle client: VmRSS after minus before, divided by the
# clients), then ACTIVE of them each run QUERIES tenant lookups at once (p50,
# p99 and worst latency, queries per second). One Postgres holds the table;
# shardgate routes to it as its one shard, pgbouncer pools to it in
# transaction mode; both with 20 server connections. The client (bench/
# clients.py) speaks the protocol itself, so 10,000 connections cost it little.
#
#   bench/clients.sh                              # 10,000 idle, 1,000 active, 2 rounds
#   IDLE=2000 ACTIVE=200 ROUNDS=1 bench/clients.sh  # a quick look
#
# Raises the open-file limit (root). Needs root or the postgres OS user; builds
# target/release/shardgate; removes every process and temp dir it starts.
set -euo pipefail
cd "$(dirname "$0")/.."
IDLE=${IDLE:-10000}
ACTIVE=${ACTIVE:-1000}
QUERIES=${QUERIES:-20}
ROUNDS=${ROUNDS:-2}
TENANTS=${TENANTS:-10000}
ulimit -n $((IDLE * 2 + 1000)) 2>/dev/null || ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -gt $((IDLE + 200)) ] || { echo "clients.sh: the open-file limit ($(ulimit -n)) is below IDLE=$IDLE; raise it (root) or lower IDLE" >&2; exit 1; }

scripts/install-deps.sh --bench >/dev/null
echo "building shardgate (cargo build --release -p shardgate)" >&2
cargo build --release -q -p shardgate
BIN=$PWD/target/release/shardgate
PGBIN=/usr/lib/postgresql/15/bin
[ -x "$PGBIN/initdb" ] || PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
PGBOUNCER=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)

# ----- processes and cleanup ----------------------------------------------------
work=$(mktemp -d /tmp/shardgate-bench.XXXXXX)
chmod 755 "$work"
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" != 0 ] || chown postgres "$work"
sg_pid=""
bouncer_pid=""
pg_started=""
cleanup() {
  set +e
  trap - EXIT INT TERM
  [ -z "$sg_pid" ] || kill "$sg_pid" 2>/dev/null
  # pgbouncer's own pid (from its pidfile), then the runuser wrapper around it.
  [ ! -s "$work/pgbouncer.pid" ] || kill "$(cat "$work/pgbouncer.pid")" 2>/dev/null
  [ -z "$bouncer_pid" ] || kill "$bouncer_pid" 2>/dev/null
  [ -z "$pg_started" ] || as_pg "$PGBIN/pg_ctl" -D "$work/pg" -m immediate -w stop >/dev/null 2>&1
  for p in $sg_pid $bouncer_pid; do wait "$p" 2>/dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT
trap 'exit 143' TERM

die() { echo "clients.sh: $*" >&2; exit 1; }

# Distinct free loopback ports, all held open at once so none is handed out twice.
read -r PG_PORT BOUNCER_PORT SG_PORT ADMIN_PORT < <(python3 -c '
import socket
s = [socket.socket() for _ in range(4)]
for x in s: x.bind(("127.0.0.1", 0))
print(*(x.getsockname()[1] for x in s))')

# ----- Postgres -------------------------------------------------------------------
as_pg "$PGBIN/initdb" -D "$work/pg" -U postgres -A trust --locale C -E UTF8 >/dev/null
pg_started=1
as_pg "$PGBIN/pg_ctl" -D "$work/pg" -l "$work/pg.log" -w -o "-p $PG_PORT -k $work \
  -c listen_addresses=127.0.0.1 -c max_connections=200 -c shared_buffers=256MB" start >/dev/null
psql -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -c 'CREATE DATABASE app' >/dev/null
psql -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres app -c \
  "CREATE TABLE t (tenant_id bigint PRIMARY KEY, v int); INSERT INTO t SELECT g, g FROM generate_series(1, $TENANTS) g" >/dev/null

# ----- pgbouncer --------------------------------------------------------------------
cat >"$work/pgbouncer.ini" <<INI
[databases]
app = host=127.0.0.1 port=$PG_PORT dbname=app user=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = trust
auth_file = $work/userlist.txt
pool_mode = transaction
default_pool_size = 20
max_client_conn = $((IDLE + 200))
logfile = $work/pgbouncer.log
pidfile = $work/pgbouncer.pid
INI
echo '"postgres" ""' >"$work/userlist.txt"
# Not through runuser, whose session limits would lower the open-file limit
# pgbouncer inherits: setpriv keeps this shell's.
if [ "$(id -u)" = 0 ]; then
  setpriv --reuid=postgres --regid=postgres --init-groups "$PGBOUNCER" -q "$work/pgbouncer.ini" &
else
  "$PGBOUNCER" -q "$work/pgbouncer.ini" &
fi
bouncer_pid=$!

# ----- shardgate ------------------------------------------------------------------
cat >"$work/shardgate.toml" <<TOML
[router]
listen = "127.0.0.1:$SG_PORT"

max_client_connections = $((IDLE + 200))

[router.pool]
size = 20

[admin]
listen = "127.0.0.1:$ADMIN_PORT"

[[shards]]
name = "s0"
url = "postgres://postgres@127.0.0.1:$PG_PORT/app"
TOML
SHARDGATE_LOG=warn "$BIN" serve --config "$work/shardgate.toml" >"$work/sg.out" 2>"$work/sg.log" &
sg_pid=$!
for _ in $(seq 1 150); do
  grep -q '^ready:' "$work/sg.out" 2>/dev/null && break
  kill -0 "$sg_pid" 2>/dev/null || { cat "$work/sg.log" >&2; die "shardgate exited"; }
  sleep 0.1
done
grep -q '^ready:' "$work/sg.out" || { cat "$work/sg.log" >&2; die "shardgate never printed ready:"; }

port_of() { case $1 in direct) echo "$PG_PORT" ;; pgbouncer) echo "$BOUNCER_PORT" ;; shardgate) echo "$SG_PORT" ;; esac; }
for target in pgbouncer shardgate; do
  ok=""
  for _ in $(seq 1 100); do
    if psql -X -q -h 127.0.0.1 -p "$(port_of $target)" -U postgres app -c 'SELECT 1' >/dev/null 2>&1; then ok=1; break; fi
    sleep 0.1
  done
  [ -n "$ok" ] || die "$target does not answer on port $(port_of $target)"
done

# ----- runs -------------------------------------------------------------------------
# pgbouncer's own process (not the runuser wrapper) and shardgate's.
bouncer_proc=$(cat "$work/pgbouncer.pid")
declare -A results
for round in $(seq 1 "$ROUNDS"); do
  order=(pgbouncer shardgate)
  [ $((round % 2)) = 0 ] && order=(shardgate pgbouncer)
  for target in "${order[@]}"; do
    if [ "$target" = pgbouncer ]; then port=$BOUNCER_PORT; pid=$bouncer_proc; else port=$SG_PORT; pid=$sg_pid; fi
    echo "round $round: $target, $IDLE clients" >&2
    line=$(python3 bench/clients.py "$port" "$pid" "$IDLE" "$ACTIVE" "$QUERIES" "$TENANTS")
    echo "  $line" >&2
    results[$target,$round]=$line
  done
done

field() { sed -n "s/.*\b$2=\([0-9.]*\).*/\1/p" <<<"${results[$1]}"; }
echo
echo "| round | target | clients | connects/s | kB per idle client | queries/s | p50 ms | p99 ms | max ms |"
echo "|---|---|---|---|---|---|---|---|---|"
for round in $(seq 1 "$ROUNDS"); do
  for target in pgbouncer shardgate; do
    k="$target,$round"
    echo "| $round | $target | $(field "$k" clients) | $(field "$k" connect_per_s) | $(field "$k" kb_per_idle_client) | $(field "$k" qps) | $(field "$k" p50_ms) | $(field "$k" p99_ms) | $(field "$k" max_ms) |"
  done
done

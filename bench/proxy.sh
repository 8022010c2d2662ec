#!/usr/bin/env bash
# Proxy overhead, side by side in one run: pgbench select-only straight to Postgres,
# through pgbouncer (transaction pooling) and through shardgate (one shard, the same
# Postgres), for -M simple/extended/prepared at 1 and 16 clients. The three targets
# are interleaved round by round; the table shows medians and ratios measured in
# this same run (machines here are noisy: compare ratios, not absolute numbers).
#
#   bench/proxy.sh                 # defaults: 3 rounds of 5 s per cell
#   ROUNDS=5 SECONDS_PER_RUN=10 bench/proxy.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
T=${SECONDS_PER_RUN:-5}
scripts/install-deps.sh --bench >/dev/null
cargo build --release -q -p shardgate
BIN=$PWD/target/release/shardgate
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
PGBOUNCER=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)

work=$(mktemp -d /tmp/shardgate-bench.XXXXXX)
chmod 755 "$work"
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  as_pg "$PGBIN/pg_ctl" -D "$work/pg" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM
[ "$(id -u)" = 0 ] && chown postgres "$work"

PG_PORT=$(free_port); BOUNCER_PORT=$(free_port); SG_PORT=$(free_port); ADMIN_PORT=$(free_port)
as_pg "$PGBIN/initdb" -D "$work/pg" -U postgres -A trust --locale C -E UTF8 >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$work/pg" -l "$work/pg.log" -w \
  -o "-p $PG_PORT -k $work -c listen_addresses=127.0.0.1 -c max_connections=200 -c shared_buffers=128MB" start >/dev/null
as_pg "$PGBIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres app
pgbench -q -i -s 10 -h 127.0.0.1 -p "$PG_PORT" -U postgres app >/dev/null 2>&1

cat > "$work/pgbouncer.ini" <<INI
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
max_client_conn = 200
logfile = $work/pgbouncer.log
INI
echo '"postgres" ""' > "$work/userlist.txt"
[ "$(id -u)" = 0 ] && chown postgres "$work"/pgbouncer.ini "$work"/userlist.txt
as_pg "$PGBOUNCER" -q "$work/pgbouncer.ini" & pids+=($!)

cat > "$work/shardgate.toml" <<TOML
[router]
listen = "127.0.0.1:$SG_PORT"
[router.pool]
size = 20
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
[[shards]]
name = "s0"
url = "postgres://postgres@127.0.0.1:$PG_PORT/app"
TOML
SHARDGATE_LOG=warn "$BIN" serve --config "$work/shardgate.toml" > "$work/sg.out" 2> "$work/sg.log" & pids+=($!)
for _ in $(seq 1 100); do grep -q ready "$work/sg.out" 2>/dev/null && break; sleep 0.1; done
for port in $BOUNCER_PORT $SG_PORT; do
  for _ in $(seq 1 100); do psql -X -q -h 127.0.0.1 -p "$port" -U postgres app -c 'select 1' >/dev/null 2>&1 && break; sleep 0.1; done
done

declare -A TPS LAT
run() { # target port mode clients -> "tps lat" or "FAIL"
  local out j
  j=$(( $3 < 2 ? $3 : 2 ))
  if out=$(pgbench -n -S -M "$2" -c "$3" -j "$j" -T "$T" -h 127.0.0.1 -p "$1" -U postgres app 2>&1) \
     && grep -q "number of failed transactions: 0" <<<"$out"; then
    echo "$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p' <<<"$out") \
$(sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' <<<"$out")"
  else
    echo FAIL
  fi
}
median() { sort -n | awk '{a[NR]=$1} END {if (NR==0) print "FAIL"; else if (NR%2) print a[(NR+1)/2]; else printf "%.3f\n", (a[NR/2]+a[NR/2+1])/2}'; }

for round in $(seq 1 "$ROUNDS"); do
  for mode in simple extended prepared; do
    for clients in 1 16; do
      for target in direct pgbouncer shardgate; do
        case $target in direct) port=$PG_PORT;; pgbouncer) port=$BOUNCER_PORT;; shardgate) port=$SG_PORT;; esac
        r=$(run "$port" "$mode" "$clients")
        key="$target/$mode/$clients"
        if [ "$r" = FAIL ]; then TPS[$key]+=""; LAT[$key]+=""; else
          TPS[$key]+="${r%% *}"$'\n'; LAT[$key]+="${r##* }"$'\n'; fi
      done
    done
  done
  echo "round $round/$ROUNDS done" >&2
done

echo
echo "pgbench -S, ${ROUNDS} rounds x ${T}s per cell, medians; $(nproc) cores; $(date -u +%F)"
printf '%-9s %-7s | %12s %12s %12s | %9s %9s | %10s %10s %10s | %s\n' \
  mode clients "direct tps" "pgbouncer" "shardgate" "sg/pgb" "sg/direct" "lat direct" "lat pgb" "lat sg" "sg added µs"
for mode in simple extended prepared; do
  for clients in 1 16; do
    d=$(printf '%s' "${TPS[direct/$mode/$clients]:-}" | median)
    b=$(printf '%s' "${TPS[pgbouncer/$mode/$clients]:-}" | median)
    s=$(printf '%s' "${TPS[shardgate/$mode/$clients]:-}" | median)
    ld=$(printf '%s' "${LAT[direct/$mode/$clients]:-}" | median)
    lb=$(printf '%s' "${LAT[pgbouncer/$mode/$clients]:-}" | median)
    ls=$(printf '%s' "${LAT[shardgate/$mode/$clients]:-}" | median)
    ratio() { if [ "$1" = FAIL ] || [ "$2" = FAIL ]; then echo "-"; else awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a/b}'; fi; }
    added=$( [ "$ls" = FAIL ] || [ "$ld" = FAIL ] && echo "-" || awk -v s="$ls" -v d="$ld" 'BEGIN{printf "%.0f", (s-d)*1000}')
    printf '%-9s %-7s | %12s %12s %12s | %9s %9s | %10s %10s %10s | %s\n' \
      "$mode" "$clients" "$d" "$b" "$s" "$(ratio "$s" "$b")" "$(ratio "$s" "$d")" "$ld" "$lb" "$ls" "$added"
  done
done

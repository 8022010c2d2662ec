#!/usr/bin/env bash
# CPU per transaction while routing, beside pgbouncer, in one interleaved run.
#
# `shardgate up --shards 2` (two local Postgres servers, one router) with a table
# `t` of TENANTS tenants spread over both shards by the directory; pgbench runs
# a tenant-keyed lookup through the router:
#
#   \set t random(1, TENANTS)
#   SELECT v FROM t WHERE tenant_id = :t AND id = 1;
#
# Beside it, the same lookup on one database on shard_0's Postgres that holds
# every row (`flat`): straight to it ("direct") and through pgbouncer in
# transaction mode (pool 20). For each round, every (mode, clients) cell runs on
# the three targets back to back, the order rotating from round to round. Around
# each run through a proxy, the proxy process's utime+stime (/proc/PID/stat, all
# its threads) is read, and the table shows the medians of
#   CPU µs per transaction = (utime + stime delta) / transactions
# beside TPS and latency. The router's process is the whole `shardgate up`
# (router and its three in-process directory replicas); Postgres runs in other
# processes and is not counted.
#
# With FLOOR=1, a fourth target "floor" joins the rotation: `relay-floor
# tokio-relay` (bench/relay-floor), shardgate's session-thread model doing no
# work (a listener thread, one current-thread tokio runtime with only I/O per
# core, each client on the least-loaded one, one fresh upstream connection per
# client, bytes copied both ways), in front of the same `flat` database,
# measured like pgbouncer. A second table gives its TPS, CPU µs per transaction
# and shardgate's ratios to it: what the runtime model alone costs.
#
# pgbouncer 1.18 cannot run `-M prepared` in transaction mode (`prepared
# statement "P_0" already exists`; `max_prepared_statements` came in 1.21): if
# the installed pgbouncer has no such setting, its prepared cells show n/a.
#
#   bench/cpu.sh                                 # 3 rounds x 5 s per run: about 5 minutes
#   ROUNDS=5 SECONDS_PER_RUN=10 bench/cpu.sh     # steadier
#   BIN=/path/to/shardgate bench/cpu.sh          # another build (default: builds target/release)
#   RESULTS=/tmp/raw.tsv bench/cpu.sh            # also keep every run's numbers
#   FLOOR=1 bench/cpu.sh                         # also the floor relay: about 6-7 minutes
#
# Needs root or the postgres OS user, like bench/proxy.sh. Ratios within one run
# only: the machines are shared and noisy.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
T=${SECONDS_PER_RUN:-5}
TENANTS=${TENANTS:-10000}
MODES=(${MODES:-simple extended prepared})
CLIENTS=(${CLIENTS:-1 16})
TARGETS=(direct pgbouncer shardgate)
[ "${FLOOR:-0}" = 0 ] || TARGETS+=(floor)
# Every target in the clear, as pgbouncer serves here: `shardgate up` offers TLS,
# and libpq's default (prefer) would take it through the router only.
export PGSSLMODE=${SSLMODE:-disable}

if [ -z "${BIN:-}" ]; then
  scripts/install-deps.sh --bench >/dev/null
  echo "building shardgate (cargo build --release -p shardgate)" >&2
  cargo build --release -q -p shardgate
  BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/shardgate
fi
BIN=$(readlink -f "$BIN")
if [ "${FLOOR:-0}" != 0 ]; then
  # As bench/relay-floor.sh builds it: release, a target directory of its own.
  echo "building bench/relay-floor (cargo build --release)" >&2
  CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/relay-floor} \
    cargo build --release --quiet --manifest-path bench/relay-floor/Cargo.toml
  RELAY=${CARGO_TARGET_DIR:-$PWD/target/relay-floor}/release/relay-floor
fi
PGBOUNCER=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
HZ=$(getconf CLK_TCK)

work=$(mktemp -d /tmp/shardgate-cpu.XXXXXX)
chmod 755 "$work"
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
up_pid=""
bouncer_pid=""
floor_pid=""
cleanup() {
  set +e
  trap - EXIT INT TERM
  [ ! -s "$work/pgbouncer.pid" ] || kill "$(cat "$work/pgbouncer.pid")" 2>/dev/null
  [ -z "$bouncer_pid" ] || { kill "$bouncer_pid" 2>/dev/null; wait "$bouncer_pid" 2>/dev/null; }
  [ -z "$floor_pid" ] || { kill "$floor_pid" 2>/dev/null; wait "$floor_pid" 2>/dev/null; }
  [ -z "$up_pid" ] || { kill "$up_pid" 2>/dev/null; wait "$up_pid" 2>/dev/null; }
  rm -rf "$work"
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT
trap 'exit 143' TERM
die() { echo "cpu.sh: $*" >&2; exit 1; }

read -r SG_PORT ADMIN_PORT BOUNCER_PORT FLOOR_PORT < <(python3 -c '
import socket
s = [socket.socket() for _ in range(4)]
for x in s: x.bind(("127.0.0.1", 0))
print(*(x.getsockname()[1] for x in s))')

echo "starting shardgate up (2 shards)" >&2
SHARDGATE_LOG=warn "$BIN" up --data-dir "$work/data" --shards 2 --port "$SG_PORT" --admin-port "$ADMIN_PORT" \
  >"$work/up.log" 2>&1 &
up_pid=$!
for _ in $(seq 240); do
  grep -q '^ready:' "$work/up.log" && break
  kill -0 "$up_pid" 2>/dev/null || { cat "$work/up.log" >&2; die "shardgate up exited"; }
  sleep 0.5
done
grep -q '^ready:' "$work/up.log" || { cat "$work/up.log" >&2; die "shardgate up did not get ready"; }
URL="postgres://postgres@127.0.0.1:$SG_PORT/app"
SHARD0=$(psql -X -At -F ' ' "postgres://postgres@127.0.0.1:$SG_PORT/shardgate" -c "SHOW SHARDS" | awk 'NR == 1 { print $2 }')
[ -n "$SHARD0" ] || die "no shard in SHOW SHARDS"
PG_HOST=$(python3 -c 'import sys, urllib.parse as u; p = u.urlparse(sys.argv[1]); print(p.hostname, p.port)' "$SHARD0")
read -r PG_HOST PG_PORT <<<"$PG_HOST"

echo "loading $TENANTS tenants (through the router) and the flat copy on shard_0" >&2
psql -X -q -v ON_ERROR_STOP=1 "$URL" -c \
  "CREATE TABLE t (tenant_id bigint, id int, v text NOT NULL, PRIMARY KEY (tenant_id, id))"
for lo in $(seq 1 1000 "$TENANTS"); do
  hi=$((lo + 999 < TENANTS ? lo + 999 : TENANTS))
  values=$(seq "$lo" "$hi" | sed 's/.*/(&, 1, '"'"'v&'"'"')/' | paste -sd, -)
  psql -X -q -v ON_ERROR_STOP=1 "$URL" -c "INSERT INTO t VALUES $values" >/dev/null
done
n=$(psql -X -At "$URL" -c "SELECT count(*) FROM t")
[ "$n" = "$TENANTS" ] || die "the router counts $n rows in t, not $TENANTS"
psql -X -q -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -c 'CREATE DATABASE flat' >/dev/null
psql -X -q -v ON_ERROR_STOP=1 -h "$PG_HOST" -p "$PG_PORT" -U postgres flat -c \
  "CREATE TABLE t (tenant_id bigint, id int, v text NOT NULL, PRIMARY KEY (tenant_id, id));
   INSERT INTO t SELECT g, 1, 'v' || g FROM generate_series(1, $TENANTS) g"
psql -X -q -h "$PG_HOST" -p "$PG_PORT" -U postgres flat -c 'VACUUM ANALYZE t'

cat >"$work/pgbouncer.ini" <<INI
[databases]
flat = host=$PG_HOST port=$PG_PORT dbname=flat user=postgres
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
pidfile = $work/pgbouncer.pid
INI
BOUNCER_PREPARED=""
if "$PGBOUNCER" --help 2>&1 | grep -q max_prepared_statements || strings "$PGBOUNCER" | grep -q '^max_prepared_statements$'; then
  echo "max_prepared_statements = 200" >>"$work/pgbouncer.ini"
  BOUNCER_PREPARED=1
fi
echo '"postgres" ""' >"$work/userlist.txt"
chmod 644 "$work"/pgbouncer.ini "$work"/userlist.txt
[ "$(id -u)" != 0 ] || chown postgres "$work"
as_pg "$PGBOUNCER" -q "$work/pgbouncer.ini" &
bouncer_pid=$!
for _ in $(seq 100); do
  psql -X -q -h 127.0.0.1 -p "$BOUNCER_PORT" -U postgres flat -c 'SELECT 1' >/dev/null 2>&1 && break
  sleep 0.1
done
[ -s "$work/pgbouncer.pid" ] || die "pgbouncer did not start"
BOUNCER_PROC=$(cat "$work/pgbouncer.pid")

if [ "${FLOOR:-0}" != 0 ]; then
  "$RELAY" tokio-relay "127.0.0.1:$FLOOR_PORT" "$PG_HOST:$PG_PORT" &
  floor_pid=$!
  for _ in $(seq 100); do
    psql -X -q -h 127.0.0.1 -p "$FLOOR_PORT" -U postgres flat -c 'SELECT 1' >/dev/null 2>&1 && break
    sleep 0.1
  done
  psql -X -q -h 127.0.0.1 -p "$FLOOR_PORT" -U postgres flat -c 'SELECT 1' >/dev/null || die "the floor relay did not start"
fi

cat >"$work/lookup.sql" <<EOF
\set t random(1, $TENANTS)
SELECT v FROM t WHERE tenant_id = :t AND id = 1;
EOF

conn_of() {
  case $1 in
    direct) echo "-h $PG_HOST -p $PG_PORT -U postgres flat" ;;
    pgbouncer) echo "-h 127.0.0.1 -p $BOUNCER_PORT -U postgres flat" ;;
    shardgate) echo "-h 127.0.0.1 -p $SG_PORT -U postgres app" ;;
    floor) echo "-h 127.0.0.1 -p $FLOOR_PORT -U postgres flat" ;;
  esac
}
pid_of() { case $1 in pgbouncer) echo "$BOUNCER_PROC" ;; shardgate) echo "$up_pid" ;; floor) echo "$floor_pid" ;; *) echo "" ;; esac; }
# utime and stime of a process in clock ticks (all its threads).
cpu_ticks() { [ -z "$1" ] && echo "0 0" || awk '{ sub(/^.*\) /, ""); print $12, $13 }' "/proc/$1/stat"; }

# One pgbench run; prints "ok <tps> <latency ms> <transactions> <user ticks> <system ticks>" or "FAIL <error>".
run() { # target mode clients seconds
  local out j=$(($3 < 2 ? $3 : 2)) tps lat n u0 s0 u1 s1 err pid
  pid=$(pid_of "$1")
  read -r u0 s0 <<<"$(cpu_ticks "$pid")"
  # shellcheck disable=SC2046
  out=$(timeout --foreground $(($4 + 60)) pgbench -n -f "$work/lookup.sql" -M "$2" -c "$3" -j "$j" -T "$4" \
    $(conn_of "$1") 2>&1) || true
  read -r u1 s1 <<<"$(cpu_ticks "$pid")"
  tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)$/\1/p' <<<"$out")
  lat=$(sed -n 's/^latency average = \([0-9.]*\) ms$/\1/p' <<<"$out")
  n=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*$/\1/p' <<<"$out")
  if [ -n "$tps" ] && [ -n "$lat" ] && [ -n "$n" ] && grep -q '^number of failed transactions: 0 ' <<<"$out" \
    && ! grep -qi 'aborted' <<<"$out"; then
    echo "ok $tps $lat $n $((u1 - u0)) $((s1 - s0))"
  else
    err=$(grep -m1 -iE 'error|fatal|aborted|timeout' <<<"$out" || true)
    echo "FAIL ${err:-$(head -c 200 <<<"$out" | tr '\n' ' ')}"
  fi
}

echo "warm-up" >&2
for mode in "${MODES[@]}"; do
  for target in "${TARGETS[@]}"; do run "$target" "$mode" 16 1 >/dev/null; done
done

raw=$work/raw.tsv
printf 'round\ttarget\tmode\tclients\tstatus\ttps\tlatency_ms\ttransactions\tcpu_us_per_tx\tuser_us_per_tx\terror\n' >"$raw"
start=$SECONDS
for round in $(seq 1 "$ROUNDS"); do
  for mode in "${MODES[@]}"; do
    for clients in "${CLIENTS[@]}"; do
      for k in "${!TARGETS[@]}"; do
        target=${TARGETS[$(((k + round) % ${#TARGETS[@]}))]}
        if [ "$target" = pgbouncer ] && [ "$mode" = prepared ] && [ -z "$BOUNCER_PREPARED" ]; then
          printf '%s\t%s\t%s\t%s\tNA\t\t\t\t\t\t%s\n' "$round" "$target" "$mode" "$clients" \
            "pgbouncer $("$PGBOUNCER" --version | head -1 | awk '{ print $2 }') has no max_prepared_statements" >>"$raw"
          continue
        fi
        read -r status a b n ut st <<<"$(run "$target" "$mode" "$clients" "$T")"
        if [ "$status" = ok ]; then
          us=$(awk -v u="$ut" -v s="$st" -v n="$n" -v hz="$HZ" -v p="$(pid_of "$target")" \
            'BEGIN { if (p == "") print "\t"; else printf "%.2f\t%.2f", (u + s) * 1e6 / hz / n, u * 1e6 / hz / n }')
          printf '%s\t%s\t%s\t%s\tok\t%s\t%s\t%s\t%s\t\n' "$round" "$target" "$mode" "$clients" "$a" "$b" "$n" "$us" >>"$raw"
        else
          printf '%s\t%s\t%s\t%s\tFAIL\t\t\t\t\t\t%s\n' "$round" "$target" "$mode" "$clients" "$a $b $n $ut $st" >>"$raw"
        fi
      done
    done
  done
  echo "round $round/$ROUNDS done ($((SECONDS - start)) s)" >&2
done
kill -0 "$up_pid" 2>/dev/null || echo "WARNING: shardgate exited during the run" >&2
[ -z "$floor_pid" ] || kill -0 "$floor_pid" 2>/dev/null || echo "WARNING: the floor relay exited during the run" >&2
[ -z "${RESULTS:-}" ] || cp "$raw" "$RESULTS"

echo
echo "tenant lookup over 2 shards ($TENANTS tenants), $ROUNDS rounds x ${T}s per run, medians; $(nproc) cores," \
  "load $(cut -d' ' -f1-3 /proc/loadavg); $(date -u '+%F %H:%M UTC'); $BIN;" \
  "$("$PGBOUNCER" --version | head -1)"
python3 - "$raw" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
cells, notes = {}, {}
for r in rows:
    k = (r["target"], r["mode"], int(r["clients"]))
    c = cells.setdefault(k, {"tps": [], "lat": [], "cpu": [], "user": [], "fail": 0, "na": 0})
    if r["status"] == "ok":
        c["tps"].append(float(r["tps"])); c["lat"].append(float(r["latency_ms"]))
        if r["cpu_us_per_tx"]:
            c["cpu"].append(float(r["cpu_us_per_tx"])); c["user"].append(float(r["user_us_per_tx"]))
    else:
        c["fail" if r["status"] == "FAIL" else "na"] += 1
        notes.setdefault(k, r["error"])
def med(k, f):
    c = cells.get(k)
    if not c or c["fail"] or c["na"] or not c[f]:
        return None
    return statistics.median(c[f])
def show(k, f, fmt):
    c = cells.get(k)
    if c and c["na"]: return "n/a"
    if c and c["fail"]: return f"FAIL({c['fail']})"
    v = med(k, f)
    return "-" if v is None else fmt % v
def ratio(a, b):
    return "-" if a is None or b is None or b == 0 else "%.2f" % (a / b)
hdr = ("mode", "c", "direct", "pgb", "sg", "sg/pgb", "sg/dir", "pgb us/tx", "sg us/tx", "sg/pgb cpu", "pgb user", "sg user", "added us sg", "added us pgb")
print("%-8s %3s | %7s %7s %7s | %6s %6s | %9s %8s %10s | %8s %7s | %11s %12s" % hdr)
modes = [m for m in ("simple", "extended", "prepared") if any(k[1] == m for k in cells)]
clients = sorted({k[2] for k in cells})
res = {}
for m in modes:
    for c in clients:
        d, p, s = ("direct", m, c), ("pgbouncer", m, c), ("shardgate", m, c)
        added = lambda x: "-" if med(x, "lat") is None or med(d, "lat") is None else "%.0f" % ((med(x, "lat") - med(d, "lat")) * 1000)
        print("%-8s %3s | %7s %7s %7s | %6s %6s | %9s %8s %10s | %8s %7s | %11s %12s" % (
            m, c, show(d, "tps", "%.0f"), show(p, "tps", "%.0f"), show(s, "tps", "%.0f"),
            ratio(med(s, "tps"), med(p, "tps")), ratio(med(s, "tps"), med(d, "tps")),
            show(p, "cpu", "%.1f"), show(s, "cpu", "%.1f"), ratio(med(s, "cpu"), med(p, "cpu")),
            show(p, "user", "%.1f"), show(s, "user", "%.1f"), added(s), added(p)))
        res[m, c] = (med(s, "tps"), med(p, "tps"), med(d, "tps"), med(s, "cpu"), med(p, "cpu"), med(s, "lat"), med(d, "lat"))
print()
print("targets: CPU/tx <= pgbouncer's (simple, extended); prepared CPU/tx <= 0.8x shardgate's extended;")
print("         TPS at 16 c >= 1.3x pgbouncer (simple, extended), >= 0.6x direct (prepared); added latency at 1 c <= 40 us")
def verdict(ok): return "met" if ok else "NOT met"
for c in clients:
    for m in ("simple", "extended"):
        if (m, c) in res and res[m, c][3] is not None and res[m, c][4] is not None:
            s, p = res[m, c][3], res[m, c][4]
            print(f"  {m:8} {c:2} c  CPU/tx {s:.1f} vs pgbouncer {p:.1f} us ({s / p:.2f}x) -> {verdict(s <= p)}")
    if ("prepared", c) in res and ("extended", c) in res and res["prepared", c][3] and res["extended", c][3]:
        a, b = res["prepared", c][3], res["extended", c][3]
        print(f"  prepared {c:2} c  CPU/tx {a:.1f} vs extended {b:.1f} us ({a / b:.2f}x) -> {verdict(a <= 0.8 * b)}")
if 16 in clients:
    for m in ("simple", "extended"):
        if (m, 16) in res and res[m, 16][0] and res[m, 16][1]:
            r = res[m, 16][0] / res[m, 16][1]
            print(f"  {m:8} 16 c  TPS {r:.2f}x pgbouncer -> {verdict(r >= 1.3)}")
    if ("prepared", 16) in res and res["prepared", 16][0] and res["prepared", 16][2]:
        r = res["prepared", 16][0] / res["prepared", 16][2]
        print(f"  prepared 16 c  TPS {r:.2f}x direct -> {verdict(r >= 0.6)}")
if 1 in clients:
    for m in modes:
        if (m, 1) in res and res[m, 1][5] is not None and res[m, 1][6] is not None:
            a = (res[m, 1][5] - res[m, 1][6]) * 1000
            print(f"  {m:8}  1 c  added latency {a:.0f} us -> {verdict(a <= 40)}")
for k, why in notes.items():
    print(f"  note: {k[0]} -M {k[1]} -c {k[2]}: {why}")
if any(k[0] == "floor" for k in cells):
    print()
    print("floor: relay-floor tokio-relay, the session threads' model doing no work (bytes copied both ways)")
    hdr = ("mode", "c", "floor", "sg/fl", "fl us/tx", "fl user", "sg/fl cpu", "sg/fl user", "fl/pgb cpu", "added us fl")
    print("%-8s %3s | %7s %6s | %8s %7s | %9s %10s | %10s | %11s" % hdr)
    for m in modes:
        for c in clients:
            d, p, s, f = ("direct", m, c), ("pgbouncer", m, c), ("shardgate", m, c), ("floor", m, c)
            added = "-" if med(f, "lat") is None or med(d, "lat") is None else "%.0f" % ((med(f, "lat") - med(d, "lat")) * 1000)
            print("%-8s %3s | %7s %6s | %8s %7s | %9s %10s | %10s | %11s" % (
                m, c, show(f, "tps", "%.0f"), ratio(med(s, "tps"), med(f, "tps")),
                show(f, "cpu", "%.1f"), show(f, "user", "%.1f"),
                ratio(med(s, "cpu"), med(f, "cpu")), ratio(med(s, "user"), med(f, "user")),
                ratio(med(f, "cpu"), med(p, "cpu")), added))
EOF

#!/usr/bin/env bash
# Proxy overhead, side by side in one run: pgbench select-only (-S) straight to
# Postgres ("direct"), through pgbouncer (transaction pooling, pool 20) and through
# shardgate (one shard that is the same Postgres, pool 20), for -M simple, extended
# and prepared at 1 and 16 clients.
#
# Machines here are noisy, so the three targets are interleaved: every round runs
# each (mode, clients) cell on all three targets back to back, in an order that
# rotates from round to round, and the table shows per-cell medians over the rounds
# and ratios measured in this same run. Compare ratios, never absolute numbers from
# another run.
#
# At 1 client a second measure follows: PAIRED_ROUNDS short runs (3,000
# transactions each) per mode, pgbouncer and shardgate back to back, and the
# median of the per-round ratios. A pair of runs a second apart sees the same
# machine, so this cancels the slow swings that a median of medians does not.
#
#   bench/proxy.sh                               # 5 rounds x 3 s per run: about 5 minutes
#   ROUNDS=7 SECONDS_PER_RUN=10 bench/proxy.sh   # longer, steadier
#   RESULTS=/tmp/raw.tsv bench/proxy.sh          # also keep every single run's numbers
#
# Needs root or the postgres OS user (Postgres and pgbouncer run as `postgres`);
# installs pgbouncer/Postgres 15 if missing (scripts/install-deps.sh --bench) and
# builds target/release/shardgate. Every process and temp dir it starts is removed
# on exit, Ctrl-C included.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}
T=${SECONDS_PER_RUN:-3}
SCALE=${SCALE:-10}
MODES=(simple extended prepared)
CLIENTS=(1 16)
TARGETS=(direct pgbouncer shardgate)
PAIRED_ROUNDS=${PAIRED_ROUNDS:-30}

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

die() { echo "proxy.sh: $*" >&2; exit 1; }

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
echo "pgbench -i -s $SCALE" >&2
pgbench -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U postgres app >"$work/init.log" 2>&1 \
  || { cat "$work/init.log" >&2; die "pgbench -i failed"; }

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
max_client_conn = 200
logfile = $work/pgbouncer.log
pidfile = $work/pgbouncer.pid
INI
echo '"postgres" ""' >"$work/userlist.txt"
as_pg "$PGBOUNCER" -q "$work/pgbouncer.ini" &
bouncer_pid=$!

# ----- shardgate ------------------------------------------------------------------
cat >"$work/shardgate.toml" <<TOML
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
# One pgbench run; prints "ok <tps> <latency ms>" or "FAIL <first error line>".
run() { # port mode clients seconds
  local out j=$(($3 < 2 ? $3 : 2)) tps lat err
  out=$(timeout --foreground $(($4 + 60)) pgbench -n -S -M "$2" -c "$3" -j "$j" -T "$4" \
    -h 127.0.0.1 -p "$1" -U postgres app 2>&1) || true
  tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)$/\1/p' <<<"$out")
  lat=$(sed -n 's/^latency average = \([0-9.]*\) ms$/\1/p' <<<"$out")
  if [ -n "$tps" ] && [ -n "$lat" ] && grep -q '^number of failed transactions: 0 ' <<<"$out" \
    && ! grep -qi 'aborted' <<<"$out"; then
    echo "ok $tps $lat"
  else
    err=$(grep -m1 -iE 'error|fatal|aborted|timeout' <<<"$out" || true)
    echo "FAIL ${err:-$(head -c 200 <<<"$out" | tr '\n' ' ')}"
  fi
}

# Warm-up, not recorded: fills both pools and every cache on every target.
echo "warm-up" >&2
for mode in "${MODES[@]}"; do
  for target in "${TARGETS[@]}"; do run "$(port_of $target)" "$mode" 16 1 >/dev/null; done
done

raw=$work/raw.tsv
printf 'round\ttarget\tmode\tclients\tstatus\ttps\tlatency_ms\n' >"$raw"
start=$SECONDS
for round in $(seq 1 "$ROUNDS"); do
  for mode in "${MODES[@]}"; do
    for clients in "${CLIENTS[@]}"; do
      for k in 0 1 2; do # rotate which target goes first, round by round
        target=${TARGETS[$(((k + round) % 3))]}
        read -r status a b <<<"$(run "$(port_of $target)" "$mode" "$clients" "$T")"
        if [ "$status" = ok ]; then
          printf '%s\t%s\t%s\t%s\tok\t%s\t%s\n' "$round" "$target" "$mode" "$clients" "$a" "$b" >>"$raw"
        else
          printf '%s\t%s\t%s\t%s\tFAIL\t\t\t%s\n' "$round" "$target" "$mode" "$clients" "$a $b" >>"$raw"
        fi
      done
    done
  done
  echo "round $round/$ROUNDS done ($((SECONDS - start)) s)" >&2
done
# Paired short runs at 1 client: "<mode> <ratio>" per round, or "<mode> FAIL".
paired=$work/paired.txt
: >"$paired"
for round in $(seq 1 "$PAIRED_ROUNDS"); do
  for mode in "${MODES[@]}"; do
    declare -A ptps=()
    for k in 0 1; do # alternate which goes first
      target=$([ $(((k + round) % 2)) = 0 ] && echo pgbouncer || echo shardgate)
      out=$(timeout --foreground 60 pgbench -n -S -M "$mode" -c 1 -t 3000 -h 127.0.0.1 -p "$(port_of $target)" -U postgres app 2>&1) || true
      ptps[$target]=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)$/\1/p' <<<"$out")
      grep -q '^number of failed transactions: 0 ' <<<"$out" || ptps[$target]=""
    done
    if [ -n "${ptps[pgbouncer]}" ] && [ -n "${ptps[shardgate]}" ]; then
      echo "$mode $(awk -v a="${ptps[shardgate]}" -v b="${ptps[pgbouncer]}" 'BEGIN { printf "%.4f", a / b }')" >>"$paired"
    else
      echo "$mode FAIL" >>"$paired"
    fi
    unset ptps
  done
done
echo "paired runs done ($((SECONDS - start)) s)" >&2
kill -0 "$sg_pid" 2>/dev/null || echo "WARNING: shardgate exited during the run" >&2
[ -z "${RESULTS:-}" ] || cp "$raw" "$RESULTS"

# ----- table ------------------------------------------------------------------------
echo
echo "pgbench -S -s $SCALE, $ROUNDS rounds x ${T}s per run, medians; $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//');" \
  "$(date -u '+%F %H:%M UTC'); shardgate $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- '*.rs' 2>/dev/null || echo '+uncommitted .rs changes'); $("$PGBOUNCER" --version | head -1)"
awk -F'\t' -v rounds="$ROUNDS" '
  function median(list,   a, n, i, j, t) {
    n = split(list, a, " ")
    for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > t + 0; j--) a[j + 1] = a[j]; a[j + 1] = t }
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
  }
  # A cell with any failed run shows FAIL (k/n failed), never a median of the rest.
  function cell(t, m, c) { k = t SUBSEP m SUBSEP c; return (k in fails) ? "FAIL(" fails[k] "/" rounds ")" : "" }
  function ratio(x, y) { return (x == "" || y == "" || y == 0) ? "-" : sprintf("%.2f", x / y) }
  NR > 1 {
    k = $2 SUBSEP $3 SUBSEP $4
    if ($5 == "ok") { tps[k] = tps[k] " " $6; lat[k] = lat[k] " " $7 }
    else { fails[k]++; if (!(k in why)) why[k] = $8 }
  }
  END {
    split("simple extended prepared", modes, " "); split("1 16", clients, " "); split("direct pgbouncer shardgate", tg, " ")
    printf "%-8s %3s | %8s %9s %9s | %6s %9s | %10s %10s %10s | %s\n", "mode", "c", "direct", "pgbouncer", "shardgate", "sg/pgb", "sg/direct", "lat direct", "lat pgb", "lat sg", "sg added us"
    for (mi = 1; mi <= 3; mi++) for (ci = 1; ci <= 2; ci++) {
      m = modes[mi]; c = clients[ci]
      for (ti = 1; ti <= 3; ti++) {
        t = tg[ti]; k = t SUBSEP m SUBSEP c
        f = cell(t, m, c)
        T[t] = f != "" ? f : sprintf("%.0f", median(tps[k])); L[t] = f != "" ? f : sprintf("%.3f", median(lat[k]))
        TV[t] = f != "" ? "" : median(tps[k]); LV[t] = f != "" ? "" : median(lat[k])
      }
      added = (LV["shardgate"] == "" || LV["direct"] == "") ? "-" : sprintf("%.0f", (LV["shardgate"] - LV["direct"]) * 1000)
      printf "%-8s %3s | %8s %9s %9s | %6s %9s | %10s %10s %10s | %s\n", m, c, T["direct"], T["pgbouncer"], T["shardgate"],
        ratio(TV["shardgate"], TV["pgbouncer"]), ratio(TV["shardgate"], TV["direct"]), L["direct"], L["pgbouncer"], L["shardgate"], added
      sgpgb[m, c] = ratio(TV["shardgate"], TV["pgbouncer"]); pgbfail[m, c] = (TV["pgbouncer"] == ""); sgfail[m, c] = (TV["shardgate"] == "")
      if (c == 1) add1[m] = added
    }
    print ""
    print "targets: shardgate >= 1.0x pgbouncer TPS (a pgbouncer FAIL counts as met if shardgate runs); <= 40 us added latency at 1 client"
    for (mi = 1; mi <= 3; mi++) {
      m = modes[mi]; ok = 1; r = ""
      for (ci = 1; ci <= 2; ci++) {
        c = clients[ci]
        if (sgfail[m, c]) { ok = 0; r = r " " c "c:shardgate FAIL" }
        else if (pgbfail[m, c]) { r = r " " c "c:pgbouncer FAIL" }
        else { r = r " " c "c:" sgpgb[m, c] "x"; if (sgpgb[m, c] + 0 < 1.0) ok = 0 }
      }
      lok = (add1[m] != "-" && add1[m] + 0 <= 40)
      printf "  %-8s TPS vs pgbouncer:%s -> %s; added latency at 1 client: %s us -> %s\n", m, r, ok ? "met" : "NOT met", add1[m], lok ? "met" : "NOT met"
    }
    n = 0
    for (k in why) {
      if (!n++) print "\nfailures (first error of each failing cell):"
      split(k, p, SUBSEP); printf "  %s -M %s -c %s: %s\n", p[1], p[2], p[3], why[k]
    }
  }' "$raw"

echo
echo "paired at 1 client: $PAIRED_ROUNDS rounds x 3,000 transactions, pgbouncer and shardgate back to back; median (quartiles) of the per-round shardgate/pgbouncer ratios"
for mode in "${MODES[@]}"; do
  awk -v m="$mode" '$1 == m' "$paired" | sort -k2 -g | awk -v m="$mode" '
    $2 == "FAIL" { fail++; next }
    { r[++n] = $2 }
    END {
      if (fail) { printf "  %-8s FAIL in %d of %d rounds\n", m, fail, fail + n; exit }
      if (n % 2) med = r[(n + 1) / 2]; else med = (r[n / 2] + r[n / 2 + 1]) / 2
      verdict = "NOT met"; if (med >= 1.0) verdict = "met"
      printf "  %-8s %.3fx (%.3f-%.3f) -> %s\n", m, med, r[int(0.25 * (n - 1)) + 1], r[int(0.75 * (n - 1)) + 1], verdict
    }'
done

#!/usr/bin/env bash
# Installs what building and testing shardgate needs on Debian 12, when missing:
# libclang (pg_query's build), protoc (raft's build), PostgreSQL 15 server and client tools (initdb,
# pg_ctl, psql, pgbench), pgbouncer (benchmark baseline), cargo-nextest, and for the web page's
# browser test (cli/tests/web.rs) node, npm and Chromium (the test drives /usr/bin/chromium through
# playwright-core, which downloads no browser of its own), and the client drivers of the driver
# matrix (tests/tests/driver_matrix.rs): Ruby's pg (ruby-pg), pgjdbc (libpostgresql-jdbc-java) and a
# JDK from Debian; psycopg 3, psycopg2, asyncpg and SQLAlchemy from PyPI into a virtualenv, and
# node-postgres and postgres.js from npm, both kept in $SHARDGATE_DRIVERS
# (default ${XDG_CACHE_HOME:-$HOME/.cache}/shardgate/drivers, outside the clone) and installed again
# only when tests/drivers/python/requirements.txt or tests/drivers/node/package-lock.json change.
set -euo pipefail

need=()
ls /usr/lib/llvm-*/lib/libclang*.so >/dev/null 2>&1 || need+=(libclang-dev)
[ -x /usr/lib/postgresql/15/bin/initdb ] || command -v initdb >/dev/null 2>&1 || need+=(postgresql-15)
command -v psql >/dev/null 2>&1 || need+=(postgresql-client-15)
command -v pgbench >/dev/null 2>&1 || need+=(postgresql-client-15)
if [ "${1:-}" = "--bench" ]; then
  command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || need+=(pgbouncer)
fi
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v javac >/dev/null 2>&1 || need+=(default-jdk-headless)
[ -f /usr/share/java/postgresql.jar ] || need+=(libpostgresql-jdbc-java)
{ command -v ruby >/dev/null 2>&1 && ruby -e 'require "pg"' >/dev/null 2>&1; } || need+=(ruby-pg)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)

if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Debian's postgresql package starts a cluster of its own on 5432; shardgate does
# not need it, and its tests start their own servers on free ports.

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

# The driver matrix's Python and JavaScript drivers, outside the clone so that a
# fresh clone (CI) finds them installed; a stamp holds the hash of what was installed.
root="$(cd "$(dirname "$0")/.." && pwd)"
drivers="${SHARDGATE_DRIVERS:-${XDG_CACHE_HOME:-$HOME/.cache}/shardgate/drivers}"
mkdir -p "$drivers"
req="$root/tests/drivers/python/requirements.txt"
stamp="$(sha256sum "$req" | cut -d' ' -f1)"
if [ "$(cat "$drivers/venv/.stamp" 2>/dev/null)" != "$stamp" ] || [ ! -x "$drivers/venv/bin/python" ]; then
  echo "installing the Python drivers into $drivers/venv"
  rm -rf "$drivers/venv"
  python3 -m venv "$drivers/venv"
  "$drivers/venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req"
  echo "$stamp" > "$drivers/venv/.stamp"
fi
lock="$root/tests/drivers/node/package-lock.json"
stamp="$(cat "$root/tests/drivers/node/package.json" "$lock" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$drivers/node/.stamp" 2>/dev/null)" != "$stamp" ] || [ ! -d "$drivers/node/node_modules" ]; then
  echo "installing the JavaScript drivers into $drivers/node"
  rm -rf "$drivers/node"
  mkdir -p "$drivers/node"
  cp "$root/tests/drivers/node/package.json" "$lock" "$drivers/node/"
  (cd "$drivers/node" && npm ci --silent --no-audit --no-fund)
  echo "$stamp" > "$drivers/node/.stamp"
fi

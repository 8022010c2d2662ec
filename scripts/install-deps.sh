#!/usr/bin/env bash
# Installs what building and testing shardgate needs on Debian 12, when missing:
# libclang (pg_query's build), protoc (raft's build), PostgreSQL 15 server and client tools (initdb,
# pg_ctl, psql, pgbench), pgbouncer (benchmark baseline), cargo-nextest, and for the web page's
# browser test (cli/tests/web.rs) node, npm and Chromium (the test drives /usr/bin/chromium through
# playwright-core, which downloads no browser of its own).
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

#!/usr/bin/env bash
# Run the test suite with the services its tests need: a throwaway PostgreSQL cluster on
# 127.0.0.1 (for the database tests) and the system Chromium (for the browser tests).
# Installs Debian's postgresql and chromium when missing (needs root and apt), stops the
# cluster on exit. Usage: scripts/test-services.sh [PYTHON] [pytest args...]
set -euo pipefail
PY=${1:-python3}
shift || true

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

missing=()
command -v chromium >/dev/null || missing+=(chromium)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
  echo "test-services: installing ${missing[*]} (apt-get)" >&2
  if ! { as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null; }; then
    echo "test-services: could not install ${missing[*]}; those tests will be skipped" >&2
  fi
fi

PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -n "$PGBIN" ] && [ -x "$PGBIN/initdb" ]; then
  PGROOT=$(mktemp -d /tmp/preftune-pg.XXXXXX)
  PGDATA=$PGROOT/pgdata
  # A free port: ask the kernel for one.
  PGPORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  run_pg() { if [ "$(id -u)" = 0 ]; then chown -R postgres:postgres "$PGROOT"; runuser -u postgres -- "$@"; else "$@"; fi; }
  install -d -m 700 "$PGDATA"
  cleanup() {
    run_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$PGROOT"
  }
  trap cleanup EXIT
  run_pg "$PGBIN/initdb" -D "$PGDATA" -U postgres --auth=trust -E UTF8 --no-locale >/dev/null
  run_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$PGROOT/pg.log" -w -t 30 \
    -o "-p $PGPORT -c listen_addresses=127.0.0.1 -k $PGROOT -c fsync=on" start >/dev/null
  "$PGBIN/psql" -h 127.0.0.1 -p "$PGPORT" -U postgres -q -c "CREATE DATABASE preftune_test" >/dev/null
  export PREFTUNE_TEST_PG_URL="postgresql+psycopg://postgres@127.0.0.1:$PGPORT/preftune_test"
  echo "test-services: PostgreSQL on 127.0.0.1:$PGPORT" >&2
else
  echo "test-services: no PostgreSQL; its tests will be skipped" >&2
fi

"$PY" -m pytest "$@"

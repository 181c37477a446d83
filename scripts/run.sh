#!/usr/bin/env bash
# Runs the app locally on embedded defaults: SQLite under .spin/, the in-process Redis broker,
# http://127.0.0.1:3000. Uses `spin up` when a Spin CLI is installed, devhost otherwise;
# ASTRIA_HOST=devhost|spin overrides. Extra arguments go to the host.
#
# A local run has no scheduler, so this script is one: it calls the outbox relay
# (POST /maintenance/relay) every RELAY_EVERY seconds (60) with a per-run admin token.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
host=${ASTRIA_HOST:-}
if [ -z "$host" ]; then
  if command -v spin >/dev/null 2>&1; then host=spin; else host=devhost; fi
fi
listen=127.0.0.1:3000
export SPIN_VARIABLE_ADMIN_TOKEN=${SPIN_VARIABLE_ADMIN_TOKEN:-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')}

case "$host" in
  spin)
    # Spin has no in-process broker: its Redis triggers need the Redis at redis_url.
    spin build
    spin up --runtime-config-file runtime-config.toml --listen "$listen" "$@" &
    ;;
  devhost)
    bash scripts/build.sh
    target/host/devhost up --from spin.toml --runtime-config-file runtime-config.toml \
      --state-dir .spin --redis memory --listen "$listen" --cache-dir target/devhost-cache "$@" &
    ;;
  *) echo "ASTRIA_HOST must be devhost or spin" >&2; exit 2 ;;
esac
host_pid=$!

(
  while sleep "${RELAY_EVERY:-60}"; do
    curl -fsS -X POST -H "authorization: Bearer $SPIN_VARIABLE_ADMIN_TOKEN" "http://$listen/maintenance/relay" \
      >/dev/null 2>&1 || echo "[run] relay call failed (will retry)" >&2
  done
) &
relay_pid=$!

stop() { kill "$relay_pid" 2>/dev/null || true; kill -TERM "$host_pid" 2>/dev/null || true; }
trap stop INT TERM EXIT
wait "$host_pid"

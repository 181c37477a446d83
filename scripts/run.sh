#!/usr/bin/env bash
# Runs the app locally on embedded defaults: SQLite under .spin/, the in-process Redis broker,
# http://127.0.0.1:3000. Uses `spin up` when a Spin CLI is installed, devhost otherwise;
# ASTRIA_HOST=devhost|spin overrides. Extra arguments go to the host.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
host=${ASTRIA_HOST:-}
if [ -z "$host" ]; then
  if command -v spin >/dev/null 2>&1; then host=spin; else host=devhost; fi
fi
case "$host" in
  spin)
    # Spin has no in-process broker: its Redis triggers need the Redis at redis_url.
    spin build
    exec spin up --runtime-config-file runtime-config.toml --listen 127.0.0.1:3000 "$@"
    ;;
  devhost)
    bash scripts/build.sh
    exec target/host/devhost up --from spin.toml --runtime-config-file runtime-config.toml \
      --state-dir .spin --redis memory --listen 127.0.0.1:3000 \
      --cache-dir target/devhost-cache "$@"
    ;;
  *) echo "ASTRIA_HOST must be devhost or spin" >&2; exit 2 ;;
esac

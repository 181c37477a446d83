#!/usr/bin/env bash
# Runs the app locally on embedded defaults: SQLite under .spin/, http://127.0.0.1:3000.
#
# Host: `spin up` when a Spin CLI is installed (or SPIN_BIN names one), devhost otherwise;
# ASTRIA_HOST=devhost|spin overrides. Extra arguments go to the host.
#
# Redis: devhost uses its in-process broker, nothing to install. Spin has no such broker: its
# Redis triggers need the Redis at redis_url (SPIN_VARIABLE_REDIS_URL, default
# redis://127.0.0.1:6379). If nothing answers there and it is a local address, this script starts
# a redis-server of its own on that port (installing Debian's package where it can) and stops it
# on exit; if no Redis can be had, it says so and runs on devhost instead.
#
# Spin's Redis trigger never reconnects: if Redis goes away, `spin up` stops (HTTP too). This
# script then waits for Redis (restarting its own redis-server), and starts `spin up` again.
# No event is lost meanwhile: events wait in the outbox and the relay below republishes them.
#
# A local run has no scheduler, so this script is one: it calls the outbox relay
# (POST /maintenance/relay) every RELAY_EVERY seconds (60) with a per-run admin token.
#
# Also: ASTRIA_LISTEN (127.0.0.1:3000), ASTRIA_STATE_DIR (.spin: the SQLite files),
# ASTRIA_SKIP_BUILD=1 (use what scripts/build.sh built already; the tests run it so, since a
# cargo build inside `cargo test` would wait for, or redo, the test run's own build).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
say() { echo "[run] $*" >&2; }

spin_bin=${SPIN_BIN:-spin}
host=${ASTRIA_HOST:-}
if [ -z "$host" ]; then
  if command -v "$spin_bin" >/dev/null 2>&1; then host=spin; else host=devhost; fi
fi
listen=${ASTRIA_LISTEN:-127.0.0.1:3000}
export SPIN_VARIABLE_ADMIN_TOKEN=${SPIN_VARIABLE_ADMIN_TOKEN:-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')}

# The SQLite files. runtime-config.toml names them relative to the repository (where this script
# runs `spin up`); another state directory gets a runtime config of its own with its paths.
state_dir=${ASTRIA_STATE_DIR:-.spin}
runtime_config=runtime-config.toml
if [ "$state_dir" != .spin ]; then
  mkdir -p "$state_dir"
  state_dir=$(cd "$state_dir" && pwd)
  runtime_config="$state_dir/runtime-config.toml"
  sed -e "s#\"\\.spin/#\"$state_dir/#" runtime-config.toml > "$runtime_config"
fi
# The operator console (/maintenance/console) asks for the admin token: keep it in a file only
# this user can read, never on the terminal or in a log.
mkdir -p "$state_dir"
(umask 077 && printf '%s\n' "$SPIN_VARIABLE_ADMIN_TOKEN" > "$state_dir/admin-token")
say "operator console: http://$listen/maintenance/console (admin token in $state_dir/admin-token)"

redis_url=${SPIN_VARIABLE_REDIS_URL:-redis://127.0.0.1:6379}
redis_port=$(sed -nE 's#^rediss?://([^@/]*@)?(127\.0\.0\.1|localhost):([0-9]+).*#\3#p' <<<"$redis_url")
redis_up() {
  command -v redis-cli >/dev/null 2>&1 || return 1
  [ "$(timeout 2 redis-cli -u "$redis_url" ping 2>/dev/null)" = PONG ]
}
own_redis_pid=""
start_own_redis() {
  [ -n "$redis_port" ] || return 1
  if ! command -v redis-server >/dev/null 2>&1; then
    local sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd="sudo -n"
    say "installing Redis (Debian's redis-server)"
    { $sudo_cmd apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq redis-server; } \
      >/dev/null 2>&1 || return 1
  fi
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 &
  own_redis_pid=$!
  for _ in $(seq 1 40); do redis_up && return 0; sleep 0.25; done
  return 1
}

if [ "$host" = spin ]; then
  if redis_up; then
    say "Redis answers at ${redis_url%%://*}://…:${redis_port:-?}"
  elif start_own_redis; then
    say "no Redis was running: started redis-server on 127.0.0.1:$redis_port for this run (stopped on exit)"
  else
    say "no Redis at $(sed -E 's#//[^@/]*@#//#' <<<"$redis_url") and none could be started: running on devhost with its in-process broker instead"
    host=devhost
  fi
fi

case "$host" in
  spin)
    # The same build as the tests (the toolchain fallback applies); Spin needs no devhost.
    [ "${ASTRIA_SKIP_BUILD:-0}" = 1 ] || ASTRIA_SKIP_DEVHOST=1 bash scripts/build.sh
    host_cmd=("$spin_bin" up --from "$root/spin.toml" --runtime-config-file "$runtime_config" \
      --state-dir "$state_dir" --listen "$listen" "$@")
    ;;
  devhost)
    [ "${ASTRIA_SKIP_BUILD:-0}" = 1 ] || bash scripts/build.sh
    host_cmd=(target/host/devhost up --from spin.toml --runtime-config-file "$runtime_config" \
      --state-dir "$state_dir" --redis memory --listen "$listen" --cache-dir target/devhost-cache "$@")
    ;;
  *) echo "ASTRIA_HOST must be devhost or spin" >&2; exit 2 ;;
esac

(
  while sleep "${RELAY_EVERY:-60}"; do
    curl -fsS -X POST -H @- "http://$listen/maintenance/relay" >/dev/null 2>&1 \
      <<<"authorization: Bearer $SPIN_VARIABLE_ADMIN_TOKEN" || say "relay call failed (will retry)"
  done
) &
relay_pid=$!

host_pid=""
stopping=""
stop() {
  stopping=1
  kill "$relay_pid" 2>/dev/null || true
  [ -z "$host_pid" ] || kill -TERM "$host_pid" 2>/dev/null || true
  [ -z "$host_pid" ] || wait "$host_pid" 2>/dev/null || true
  [ -z "$own_redis_pid" ] || kill "$own_redis_pid" 2>/dev/null || true
}
trap stop INT TERM EXIT

while :; do
  "${host_cmd[@]}" &
  host_pid=$!
  status=0
  wait "$host_pid" || status=$?
  host_pid=""
  [ -z "$stopping" ] || exit 0
  if [ "$host" != spin ] || redis_up; then
    say "the host stopped (status $status)"
    exit "$status"
  fi
  say "Redis went away, and Spin's Redis trigger does not reconnect, so spin up stopped (HTTP too)."
  say "waiting for Redis to come back; events wait in the outbox meanwhile and nothing is lost."
  until redis_up; do
    if [ -n "$own_redis_pid" ] && ! kill -0 "$own_redis_pid" 2>/dev/null; then
      start_own_redis || true
    fi
    sleep 1
  done
  say "Redis is back: starting spin up again"
done

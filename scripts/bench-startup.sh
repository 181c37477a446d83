#!/usr/bin/env bash
# Prints devhost's start-up time for the app's spin.toml: from process start until
# /.well-known/spin/health answers, with an empty compile cache and with a warm one.
# Usage: scripts/bench-startup.sh [runs]   (needs scripts/build.sh to have run)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
runs=${1:-5}
bin=target/host/devhost
[ -x "$bin" ] || { echo "build first: scripts/build.sh" >&2; exit 1; }
cache=$(mktemp -d); state=$(mktemp -d)
trap 'rm -rf "$cache" "$state"' EXIT

measure() { # $1 = keep cache (1) or empty it (0)
  [ "$1" = 1 ] || rm -rf "${cache:?}"/*
  local port=$((20000 + RANDOM % 20000))
  local t0; t0=$(date +%s%N)
  "$bin" up --from spin.toml --listen "127.0.0.1:$port" --state-dir "$state" --redis memory \
    --cache-dir "$cache" >/dev/null 2>&1 &
  local pid=$!
  # Give up after 60 s (or as soon as devhost exits) instead of waiting forever.
  local deadline=$(( $(date +%s) + 60 ))
  until curl -sf --max-time 1 "http://127.0.0.1:$port/.well-known/spin/health" >/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "devhost exited before it served (port $port taken? run it by hand to see why)" >&2; exit 1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      kill "$pid" 2>/dev/null || true
      echo "devhost did not answer /.well-known/spin/health within 60 s" >&2; exit 1
    fi
    sleep 0.005
  done
  local t1; t1=$(date +%s%N)
  kill "$pid"; wait "$pid" 2>/dev/null || true
  echo $(( (t1 - t0) / 1000000 ))
}

for mode in cold warm; do
  keep=0; [ "$mode" = warm ] && { keep=1; measure 0 >/dev/null; }
  times=(); for _ in $(seq "$runs"); do times+=("$(measure $keep)"); done
  sorted=$(printf '%s\n' "${times[@]}" | sort -n | tr '\n' ' ')
  echo "devhost start-up, $mode compile cache: ${sorted}ms (runs sorted; median $(printf '%s\n' "${times[@]}" | sort -n | sed -n "$(( (runs + 1) / 2 ))p") ms)"
done
echo "components:"; for f in target/wasm32-wasip2/release/{message,image,payment,maintenance}_service.wasm; do
  printf '  %-28s %8d bytes\n' "$(basename "$f")" "$(stat -c %s "$f")"; done

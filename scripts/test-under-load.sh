#!/usr/bin/env bash
# Runs chosen integration tests ROUNDS times while a CPU hog (HOGS busy processes, two by
# default: as many as this project's machines have cores) runs beside them: a test that waits
# for time instead of a condition, or that assumes an idle machine, fails here.
#
#   scripts/test-under-load.sh [ROUNDS] [cargo test filter...]
#
# Default filters: the browser tests and the Redis and PostgreSQL outage tests. Run
# scripts/test.sh first (it builds what the tests need); the services it starts must be up.
# Prints one line per round and exits non-zero if any round failed.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
rounds=${1:-3}
shift || true
filters=("$@")
if [ ${#filters[@]} -eq 0 ]; then
  # browser: the sandbox bought through in Chromium, and the console; the rest: Redis stopped
  # under the app, PostgreSQL stopped and started under it.
  filters=(browser redis_outage redis_is_down redis_stopped redis_absent loses_its_server stuck_by_a_redis_outage database_down postgres_restarted)
fi
hogs=${HOGS:-2}

pids=()
stop_hogs() { [ ${#pids[@]} -eq 0 ] || kill "${pids[@]}" 2>/dev/null || true; }
trap stop_hogs EXIT
for _ in $(seq "$hogs"); do
  ( while :; do :; done ) &
  pids+=($!)
done
echo "[load] $hogs busy processes beside the tests (pids ${pids[*]})" >&2

failed=0
for round in $(seq "$rounds"); do
  start=$(date +%s)
  log=$(mktemp)
  args=()
  for f in "${filters[@]}"; do args+=("$f"); done
  # One cargo test per filter would rebuild nothing but restart every binary: pass them all
  # to the test binaries at once (cargo test takes one filter; the harness, several).
  if cargo test --profile host --tests -- "${args[@]}" >"$log" 2>&1; then
    verdict=passed
  else
    verdict=FAILED
    failed=1
  fi
  counts=$(grep -E '^test result:' "$log" | awk '{p+=$4; f+=$6} END {print p" passed, "f" failed"}')
  echo "[load] round $round: $verdict in $(( $(date +%s) - start )) s ($counts)" >&2
  if [ "$verdict" = FAILED ]; then
    grep -E '^test .* FAILED$|panicked at' "$log" | head -20 >&2
    cp "$log" "target/test-under-load-round-$round.log"
    echo "[load] whole output: target/test-under-load-round-$round.log" >&2
  fi
  rm -f "$log"
done
exit "$failed"

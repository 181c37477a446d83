#!/usr/bin/env bash
# Runs every test: unit tests of the native crates, the integration tests, which start the
# real wasm components in devhost against real PostgreSQL and Redis (started or installed here
# when they are not running), and the checks of the Kubernetes overlays.
#
# Real Spin: with SPIN_BIN=/path/to/spin the integration tests run under that Spin CLI instead of
# devhost. When ../shared/tools/spin is present (this project's machines and CI) and no
# arguments are given, the integration suite also runs, after the devhost run, under Spin 3.6.3
# (SpinKube's runtime: SQLite and PostgreSQL) and Spin 4.0.2 (SQLite only: 4.0.0-4.0.2 hang on a
# PostgreSQL query that returns no rows, spinframework/spin#3671). A test a host cannot run is
# skipped by name, with the reason printed here, never passed silently.
#
# Builds go to target/, which scripts/build-cache.sh links to a cache shared by this machine's
# clones: a second clone (CI's) compiles only this repository's crates. One run at a time uses
# that cache (a lock), since the tests run what it holds.
#
# At the end the run prints where its time went, and fails if any process it started (a host,
# a Spin trigger, a browser, a server) is still running: each carries ASTRIA_TEST_RUN in its
# environment, which is how they are found.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
started=$(date +%s)

# Where the time went, printed at the end whatever happens.
phases=() phase_at=$started
phase() { local now; now=$(date +%s); phases+=("$(printf '%6d s  %s' $((now - phase_at)) "$1")"); phase_at=$now; }

# The processes this run started and that still run (not this script, which was started
# before the mark existed, nor the scan, which runs without it).
leftovers() {
  env -u ASTRIA_TEST_RUN bash -c '
    for f in /proc/[0-9]*/environ; do
      { tr "\0" "\n" < "$f"; } 2>/dev/null | grep -qxF "ASTRIA_TEST_RUN=$1" && { p=${f#/proc/}; echo "${p%/environ}"; }
    done; true' _ "$ASTRIA_TEST_RUN"
}

finish() {
  local rc=$? left=""
  trap - EXIT
  # A failed Spin pass exits while jobs of this run still work beside it (the Kubernetes
  # checks, the other Spin pass): wait for them and show what they printed, rather than kill
  # them below as leftovers. An interrupt (130, 143) does not wait.
  if [ "$rc" -ne 130 ] && [ "$rc" -ne 143 ]; then
    [ -z "${pass_402_pid:-}" ] || collect_402
    [ -z "${k8s_pid:-}" ] || collect_k8s
  fi
  if [ -n "${ASTRIA_TEST_RUN:-}" ]; then
    # Hosts and browsers are stopped by the tests that started them; give a process group that
    # was just killed a moment to be gone, then whatever is left is a leak.
    for _ in $(seq 50); do left=$(leftovers); [ -z "$left" ] && break; sleep 0.2; done
    if [ -n "$left" ]; then
      echo "[test] FAILED: processes started by this run are still running (stopped now):" >&2
      ps -o pid,ppid,etime,args -p "$(echo $left | tr ' ' ',')" >&2 || true
      kill -KILL $left 2>/dev/null || true
      [ "$rc" -ne 0 ] || rc=1
    else
      echo "[test] no process started by this run is left running" >&2
    fi
  fi
  phase "end"
  echo "[test] where the time went ($build_state build cache):" >&2
  printf '[test] %s\n' "${phases[@]}" >&2
  echo "[test] done in $(( $(date +%s) - started )) s (exit $rc)" >&2
  exit "$rc"
}
# The jobs that run beside the Spin 3.6.3 pass: each waits for its job, prints what it
# printed, and leaves its status (pass_402_rc, k8s_rc); at the end of a run, or from finish().
collect_402() {
  pass_402_rc=0
  wait "$pass_402_pid" || pass_402_rc=$?
  pass_402_pid=""
  echo "[test] ---- the Spin 4.0.2 pass, which ran beside the Spin 3.6.3 pass ----" >&2
  cat "$pass_402_log" >&2
  rm -f "$pass_402_log"
}
collect_k8s() {
  k8s_rc=0
  wait "$k8s_pid" || k8s_rc=$?
  k8s_pid=""
  cat "$k8s_log" >&2
  rm -f "$k8s_log"
}

build_state="cold"
trap finish EXIT

# A test binary runs two worlds at a time, each a whole app (hosts, fake servers, a Redis of
# its own), and a stuck one holds what it opened until its deadline: a soft limit on open
# files of 1024 (common), or less (some CI shells), is a failure that depends on the machine.
# Raise it to the hard limit (at most 65536) and print both, so that a log shows what ran.
open_files_hard=$(ulimit -Hn)
open_files_want=65536
[ "$open_files_hard" != unlimited ] && [ "$open_files_hard" -lt "$open_files_want" ] && open_files_want=$open_files_hard
if [ "$(ulimit -Sn)" != unlimited ] && [ "$(ulimit -Sn)" -lt "$open_files_want" ]; then
  ulimit -Sn "$open_files_want" || true
fi
echo "[test] $(nproc) CPUs; open files: soft limit $(ulimit -Sn), hard limit $open_files_hard" >&2

bash scripts/ensure-services.sh
phase "services (PostgreSQL, Redis)"
bash scripts/build-cache.sh
[ -x target/host/devhost ] && build_state="warm"
# One run at a time uses the (shared) target/: the tests run the components and hosts it holds.
exec 9>>target/.test-run.lock
if ! flock -n 9; then
  echo "[test] another test run uses target/ ($(readlink -f target)): waiting for it" >&2
  flock 9
fi
# Every process started from here on carries the mark that `leftovers` looks for.
ASTRIA_TEST_RUN="$(date +%s)-$$-$RANDOM"
export ASTRIA_TEST_RUN

ASTRIA_SKIP_DEVHOST=1 bash scripts/build.sh
phase "wasm components (cargo build --target wasm32-wasip2)"
# The native binaries (devhost, the sandbox) are built here, with the tests' feature resolution,
# so that `cargo test` and `cargo bench` below compile nothing again. (scripts/build.sh's
# `-p devhost` resolves features differently, and a `-p astria-tests` bench build differently
# again: each compiled wasmtime, or most of the tree, a second time.)
cargo build --profile host --bins --tests
phase "native build (devhost, sandbox, test binaries)"

# Spin CLIs, when this machine has them.
spin_363="" spin_402=""
if [ -x ../shared/tools/spin/install.sh ]; then
  for bin in $(bash ../shared/tools/spin/install.sh target/spin-cli); do
    case "$bin" in *spin-3.6.3) spin_363=$bin ;; *spin-4.0.2) spin_402=$bin ;; esac
  done
fi

skips=()
skip() { # name-filter, reason
  echo "[test] skipped: tests matching '$1': $2" >&2
  skips+=(--skip "$1")
}

# scripts/run.sh under Spin (tests/tests/run_script.rs) needs a Spin CLI of its own.
export ASTRIA_SPIN_CLI=${ASTRIA_SPIN_CLI:-${SPIN_BIN:-$spin_363}}
[ -n "$ASTRIA_SPIN_CLI" ] || skip under_spin "no Spin CLI on this machine (set ASTRIA_SPIN_CLI or SPIN_BIN)"
if [ -n "${SPIN_BIN:-}" ]; then
  skip devhost_only "SPIN_BIN is set: devhost-only features"
fi
# The browser tests (the sandbox, tests/tests/browser.rs; the operator console, tests/tests/image.rs)
# need Chromium and chromedriver.
if ! bash scripts/ensure-chromium.sh; then
  skip browser "no Chromium/chromedriver could be installed (scripts/ensure-chromium.sh says why above)"
fi
phase "Spin CLIs, Chromium"

# Same profile as devhost so the test binaries reuse its compiled dependencies. Benchmarks are
# compiled too (not run), so that they cannot rot.
args=("$@")
if [ ${#skips[@]} -gt 0 ]; then
  case " $* " in *" -- "*) args+=("${skips[@]}") ;; *) args+=(-- "${skips[@]}") ;; esac
fi
cargo test --profile host "${args[@]}"
phase "tests: unit and integration under ${SPIN_BIN:-devhost}"
cargo bench --profile host --no-run
phase "benchmarks compiled"
# The Kubernetes checks need neither the hosts nor cargo: they run beside the Spin passes,
# whose tests mostly wait, and are waited for (and their output printed) at the end.
k8s_log=$(mktemp)
bash scripts/check-kubernetes.sh >"$k8s_log" 2>&1 &
k8s_pid=$!

# The integration suite under real Spin (only for a full run).
spin_pass() { # label, spin binary, extra skip arguments...
  local label=$1 bin=$2; shift 2
  echo "[test] integration tests under $label ($bin)" >&2
  echo "[test] skipped under $label: tests matching 'devhost_only' (devhost-only features), 'run_script', 'browser' and 'sandbox_' (the scripts' own runs, host-independent: ran in the devhost pass), 'fuzz' (tens of thousands of requests: ran in the devhost pass; scripts/fuzz.sh with SPIN_BIN runs it under Spin)" >&2
  # Its own status, whatever the caller's `set -e` context (it is called in `||` and `&`).
  local rc=0
  # The integration binaries only: the unit tests and the store's contract suite touch no
  # host, and ran in the devhost pass.
  local binaries=() f
  for f in tests/tests/*.rs; do
    case "$(basename "$f" .rs)" in browser | fuzz | run_script) ;; *) binaries+=(--test "$(basename "$f" .rs)") ;; esac
  done
  SPIN_BIN=$bin cargo test --profile host "${binaries[@]}" -- \
    --skip devhost_only --skip run_script --skip browser --skip sandbox_ --skip fuzz "$@" || rc=$?
  phase "tests: integration under $label"
  return "$rc"
}
if [ $# -eq 0 ] && [ -z "${SPIN_BIN:-}" ]; then
  # The two Spin passes run side by side: their tests mostly wait (on hosts, Redis, the
  # fakes), so together they take about as long as the longer one alone (measured: 209 s
  # against 198 + 124 s one after the other). Every test has its own ports, databases,
  # state directories and channel prefixes, as the threads of one pass already need. The
  # 4.0.2 pass's output is kept apart and printed after the 3.6.3 pass's.
  pass_402_pid="" pass_402_log=""
  if [ -n "$spin_402" ]; then
    echo "[test] skipped under Spin 4.0.2: tests matching 'postgres' (spinframework/spin#3671: a query returning no rows hangs)" >&2
    pass_402_log=$(mktemp)
    (spin_pass "Spin 4.0.2" "$spin_402" --skip postgres) >"$pass_402_log" 2>&1 &
    pass_402_pid=$!
  fi
  pass_363_rc=0
  if [ -n "$spin_363" ]; then
    spin_pass "Spin 3.6.3" "$spin_363" || pass_363_rc=$?
  fi
  if [ -n "$pass_402_pid" ]; then
    collect_402
    phase "tests: integration under Spin 4.0.2 (beside 3.6.3: its wait after 3.6.3's end)"
    [ "$pass_402_rc" -eq 0 ] || exit "$pass_402_rc"
  fi
  [ "$pass_363_rc" -eq 0 ] || exit "$pass_363_rc"
  [ -n "$spin_363$spin_402" ] || echo "[test] no ../shared/tools/spin: the integration suite ran under devhost only" >&2
fi
collect_k8s
phase "Kubernetes checks (beside the Spin passes: their wait after the passes' end)"
[ "$k8s_rc" -eq 0 ] || exit "$k8s_rc"

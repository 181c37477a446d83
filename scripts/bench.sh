#!/usr/bin/env bash
# Prints the project's performance figures and writes the webhook table to docs/performance.md:
# devhost start-up, the event pipeline's cost, the WhatsApp webhook's throughput and latency
# (under devhost, the native reference server and, when ../shared/tools/spin is present, Spin
# 3.6.3 and 4.0.2), delivery with pacing off under the same hosts, and the sender's pace.
# Usage: scripts/bench.sh [--webhook-only]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/ensure-services.sh
bash scripts/build.sh
rm -f target/bench/webhook-*.md

webhook() { # label, then env assignments
  echo "[bench] webhook under $1" >&2
  shift
  env "$@" cargo bench --profile host --config profile.host.package.astria-tests.opt-level=2 -p astria-tests --bench webhook
}
delivery() { # label, then env assignments
  echo "[bench] delivery under $1" >&2
  shift
  env "$@" cargo bench --profile host --config profile.host.package.astria-tests.opt-level=2 -p astria-tests --bench delivery
}

if [ "${1:-}" != --webhook-only ]; then
  bash scripts/bench-startup.sh 5
  cargo bench --profile host --config profile.host.package.astria-tests.opt-level=2 -p astria-tests --bench events
  cargo bench --profile host --config profile.host.package.astria-tests.opt-level=2 -p astria-tests --bench pace
fi
# The native reference: the same webhook code in a native server (tools/native-reference),
# with kept connections, and with connections opened per request as Spin's hosts do.
cargo build --profile host -p native-reference
webhook "native reference" ASTRIA_NATIVE_REFERENCE="$root/target/host/native-reference"
webhook "native reference, connections per request" \
  ASTRIA_NATIVE_REFERENCE="$root/target/host/native-reference" ASTRIA_NATIVE_FRESH=1
webhook devhost
delivery devhost
if [ -x ../shared/tools/spin/install.sh ]; then
  for bin in $(bash ../shared/tools/spin/install.sh target/spin-cli); do
    case "$bin" in /*) ;; *) bin=$root/$bin ;; esac
    case "$bin" in
      *spin-3.6.3)
        webhook "Spin 3.6.3" SPIN_BIN="$bin"
        delivery "Spin 3.6.3" SPIN_BIN="$bin" ;;
      # Spin 4.0.0-4.0.2 hang on a PostgreSQL query that returns no rows (spinframework/spin#3671).
      *spin-4.0.2)
        webhook "Spin 4.0.2" SPIN_BIN="$bin" ASTRIA_BENCH_DATABASES=sqlite
        delivery "Spin 4.0.2" SPIN_BIN="$bin" ASTRIA_BENCH_DATABASES=sqlite ;;
    esac
  done
fi

# docs/performance.md: the part between the markers is this run's; the rest is written by hand.
{
  echo "<!-- bench:begin (written by scripts/bench.sh; do not edit by hand) -->"
  echo
  echo "Measured $(date -u +%Y-%m-%d) on $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'))," \
    "$(free -g | awk '/^Mem:/ {print $2}') GB RAM, commit $(git rev-parse --short HEAD)$(git diff --quiet || echo ' with local changes')," \
    "by \`scripts/bench.sh\`."
  echo
  for f in target/bench/webhook-*.md; do
    case "$f" in *-delivery.md) continue ;; esac
    cat "$f"; echo
    if [ -f "${f%.md}-delivery.md" ]; then cat "${f%.md}-delivery.md"; echo; fi
  done
  echo "<!-- bench:end -->"
} > target/bench/webhook.md
grep -q '<!-- bench:begin' docs/performance.md || { echo "docs/performance.md has no bench markers" >&2; exit 1; }
awk -v part=target/bench/webhook.md '
  /<!-- bench:begin/ { while ((getline line < part) > 0) print line; skip = 1; next }
  /<!-- bench:end -->/ { skip = 0; next }
  !skip { print }
' docs/performance.md > target/bench/performance.md
mv target/bench/performance.md docs/performance.md
echo "[bench] the webhook tables are in docs/performance.md" >&2

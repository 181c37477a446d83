#!/usr/bin/env bash
# Runs every test: unit tests of the native crates, the integration tests, which start the
# real wasm components in devhost (or in Spin, with SPIN_BIN=/path/to/spin) against real
# PostgreSQL and Redis, started or installed here when they are not running, and the checks of
# the Kubernetes overlays.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
started=$(date +%s)
bash scripts/ensure-services.sh
bash scripts/build.sh
# Same profile as devhost so the test binaries reuse its compiled dependencies.
cargo test --profile host "$@"
bash scripts/check-kubernetes.sh
echo "[test] done in $(( $(date +%s) - started )) s" >&2

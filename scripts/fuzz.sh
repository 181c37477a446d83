#!/usr/bin/env bash
# Fuzzes every public route through the real components (tests/tests/fuzz.rs) with larger
# counts than scripts/test.sh runs (10,000 per route there): 100,000 by default.
# Usage: scripts/fuzz.sh [signed-cases-per-route] [refused-cases-per-route]
# A failure prints its seed; ASTRIA_FUZZ_SEED=<seed> scripts/fuzz.sh replays it.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/ensure-services.sh
bash scripts/build.sh
export ASTRIA_FUZZ_SIGNED_CASES=${1:-100000} ASTRIA_FUZZ_CASES=${2:-100000}
cargo test --profile host -p astria-tests --test fuzz -- --nocapture

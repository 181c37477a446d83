#!/usr/bin/env bash
# Prints the project's performance figures: devhost start-up, the event pipeline's cost and
# the WhatsApp webhook's throughput.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/ensure-services.sh
bash scripts/build.sh
bash scripts/bench-startup.sh 5
cargo bench --profile host -p astria-tests --bench events
cargo bench --profile host -p astria-tests --bench webhook
cargo bench --profile host -p astria-tests --bench pace

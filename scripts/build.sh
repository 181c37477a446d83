#!/usr/bin/env bash
# Builds every wasm component (what `spin build` does, for all of them at once, so the
# standard library is compiled once) and, unless ASTRIA_SKIP_DEVHOST=1, the native devhost and
# sandbox binaries.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/setup-toolchain.sh
# shellcheck disable=SC1091
source target/toolchain.env

wasm_packages=(message-service message-sender conversation-worker payment-checkout image-trainer image-service payment-service maintenance-service host-probe redis-probe event-probe event-consumer)
args=(); for p in "${wasm_packages[@]}"; do args+=(-p "$p"); done
echo "[build] wasm components (${ASTRIA_TOOLCHAIN} toolchain)" >&2
cargo build --target wasm32-wasip2 --release "${args[@]}"

if [ "${ASTRIA_SKIP_DEVHOST:-0}" != 1 ]; then
  # devhost is native: never build it with the wasm toolchain's overrides.
  echo "[build] devhost" >&2
  env -u RUSTC -u RUSTC_BOOTSTRAP -u CARGO_UNSTABLE_BUILD_STD -u CARGO_TARGET_WASM32_WASIP2_RUSTFLAGS \
    cargo build --profile host -p devhost -p sandbox
fi

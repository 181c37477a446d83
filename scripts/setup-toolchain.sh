#!/usr/bin/env bash
# Makes `cargo build --target wasm32-wasip2 --release` work on this machine, and writes the
# environment that build needs to target/toolchain.env (source it before building).
#
# Choice, in order:
#   1. rustup's wasm32-wasip2 target, if already installed or installable within a time bound;
#   2. Debian's rustc-web with its standard-library source, building std itself (build-std).
# It never changes the user's default toolchain: option 2 only sets RUSTC for our builds.
# Idempotent: a second run reuses the recorded choice.
# ASTRIA_WASM_TOOLCHAIN=rustup|debian forces one (CI uses it to prove the fallback works).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# target/ may be this machine's shared build cache (scripts/build-cache.sh says why and how).
bash "$root/scripts/build-cache.sh"
env_file="$root/target/toolchain.env"
mkdir -p "$root/target"

say() { echo "[toolchain] $*" >&2; }

valid_env() {
  [ -f "$env_file" ] || return 1
  # shellcheck disable=SC1090
  ( source "$env_file"; [ "${ASTRIA_TOOLCHAIN:-}" = rustup ] && rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2 ) && return 0
  ( source "$env_file"; [ "${ASTRIA_TOOLCHAIN:-}" = debian ] && [ -x /usr/bin/rustc ] && [ -d /usr/lib/rustlib/src/rust/library ] && [ -d /usr/lib/wasm32-wasi ] ) && return 0
  return 1
}

forced=${ASTRIA_WASM_TOOLCHAIN:-}
if [ -n "$forced" ] && ! grep -q "ASTRIA_TOOLCHAIN=$forced\$" "$env_file" 2>/dev/null; then
  rm -f "$env_file"
fi

if valid_env; then
  say "using $(grep -o 'ASTRIA_TOOLCHAIN=[a-z]*' "$env_file" | cut -d= -f2) (recorded in target/toolchain.env)"
  exit 0
fi

if [ "$forced" != debian ] && command -v rustup >/dev/null 2>&1; then
  if rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
    echo "export ASTRIA_TOOLCHAIN=rustup" > "$env_file"; say "using rustup's wasm32-wasip2 target"; exit 0
  fi
  say "trying: rustup target add wasm32-wasip2 (at most ${RUSTUP_TIMEOUT:-25}s)"
  if timeout "${RUSTUP_TIMEOUT:-25}" rustup target add wasm32-wasip2 >/dev/null 2>&1; then
    echo "export ASTRIA_TOOLCHAIN=rustup" > "$env_file"; say "using rustup's wasm32-wasip2 target"; exit 0
  fi
  say "rustup could not install wasm32-wasip2; falling back to Debian's rustc-web"
fi

if ! { [ -x /usr/bin/rustc ] && /usr/bin/rustc --version 2>/dev/null | grep -q . && [ -d /usr/lib/rustlib/src/rust/library ] \
       && [ -d /usr/lib/wasm32-wasi ] && command -v lld >/dev/null 2>&1; }; then
  say "installing rustc-web, cargo-web, rust-web-src, lld, wasi-libc with apt-get"
  sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq rustc-web cargo-web rust-web-src lld wasi-libc >/dev/null
fi

cat > "$env_file" <<ENV
export ASTRIA_TOOLCHAIN=debian
export RUSTC=/usr/bin/rustc
export RUSTC_BOOTSTRAP=1
export CARGO_UNSTABLE_BUILD_STD=std,panic_abort
export CARGO_TARGET_WASM32_WASIP2_RUSTFLAGS="-L /usr/lib/wasm32-wasi"
ENV
say "using Debian $(/usr/bin/rustc --version) with build-std"

#!/usr/bin/env bash
# Shares one cargo target directory between every clone of this repository on a machine, so
# that a second clone (CI makes a fresh one for every run) compiles only this repository's own
# crates and reuses the dependencies (wasmtime, tokio, ...), which are most of a cold build.
#
#   ASTRIA_BUILD_CACHE=<dir>   the shared folder (default: ${XDG_CACHE_HOME:-~/.cache}/astria-bot/target)
#   ASTRIA_BUILD_CACHE=off     keep target/ inside the clone, as cargo does by default
#
# How: target/ becomes a link to the shared folder (an existing target/ folder or link is left
# as it is). Cargo keys each compiled artifact by compiler version, dependency versions,
# features and profile, so toolchain or Cargo.lock changes only add artifacts. What cargo does
# not key is which clone's sources its own crates were built from: it decides freshness by
# modification times. So the cache records the last clone that used it, and when another clone
# comes along, this script marks that clone's tracked files as modified now: its own crates
# are rebuilt from its own sources, never taken from another clone's build.
#
# Every build entry point calls this first (scripts/setup-toolchain.sh does). Idempotent.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
say() { echo "[build-cache] $*" >&2; }

cache=${ASTRIA_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/astria-bot/target}
if [ "$cache" = off ]; then
  exit 0
fi

if [ ! -e "$root/target" ] && [ ! -L "$root/target" ]; then
  if mkdir -p "$cache" 2>/dev/null && ln -s "$cache" "$root/target"; then
    say "target/ -> $cache (shared by this machine's clones; ASTRIA_BUILD_CACHE=off keeps it in the clone)"
  else
    say "cannot use $cache: target/ stays in the clone"
    exit 0
  fi
fi

# Only a target/ that is a link can be shared; a plain folder belongs to this clone alone.
[ -L "$root/target" ] || exit 0
owner_file="$root/target/.astria-owner"
owner=$(cat "$owner_file" 2>/dev/null || true)
if [ "$owner" != "$root" ]; then
  if [ -n "$owner" ]; then
    say "last built from $owner: marking this clone's sources as changed, so its own crates are rebuilt from them"
  fi
  if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$root" ls-files -z | (cd "$root" && xargs -0 -r touch -c --)
  else
    find "$root" -path "$root/target" -prune -o -type f -exec touch -c {} +
  fi
  echo "$root" > "$owner_file"
fi

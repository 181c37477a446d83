#!/usr/bin/env bash
# Makes sure headless Chromium and its WebDriver (chromedriver) are here for the browser test
# (tests/tests/browser.rs), installing Debian's chromium and chromium-driver when they are not.
# Exits non-zero, saying why, when they cannot be had; scripts/test.sh then skips that test by
# name and prints the reason.
set -euo pipefail
say() { echo "[chromium] $*" >&2; }
have() { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }
if have; then
  say "$(chromium --version 2>/dev/null | head -n1) and chromedriver are installed"
  exit 0
fi
sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd="sudo -n"
say "installing Debian's chromium and chromium-driver (for the browser test)"
started=$(date +%s)
if ! { $sudo_cmd apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq \
    --no-install-recommends chromium chromium-driver; } >/tmp/ensure-chromium.log 2>&1; then
  say "could not install them (see /tmp/ensure-chromium.log): $(tail -n1 /tmp/ensure-chromium.log)"
  exit 1
fi
have || { say "installed, but chromium or chromedriver is not on PATH"; exit 1; }
say "installed in $(( $(date +%s) - started )) s: $(chromium --version 2>/dev/null | head -n1)"

#!/usr/bin/env bash
# Try the whole bot in a browser, with nothing to sign up for: starts the app as scripts/run.sh
# does (embedded defaults, SQLite) plus the sandbox (tools/sandbox), which plays WhatsApp (a phone
# page), Stripe Checkout and Astria on loopback, and prints the one URL to open.
#
# The app is pointed at the sandbox (whatsapp_api_url, whatsapp_media_url, stripe_api_url,
# astria_api_url) with secrets generated for this run, and the sandbox gets the same secrets: it
# reaches the app only through the public routes, with Meta's and Stripe's signatures. Timings
# are shortened so the journey takes seconds: messages paced 0.5 s apart, Stripe's timeout 4 s,
# reconciliation of orders Astria did not call back about after 1 minute, the outbox relay every
# 5 s.
#
# Each run starts from an empty database (ASTRIA_STATE_DIR, default .spin/sandbox), since the
# sandbox's chats, sessions and tunes live in its memory.
#
# Also: SANDBOX_LISTEN (127.0.0.1:3100), ASTRIA_LISTEN (127.0.0.1:3000),
# SANDBOX_TRAINING_SECONDS (5), ASTRIA_SKIP_BUILD=1, and what scripts/run.sh takes
# (ASTRIA_HOST=devhost|spin, SPIN_BIN).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
say() { echo "[sandbox] $*" >&2; }
secret() { head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n'; }

app_listen=${ASTRIA_LISTEN:-127.0.0.1:3000}
sandbox_listen=${SANDBOX_LISTEN:-127.0.0.1:3100}
sandbox_url=http://$sandbox_listen
export ASTRIA_LISTEN=$app_listen SANDBOX_LISTEN=$sandbox_listen SANDBOX_APP_URL=http://$app_listen

export SPIN_VARIABLE_WHATSAPP_APP_SECRET=$(secret)
export SPIN_VARIABLE_WHATSAPP_VERIFY_TOKEN=$(secret)
export SPIN_VARIABLE_WHATSAPP_ACCESS_TOKEN=EAAG$(secret)
export SPIN_VARIABLE_WHATSAPP_PHONE_NUMBER_ID=100000000000001
export SPIN_VARIABLE_STRIPE_SECRET_KEY=sk_test_$(secret)
export SPIN_VARIABLE_STRIPE_WEBHOOK_SECRET=whsec_$(secret)
export SPIN_VARIABLE_ASTRIA_API_KEY=sd_$(secret)
export SPIN_VARIABLE_CALLBACK_SECRET=$(secret)
export SPIN_VARIABLE_WHATSAPP_API_URL=$sandbox_url
export SPIN_VARIABLE_WHATSAPP_MEDIA_URL=$sandbox_url
export SPIN_VARIABLE_STRIPE_API_URL=$sandbox_url
export SPIN_VARIABLE_ASTRIA_API_URL=$sandbox_url
export SPIN_VARIABLE_PUBLIC_BASE_URL=http://$app_listen
export SPIN_VARIABLE_ASTRIA_TEST_MODE=true
export SPIN_VARIABLE_WHATSAPP_PACE_MS=${SPIN_VARIABLE_WHATSAPP_PACE_MS:-500}
export SPIN_VARIABLE_WHATSAPP_RETRY_BASE_MS=${SPIN_VARIABLE_WHATSAPP_RETRY_BASE_MS:-1000}
export SPIN_VARIABLE_WHATSAPP_UNCONFIRMED_WAIT_MS=${SPIN_VARIABLE_WHATSAPP_UNCONFIRMED_WAIT_MS:-10000}
export SPIN_VARIABLE_STRIPE_TIMEOUT_MS=${SPIN_VARIABLE_STRIPE_TIMEOUT_MS:-4000}
export SPIN_VARIABLE_RECONCILE_AFTER_MINUTES=${SPIN_VARIABLE_RECONCILE_AFTER_MINUTES:-1}
export SPIN_VARIABLE_RECONCILE_BACKOFF_MINUTES=${SPIN_VARIABLE_RECONCILE_BACKOFF_MINUTES:-0}
export SPIN_VARIABLE_RECONCILE_PAID_AFTER_MINUTES=${SPIN_VARIABLE_RECONCILE_PAID_AFTER_MINUTES:-1}
export RELAY_EVERY=${RELAY_EVERY:-5}

state_dir=${ASTRIA_STATE_DIR:-.spin/sandbox}
rm -rf "$state_dir"
mkdir -p "$state_dir"
export ASTRIA_STATE_DIR=$state_dir

if [ "${ASTRIA_SKIP_BUILD:-0}" != 1 ]; then
  bash scripts/build.sh
  export ASTRIA_SKIP_BUILD=1
fi
[ -x target/host/sandbox ] || { say "target/host/sandbox is missing: run scripts/build.sh"; exit 1; }

target/host/sandbox &
sandbox_pid=$!
bash scripts/run.sh "$@" &
run_pid=$!
stop() {
  kill -TERM "$run_pid" 2>/dev/null || true
  wait "$run_pid" 2>/dev/null || true
  kill "$sandbox_pid" 2>/dev/null || true
}
trap stop INT TERM EXIT

for _ in $(seq 1 240); do
  curl -fsS "http://$app_listen/health/message" >/dev/null 2>&1 && break
  kill -0 "$run_pid" 2>/dev/null || { say "the app did not start"; exit 1; }
  sleep 0.5
done
say "ready: open $sandbox_url in a browser (Ctrl-C stops the app and the sandbox)"
wait "$run_pid"

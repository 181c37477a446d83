#!/usr/bin/env bash
# Makes sure PostgreSQL (127.0.0.1:5432, trust auth for user postgres) and Redis
# (127.0.0.1:6379) answer, starting them, or installing them from Debian, when they do not.
set -euo pipefail
say() { echo "[services] $*" >&2; }
sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
apt_updated=""
apt_install() {
  [ -n "$apt_updated" ] || { $sudo_cmd apt-get update -qq >/dev/null; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "$@" >/dev/null
}

pg_up() { command -v pg_isready >/dev/null 2>&1 && pg_isready -q -h 127.0.0.1 -p 5432; }
if pg_up; then
  say "PostgreSQL is running"
else
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    say "installing PostgreSQL"
    apt_install postgresql
    fresh_install=1
  fi
  version=$(ls /etc/postgresql | sort -V | tail -n1)
  if [ "${fresh_install:-}" = 1 ]; then
    # Tests connect as postgres over TCP without a password, as on the project's machines.
    hba="/etc/postgresql/$version/main/pg_hba.conf"
    $sudo_cmd sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
  fi
  say "starting PostgreSQL $version"
  $sudo_cmd pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  # The package may have started the cluster itself, before the pg_hba.conf edit above.
  [ "${fresh_install:-}" = 1 ] && { $sudo_cmd pg_ctlcluster --skip-systemctl-redirect "$version" main reload || true; }
  for _ in $(seq 1 60); do pg_up && break; sleep 0.5; done
  pg_up || { say "PostgreSQL did not start"; exit 1; }
fi

redis_up() { command -v redis-cli >/dev/null 2>&1 && [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ]; }
if redis_up; then
  say "Redis is running"
else
  command -v redis-server >/dev/null 2>&1 || { say "installing Redis"; apt_install redis-server; }
  say "starting Redis"
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 1 40); do redis_up && break; sleep 0.25; done
  redis_up || { say "Redis did not start"; exit 1; }
fi

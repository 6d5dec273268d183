#!/usr/bin/env bash
# Makes sure PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379) are running, installing
# them from Debian packages when missing. Idempotent: running services are left alone.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ensure_postgres() {
  if ! command -v pg_isready >/dev/null || ! pg_isready -q -h 127.0.0.1 -p 5432; then
    if ! command -v pg_ctlcluster >/dev/null; then
      log "installing PostgreSQL"
      apt_install postgresql postgresql-client
    fi
    local version
    version="$(find /etc/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -V | tail -n1)"
    [ -n "$version" ] || die "no PostgreSQL cluster found under /etc/postgresql"
    log "starting PostgreSQL $version"
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    wait_for 30 "PostgreSQL on 127.0.0.1:5432" pg_isready -q -h 127.0.0.1 -p 5432
  fi
  # A fresh Debian install uses password auth on TCP: give the postgres role the password
  # TEST_DATABASE_URL carries (harmless where trust auth is configured).
  if ! psql "$TEST_DATABASE_URL" -Atqc 'SELECT 1' >/dev/null 2>&1; then
    log "setting the postgres role's password for TEST_DATABASE_URL"
    (cd / && $SUDO -u postgres psql -qc "ALTER ROLE postgres PASSWORD 'postgres'") \
      || (cd / && su postgres -c "psql -qc \"ALTER ROLE postgres PASSWORD 'postgres'\"")
    psql "$TEST_DATABASE_URL" -Atqc 'SELECT 1' >/dev/null || die "cannot connect with TEST_DATABASE_URL"
  fi
}

ensure_redis() {
  if command -v redis-cli >/dev/null && redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    return
  fi
  command -v redis-server >/dev/null || { log "installing Redis"; apt_install redis-server redis-tools; }
  log "starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --pidfile "$ORDERS_CACHE/redis.pid" --logfile "$ORDERS_CACHE/redis.log"
  wait_for 15 "Redis on 127.0.0.1:6379" redis-cli -h 127.0.0.1 -p 6379 ping
}

ensure_postgres
ensure_redis

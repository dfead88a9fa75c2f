#!/usr/bin/env bash
# Make sure PostgreSQL and RabbitMQ (with its management plugin) are up on this machine.
# Starts them when installed but down; installs them with apt-get when missing and possible.
# Idempotent: running it again when everything is up only checks. Respects SNTRACK_SKIP_SERVICES=1
# (for servers you run elsewhere: then only reachability is checked by the commands themselves).
set -euo pipefail

log() { printf '[services] %s\n' "$*" >&2; }
die() { printf '[services] ERROR: %s\n' "$*" >&2; exit 1; }

[ "${SNTRACK_SKIP_SERVICES:-0}" = "1" ] && { log "SNTRACK_SKIP_SERVICES=1: not managing services"; exit 0; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {  # port, what, seconds
  for _ in $(seq 1 "$3"); do port_open "$1" && return 0; sleep 1; done
  die "$2 did not open port $1 within $3 s"
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

apt_install() {
  command -v apt-get >/dev/null || die "$1 is missing and this is not a Debian/Ubuntu system: install $1 yourself"
  log "installing $* with apt-get"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq || true
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null \
    || die "apt-get could not install $*; install it yourself and re-run"
}

ensure_postgres() {
  if port_open 5432; then log "PostgreSQL is up"; return; fi
  command -v pg_ctlcluster >/dev/null || apt_install postgresql
  local version
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -1)
  [ -n "$version" ] || die "PostgreSQL is installed but has no cluster; create one with pg_createcluster"
  log "starting PostgreSQL $version"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || as_root pg_ctlcluster "$version" main start
  wait_port 5432 PostgreSQL 60
  # Local trust for the postgres user over TCP is how the defaults connect; say so if it is not allowed.
  psql -h 127.0.0.1 -U postgres -Atc 'select 1' >/dev/null 2>&1 \
    || log "WARNING: cannot connect as postgres@127.0.0.1 without a password; set SNTRACK_DATABASE_URL"
}

ensure_rabbitmq() {
  if ! port_open 5672; then
    command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
    log "starting RabbitMQ"
    as_root rabbitmq-plugins --offline enable rabbitmq_management >/dev/null 2>&1 || true
    as_root rabbitmq-server -detached
    wait_port 5672 RabbitMQ 90
  else
    log "RabbitMQ is up"
  fi
  if ! port_open 15672; then
    log "enabling the rabbitmq_management plugin"
    as_root rabbitmq-plugins enable rabbitmq_management >/dev/null
    wait_port 15672 "RabbitMQ management API" 60
  fi
}

# RabbitMQ refuses bodies larger than the consumers' gate accepts (SNTRACK_MAX_MESSAGE_BYTES, default 1 MiB), so an
# oversized message is refused at publish rather than stored, carried and held in a consumer's memory. Set at run
# time (new channels obey at once, no restart) and in rabbitmq.conf for the next start. Idempotent.
limit_rabbitmq_message_size() {
  local bytes="${SNTRACK_MAX_MESSAGE_BYTES:-1048576}" conf="${RABBITMQ_CONFIG_FILE:-/etc/rabbitmq/rabbitmq.conf}"
  [[ "$bytes" =~ ^[0-9]+$ ]] || die "SNTRACK_MAX_MESSAGE_BYTES must be a number of bytes, not '$bytes'"
  local current
  current=$(as_root rabbitmqctl eval 'application:get_env(rabbit, max_message_size).' 2>/dev/null | tr -d '[:space:]') \
    || { log "WARNING: cannot run rabbitmqctl; set max_message_size = $bytes in rabbitmq.conf yourself"; return; }
  if [ "$current" != "{ok,$bytes}" ]; then
    as_root rabbitmqctl eval "application:set_env(rabbit, max_message_size, $bytes)." >/dev/null
    log "RabbitMQ max_message_size set to $bytes bytes (was $current)"
  fi
  if [ -f "$conf" ] && ! grep -qx "max_message_size = $bytes" "$conf"; then
    as_root sed -i '/^max_message_size[[:space:]]*=/d' "$conf"
    printf 'max_message_size = %s\n' "$bytes" | as_root tee -a "$conf" >/dev/null
    log "wrote max_message_size = $bytes to $conf"
  fi
}

ensure_postgres
ensure_rabbitmq
limit_rabbitmq_message_size

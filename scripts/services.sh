#!/usr/bin/env bash
# Installs (Debian packages, PyPI) and starts what the tests need, when it is missing, then
# prints `export VAR=...` lines for the services. Sourced by scripts/test.sh; also usable alone:
#   eval "$(scripts/services.sh)"
# Reuses Redis on 127.0.0.1:6379, RabbitMQ on 127.0.0.1:5672 and moto on 127.0.0.1:5000 when up.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { echo "[services] $*" >&2; }
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { # port seconds name
  for _ in $(seq 1 "$(( $2 * 4 ))"); do listening "$1" && return 0; sleep 0.25; done
  log "$3 did not start listening on 127.0.0.1:$1 within $2 s"; return 1
}
apt_updated=0
apt_install() {
  if [ "$(id -u)" != 0 ]; then log "need root to apt-get install $*"; return 1; fi
  if [ $apt_updated = 0 ]; then DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

# --- Redis -------------------------------------------------------------------------------------
if ! listening 6379; then
  command -v redis-server >/dev/null || apt_install redis-server
  log "starting redis-server on 127.0.0.1:6379"
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp --logfile /tmp/celery-scale-redis.log >&2
  wait_port 6379 20 redis
fi

# --- RabbitMQ (+ management plugin) ------------------------------------------------------------
# The package also serves the throwaway nodes that the RabbitMQ restart and amqps:// tests start
# on their own ports (celery-scale-amqp/tests/common/scratch.rs); their certificates are
# made in Rust, so nothing more is needed for them.
if ! command -v rabbitmq-server >/dev/null; then apt_install rabbitmq-server; fi
if ! listening 5672; then
  log "starting rabbitmq-server"
  rabbitmq-server -detached >&2 2>&1 || true
  wait_port 5672 90 rabbitmq
fi
if ! listening 15672; then
  log "enabling rabbitmq_management"
  rabbitmq-plugins enable rabbitmq_management >&2
  wait_port 15672 60 rabbitmq-management
fi

# --- Python venv: Celery and moto (pinned) -----------------------------------------------------
venv="$root/.venv"
req="$root/scripts/requirements-test.txt"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" >&2 || { apt_install python3-venv python3-pip && python3 -m venv "$venv" >&2; }
fi
if ! cmp -s "$req" "$venv/.requirements-installed" 2>/dev/null; then
  # kombu's SQS transport needs pycurl; where pip finds no wheel it builds from libcurl and
  # OpenSSL (Debian's dev packages).
  dpkg -s libcurl4-openssl-dev libssl-dev >/dev/null 2>&1 || apt_install libcurl4-openssl-dev libssl-dev
  log "installing pinned Python packages into .venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$req" >&2
  cp "$req" "$venv/.requirements-installed"
fi

# --- moto server -------------------------------------------------------------------------------
if ! listening 5000; then
  log "starting moto_server on 127.0.0.1:5000"
  nohup "$venv/bin/moto_server" -H 127.0.0.1 -p 5000 >/tmp/celery-scale-moto.log 2>&1 &
  wait_port 5000 60 moto
fi

cat <<VARS
export CELERY_SCALE_REDIS_URL=redis://127.0.0.1:6379
export CELERY_SCALE_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f
export CELERY_SCALE_RABBITMQ_MGMT_URL=http://guest:guest@127.0.0.1:15672
export CELERY_SCALE_MOTO_URL=http://127.0.0.1:5000
export CELERY_SCALE_PYTHON=$venv/bin/python
export AWS_ACCESS_KEY_ID=testing
export AWS_SECRET_ACCESS_KEY=testing
export AWS_REGION=us-east-1
export AWS_EC2_METADATA_DISABLED=true
VARS

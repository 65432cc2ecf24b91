#!/usr/bin/env bash
# scripts/stack.sh: run singleflight's PostgreSQL, Redis and Prometheus natively
# (no Docker), with all their state in a project-local .stack/ folder; with
# REPLICAS=3, a fleet of the service behind HAProxy too.
#
# Usage: scripts/stack.sh [up|start|stop|status|env|help]
#   up      (default) install missing packages, start PostgreSQL, Redis and
#           Prometheus, then run the service in the foreground:
#           exec cargo run --release
#           (Ctrl-C stops the service; the other servers keep running)
#           With REPLICAS=N (N > 1): build the service, run N replicas and
#           HAProxy in front of them, and follow the replicas' logs in the
#           foreground; Ctrl-C (or SIGTERM) stops HAProxy and the replicas
#           gracefully (the other servers keep running)
#   start   like `up`, but only PostgreSQL, Redis and Prometheus (idempotent:
#           what is already running is reused); with REPLICAS=N (N > 1) also
#           the replicas and HAProxy, in the background
#   stop    stop HAProxy and the replicas (if a fleet runs), PostgreSQL (fast
#           shutdown), Redis and Prometheus; fine if already stopped
#   status  running or not, pid, port, data dir and log of each server
#   env     print export lines for the running stack:
#             eval "$(scripts/stack.sh env)"
#
# Environment:
#   PG_PORT     PostgreSQL port (default 5432), listens on 127.0.0.1 only
#   REDIS_PORT  Redis port (default 6379), listens on 127.0.0.1 only
#   PROM_PORT   Prometheus port (default 9090), listens on 127.0.0.1 only
#   HTTP_ADDR   passed through to the service (its default is 0.0.0.0:8080);
#               Prometheus scrapes the service there (127.0.0.1 for 0.0.0.0)
#   RUST_LOG    passed through to the service (default: info)
#   STACK_DIR   where all state lives (default: .stack at the repository root)
#   REPLICAS    how many replicas of the service to run (default 1: the
#               service alone on HTTP_ADDR, no HAProxy). Above 1, replica i
#               listens on 127.0.0.1:REPLICA_BASE_PORT+i-1, HAProxy spreads
#               requests over the ready ones (round robin, health-checked on
#               GET /readyz) on LB_PORT, Prometheus scrapes every replica,
#               and HTTP_ADDR is not used
#   LB_PORT     HAProxy's port (default 8080, on all interfaces like the
#               service's own default), with REPLICAS > 1
#   REPLICA_BASE_PORT  first replica's port (default 8081), with REPLICAS > 1
#   SERVICE_BIN the service binary the replicas run (default: build it with
#               cargo build --release), with REPLICAS > 1
#
# Layout (under STACK_DIR, by default .stack/ at the repository root):
#   pg/data  pg/postgres.log  pg/run (unix socket)
#   redis/   redis/redis.log  redis/redis.pid
#   prometheus/data  prometheus/prometheus.log  prometheus/prometheus.pid
#   prometheus/prometheus.yaml (the project's prometheus.yaml, with its
#   compose service discovery replaced by where the service listens)
#   app/replica-<i>.log  app/replica-<i>.pid  (with REPLICAS > 1)
#   haproxy/haproxy.cfg  haproxy/haproxy.log  haproxy/haproxy.pid
# It never touches Debian's own PostgreSQL cluster or system-wide services
# (except the prometheus service that Debian's package starts when this
# script installs it: that one is stopped and disabled, as it takes :9090).
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
STACK=${STACK_DIR:-$ROOT/.stack}
[[ $STACK == /* ]] || STACK=$PWD/$STACK
PG_DIR=$STACK/pg
PG_DATA=$PG_DIR/data
PG_LOG=$PG_DIR/postgres.log
PG_SOCK=$PG_DIR/run
REDIS_DIR=$STACK/redis
REDIS_LOG=$REDIS_DIR/redis.log
REDIS_PIDFILE=$REDIS_DIR/redis.pid
REDIS_PORTFILE=$REDIS_DIR/redis.port
PROM_DIR=$STACK/prometheus
PROM_DATA=$PROM_DIR/data
PROM_LOG=$PROM_DIR/prometheus.log
PROM_PIDFILE=$PROM_DIR/prometheus.pid
PROM_PORTFILE=$PROM_DIR/prometheus.port
PROM_CONFIG=$PROM_DIR/prometheus.yaml
PROM_TARGETFILE=$PROM_DIR/prometheus.target
# The project's scrape config, written for docker-compose: it finds every replica of
# the compose service `app` through Docker's DNS, on this one line, which the copy
# made here replaces with the addresses where the service listens.
PROM_SOURCE=$ROOT/prometheus.yaml
PROM_COMPOSE_DISCOVERY='dns_sd_configs: [{names: ["app"], type: A, port: 8080}]'
APP_DIR=$STACK/app
LB_DIR=$STACK/haproxy
LB_CONFIG=$LB_DIR/haproxy.cfg
LB_LOG=$LB_DIR/haproxy.log
LB_PIDFILE=$LB_DIR/haproxy.pid
LB_PORTFILE=$LB_DIR/haproxy.port
DB_NAME=singleflight
ME=${0}
CMD=${1:-up}

# Remember whether the user chose the ports, so that a stack already running
# on another port is adopted (when not chosen) or reported (when chosen).
PG_PORT_SET=${PG_PORT+yes}
REDIS_PORT_SET=${REDIS_PORT+yes}
PROM_PORT_SET=${PROM_PORT+yes}
PG_PORT=${PG_PORT:-5432}
REDIS_PORT=${REDIS_PORT:-6379}
PROM_PORT=${PROM_PORT:-9090}
REPLICAS=${REPLICAS:-1}
LB_PORT=${LB_PORT:-8080}
REPLICA_BASE_PORT=${REPLICA_BASE_PORT:-8081}
PG_BIN=""

say() { printf 'stack: %s\n' "$*"; }
warn() { printf 'stack: %s\n' "$*" >&2; }
# die "headline" ["next step" ...]: every failure says what to do next.
die() {
  printf 'stack: error: %s\n' "$1" >&2
  shift
  local line
  for line in "$@"; do printf '       %s\n' "$line" >&2; done
  exit 1
}
is_root() { [[ $EUID -eq 0 ]]; }
# True when a fleet of replicas behind HAProxy is asked for (REPLICAS > 1).
fleet() { ((REPLICAS > 1)); }
# True if PID exists and is not a zombie (containers whose PID 1 does not
# reap promptly keep dead daemons around as zombies).
alive() {
  local st
  st=$(sed -n 's/^.*) \([A-Za-z]\).*$/\1/p' "/proc/$1/stat" 2>/dev/null) || return 1
  [[ -n $st && $st != Z && $st != X ]]
}

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

# STACK_DIR ends up inside a postgres option string ('-k <dir>'), so it may not
# contain quotes or line breaks.
check_stack_dir() {
  if [[ $STACK == *[\'\"$'\n']* ]]; then
    die "STACK_DIR=$STACK contains a quote or a line break, which PostgreSQL's options cannot carry." \
      "use a plain path, e.g. STACK_DIR=/tmp/singleflight-stack $ME $CMD"
  fi
}

check_port_value() { # NAME VALUE
  if ! [[ $2 =~ ^[0-9]{1,5}$ ]] || ((10#$2 < 1 || 10#$2 > 65535)); then
    local example=6380
    [[ $1 != PG_PORT ]] || example=5433
    [[ $1 != PROM_PORT ]] || example=9091
    [[ $1 != LB_PORT ]] || example=8090
    [[ $1 != REPLICA_BASE_PORT ]] || example=8091
    die "$1=$2 is not a valid TCP port." "use a number between 1 and 65535, e.g. $1=$example $ME $CMD"
  fi
}

# ---------------------------------------------------------------- ports --

# True if something accepts TCP connections on 127.0.0.1:PORT.
port_open() {
  # shellcheck disable=SC2016 # $1 is expanded by the inner bash
  timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

# Describe who listens on PORT, if `ss -ltnp` can tell.
port_holder() {
  command -v ss >/dev/null 2>&1 || return 0
  ss -Hltnp "sport = :$1" 2>/dev/null | awk '{
      who = "an unknown process (ss could not tell; try: sudo ss -ltnp)"
      if (match($0, /users:\(\("[^"]*",pid=[0-9]+/)) {
        s = substr($0, RSTART + 8, RLENGTH - 8)
        n = index(s, "\",pid=")
        who = substr(s, 2, n - 2) " (pid " substr(s, n + 6) ")"
      }
      print $4 " is held by " who
    }'
}

port_taken_die() { # WHAT PORT VARNAME
  local what=$1 port=$2 var=$3 holder hint=()
  holder=$(port_holder "$port")
  [[ -n $holder ]] || holder="(could not tell who holds it; try: sudo ss -ltnp 'sport = :$port')"
  case $holder in
    *postgres*) hint=("if this is Debian's own cluster (see: pg_lsclusters), this script leaves it alone;"
                      "stop it yourself if you do not need it (pg_ctlcluster <version> main stop), or use another port.") ;;
    *redis*) hint=("if this is the system redis-server service, this script leaves it alone;"
                   "stop it yourself if you do not need it (service redis-server stop), or use another port.") ;;
    *prometheus*) hint=("if this is the system prometheus service (Debian's package starts one on :9090 where systemd runs),"
                        "stop it yourself if you do not need it (systemctl disable --now prometheus), or use another port.") ;;
    *singleflight* | *cargo*) hint=("this looks like the service itself: an earlier '$ME up' or a 'cargo run' of your own?"
                                    "stop it (Ctrl-C where it runs), or use another port.") ;;
    *haproxy*) hint=("if this is the system haproxy service (service haproxy status), this script leaves it alone;"
                     "stop it yourself if you do not need it (service haproxy stop), or use another port.") ;;
  esac
  die "port $port (for $what) is already in use by something that is not this project's $what." \
    "$holder" \
    "${hint[@]}" \
    "choose another port, e.g.: $var=$((port + 1)) $ME $CMD" \
    "('$ME env', 'status' and 'stop' find the running ports on their own)"
}

# ------------------------------------------------------------- packages --

# Newest /usr/lib/postgresql/*/bin, or the one matching an existing data dir.
find_pg_bin() {
  local want="" found
  if [[ -r $PG_DATA/PG_VERSION ]]; then
    want=$(<"$PG_DATA/PG_VERSION")
    if [[ -x /usr/lib/postgresql/$want/bin/postgres ]]; then
      PG_BIN=/usr/lib/postgresql/$want/bin
      return 0
    fi
  fi
  found=$(shopt -s nullglob; printf '%s\n' /usr/lib/postgresql/*/bin/postgres | sort -V | tail -n 1)
  PG_BIN=${found%/postgres}
}

missing_packages() {
  local pkgs=()
  find_pg_bin
  if [[ -z $PG_BIN ]] || [[ ! -x $PG_BIN/initdb ]] || [[ ! -x $PG_BIN/pg_ctl ]]; then
    pkgs+=(postgresql)
  elif [[ ! -x $PG_BIN/psql ]] || [[ ! -x $PG_BIN/createdb ]]; then
    pkgs+=(postgresql-client)
  fi
  command -v redis-server >/dev/null 2>&1 || pkgs+=(redis-server)
  command -v redis-cli >/dev/null 2>&1 || pkgs+=(redis-tools)
  command -v curl >/dev/null 2>&1 || pkgs+=(curl)
  if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
    pkgs+=(prometheus)
  fi
  if ! command -v setsid >/dev/null 2>&1 || { is_root && ! command -v runuser >/dev/null 2>&1; }; then
    pkgs+=(util-linux)
  fi
  if fleet && [[ -z $(haproxy_bin) ]]; then pkgs+=(haproxy); fi
  printf '%s\n' "${pkgs[@]}"
}

# Debian installs haproxy in /usr/sbin, which is not on a normal user's PATH.
haproxy_bin() {
  if command -v haproxy 2>/dev/null; then return 0; fi
  if [[ -x /usr/sbin/haproxy ]]; then printf '/usr/sbin/haproxy\n'; fi
}

ensure_packages() {
  local pkgs=()
  mapfile -t pkgs < <(missing_packages | sed '/^$/d')
  ((${#pkgs[@]} == 0)) && return 0
  if ! is_root; then
    die "missing packages: ${pkgs[*]}" \
      "install them, then run this again:" \
      "  sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y ${pkgs[*]}"
  fi
  say "installing missing packages: ${pkgs[*]}"
  apt-get update ||
    die "apt-get update failed." "check network access / apt sources, then run '$ME $CMD' again."
  # No recommends: prometheus would bring node-exporter, a system service of its own.
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${pkgs[@]}" ||
    die "apt-get install ${pkgs[*]} failed." "fix the apt error above, then run '$ME $CMD' again."
  if [[ " ${pkgs[*]} " == *" prometheus "* ]]; then stop_system_prometheus; fi
  mapfile -t pkgs < <(missing_packages | sed '/^$/d')
  ((${#pkgs[@]} == 0)) ||
    die "still missing after apt-get install: ${pkgs[*]}" \
      "check that /usr/lib/postgresql/*/bin, redis-server, redis-cli, curl, prometheus, promtool, setsid (and haproxy for REPLICAS > 1) exist."
}

# Where systemd runs, installing Debian's prometheus package starts a system-wide
# Prometheus on :9090, which would hold the port of the project's own. This script
# just installed it, so it takes it back out of the way (and says how to undo that).
stop_system_prometheus() {
  command -v systemctl >/dev/null 2>&1 || return 0
  systemctl is-active --quiet prometheus 2>/dev/null || return 0
  say "prometheus: Debian's package started a system-wide prometheus service on :9090;"
  say "            stopping and disabling it so the project's own can listen there"
  say "            (to get it back: systemctl enable --now prometheus)"
  systemctl disable --now prometheus >/dev/null 2>&1 ||
    warn "warning: could not stop the system prometheus service; if :9090 stays taken, use PROM_PORT=9091"
}

# ----------------------------------------------------------- postgresql --

# .stack/ must be searchable by the postgres user even under umask 077.
make_stack_dir() {
  if [[ ! -d $STACK ]]; then
    mkdir -p "$STACK"
    chmod 0755 "$STACK"
  fi
  [[ -w $STACK ]] ||
    die "$STACK is not writable by you (was it created by a root run?)." \
      "run this script as root again (sudo $ME $CMD), or remove it: sudo rm -rf $STACK"
}

# Run a PostgreSQL server binary: PostgreSQL refuses to run as root.
as_pg() {
  if is_root; then
    (cd "$PG_DIR" && runuser -u postgres -- "$@")
  else
    "$@"
  fi
}

# Pid of this project's postmaster (from its postmaster.pid), or fail.
pg_pid() {
  local f=$PG_DATA/postmaster.pid pid
  [[ -r $f ]] || return 1
  pid=$(sed -n 1p "$f")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  alive "$pid" || return 1
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == postgres ]] || return 1
  printf '%s\n' "$pid"
}

# True if .stack/pg exists but we cannot look inside (a root run made it).
pg_unreadable() { [[ -d $PG_DIR && ! -x $PG_DIR ]]; }

pg_running_port() { sed -n 4p "$PG_DATA/postmaster.pid" 2>/dev/null; }

pg_prepare_dirs() {
  make_stack_dir
  if ! is_root && [[ -e $PG_DIR && ! -O $PG_DIR ]]; then
    die "$PG_DIR belongs to $(stat -c %U "$PG_DIR"), not to you (was it created by a root run?)." \
      "run this script as root again, or remove the local data: sudo rm -rf $PG_DIR"
  fi
  mkdir -p "$PG_DIR" "$PG_SOCK"
  chmod 0700 "$PG_DIR" "$PG_SOCK"
  if is_root; then
    getent passwd postgres >/dev/null ||
      die "there is no 'postgres' system user (PostgreSQL refuses to run as root)." \
        "reinstall the package that creates it: apt-get install --reinstall postgresql-common"
    chown postgres:postgres "$PG_DIR" "$PG_SOCK"
    [[ ! -e $PG_LOG ]] || chown postgres:postgres "$PG_LOG"
    runuser -u postgres -- test -w "$PG_DIR" -a -x "$PG_DIR" 2>/dev/null ||
      die "the 'postgres' user cannot reach $PG_DIR (a parent directory is not searchable by others, e.g. /root is 0700)." \
        "move the repository somewhere like /work or /srv, or make its parent directories searchable: chmod o+x <dir>"
  fi
}

pg_initdb() {
  local have
  if [[ -s $PG_DATA/PG_VERSION ]]; then
    have=$(<"$PG_DATA/PG_VERSION")
    [[ $PG_BIN == "/usr/lib/postgresql/$have/bin" ]] ||
      die "$PG_DATA was created by PostgreSQL $have, but its binaries are not installed (found: ${PG_BIN:-none})." \
        "install them (apt-get install postgresql-$have), or throw the local data away: rm -rf $PG_DIR"
    return 0
  fi
  if [[ -d $PG_DATA ]] && [[ -n $(ls -A "$PG_DATA" 2>/dev/null) ]]; then
    die "$PG_DATA exists but is not a PostgreSQL data directory (an interrupted initdb?)." \
      "remove it and try again: rm -rf $PG_DATA && $ME $CMD"
  fi
  say "postgres: initializing a new cluster in $PG_DATA ($PG_BIN/initdb)"
  if ! as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U postgres --auth=trust -E UTF8 --locale=C \
    >"$PG_DIR/initdb.log" 2>&1; then
    tail -n 20 "$PG_DIR/initdb.log" >&2 || true
    die "initdb failed (full output: $PG_DIR/initdb.log)." \
      "fix the cause above, then: rm -rf $PG_DATA && $ME $CMD"
  fi
}

# After a crash postmaster.pid and the socket lock file stay behind; postgres
# refuses to start while their pid is still taken (e.g. by a not-yet-reaped
# zombie, or a reused pid). Remove them only if no live postgres process still
# works in our data dir.
pg_clear_stale_locks() {
  local f=$PG_DATA/postmaster.pid old="" p stale=()
  if [[ -e $f ]]; then
    old=$(sed -n 1p "$f")
    if [[ $old =~ ^[0-9]+$ ]] && alive "$old" && [[ $(cat "/proc/$old/comm" 2>/dev/null) == postgres ]]; then
      return 0 # a live postgres: let postgres itself decide
    fi
    stale+=("$f")
  fi
  for p in "$PG_SOCK"/.s.PGSQL.*; do [[ -e $p ]] && stale+=("$p"); done
  ((${#stale[@]} > 0)) || return 0
  for p in /proc/[0-9]*; do
    [[ $(cat "$p/comm" 2>/dev/null) == postgres ]] || continue
    alive "${p#/proc/}" || continue
    if [[ $(readlink "$p/cwd" 2>/dev/null) == "$PG_DATA" ]]; then
      die "leftover postgres processes (e.g. pid ${p#/proc/}) still use $PG_DATA after a crash." \
        "wait a few seconds or stop them (kill ${p#/proc/}), then run '$ME $CMD' again."
    fi
  done
  say "postgres: removing stale lock files left by a crash${old:+ (pid $old is gone)}: ${stale[*]##*/}"
  rm -f "${stale[@]}"
}

pg_start() {
  local pid port
  find_pg_bin
  if pid=$(pg_pid); then
    port=$(pg_running_port)
    if [[ $port != "$PG_PORT" ]]; then
      [[ -n $PG_PORT_SET ]] &&
        die "this project's postgres is already running on port $port, not PG_PORT=$PG_PORT." \
          "use it as is: PG_PORT=$port $ME $CMD" \
          "or move it: $ME stop && PG_PORT=$PG_PORT $ME $CMD"
      PG_PORT=$port
    fi
    say "postgres: already running (pid $pid) on 127.0.0.1:$PG_PORT, reusing it"
  else
    if port_open "$PG_PORT"; then port_taken_die postgres "$PG_PORT" PG_PORT; fi
    pg_prepare_dirs
    pg_initdb
    pg_clear_stale_locks
    say "postgres: starting on 127.0.0.1:$PG_PORT (log: $PG_LOG)"
    if ! as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t 30 \
      -o "-p $PG_PORT -k '$PG_SOCK' -c listen_addresses=127.0.0.1" start >/dev/null; then
      tail -n 20 "$PG_LOG" >&2 || true
      die "postgres failed to start (log above, full log: $PG_LOG)." \
        "fix the cause in the log, then run '$ME $CMD' again (or '$ME stop' first if it is half up)."
    fi
    pid=$(pg_pid) || die "pg_ctl reported success but no postmaster is running." "see $PG_LOG"
    say "postgres: started (pid $pid)"
  fi
  pg_ensure_db
}

pg_ensure_db() {
  local exists
  exists=$(PGCONNECT_TIMEOUT=5 "$PG_BIN/psql" -X -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres \
    -tAc "SELECT 1 FROM pg_database WHERE datname='$DB_NAME'") ||
    die "cannot query postgres on 127.0.0.1:$PG_PORT." "see $PG_LOG; try '$ME stop' then '$ME $CMD'."
  if [[ $exists == 1 ]]; then
    say "postgres: database '$DB_NAME' exists"
  else
    PGCONNECT_TIMEOUT=5 "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres "$DB_NAME" ||
      die "createdb $DB_NAME failed." "see $PG_LOG; try '$ME stop' then '$ME $CMD'."
    say "postgres: created database '$DB_NAME'"
  fi
}

pg_stop() {
  local pid
  if ! pid=$(pg_pid); then
    pg_unreadable &&
      die "cannot inspect $PG_DIR as $(id -un) (it belongs to $(stat -c %U "$PG_DIR"))." "run: sudo $ME stop"
    say "postgres: not running"
    return 0
  fi
  find_pg_bin
  say "postgres: stopping (pid $pid, fast shutdown)"
  if [[ -n $PG_BIN ]]; then
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 30 stop >/dev/null ||
      die "postgres (pid $pid) did not stop within 30 s." \
        "see $PG_LOG; try again, or as a last resort: kill -QUIT $pid (immediate shutdown)"
  else
    kill -INT "$pid" # SIGINT = fast shutdown
    local i
    for ((i = 0; i < 150; i++)); do alive "$pid" || break; sleep 0.2; done
    ! alive "$pid" ||
      die "postgres (pid $pid) did not stop within 30 s." "see $PG_LOG; as a last resort: kill -QUIT $pid"
  fi
  say "postgres: stopped"
}

# ---------------------------------------------------------------- redis --

# Pid of this project's redis-server (from its pid file), or fail.
redis_pid() {
  local pid
  [[ -r $REDIS_PIDFILE ]] || return 1
  pid=$(<"$REDIS_PIDFILE")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  alive "$pid" || return 1
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == redis-server* ]] || return 1
  printf '%s\n' "$pid"
}

redis_running_port() {
  local port=""
  [[ -r $REDIS_PORTFILE ]] && port=$(<"$REDIS_PORTFILE")
  printf '%s\n' "${port:-$REDIS_PORT}"
}

redis_cli() { # PORT ARGS...
  local port=$1
  shift
  timeout 3 redis-cli -h 127.0.0.1 -p "$port" "$@" 2>/dev/null
}

# True if the redis answering on PORT is the process PID.
redis_is_ours() { # PID PORT
  [[ $(redis_cli "$2" info server | tr -d '\r' | sed -n 's/^process_id://p') == "$1" ]]
}

redis_start() {
  local pid port i
  if pid=$(redis_pid); then
    port=$(redis_running_port)
    if [[ $port != "$REDIS_PORT" ]]; then
      [[ -n $REDIS_PORT_SET ]] &&
        die "this project's redis is already running on port $port, not REDIS_PORT=$REDIS_PORT." \
          "use it as is: REDIS_PORT=$port $ME $CMD" \
          "or move it: $ME stop && REDIS_PORT=$REDIS_PORT $ME $CMD"
      REDIS_PORT=$port
    fi
    redis_is_ours "$pid" "$REDIS_PORT" ||
      die "this project's redis-server (pid $pid) runs but does not answer on 127.0.0.1:$REDIS_PORT." \
        "see $REDIS_LOG; restart it: $ME stop && $ME $CMD"
    say "redis: already running (pid $pid) on 127.0.0.1:$REDIS_PORT, reusing it"
    return 0
  fi
  if port_open "$REDIS_PORT"; then port_taken_die redis "$REDIS_PORT" REDIS_PORT; fi
  make_stack_dir
  mkdir -p "$REDIS_DIR"
  rm -f "$REDIS_PIDFILE"
  say "redis: starting on 127.0.0.1:$REDIS_PORT (log: $REDIS_LOG)"
  if ! redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --daemonize yes \
    --pidfile "$REDIS_PIDFILE" --logfile "$REDIS_LOG" --dir "$REDIS_DIR" \
    --save "" --appendonly no; then
    tail -n 20 "$REDIS_LOG" >&2 2>/dev/null || true
    die "redis-server refused to start (see above and $REDIS_LOG)." "fix the cause, then run '$ME $CMD' again."
  fi
  printf '%s\n' "$REDIS_PORT" >"$REDIS_PORTFILE"
  for ((i = 0; i < 50; i++)); do # up to ~10 s
    [[ $(redis_cli "$REDIS_PORT" ping) == PONG ]] && break
    sleep 0.2
  done
  if [[ $(redis_cli "$REDIS_PORT" ping) != PONG ]]; then
    tail -n 20 "$REDIS_LOG" >&2 2>/dev/null || true
    die "redis did not answer PING on 127.0.0.1:$REDIS_PORT within 10 s (log above, full log: $REDIS_LOG)." \
      "fix the cause in the log, then run '$ME stop' and '$ME $CMD' again."
  fi
  pid=$(redis_pid) || die "redis answers but its pid file $REDIS_PIDFILE is missing." "run '$ME stop' and '$ME $CMD' again."
  say "redis: started (pid $pid)"
}

redis_stop() {
  local pid port i
  if ! pid=$(redis_pid); then
    say "redis: not running"
    rm -f "$REDIS_PIDFILE" "$REDIS_PORTFILE"
    return 0
  fi
  port=$(redis_running_port)
  say "redis: stopping (pid $pid)"
  # Only send SHUTDOWN if the server on that port really is ours; else SIGTERM.
  if ! { redis_is_ours "$pid" "$port" && redis_cli "$port" shutdown nosave >/dev/null; }; then
    kill -TERM "$pid" 2>/dev/null || true
  fi
  for ((i = 0; i < 50; i++)); do alive "$pid" || break; sleep 0.2; done
  if alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 25; i++)); do alive "$pid" || break; sleep 0.2; done
  fi
  ! alive "$pid" ||
    die "redis (pid $pid) did not stop within 15 s." "see $REDIS_LOG; as a last resort: kill -KILL $pid"
  rm -f "$REDIS_PIDFILE" "$REDIS_PORTFILE"
  say "redis: stopped"
}

# ----------------------------------------------------------- prometheus --

# host:port where Prometheus finds the service: HTTP_ADDR (the service's own
# default 0.0.0.0:8080), with a wildcard or localhost host turned into loopback.
service_target() {
  local addr=${HTTP_ADDR:-0.0.0.0:8080} host port
  port=${addr##*:}
  host=${addr%:*}
  if [[ $addr != *:* ]] || ! [[ $port =~ ^[0-9]{1,5}$ ]] || ((10#$port < 1 || 10#$port > 65535)); then
    die "HTTP_ADDR=$addr has no fixed TCP port, and Prometheus needs one to scrape the service." \
      "use an address like 0.0.0.0:8080 or 127.0.0.1:8081: HTTP_ADDR=0.0.0.0:8080 $ME $CMD"
  fi
  case $host in
    0.0.0.0 | "" | localhost) host=127.0.0.1 ;;
    "[::]") host="[::1]" ;;
  esac
  printf '%s:%s\n' "$host" "$((10#$port))"
}

# Every host:port Prometheus scrapes, one a line: each replica's with REPLICAS > 1,
# else the service's HTTP_ADDR.
service_targets() {
  local i
  if fleet; then
    for ((i = 1; i <= REPLICAS; i++)); do printf '127.0.0.1:%s\n' "$(replica_port "$i")"; done
  else
    service_target
  fi
}

# Pid of this project's prometheus (from its pid file), or fail.
prom_pid() {
  local pid
  [[ -r $PROM_PIDFILE ]] || return 1
  pid=$(<"$PROM_PIDFILE")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  alive "$pid" || return 1
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == prometheus ]] || return 1
  printf '%s\n' "$pid"
}

prom_running_port() {
  local port=""
  [[ -r $PROM_PORTFILE ]] && port=$(<"$PROM_PORTFILE")
  printf '%s\n' "${port:-$PROM_PORT}"
}

prom_get() { # PORT PATH: the body of a GET, or fail
  curl -fsS --max-time 2 "http://127.0.0.1:$1$2" 2>/dev/null
}

# True if the Prometheus answering on PORT keeps its data in our data dir.
prom_is_ours() { # PORT
  prom_get "$1" /api/v1/status/flags | grep -qF "\"storage.tsdb.path\":\"$PROM_DATA\""
}

# Writes the project's prometheus.yaml to FILE with its compose service discovery replaced
# by the static TARGETs, and checks the result with promtool, so a broken prometheus.yaml
# is reported as such.
prom_render_config() { # FILE TARGET...
  local file=$1 out source static
  shift
  [[ -r $PROM_SOURCE ]] ||
    die "$PROM_SOURCE is missing (the scrape config the native and the compose stack share)." \
      "restore it: git -C '$ROOT' checkout -- prometheus.yaml"
  source=$(<"$PROM_SOURCE")
  [[ $source == *"$PROM_COMPOSE_DISCOVERY"* ]] ||
    die "$PROM_SOURCE does not contain the line '$PROM_COMPOSE_DISCOVERY', so this script cannot point it at the service." \
      "keep that line exactly as it is in $PROM_SOURCE; docker-compose.yaml needs it too."
  static=$(printf '"%s", ' "$@")
  static="static_configs: [{targets: [${static%, }]}]"
  {
    printf '# Written by scripts/stack.sh from %s, with its compose service discovery\n' "$PROM_SOURCE"
    printf '# replaced by: %s\n' "$static"
    printf '# Edit that file, not this copy (it is rewritten on every start).\n'
    printf '%s\n' "${source//"$PROM_COMPOSE_DISCOVERY"/"$static"}"
  } >"$file"
  if ! out=$(promtool check config "$file" 2>&1); then
    printf '%s\n' "$out" >&2
    die "promtool rejects the scrape config made from $PROM_SOURCE (output above)." \
      "fix $PROM_SOURCE (check it with: promtool check config prometheus.yaml), then run '$ME $CMD' again."
  fi
}

# Waits until PID answers /-/ready on PORT (up to ~30 s); fails if it dies first.
prom_wait_ready() { # PID PORT
  local i
  for ((i = 0; i < 150; i++)); do
    alive "$1" || return 1
    prom_get "$2" /-/ready >/dev/null && return 0
    sleep 0.2
  done
  return 1
}

# The targets' health as the running prometheus last saw it: "target up", or "target down:
# <last scrape error>"; for several targets, how many are up (and the first error).
prom_target_health() { # PORT
  local body health err healths=() up=0
  body=$(prom_get "$1" /api/v1/targets) || { printf 'target unknown (the targets API did not answer)\n'; return 0; }
  mapfile -t healths < <(printf '%s' "$body" | grep -o '"health":"[a-z]*"' | cut -d'"' -f4)
  err=$(printf '%s' "$body" | grep -o '"lastError":"[^"]\+"' | head -n 1 | cut -d'"' -f4)
  if ((${#healths[@]} > 1)); then
    for health in "${healths[@]}"; do [[ $health != up ]] || up=$((up + 1)); done
    if ((up == ${#healths[@]})); then
      printf 'all %s targets up\n' "$up"
    else
      printf '%s of %s targets up%s\n' "$up" "${#healths[@]}" "${err:+ (first error: $err)}"
    fi
    return 0
  fi
  health=${healths[0]:-}
  printf 'target '
  case $health in
    up) printf 'up\n' ;;
    "") printf 'not listed yet (Prometheus lists it within a few seconds of starting)\n' ;;
    unknown) printf 'not scraped yet\n' ;;
    *) printf '%s%s\n' "$health" "${err:+: $err}" ;;
  esac
}

prom_start() {
  local pid port target targets=() new
  target=$(service_targets)
  mapfile -t targets <<<"$target"
  target=${targets[*]}
  make_stack_dir
  mkdir -p "$PROM_DIR" "$PROM_DATA"
  new=$PROM_CONFIG.new
  prom_render_config "$new" "${targets[@]}"
  if pid=$(prom_pid); then
    port=$(prom_running_port)
    if [[ $port != "$PROM_PORT" ]]; then
      [[ -n $PROM_PORT_SET ]] &&
        die "this project's prometheus is already running on port $port, not PROM_PORT=$PROM_PORT." \
          "use it as is: PROM_PORT=$port $ME $CMD" \
          "or move it: $ME stop && PROM_PORT=$PROM_PORT $ME $CMD"
      PROM_PORT=$port
    fi
    { prom_wait_ready "$pid" "$PROM_PORT" && prom_is_ours "$PROM_PORT"; } ||
      die "this project's prometheus (pid $pid) runs but does not answer on 127.0.0.1:$PROM_PORT." \
        "see $PROM_LOG; restart it: $ME stop && $ME $CMD"
    if cmp -s "$new" "$PROM_CONFIG"; then
      rm -f "$new"
    else
      mv "$new" "$PROM_CONFIG"
      printf '%s\n' "$target" >"$PROM_TARGETFILE"
      kill -HUP "$pid" # Prometheus reloads its configuration on SIGHUP
      say "prometheus: scrape config changed, reloaded it (now scraping $target)"
    fi
    say "prometheus: already running (pid $pid) on 127.0.0.1:$PROM_PORT, reusing it"
    return 0
  fi
  if port_open "$PROM_PORT"; then port_taken_die prometheus "$PROM_PORT" PROM_PORT; fi
  mv "$new" "$PROM_CONFIG"
  printf '%s\n' "$target" >"$PROM_TARGETFILE"
  rm -f "$PROM_PIDFILE"
  say "prometheus: starting on 127.0.0.1:$PROM_PORT, scraping $target every 5 s (log: $PROM_LOG)"
  # setsid: a session of its own, so that Ctrl-C on `up` (which reaches the whole
  # foreground process group) stops the service but not Prometheus.
  setsid prometheus --config.file="$PROM_CONFIG" --storage.tsdb.path="$PROM_DATA" \
    --storage.tsdb.retention.time=7d --web.listen-address="127.0.0.1:$PROM_PORT" \
    </dev/null >>"$PROM_LOG" 2>&1 &
  pid=$!
  printf '%s\n' "$pid" >"$PROM_PIDFILE"
  printf '%s\n' "$PROM_PORT" >"$PROM_PORTFILE"
  if ! prom_wait_ready "$pid" "$PROM_PORT"; then
    tail -n 20 "$PROM_LOG" >&2 2>/dev/null || true
    alive "$pid" && kill -TERM "$pid" 2>/dev/null
    rm -f "$PROM_PIDFILE" "$PROM_PORTFILE"
    die "prometheus did not become ready on 127.0.0.1:$PROM_PORT within 30 s (log above, full log: $PROM_LOG)." \
      "fix the cause in the log, then run '$ME $CMD' again."
  fi
  prom_pid >/dev/null ||
    die "prometheus answers, but pid $pid from $PROM_PIDFILE is not it." "run '$ME stop', then '$ME $CMD' again."
  say "prometheus: started (pid $pid)"
}

prom_stop() {
  local pid i
  if ! pid=$(prom_pid); then
    say "prometheus: not running"
    rm -f "$PROM_PIDFILE" "$PROM_PORTFILE"
    return 0
  fi
  say "prometheus: stopping (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do alive "$pid" || break; sleep 0.2; done
  ! alive "$pid" ||
    die "prometheus (pid $pid) did not stop within 20 s." "see $PROM_LOG; as a last resort: kill -KILL $pid"
  rm -f "$PROM_PIDFILE" "$PROM_PORTFILE"
  say "prometheus: stopped"
}

# ---------------------------------------------------------------- fleet --

# With REPLICAS > 1: replicas of the service (app/replica-<i>.*) and HAProxy in front of
# them (haproxy/*). Like Prometheus, each runs in a session of its own (setsid), so that
# Ctrl-C on `up` reaches only this script, which then stops them in order: HAProxy first,
# so that no new request reaches a replica that is shutting down, then the replicas, each
# finishing the requests it serves (SIGTERM is the service's graceful shutdown).

replica_port() { printf '%s\n' "$((REPLICA_BASE_PORT + $1 - 1))"; }

# Pid of this project's replica I (from its pid file), or fail.
replica_pid() { # I
  local pid f=$APP_DIR/replica-$1.pid
  [[ -r $f ]] || return 1
  pid=$(<"$f")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  alive "$pid" || return 1
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == singleflight ]] || return 1
  printf '%s\n' "$pid"
}

replica_running_port() { # I
  local port=""
  [[ -r $APP_DIR/replica-$1.port ]] && port=$(<"$APP_DIR/replica-$1.port")
  printf '%s\n' "${port:-$(replica_port "$1")}"
}

# The numbers of the replicas that have a pid file (running or not), in order: `stop` and
# `status` find a fleet this way whatever REPLICAS says now.
replica_indices() {
  local f
  for f in "$APP_DIR"/replica-*.pid; do
    [[ -e $f ]] || continue
    f=${f##*/replica-}
    f=${f%.pid}
    [[ $f =~ ^[0-9]+$ ]] && printf '%s\n' "$f"
  done | sort -n
}

# True if a fleet was started here (a pid file of HAProxy or of a replica exists).
fleet_started() { [[ -e $LB_PIDFILE ]] || [[ -n $(replica_indices) ]]; }

# Sets SERVICE_BINARY: SERVICE_BIN, or the binary of a fresh `cargo build --release`.
SERVICE_BINARY=""
resolve_service_bin() {
  local dir
  if [[ -n ${SERVICE_BIN:-} ]]; then
    [[ -f $SERVICE_BIN && -x $SERVICE_BIN ]] ||
      die "SERVICE_BIN=$SERVICE_BIN is not an executable file." \
        "point it at a built service (cargo build --release: target/release/singleflight), or unset it to let this script build one."
    SERVICE_BINARY=$SERVICE_BIN
    return 0
  fi
  ensure_cargo
  say "building the service (cargo build --release --bin singleflight)"
  (cd "$ROOT" && cargo build --release --bin singleflight) ||
    die "cargo build --release failed (output above)." "fix the build, then run '$ME $CMD' again."
  # CARGO_TARGET_DIR or a cargo config may move the target directory: ask cargo.
  dir=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
  SERVICE_BINARY=${dir:-$ROOT/target}/release/singleflight
  [[ -x $SERVICE_BINARY ]] ||
    die "cargo built the service, but $SERVICE_BINARY is not there." \
      "set SERVICE_BIN to the binary it built: SERVICE_BIN=<path> $ME $CMD"
}

replica_start() { # I
  local i=$1 pid port log
  port=$(replica_port "$i")
  log=$APP_DIR/replica-$i.log
  if pid=$(replica_pid "$i"); then
    if [[ $(replica_running_port "$i") != "$port" ]]; then
      die "this project's replica $i already runs on port $(replica_running_port "$i"), not $port." \
        "stop the fleet first: $ME stop && $ME $CMD"
    fi
    say "replica $i: already running (pid $pid) on 127.0.0.1:$port, reusing it ('$ME stop' first to run a new build)"
    return 0
  fi
  if port_open "$port"; then port_taken_die "replica $i" "$port" REPLICA_BASE_PORT; fi
  make_stack_dir
  mkdir -p "$APP_DIR"
  say "replica $i: starting on 127.0.0.1:$port (log: $log)"
  HTTP_ADDR=127.0.0.1:$port setsid "$SERVICE_BINARY" </dev/null >>"$log" 2>&1 &
  pid=$!
  disown "$pid" # watched through its pid file; bash need not report how it ends
  printf '%s\n' "$pid" >"$APP_DIR/replica-$i.pid"
  printf '%s\n' "$port" >"$APP_DIR/replica-$i.port"
}

# Waits until replica I answers GET /readyz with 200 (up to 60 s: it applies migrations and
# waits for PostgreSQL first); fails, showing its log, if it exits or does not get there.
replica_wait_ready() { # I
  local i=$1 pid port n log=$APP_DIR/replica-$1.log
  pid=$(<"$APP_DIR/replica-$i.pid")
  port=$(replica_running_port "$i")
  for ((n = 0; n < 300; n++)); do
    if ! alive "$pid"; then
      tail -n 20 "$log" >&2 2>/dev/null || true
      die "replica $i exited while starting (log above, full log: $log)." "fix the cause in the log, then run '$ME $CMD' again."
    fi
    if curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$port/readyz" 2>/dev/null; then
      say "replica $i: ready (pid $pid)"
      return 0
    fi
    sleep 0.2
  done
  tail -n 20 "$log" >&2 2>/dev/null || true
  die "replica $i (pid $pid) did not answer GET /readyz with 200 on 127.0.0.1:$port within 60 s (log above, full log: $log)." \
    "fix the cause in the log, then run '$ME stop' and '$ME $CMD' again."
}

replica_stop() { # I
  local i=$1 pid n
  if ! pid=$(replica_pid "$i"); then
    say "replica $i: not running"
    rm -f "$APP_DIR/replica-$i.pid" "$APP_DIR/replica-$i.port"
    return 0
  fi
  say "replica $i: stopping (pid $pid, graceful)"
  kill -TERM "$pid" 2>/dev/null || true
  # The service gives in-flight requests up to 10 s after SIGTERM.
  for ((n = 0; n < 75; n++)); do alive "$pid" || break; sleep 0.2; done
  ! alive "$pid" ||
    die "replica $i (pid $pid) did not stop within 15 s." "see $APP_DIR/replica-$i.log; as a last resort: kill -KILL $pid"
  rm -f "$APP_DIR/replica-$i.pid" "$APP_DIR/replica-$i.port"
  say "replica $i: stopped"
}

# Pid of this project's haproxy (from its pid file), or fail.
lb_pid() {
  local pid
  [[ -r $LB_PIDFILE ]] || return 1
  pid=$(<"$LB_PIDFILE")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  alive "$pid" || return 1
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == haproxy ]] || return 1
  printf '%s\n' "$pid"
}

lb_running_port() {
  local port=""
  [[ -r $LB_PORTFILE ]] && port=$(<"$LB_PORTFILE")
  printf '%s\n' "${port:-$LB_PORT}"
}

# Writes HAProxy's configuration for REPLICAS replicas to FILE, and checks it with haproxy -c.
lb_render_config() { # FILE
  local file=$1 i out
  {
    cat <<CFG
# Written by scripts/stack.sh (rewritten on every start): HAProxy on :$LB_PORT in front of
# $REPLICAS replicas of singleflight. The compose stack's counterpart is deploy/haproxy/haproxy.cfg.
global
    log stdout format raw local0 notice
    maxconn 4096
    # A graceful stop (SIGUSR1) waits for open connections at most this long.
    hard-stop-after 10s

defaults
    mode http
    log global
    option httplog
    # Errors and servers going up or down are logged, not every request.
    option dontlog-normal
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 10s
    # A request whose replica refused the connection is sent to another one.
    retries 2
    option redispatch

frontend singleflight
    bind :$LB_PORT
    default_backend replicas

backend replicas
    balance roundrobin
    # A replica gets requests while GET /readyz answers 200 (it reaches PostgreSQL).
    option httpchk GET /readyz
    http-check expect status 200
    default-server check inter 2s fall 2 rise 1
CFG
    for ((i = 1; i <= REPLICAS; i++)); do
      printf '    server replica-%s 127.0.0.1:%s\n' "$i" "$(replica_port "$i")"
    done
  } >"$file"
  if ! out=$("$(haproxy_bin)" -c -q -f "$file" 2>&1); then
    printf '%s\n' "$out" >&2
    die "haproxy rejects the configuration this script wrote to $file (output above)." \
      "this is a bug in $ME; as a workaround run the replicas without HAProxy (REPLICAS=1)."
  fi
}

lb_start() {
  local pid port new n
  make_stack_dir
  mkdir -p "$LB_DIR"
  new=$LB_CONFIG.new
  lb_render_config "$new"
  if pid=$(lb_pid); then
    port=$(lb_running_port)
    if [[ $port == "$LB_PORT" ]] && cmp -s "$new" "$LB_CONFIG"; then
      rm -f "$new"
      say "haproxy: already running (pid $pid) on :$LB_PORT, reusing it"
      return 0
    fi
    say "haproxy: its configuration changed (REPLICAS, LB_PORT or REPLICA_BASE_PORT), restarting it"
    lb_stop
  fi
  if port_open "$LB_PORT"; then port_taken_die haproxy "$LB_PORT" LB_PORT; fi
  mv "$new" "$LB_CONFIG"
  rm -f "$LB_PIDFILE"
  say "haproxy: starting on :$LB_PORT, round robin over $REPLICAS replicas (log: $LB_LOG)"
  # -db: stay in the foreground (of its own session), so that its pid is the one we know.
  setsid "$(haproxy_bin)" -db -f "$LB_CONFIG" </dev/null >>"$LB_LOG" 2>&1 &
  pid=$!
  disown "$pid"
  printf '%s\n' "$pid" >"$LB_PIDFILE"
  printf '%s\n' "$LB_PORT" >"$LB_PORTFILE"
  for ((n = 0; n < 50; n++)); do # up to ~10 s
    alive "$pid" || break
    curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$LB_PORT/readyz" 2>/dev/null && break
    sleep 0.2
  done
  if ! curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$LB_PORT/readyz" 2>/dev/null; then
    tail -n 20 "$LB_LOG" >&2 2>/dev/null || true
    if alive "$pid"; then kill -TERM "$pid" 2>/dev/null || true; fi
    rm -f "$LB_PIDFILE" "$LB_PORTFILE"
    die "haproxy did not serve GET /readyz on :$LB_PORT within 10 s (log above, full log: $LB_LOG)." \
      "fix the cause in the log, then run '$ME $CMD' again."
  fi
  lb_pid >/dev/null ||
    die "haproxy answers, but pid $pid from $LB_PIDFILE is not it." "run '$ME stop', then '$ME $CMD' again."
  say "haproxy: started (pid $pid)"
}

lb_stop() {
  local pid n
  if ! pid=$(lb_pid); then
    say "haproxy: not running"
    rm -f "$LB_PIDFILE" "$LB_PORTFILE"
    return 0
  fi
  say "haproxy: stopping (pid $pid, graceful)"
  # SIGUSR1: stop listening, let open connections finish (at most hard-stop-after), exit.
  kill -USR1 "$pid" 2>/dev/null || true
  for ((n = 0; n < 75; n++)); do alive "$pid" || break; sleep 0.2; done
  if alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((n = 0; n < 25; n++)); do alive "$pid" || break; sleep 0.2; done
  fi
  ! alive "$pid" ||
    die "haproxy (pid $pid) did not stop within 20 s." "see $LB_LOG; as a last resort: kill -KILL $pid"
  rm -f "$LB_PIDFILE" "$LB_PORTFILE"
  say "haproxy: stopped"
}

# Starts (or reuses) REPLICAS replicas of SERVICE_BINARY and HAProxy in front of them, and
# stops replicas beyond REPLICAS left from an earlier, larger fleet.
fleet_start() {
  local i
  # Replica 1 first, alone: every replica applies pending migrations at start-up, and two
  # migrating an empty database at the same moment could collide.
  replica_start 1
  replica_wait_ready 1
  for ((i = 2; i <= REPLICAS; i++)); do replica_start "$i"; done
  for ((i = 2; i <= REPLICAS; i++)); do replica_wait_ready "$i"; done
  lb_start
  for i in $(replica_indices); do ((i <= REPLICAS)) || replica_stop "$i"; done
}

# Stops HAProxy, then every replica that has a pid file.
fleet_stop() {
  local i
  lb_stop
  for i in $(replica_indices); do replica_stop "$i"; done
}

# Fail before starting anything if a fleet port is held by a foreign process.
fleet_preflight_ports() {
  local i
  if ! lb_pid >/dev/null && port_open "$LB_PORT"; then port_taken_die haproxy "$LB_PORT" LB_PORT; fi
  for ((i = 1; i <= REPLICAS; i++)); do
    if ! replica_pid "$i" >/dev/null && port_open "$(replica_port "$i")"; then
      port_taken_die "replica $i" "$(replica_port "$i")" REPLICA_BASE_PORT
    fi
  done
}

# ------------------------------------------------------------- commands --

# Fail before starting anything if a port is held by a foreign process.
preflight_ports() {
  if ! pg_pid >/dev/null && port_open "$PG_PORT"; then port_taken_die postgres "$PG_PORT" PG_PORT; fi
  if ! redis_pid >/dev/null && port_open "$REDIS_PORT"; then port_taken_die redis "$REDIS_PORT" REDIS_PORT; fi
  if ! prom_pid >/dev/null && port_open "$PROM_PORT"; then port_taken_die prometheus "$PROM_PORT" PROM_PORT; fi
}

start_stack() {
  local target
  if ! fleet; then
    target=$(service_target)
    if ((PROM_PORT == ${target##*:})); then
      die "PROM_PORT and the service's HTTP port (HTTP_ADDR=${HTTP_ADDR:-0.0.0.0:8080}) are both $PROM_PORT." \
        "give Prometheus another port, e.g. PROM_PORT=9090 $ME $CMD"
    fi
  fi
  ensure_packages
  preflight_ports
  if fleet; then fleet_preflight_ports; fi
  pg_start
  redis_start
  prom_start
}

print_urls() {
  printf 'export DATABASE_URL=postgres://postgres@127.0.0.1:%s/%s\n' "$PG_PORT" "$DB_NAME"
  printf 'export REDIS_URL=redis://127.0.0.1:%s/\n' "$REDIS_PORT"
}

cmd_start() {
  local targets
  start_stack
  if fleet; then
    export_service_env
    resolve_service_bin
    fleet_start
  fi
  targets=$(service_targets)
  say "ready:"
  say "  postgres  127.0.0.1:$PG_PORT  db '$DB_NAME', user postgres (trust)  data $PG_DATA"
  say "  redis     127.0.0.1:$REDIS_PORT  dir $REDIS_DIR"
  say "  prometheus http://127.0.0.1:$PROM_PORT  scrapes the service at ${targets//$'\n'/ } every 5 s  data $PROM_DATA"
  if fleet; then
    say "  haproxy   http://127.0.0.1:$LB_PORT  round robin over $REPLICAS replicas (127.0.0.1:$REPLICA_BASE_PORT-$(replica_port "$REPLICAS")), logs in $APP_DIR"
    say "try:       curl 'http://localhost:$LB_PORT/template-details?id=1'"
  else
    say "to point the service (or tests) at it:  eval \"\$($ME env)\""
  fi
  say "stop it with: $ME stop"
}

cmd_stop() {
  if fleet || fleet_started; then fleet_stop; fi
  pg_stop
  redis_stop
  prom_stop
}

cmd_status() {
  local pid port
  find_pg_bin
  if pid=$(pg_pid); then
    printf 'postgres: running, pid %s, port %s (127.0.0.1)\n' "$pid" "$(pg_running_port)"
  else
    printf 'postgres: not running (port %s when started)\n' "$PG_PORT"
    if port_open "$PG_PORT"; then
      printf '          note: port %s is in use by something else: %s\n' "$PG_PORT" "$(port_holder "$PG_PORT" | head -n 1)"
    fi
  fi
  if [[ -e $PG_DATA ]]; then
    printf '          data dir: %s\n' "$PG_DATA"
  elif pg_unreadable; then
    printf '          data dir: %s (not readable by you; try: sudo %s status)\n' "$PG_DATA" "$ME"
  else
    printf '          data dir: %s (not created yet)\n' "$PG_DATA"
  fi
  printf '          log file: %s\n' "$PG_LOG"
  printf '          binaries: %s\n' "${PG_BIN:-not installed}"
  if pid=$(redis_pid); then
    port=$(redis_running_port)
    printf 'redis:    running, pid %s, port %s (127.0.0.1)\n' "$pid" "$port"
  else
    printf 'redis:    not running (port %s when started)\n' "$REDIS_PORT"
    if port_open "$REDIS_PORT"; then
      printf '          note: port %s is in use by something else: %s\n' "$REDIS_PORT" "$(port_holder "$REDIS_PORT" | head -n 1)"
    fi
  fi
  printf '          data dir: %s\n' "$REDIS_DIR"
  printf '          log file: %s\n' "$REDIS_LOG"
  printf '          pid file: %s\n' "$REDIS_PIDFILE"
  if pid=$(prom_pid); then
    port=$(prom_running_port)
    printf 'prometheus: running, pid %s, port %s (127.0.0.1), http://127.0.0.1:%s/targets\n' "$pid" "$port" "$port"
    printf '          scrapes: %s every 5 s, %s\n' "$(cat "$PROM_TARGETFILE" 2>/dev/null || printf 'unknown')" "$(prom_target_health "$port")"
  else
    printf 'prometheus: not running (port %s when started)\n' "$PROM_PORT"
    if port_open "$PROM_PORT"; then
      printf '          note: port %s is in use by something else: %s\n' "$PROM_PORT" "$(port_holder "$PROM_PORT" | head -n 1)"
    fi
  fi
  printf '          data dir: %s\n' "$PROM_DATA"
  printf '          log file: %s\n' "$PROM_LOG"
  printf '          config:   %s (from %s)\n' "$PROM_CONFIG" "$PROM_SOURCE"
  if fleet || fleet_started; then fleet_status; fi
}

fleet_status() {
  local pid port i indices
  if pid=$(lb_pid); then
    port=$(lb_running_port)
    printf 'haproxy: running, pid %s, port %s (all interfaces), http://127.0.0.1:%s/\n' "$pid" "$port" "$port"
  else
    printf 'haproxy: not running (port %s when started)\n' "$LB_PORT"
  fi
  printf '          config:   %s\n' "$LB_CONFIG"
  printf '          log file: %s\n' "$LB_LOG"
  # The replicas asked for, and any others that have a pid file.
  indices=$({ replica_indices; if fleet; then seq 1 "$REPLICAS"; fi; } | sort -nu)
  for i in $indices; do
    port=$(replica_running_port "$i")
    if pid=$(replica_pid "$i"); then
      if curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$port/readyz" 2>/dev/null; then
        printf 'replica-%s: running, pid %s, port %s (127.0.0.1), ready\n' "$i" "$pid" "$port"
      else
        printf 'replica-%s: running, pid %s, port %s (127.0.0.1), not ready (GET /readyz does not answer 200)\n' "$i" "$pid" "$port"
      fi
    else
      printf 'replica-%s: not running (port %s when started)\n' "$i" "$port"
    fi
    printf '          log file: %s\n' "$APP_DIR/replica-$i.log"
  done
}

cmd_env() {
  local down=()
  if pg_pid >/dev/null; then
    PG_PORT=$(pg_running_port)
  elif pg_unreadable; then
    warn "warning: cannot inspect $PG_DIR as $(id -un); assuming PG_PORT=$PG_PORT (sudo $ME env shows the real one)"
  else
    down+=(postgres)
  fi
  if redis_pid >/dev/null; then REDIS_PORT=$(redis_running_port); else down+=(redis); fi
  ((${#down[@]} == 0)) || warn "warning: not running: ${down[*]} (start with: $ME start)"
  print_urls
}

ensure_cargo() {
  if ! command -v cargo >/dev/null 2>&1 && [[ -x ${HOME:-/nonexistent}/.cargo/bin/cargo ]]; then
    PATH=$HOME/.cargo/bin:$PATH
  fi
  command -v cargo >/dev/null 2>&1 ||
    die "cargo (Rust) is not installed (the service needs Rust 1.85 or newer)." \
      "install it with rustup, then run '$ME up' again:" \
      "  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y && . \"\$HOME/.cargo/env\"" \
      "(the databases alone: '$ME start')"
}

# The service's settings for the stack started here; other variables of the README's
# configuration table pass through from the caller's environment.
export_service_env() {
  export DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/$DB_NAME"
  export REDIS_URL="redis://127.0.0.1:$REDIS_PORT/"
  export RUST_LOG="${RUST_LOG:-info}"
}

# `up` with REPLICAS > 1: the fleet in the foreground. Whatever ends it (Ctrl-C, SIGTERM, a
# failure while starting), HAProxy and the replicas started here are stopped on the way out.
cmd_up_fleet() {
  local i pid targets alive_now follow_pid="" gone=() logs=()
  if pid=$(lb_pid); then
    die "this project's fleet already runs (haproxy pid $pid, started by '$ME start' or another '$ME up')." \
      "use it (http://127.0.0.1:$(lb_running_port)/, '$ME status'), or stop it first: $ME stop"
  fi
  for i in $(replica_indices); do
    if pid=$(replica_pid "$i"); then
      die "this project's replica $i already runs (pid $pid, started by '$ME start' or another '$ME up')." \
        "use it ('$ME status'), or stop the fleet first: $ME stop"
    fi
  done
  start_stack
  export_service_env
  resolve_service_bin
  trap 'if [[ -n $follow_pid ]]; then kill "$follow_pid" 2>/dev/null || true; fi; fleet_stop' EXIT
  trap 'say "stopping HAProxy and the replicas (PostgreSQL, Redis and Prometheus keep running)"; exit 0' INT TERM
  fleet_start
  targets=$(service_targets)
  say "postgres  127.0.0.1:$PG_PORT   DATABASE_URL=$DATABASE_URL"
  say "redis     127.0.0.1:$REDIS_PORT   REDIS_URL=$REDIS_URL"
  say "prometheus http://127.0.0.1:$PROM_PORT   scrapes ${targets//$'\n'/ } every 5 s (targets: http://127.0.0.1:$PROM_PORT/targets)"
  say "replicas  ${targets//$'\n'/ }   ($SERVICE_BINARY, RUST_LOG=$RUST_LOG, logs in $APP_DIR)"
  say "haproxy   http://127.0.0.1:$LB_PORT   round robin over the replicas that answer GET /readyz"
  say "try:      curl 'http://localhost:$LB_PORT/template-details?id=1'"
  say "following the replicas' logs; Ctrl-C (or SIGTERM) stops HAProxy and the replicas; PostgreSQL, Redis and Prometheus keep running ('$ME stop' stops them)"
  logs=()
  for ((i = 1; i <= REPLICAS; i++)); do logs+=("$APP_DIR/replica-$i.log"); done
  tail -n 0 -q -F -- "${logs[@]}" &
  follow_pid=$!
  # Waits in the background, so that a signal reaches the trap at once.
  while :; do
    sleep 1 &
    wait $! || true
    alive_now=0
    for ((i = 1; i <= REPLICAS; i++)); do
      if replica_pid "$i" >/dev/null; then
        alive_now=$((alive_now + 1))
      elif [[ " ${gone[*]} " != *" $i "* ]]; then
        gone+=("$i")
        warn "replica $i exited (see $APP_DIR/replica-$i.log); HAProxy sends its requests to the others"
      fi
    done
    if ((alive_now == 0)); then
      die "every replica has exited (see the logs in $APP_DIR)." "fix the cause, then run '$ME up' again."
    fi
  done
}

cmd_up() {
  local http_host http_port curl_host
  if fleet; then
    cmd_up_fleet
    return
  fi
  ensure_cargo
  # The service's own default is 0.0.0.0:8080.
  http_port=${HTTP_ADDR:-0.0.0.0:8080}
  http_port=${http_port##*:}
  http_host=${HTTP_ADDR:-0.0.0.0:8080}
  http_host=${http_host%:*}
  if [[ $http_port =~ ^[0-9]+$ ]] && ((10#$http_port != 0)) && port_open "$http_port"; then
    die "port $http_port (for the service's HTTP server) is already in use." \
      "$(port_holder "$http_port" | head -n 1)" \
      "stop whatever holds it (an earlier 'stack.sh up'?), or choose another address, e.g.: HTTP_ADDR=0.0.0.0:$((10#$http_port + 1)) $ME up"
  fi
  start_stack
  export_service_env
  case $http_host in
    0.0.0.0 | "[::]" | "" | 127.0.0.1 | localhost) curl_host=localhost; http_host=127.0.0.1 ;;
    *) curl_host=$http_host ;;
  esac
  say "postgres  127.0.0.1:$PG_PORT   DATABASE_URL=$DATABASE_URL"
  say "redis     127.0.0.1:$REDIS_PORT   REDIS_URL=$REDIS_URL"
  say "prometheus http://127.0.0.1:$PROM_PORT   scrapes $(service_target) every 5 s (targets: http://127.0.0.1:$PROM_PORT/targets)"
  say "service   http://$http_host:$http_port   (HTTP_ADDR=${HTTP_ADDR:-<service default 0.0.0.0:8080>}, RUST_LOG=$RUST_LOG)"
  say "try:      curl 'http://$curl_host:$http_port/template-details?id=1'"
  say "building and running the service (cargo run --release); Ctrl-C stops it; PostgreSQL, Redis and Prometheus keep running ('$ME stop' stops them)"
  cd "$ROOT"
  exec cargo run --release --bin singleflight
}

# REPLICAS, and with REPLICAS > 1 the fleet's ports: valid, and clear of the other servers'.
check_fleet_settings() {
  local last port var
  if ! [[ $REPLICAS =~ ^[0-9]{1,2}$ ]] || ((10#$REPLICAS < 1 || 10#$REPLICAS > 16)); then
    die "REPLICAS=$REPLICAS is not a number of replicas between 1 and 16." \
      "e.g. REPLICAS=3 $ME $CMD (or leave it unset for the service alone)"
  fi
  REPLICAS=$((10#$REPLICAS))
  fleet || return 0
  check_port_value LB_PORT "$LB_PORT"
  check_port_value REPLICA_BASE_PORT "$REPLICA_BASE_PORT"
  LB_PORT=$((10#$LB_PORT))
  REPLICA_BASE_PORT=$((10#$REPLICA_BASE_PORT))
  last=$((REPLICA_BASE_PORT + REPLICAS - 1))
  ((last <= 65535)) ||
    die "REPLICA_BASE_PORT=$REPLICA_BASE_PORT leaves no room for $REPLICAS replicas (ports up to $last)." \
      "use a lower one, e.g. REPLICA_BASE_PORT=8081 $ME $CMD"
  for var in LB_PORT PG_PORT REDIS_PORT PROM_PORT; do
    port=${!var}
    if ((port >= REPLICA_BASE_PORT && port <= last)); then
      die "$var=$port is one of the replicas' ports ($REPLICA_BASE_PORT-$last: REPLICA_BASE_PORT=$REPLICA_BASE_PORT and REPLICAS=$REPLICAS)." \
        "move one of them, e.g. REPLICA_BASE_PORT=$((last + 1)) $ME $CMD"
    fi
    if [[ $var != LB_PORT ]] && ((port == LB_PORT)); then
      die "LB_PORT and $var are both $port." "give HAProxy another port, e.g. LB_PORT=8080 $ME $CMD"
    fi
  done
  if [[ -n ${HTTP_ADDR:-} && ( $CMD == up || $CMD == start ) ]]; then
    warn "note: HTTP_ADDR=$HTTP_ADDR is not used with REPLICAS=$REPLICAS: replica i listens on 127.0.0.1:REPLICA_BASE_PORT+i-1, HAProxy on :$LB_PORT"
  fi
}

main() {
  case $CMD in
    help | -h | --help) usage; return 0 ;;
    up | start | stop | status | env) ;;
    *) usage >&2; die "unknown command '$CMD'." "use one of: up (default), start, stop, status, env" ;;
  esac
  check_stack_dir
  check_port_value PG_PORT "$PG_PORT"
  check_port_value REDIS_PORT "$REDIS_PORT"
  check_port_value PROM_PORT "$PROM_PORT"
  PG_PORT=$((10#$PG_PORT))
  REDIS_PORT=$((10#$REDIS_PORT))
  PROM_PORT=$((10#$PROM_PORT))
  if ((PG_PORT == REDIS_PORT || PG_PORT == PROM_PORT || REDIS_PORT == PROM_PORT)); then
    die "PG_PORT=$PG_PORT, REDIS_PORT=$REDIS_PORT and PROM_PORT=$PROM_PORT must be three different ports." \
      "e.g. PG_PORT=5433 REDIS_PORT=6380 PROM_PORT=9091 $ME $CMD"
  fi
  check_fleet_settings
  case $CMD in
    up) cmd_up ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
  esac
}

main

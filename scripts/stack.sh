#!/usr/bin/env bash
# scripts/stack.sh: run singleflight's PostgreSQL, Redis and Prometheus natively
# (no Docker), with all their state in a project-local .stack/ folder.
#
# Usage: scripts/stack.sh [up|start|stop|status|env|help]
#   up      (default) install missing packages, start PostgreSQL, Redis and
#           Prometheus, then run the service in the foreground:
#           exec cargo run --release
#           (Ctrl-C stops the service; the other servers keep running)
#   start   like `up`, but only PostgreSQL, Redis and Prometheus (idempotent:
#           what is already running is reused)
#   stop    stop PostgreSQL (fast shutdown), Redis and Prometheus; fine if
#           already stopped
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
#
# Layout (under STACK_DIR, by default .stack/ at the repository root):
#   pg/data  pg/postgres.log  pg/run (unix socket)
#   redis/   redis/redis.log  redis/redis.pid
#   prometheus/data  prometheus/prometheus.log  prometheus/prometheus.pid
#   prometheus/prometheus.yaml (the project's prometheus.yaml, with its
#   compose target app:8080 rewritten to where the service listens)
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
# The project's scrape config, written for docker-compose: it scrapes "app:8080"
# (quoted, as the target is written there).
PROM_SOURCE=$ROOT/prometheus.yaml
PROM_COMPOSE_TARGET='"app:8080"'
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
  printf '%s\n' "${pkgs[@]}"
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
      "check that /usr/lib/postgresql/*/bin, redis-server, redis-cli, curl, prometheus, promtool and setsid exist."
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

# Writes the project's prometheus.yaml to FILE with its compose target replaced by TARGET,
# and checks the result with promtool, so a broken prometheus.yaml is reported as such.
prom_render_config() { # TARGET FILE
  local target=$1 file=$2 out
  [[ -r $PROM_SOURCE ]] ||
    die "$PROM_SOURCE is missing (the scrape config the native and the compose stack share)." \
      "restore it: git -C '$ROOT' checkout -- prometheus.yaml"
  grep -qF "$PROM_COMPOSE_TARGET" "$PROM_SOURCE" ||
    die "$PROM_SOURCE does not name the compose target $PROM_COMPOSE_TARGET, so this script cannot point it at the service." \
      "keep the target written as $PROM_COMPOSE_TARGET (with the quotes) in $PROM_SOURCE; docker-compose.yaml needs it too."
  {
    printf '# Written by scripts/stack.sh from %s: target %s -> "%s".\n' "$PROM_SOURCE" "$PROM_COMPOSE_TARGET" "$target"
    printf '# Edit that file, not this copy (it is rewritten on every start).\n'
    sed "s/$PROM_COMPOSE_TARGET/\"$target\"/g" "$PROM_SOURCE"
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

# Where the running prometheus scrapes (from its config), and the target's health as it
# last saw it: "up", or "down: <last scrape error>".
prom_target_health() { # PORT
  local body health err
  body=$(prom_get "$1" /api/v1/targets) || { printf 'unknown (the targets API did not answer)\n'; return 0; }
  health=$(printf '%s' "$body" | grep -o '"health":"[a-z]*"' | head -n 1 | cut -d'"' -f4)
  err=$(printf '%s' "$body" | grep -o '"lastError":"[^"]*"' | head -n 1 | cut -d'"' -f4)
  case $health in
    up) printf 'up\n' ;;
    "") printf 'not listed yet (Prometheus lists it within a few seconds of starting)\n' ;;
    unknown) printf 'not scraped yet\n' ;;
    *) printf '%s%s\n' "$health" "${err:+: $err}" ;;
  esac
}

prom_start() {
  local pid port target new
  target=$(service_target)
  make_stack_dir
  mkdir -p "$PROM_DIR" "$PROM_DATA"
  new=$PROM_CONFIG.new
  prom_render_config "$target" "$new"
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

# ------------------------------------------------------------- commands --

# Fail before starting anything if a port is held by a foreign process.
preflight_ports() {
  if ! pg_pid >/dev/null && port_open "$PG_PORT"; then port_taken_die postgres "$PG_PORT" PG_PORT; fi
  if ! redis_pid >/dev/null && port_open "$REDIS_PORT"; then port_taken_die redis "$REDIS_PORT" REDIS_PORT; fi
  if ! prom_pid >/dev/null && port_open "$PROM_PORT"; then port_taken_die prometheus "$PROM_PORT" PROM_PORT; fi
}

start_stack() {
  local target
  target=$(service_target)
  if ((PROM_PORT == ${target##*:})); then
    die "PROM_PORT and the service's HTTP port (HTTP_ADDR=${HTTP_ADDR:-0.0.0.0:8080}) are both $PROM_PORT." \
      "give Prometheus another port, e.g. PROM_PORT=9090 $ME $CMD"
  fi
  ensure_packages
  preflight_ports
  pg_start
  redis_start
  prom_start
}

print_urls() {
  printf 'export DATABASE_URL=postgres://postgres@127.0.0.1:%s/%s\n' "$PG_PORT" "$DB_NAME"
  printf 'export REDIS_URL=redis://127.0.0.1:%s/\n' "$REDIS_PORT"
}

cmd_start() {
  start_stack
  say "ready:"
  say "  postgres  127.0.0.1:$PG_PORT  db '$DB_NAME', user postgres (trust)  data $PG_DATA"
  say "  redis     127.0.0.1:$REDIS_PORT  dir $REDIS_DIR"
  say "  prometheus http://127.0.0.1:$PROM_PORT  scrapes the service at $(service_target) every 5 s  data $PROM_DATA"
  say "to point the service (or tests) at it:  eval \"\$($ME env)\""
  say "stop it with: $ME stop"
}

cmd_stop() {
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
    printf '          scrapes: %s every 5 s, target %s\n' "$(cat "$PROM_TARGETFILE" 2>/dev/null || printf 'unknown')" "$(prom_target_health "$port")"
  else
    printf 'prometheus: not running (port %s when started)\n' "$PROM_PORT"
    if port_open "$PROM_PORT"; then
      printf '          note: port %s is in use by something else: %s\n' "$PROM_PORT" "$(port_holder "$PROM_PORT" | head -n 1)"
    fi
  fi
  printf '          data dir: %s\n' "$PROM_DATA"
  printf '          log file: %s\n' "$PROM_LOG"
  printf '          config:   %s (from %s)\n' "$PROM_CONFIG" "$PROM_SOURCE"
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

cmd_up() {
  local http_host http_port curl_host
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
  export DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/$DB_NAME"
  export REDIS_URL="redis://127.0.0.1:$REDIS_PORT/"
  export RUST_LOG="${RUST_LOG:-info}"
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
  case $CMD in
    up) cmd_up ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
  esac
}

main

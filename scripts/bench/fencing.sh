#!/usr/bin/env bash
# What fencing a write costs Redis: a plain `SET value PX ttl` (the write before fencing) against
# the service's fenced write, the script that sets the value only while the key's generation is
# the one its load began under (src/actors/cache/writes.rs, SET_FENCED). A Redis of its own on
# 127.0.0.1:PORT (default 16399, no persistence) pinned to core 0, redis-benchmark pinned to core
# 1, RUNS rounds (default 3) alternating the two, each N writes (default 200,000) of a 1.5 KB
# value over 100,000 keys from 32 connections.
#
#   scripts/bench/fencing.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-3}
PORT=${PORT:-16399}
N=${N:-200000}
dir=$(mktemp -d)
taskset -c 0 redis-server --port "$PORT" --bind 127.0.0.1 --save '' --appendonly no \
  --dir "$dir" --daemonize no --loglevel warning >/dev/null & server=$!
trap 'kill "$server"; wait "$server" 2>/dev/null || true; rm -rf "$dir"' EXIT
until redis-cli -p "$PORT" ping >/dev/null 2>&1; do sleep 0.1; done

# The script exactly as the service sends it.
script=$(sed -n '/^static SET_FENCED/,/^});/p' src/actors/cache/writes.rs | sed -n '/r"/,/",/p' | sed '1d;$d')
[ -n "$script" ] || { echo "fencing: SET_FENCED not found in src/actors/cache/writes.rs" >&2; exit 1; }
sha=$(redis-cli -p "$PORT" script load "$script")
value=$(head -c 1536 /dev/zero | tr '\0' x)

bench() { # label command...
  local label=$1
  shift
  taskset -c 1 redis-benchmark -p "$PORT" -n "$N" -c 32 -r 100000 -q "$@" |
    awk -v label="$label" -F'[ ,]+' '/requests per second/ { for (i = 1; i <= NF; i++) if ($i == "requests") rps = $(i - 1); if (match($0, /p50=[0-9.]+/)) p50 = substr($0, RSTART + 4, RLENGTH - 4) } END { printf "%s %s rps p50 %s ms\n", label, rps, p50 }'
}

for run in $(seq "$runs"); do
  redis-cli -p "$PORT" flushall >/dev/null
  echo "run $run $(bench SET SET 'template:{__rand_int__}' "$value" PX 60000)"
  redis-cli -p "$PORT" flushall >/dev/null
  echo "run $run $(bench SET_FENCED EVALSHA "$sha" 2 'template:{__rand_int__}' 'template:{__rand_int__}:gen' 0 "$value" 60000)"
  # The fenced writes wrote (no generation key: generation 0, as the load read it).
  written=$(redis-cli -p "$PORT" dbsize)
  [ "$written" -gt 0 ] || { echo "fencing: the fenced writes wrote nothing" >&2; exit 1; }
done

#!/usr/bin/env bash
# Requests and errors through a rolling restart: a fleet of 3 replicas behind HAProxy
# (`REPLICAS=3 scripts/stack.sh start`, in a stack directory of its own), `wrk -c100` over 100
# ids through HAProxy while `scripts/stack.sh restart` restarts each replica in turn, once per
# SHUTDOWN_DRAIN_MS value given (default "3000 0": the default drain, and none).
#
#   SERVICE_BIN=target/release/singleflight scripts/bench/rolling.sh [DRAIN_MS...]
#
# Prints wrk's totals per run: requests, non-2xx answers and socket errors (connect, read,
# write, timeout). Ports: LB_PORT (default 18380), REPLICA_BASE_PORT (18381), PG_PORT (15442),
# REDIS_PORT (16389), PROM_PORT (19099). The stack is stopped and its directory removed at the
# end.
set -euo pipefail
cd "$(dirname "$0")/../.."
drains=("${@}")
[ ${#drains[@]} -gt 0 ] || drains=(3000 0)
export SERVICE_BIN=${SERVICE_BIN:-target/release/singleflight}
export REPLICAS=3 LB_PORT=${LB_PORT:-18380} REPLICA_BASE_PORT=${REPLICA_BASE_PORT:-18381}
export PG_PORT=${PG_PORT:-15442} REDIS_PORT=${REDIS_PORT:-16389} PROM_PORT=${PROM_PORT:-19099}
export RUST_LOG=${RUST_LOG:-warn}
STACK_DIR=$(mktemp -d /tmp/singleflight-rolling.XXXXXX)
chmod 755 "$STACK_DIR"
export STACK_DIR
trap 'scripts/stack.sh stop >/dev/null 2>&1 || true; rm -rf "$STACK_DIR"' EXIT
lua=$(mktemp /tmp/ids100.XXXXXX.lua)
cat > "$lua" <<'LUA'
counter = 0
request = function()
  counter = counter + 1
  return wrk.format(nil, "/template-details?id=" .. (1 + counter % 100))
end
LUA
for drain in "${drains[@]}"; do
    export SHUTDOWN_DRAIN_MS=$drain
    scripts/stack.sh stop >/dev/null 2>&1 || true
    scripts/stack.sh start >/dev/null
    wrk -t2 -c100 -d60s -s "$lua" "http://127.0.0.1:$LB_PORT/" > "$STACK_DIR/wrk-$drain.txt" &
    wrk=$!
    sleep 3
    started=$(date +%s)
    scripts/stack.sh restart >/dev/null
    took=$(( $(date +%s) - started ))
    wait $wrk
    requests=$(awk '/requests in/ {print $1}' "$STACK_DIR/wrk-$drain.txt")
    non2xx=$(awk '/Non-2xx/ {print $NF}' "$STACK_DIR/wrk-$drain.txt")
    errors=$(grep 'Socket errors' "$STACK_DIR/wrk-$drain.txt" || echo "Socket errors: none")
    echo "SHUTDOWN_DRAIN_MS=$drain: restart of 3 replicas took ${took} s; ${requests} requests in 60 s; non-2xx: ${non2xx:-0}; ${errors}"
done
rm -f "$lua"

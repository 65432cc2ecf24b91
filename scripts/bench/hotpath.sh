#!/usr/bin/env bash
# The hot path, measured the honest way on a small machine: the server pinned to core 0 with one
# HTTP worker and one KeyOwner shard, `wrk -t1 -c64` pinned to core 1, each run 10 s on one cached
# key, alternated with the bare actix-web handler (examples/bare, serving the same bytes, pinned
# the same way). Optionally alternated with a second service binary (an older build) too.
#
#   scripts/bench/hotpath.sh [RUNS] [BASELINE_BINARY]
#
# Prints one line per run and server: requests/s and wrk's p99. Uses `scripts/stack.sh start`'s
# PostgreSQL and Redis (Redis logical db 5, flushed before each run).
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-3}
baseline=${2:-}
PORT=${PORT:-18281}
BARE_PORT=${BARE_PORT:-18291}
U=http://127.0.0.1:$PORT

cargo build --release --quiet --bin singleflight --example bare
scripts/stack.sh start >/dev/null
eval "$(scripts/stack.sh env)"
target=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')

wrk_line() {
  taskset -c 1 wrk -t1 -c64 -d10s --latency "$1/template-details?id=1" |
    awk '/Requests\/sec/ { rps = $2 } / 99%/ { p99 = $2 } END { printf "%s req/s, p99 %s\n", rps, p99 }'
}

start_service() { # binary
  redis-cli -u "${REDIS_URL%/}/5" flushdb >/dev/null
  taskset -c 0 env HTTP_ADDR="127.0.0.1:$PORT" HTTP_WORKERS=1 KEY_OWNER_SHARDS=1 \
    REDIS_URL="${REDIS_URL%/}/5" RUST_LOG=warn "$1" & pid=$!
  until curl -sf "$U/readyz" >/dev/null; do sleep 0.1; done
  curl -s "$U/template-details?id=1" >/dev/null
}

for run in $(seq "$runs"); do
  if [ -n "$baseline" ]; then
    start_service "$baseline"
    echo "run $run baseline: $(wrk_line "$U")"
    kill "$pid"; wait "$pid" 2>/dev/null || true
  fi
  start_service "$target/release/singleflight"
  echo "run $run service:  $(wrk_line "$U")"
  # The bare handler copies the service's cached response, then serves it alone on core 0.
  taskset -c 0 "$target/release/examples/bare" --from "$U" --addr "127.0.0.1:$BARE_PORT" --workers 1 \
    >/dev/null 2>&1 & bare=$!
  sleep 1
  kill "$pid"; wait "$pid" 2>/dev/null || true
  echo "run $run bare:     $(wrk_line "http://127.0.0.1:$BARE_PORT")"
  kill "$bare"; wait "$bare" 2>/dev/null || true
done

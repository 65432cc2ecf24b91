#!/usr/bin/env bash
# The service's memory against the size of its templates: COUNT templates (default 2000) of each
# size in SIZES_KB (default "1 64 256") are added to `scripts/stack.sh start`'s database (ids
# from 1,000,001, removed again at the end), the service starts on its defaults (CACHE_MEMORY_MB
# and the rest; extra VAR=value arguments are passed to it), and CLIENTS clients (default 8)
# ask for every one of them three times in each of PASSES passes (default 3). Prints the service's RSS (VmRSS, and
# the peak VmHWM) after each pass, with what its caches say they hold (cache_memory_bytes).
# BURST=N (e.g. 512) makes each pass instead N connections of `wrk -t1` walking through the ids
# in order for PASS_SECONDS seconds (default 10; scripts/bench/sequence.lua), so that up to N cold
# keys load at once: INFLIGHT_MEMORY_MB is what bounds them. It then prints the answers that
# were not 200 (503s: requests shed for memory) with the requests made.
#
#   scripts/bench/memory.sh [VAR=value...]
set -euo pipefail
cd "$(dirname "$0")/../.."
COUNT=${COUNT:-2000}
SIZES_KB=${SIZES_KB:-1 64 256}
PASSES=${PASSES:-3}
CLIENTS=${CLIENTS:-8}
BURST=${BURST:-}
PASS_SECONDS=${PASS_SECONDS:-10}
PORT=${PORT:-18281}
U=http://127.0.0.1:$PORT
FIRST=1000001

cargo build --release --quiet --bin singleflight
scripts/stack.sh start >/dev/null
eval "$(scripts/stack.sh env)"
target=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
RUST_LOG=error "$target/release/singleflight" seed-demo >/dev/null
last=$((FIRST + COUNT - 1))
cleanup() {
  [ -z "${pid:-}" ] || { kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true; }
  psql -q "$DATABASE_URL" -c "DELETE FROM templates WHERE id >= $FIRST" >/dev/null
}
trap cleanup EXIT

kb() { awk -v f="$1" '$1 == f":" { print $2 }' "/proc/$pid/status"; }

for size in $SIZES_KB; do
  psql -q "$DATABASE_URL" -c "DELETE FROM templates WHERE id >= $FIRST" >/dev/null
  # Content that does not compress to nothing (as real HTML would not): md5 hex, repeated.
  psql -q "$DATABASE_URL" -c "INSERT INTO templates (id, name, content)
    SELECT g, 'large ' || g, left(repeat(md5(g::text) || md5((g + 1)::text), $((size * 1024 / 64 + 1))), $((size * 1024)))
    FROM generate_series($FIRST, $last) AS g" >/dev/null
  redis-cli -u "${REDIS_URL%/}/5" flushdb >/dev/null
  env HTTP_ADDR="127.0.0.1:$PORT" REDIS_URL="${REDIS_URL%/}/5" RUST_LOG=warn "$@" \
    "$target/release/singleflight" & pid=$!
  until curl -sf "$U/readyz" >/dev/null; do sleep 0.1; done
  echo "$COUNT templates of $size KB ($((COUNT * size / 1024)) MB of bodies): RSS at start $(kb VmRSS) kB"
  for pass in $(seq "$PASSES"); do
    if [ -n "$BURST" ]; then
      out=$(wrk -t1 -c"$BURST" -d"${PASS_SECONDS}s" -s scripts/bench/sequence.lua \
        "$U/template-details?id=$FIRST" -- "$FIRST" "$COUNT")
      failed="$(awk '/Non-2xx/ { bad = $NF } / requests in / { n = $1 } END { print bad + 0 " of " n }' <<<"$out")"
    else
      failed=$(for id in $(seq "$FIRST" "$last") $(seq "$FIRST" "$last") $(seq "$FIRST" "$last"); do
        echo "$U/template-details?id=$id"
      done | xargs -P "$CLIENTS" -n 1 curl -s -o /dev/null -w '%{http_code}\n' | grep -vc '^200$' || true)
    fi
    held=$(curl -s "$U/metrics" | awk '/^cache_memory_bytes\{/ { s += $2 } END { printf "%.1f", s / 1e6 }')
    echo "  pass $pass: RSS $(kb VmRSS) kB, peak $(kb VmHWM) kB, caches hold $held MB, non-200 answers: $failed"
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
done

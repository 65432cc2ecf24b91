#!/usr/bin/env bash
# Replays the seed's incident against the native stack and prints one table row per phase:
# 200 clients over ids 1..100 for 3 × 10 s, with Redis failing during the middle 10 s.
#
#   scripts/bench/incident.sh [blackhole|refused] [NEAR_CACHE_TTL_MS]
#
# blackhole: Redis is frozen with SIGSTOP — the kernel still accepts connections and buffers
#            requests, but nothing answers (a partition that drops packets); SIGCONT ends it.
# refused:   Redis is shut down (connections refused) and started again afterwards.
# It starts its own service (release build) on 127.0.0.1:$PORT against `scripts/stack.sh start`'s
# PostgreSQL and Redis (Redis logical db 9, flushed first), and stops it at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
fault=${1:-blackhole}
near_ms=${2:-1000}
PORT=${PORT:-18300}
case $fault in blackhole|refused) ;; *) echo "usage: $0 [blackhole|refused] [NEAR_CACHE_TTL_MS]" >&2; exit 2 ;; esac

cargo build --release --quiet --bin singleflight --bin loadtest
scripts/stack.sh start >/dev/null
eval "$(scripts/stack.sh env)"
# The demo templates, loaded into the stack's database if its table is empty.
RUST_LOG=error target/release/singleflight seed-demo >/dev/null
redis_port=${REDIS_URL##*:}; redis_port=${redis_port%%/*}
redis_pid=$(redis-cli -p "$redis_port" info server | awk -F: '/^process_id:/{print $2}' | tr -d '\r')
redis-cli -p "$redis_port" -n 9 flushdb >/dev/null

url=http://127.0.0.1:$PORT
HTTP_ADDR=127.0.0.1:$PORT REDIS_URL=redis://127.0.0.1:$redis_port/9 NEAR_CACHE_TTL_MS=$near_ms \
  RUST_LOG=error target/release/singleflight &
service=$!
restore() {
  kill -CONT "$redis_pid" 2>/dev/null || true
  redis-cli -p "$redis_port" ping >/dev/null 2>&1 || scripts/stack.sh start >/dev/null
  kill "$service" 2>/dev/null || true
}
trap restore EXIT
for _ in $(seq 100); do curl -sf "$url/readyz" >/dev/null && break; sleep 0.1; done

load() { target/release/loadtest spread --url "$url" --ids 100 --concurrency 200 --duration "$1" --json; }
load 3s >/dev/null # warm: every id loaded once
load 10s >/tmp/incident.normal.json
case $fault in
  blackhole) kill -STOP "$redis_pid" ;;
  refused) redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true ;;
esac
load 10s >/tmp/incident.outage.json
case $fault in
  blackhole) kill -CONT "$redis_pid" ;;
  refused) scripts/stack.sh start >/dev/null ;;
esac
load 10s >/tmp/incident.after.json

python3 - "$fault" "$near_ms" <<'PY'
import json, sys
fault, near = sys.argv[1], sys.argv[2]
print(f"| fault | near cache | phase | req/s | p50 ms | p99 ms | max ms | 5xx | DB queries/s |")
print("|---|---|---|---|---|---|---|---|---|")
for phase in ["normal", "outage", "after"]:
    r = json.load(open(f"/tmp/incident.{phase}.json"))
    fivexx = sum(n for code, n in r["status"].items() if code.startswith("5"))
    db_per_s = r["metrics"]["db_hits_total"] / r["elapsed_seconds"]
    lat = r["latency_ms"]
    print(f"| {fault} | {near} ms | {phase} | {r['throughput_rps']:.0f} | {lat['p50']:.2f} | "
          f"{lat['p99']:.2f} | {lat['max']:.1f} | {fivexx} | {db_per_s:.1f} |")
PY

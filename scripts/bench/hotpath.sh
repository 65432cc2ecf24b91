#!/usr/bin/env bash
# The hot path, measured the honest way on a small machine: the server pinned to core 0 with one
# HTTP worker and one KeyOwner shard, `wrk -t1 -c64` pinned to core 1, each run 10 s, alternated
# with the bare actix-web handler (examples/bare, serving the same bytes, pinned the same way)
# and, optionally, with other service binaries (older builds), each named by its file name.
#
#   scripts/bench/hotpath.sh [RUNS] [BASELINE_BINARY...]
#
# Workloads (WORKLOADS, default "hot spread"): `hot` asks for one cached key (id 1); `spread`
# for ids drawn uniformly from 1..=1000 (scripts/bench/spread.lua), every one cached first;
# `spread10k` and `spread100k` the same over 1..=10000 and 1..=100000: more templates than the
# demo's 1,200, so rows up to that id are added to the stack's database for the run (small
# bodies, names `bench N`, removed at the end), and, on the service's defaults, more than its
# worker and near caches hold (WORKER_CACHE_CAPACITY and NEAR_CACHE_CAPACITY, 10,000 each).
# SERVICE_ENV="VAR=value ..." starts every service run with those settings (cache sizes, say).
# COALESCE_MODES (default "on") runs the services once per mode, e.g. "on off". Each run
# restarts every server with an emptied Redis. UPDATES=N (default 0) adds a last phase: under
# the spread load, N templates are changed in PostgreSQL and polled through the service until
# served (`loadtest --updates`), which prints how soon each change was visible. BARE_PROM=1 also
# runs the bare handler wrapped in actix-web-prom's middleware (`bare --prom`, as the service
# counts its other routes): what counting the hot route through the middleware would cost.
# TRACING=1 also runs the service exporting its spans over OTLP/HTTP (to a sink on core 1 that
# reads each batch and answers 200), once with every request's spans (`service+otlp`) and once
# sampling 1% of traces (`service+otlp1%`, OTEL_TRACES_SAMPLER=parentbased_traceidratio).
#
# CLUSTER=1 also runs the service against a Redis Cluster of three masters (`service+cluster`),
# started by `REDIS_MODE=cluster scripts/stack.sh start` in a state folder of its own
# (.stack/cluster-bench, its servers on CLUSTER_PORT_BASE.. , default 16480: PostgreSQL there,
# the nodes from +1, Prometheus +10); the service reads the templates from the main stack's
# PostgreSQL either way, and every node is flushed before each start.
# On core 0 there is only the server under test: the stack's Redis, PostgreSQL and Prometheus
# processes (every one on this machine) are moved to core 1 for the run, with the load
# generator, as they would run on machines of their own; they get both cores back at the end.
# PIN_DEPENDENCIES=0 leaves them where the scheduler puts them (as the runs before §18 did).
# Prints one line per run and server — requests/s, wrk's p99, and the server's CPU time per
# request (user + system, all its threads, from /proc: unlike requests/s it does not depend on
# how much of its core the server got, so it holds on a machine shared with other work) — then
# the medians and their ratios to the bare handler's. `cpu` is bare's CPU per request divided
# by the server's: the share of the bare handler's throughput the server reaches on a core of
# its own. Uses `scripts/stack.sh start`'s PostgreSQL and Redis (Redis
# logical db 5, flushed before each start); PG_PORT/REDIS_PORT/PROM_PORT move them, PORT and
# BARE_PORT move the servers.
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-3}
baselines=("${@:2}")
PORT=${PORT:-18281}
BARE_PORT=${BARE_PORT:-18291}
WORKLOADS=${WORKLOADS:-hot spread}
COALESCE_MODES=${COALESCE_MODES:-on}
UPDATES=${UPDATES:-0}
BARE_PROM=${BARE_PROM:-0}
BARE_PROM_PORT=$((BARE_PORT + 1))
TRACING=${TRACING:-0}
SINK_PORT=$((BARE_PORT + 2))
U=http://127.0.0.1:$PORT
SERVICE_ENV=${SERVICE_ENV:-}
ids_of() { # workload: how many ids it asks for
  case "$1" in
    spread) echo 1000 ;;
    spread10k) echo 10000 ;;
    spread100k) echo 100000 ;;
    *) echo 1 ;;
  esac
}
CLUSTER=${CLUSTER:-0}
CLUSTER_PORT_BASE=${CLUSTER_PORT_BASE:-16480}

cargo build --release --quiet --bin singleflight --bin loadtest --example bare
scripts/stack.sh start >/dev/null
eval "$(scripts/stack.sh env)"
if [ "$CLUSTER" = 1 ]; then
  cluster_stack=(env STACK_DIR="$PWD/.stack/cluster-bench" REDIS_MODE=cluster PG_PORT="$CLUSTER_PORT_BASE"
    REDIS_PORT=$((CLUSTER_PORT_BASE + 1)) PROM_PORT=$((CLUSTER_PORT_BASE + 10)) scripts/stack.sh)
  "${cluster_stack[@]}" start >/dev/null
  cluster_url=$("${cluster_stack[@]}" env | sed -n 's/^export REDIS_URL=//p')
  [ -n "$cluster_url" ] || { echo "hotpath: the cluster stack gave no REDIS_URL" >&2; exit 1; }
fi
target=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
# The demo templates (ids 1..=1200), loaded into the stack's database if its table is empty.
RUST_LOG=error "$target/release/singleflight" seed-demo >/dev/null
most=1
for workload in $WORKLOADS; do [ "$(ids_of "$workload")" -gt "$most" ] && most=$(ids_of "$workload"); done
bench_rows=0
if [ "$most" -gt 1200 ]; then
  psql -q "$DATABASE_URL" -c "INSERT INTO templates (id, name, content)
    SELECT g, 'bench ' || g, repeat('bench template ', 25) FROM generate_series(1201, $most) AS g
    ON CONFLICT (id) DO NOTHING" >/dev/null
  bench_rows=1
fi
results=$(mktemp)
dependencies() { [ "${PIN_DEPENDENCIES:-1}" = 0 ] || pgrep -x 'redis-server|postgres|prometheus' || true; }
for p in $(dependencies); do taskset -a -p -c 1 "$p" >/dev/null 2>&1 || true; done
trap 'rm -f "$results"; [ -z "${sink:-}" ] || kill "$sink"
  for p in $(dependencies); do taskset -a -p -c "0-$(($(nproc) - 1))" "$p" >/dev/null 2>&1 || true; done
  [ "$bench_rows" = 0 ] || psql -q "$DATABASE_URL" -c "DELETE FROM templates WHERE id > 1200 AND name LIKE '"'"'bench %'"'"'" >/dev/null' EXIT

if [ "$TRACING" = 1 ]; then
  # What a collector does with a batch, at the least: read it and answer 200.
  taskset -c 1 python3 -c '
import http.server, sys
class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
' "$SINK_PORT" & sink=$!
fi

cpu_ticks() { # pid: user + system clock ticks of every thread so far
  awk '{ print $14 + $15 }' "/proc/$1/stat"
}

wrk_line() { # base-url workload server-pid
  local script=() before out
  [ "$2" != hot ] && script=(-s scripts/bench/spread.lua)
  before=$(cpu_ticks "$3")
  out=$(taskset -c 1 wrk -t1 -c64 -d10s --latency "${script[@]}" "$1/template-details?id=1" -- "$(ids_of "$2")")
  awk -v ticks="$(($(cpu_ticks "$3") - before))" -v hz="$(getconf CLK_TCK)" '
         /Requests\/sec/ { rps = $2 }
         / requests in / { n = $1 }
         / 99%/ { p99 = $2; if (p99 ~ /us$/) p99 = p99 / 1000; else if (p99 ~ /ms$/) p99 = p99 + 0; else p99 = p99 * 1000 }
         /Non-2xx/ { bad = $NF }
         END { printf "%s req/s, p99 %.2f ms, cpu %.2f us/req%s\n", rps, p99, ticks * 1e6 / hz / n, bad ? ", NON-2XX " bad : "" }' <<<"$out"
}

start_service() { # binary coalesce workload [VAR=value...]
  redis-cli -u "${REDIS_URL%/}/5" flushdb >/dev/null
  if [ -n "${cluster_url:-}" ]; then
    for node in ${cluster_url//,/ }; do redis-cli -u "$node" flushall >/dev/null; done
  fi
  taskset -c 0 env HTTP_ADDR="127.0.0.1:$PORT" HTTP_WORKERS=1 KEY_OWNER_SHARDS=1 COALESCE="$2" \
    REDIS_URL="${REDIS_URL%/}/5" RUST_LOG=warn $SERVICE_ENV "${@:4}" "$1" & pid=$!
  until curl -sf "$U/readyz" >/dev/null; do sleep 0.1; done
  if [ "$3" != hot ]; then
    for id in $(seq "$(ids_of "$3")"); do echo "url = \"$U/template-details?id=$id\""; done |
      curl -s -Z --parallel-max 8 -K - >/dev/null 2>&1
  else
    curl -s "$U/template-details?id=1" >/dev/null
  fi
}

stop() { kill "$1"; wait "$1" 2>/dev/null || true; }

record() { # label line
  echo "$1: $2"
  echo "$1 $2" >>"$results"
}

for run in $(seq "$runs"); do
  for workload in $WORKLOADS; do
    for mode in $COALESCE_MODES; do
      for baseline in "${baselines[@]}"; do
        start_service "$baseline" "$mode" "$workload"
        record "run $run $workload COALESCE=$mode $(basename "$baseline")" "$(wrk_line "$U" "$workload" "$pid")"
        stop "$pid"
      done
      if [ "$TRACING" = 1 ]; then
        otlp=(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$SINK_PORT")
        start_service "$target/release/singleflight" "$mode" "$workload" "${otlp[@]}"
        record "run $run $workload COALESCE=$mode service+otlp" "$(wrk_line "$U" "$workload" "$pid")"
        stop "$pid"
        start_service "$target/release/singleflight" "$mode" "$workload" "${otlp[@]}" \
          OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.01
        record "run $run $workload COALESCE=$mode service+otlp1%" "$(wrk_line "$U" "$workload" "$pid")"
        stop "$pid"
      fi
      if [ "$CLUSTER" = 1 ]; then
        start_service "$target/release/singleflight" "$mode" "$workload" REDIS_URL="$cluster_url"
        record "run $run $workload COALESCE=$mode service+cluster" "$(wrk_line "$U" "$workload" "$pid")"
        stop "$pid"
      fi
      start_service "$target/release/singleflight" "$mode" "$workload"
      record "run $run $workload COALESCE=$mode service " "$(wrk_line "$U" "$workload" "$pid")"
      # The bare handler copies the service's cached response, then serves it alone on core 0.
      taskset -c 0 "$target/release/examples/bare" --from "$U" --addr "127.0.0.1:$BARE_PORT" \
        --workers 1 >/dev/null 2>&1 & bare=$!
      if [ "$BARE_PROM" = 1 ]; then
        taskset -c 0 "$target/release/examples/bare" --from "$U" --addr "127.0.0.1:$BARE_PROM_PORT" \
          --workers 1 --prom >/dev/null 2>&1 & bare_prom=$!
      fi
      sleep 1
      stop "$pid"
      record "run $run $workload COALESCE=$mode bare    " "$(wrk_line "http://127.0.0.1:$BARE_PORT" "$workload" "$bare")"
      stop "$bare"
      if [ "$BARE_PROM" = 1 ]; then
        record "run $run $workload COALESCE=$mode bare+prom" "$(wrk_line "http://127.0.0.1:$BARE_PROM_PORT" "$workload" "$bare_prom")"
        stop "$bare_prom"
      fi
    done
  done
done

echo
echo "medians of $runs runs (ratios to the bare handler of the same workload and mode):"
awk '{ key = $3 " " $4 " " $5; rps[key] = rps[key] " " $6; p99[key] = p99[key] " " $9; cpu[key] = cpu[key] " " $12 }
  function median(list,   n, v, i, j, t) {
    n = split(list, v, " ")
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (v[j] + 0 < v[i] + 0) { t = v[i]; v[i] = v[j]; v[j] = t }
    return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
  }
  END {
    for (key in rps) { m[key] = median(rps[key]); q[key] = median(p99[key]); c[key] = median(cpu[key]) }
    for (key in rps) {
      split(key, k, " "); bare = k[1] " " k[2] " bare"
      printf "%-6s %-12s %-30s %7.0f req/s (%.2fx)  p99 %6.2f ms (%.2fx)  cpu %5.2f us/req (%.2fx)\n",
        k[1], k[2], k[3], m[key], m[key] / m[bare], q[key], q[key] / q[bare], c[key], c[bare] / c[key]
    }
  }' "$results" | sort

if [ "$UPDATES" -gt 0 ]; then
  echo
  echo "change visibility: $UPDATES changes during 12 s of spread load (wrk -t1 -c64 on core 1):"
  start_service "$target/release/singleflight" on spread
  taskset -c 1 wrk -t1 -c64 -d12s -s scripts/bench/spread.lua "$U/template-details?id=1" -- 1000 \
    >/dev/null & load=$!
  taskset -c 1 "$target/release/loadtest" spread --url "$U" --ids 1000 --concurrency 1 \
    --duration 10s --updates "$UPDATES" --database-url "$DATABASE_URL"
  wait "$load" || true
  stop "$pid"
fi

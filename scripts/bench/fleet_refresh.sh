#!/usr/bin/env bash
# Refresh-ahead across a fleet: three replicas (scripts/stack.sh, REPLICAS=3) with a 5 s soft TTL
# and no jitter, `./loadtest.sh hot` on one id over all three for 21 s (4 soft expiries), once
# with the fleet lease on and once off. Prints refreshes and database queries, summed over the
# replicas' /metrics: with the lease, one refresh per expiry for the whole fleet.
#
#   scripts/bench/fleet_refresh.sh [SCENARIO ARGS...]   (default: hot --id 7)
#
# Stops any stack it finds first (the replicas are restarted with the settings each run needs),
# and stops the fleet at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
scenario=("${@:-hot}")
[[ $# -gt 0 ]] || scenario=(hot --id 7)
urls=(--url http://127.0.0.1:8081 --url http://127.0.0.1:8082 --url http://127.0.0.1:8083)

# The sum of one counter over the three replicas.
fleet_sum() {
  local port total=0 value
  for port in 8081 8082 8083; do
    value=$(curl -sf "http://127.0.0.1:$port/metrics" | awk -v m="$1" '$1 == m { print $2 }')
    total=$((total + ${value:-0}))
  done
  echo "$total"
}

for lease in 1000 0; do
  REPLICAS=3 scripts/stack.sh stop >/dev/null 2>&1 || true
  LEASE_TTL_MS=$lease CACHE_TTL_SECS=5 TTL_JITTER_PCT=0 REPLICAS=3 scripts/stack.sh start >/dev/null
  eval "$(REPLICAS=3 scripts/stack.sh env)"
  redis-cli -u "$REDIS_URL" flushdb >/dev/null
  refreshes=$(fleet_sum refreshes_total)
  queries=$(fleet_sum db_hits_total)
  ./loadtest.sh "${scenario[@]}" "${urls[@]}" --duration 21s --concurrency 48 |
    grep -E '^  (requests|status) '
  refreshes=$(($(fleet_sum refreshes_total) - refreshes))
  queries=$(($(fleet_sum db_hits_total) - queries))
  echo "LEASE_TTL_MS=$lease: refreshes $refreshes, database queries $queries"
done
REPLICAS=3 scripts/stack.sh stop >/dev/null

#!/usr/bin/env bash
# Load test for the singleflight service: builds the load generator (the `loadtest` crate,
# loadtest/) in release mode and runs it with the arguments given here.
#
#   ./loadtest.sh                      the seed's test against http://localhost:8080 and its table
#   ./loadtest.sh stampede             10 rounds of 200 simultaneous requests for a cold key
#   ./loadtest.sh hot --duration 10s   one key;  ./loadtest.sh spread --dist zipf   many keys
#   ./loadtest.sh --help               every scenario and option
#
# Cargo does nothing when the binary is up to date. Build output goes to stderr, so
# `./loadtest.sh --json > report.json` captures only the report.
set -euo pipefail
cd "$(dirname "$0")"
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v cargo >/dev/null; then
  echo "loadtest.sh: cargo not found; install the Rust toolchain first" >&2
  exit 1
fi
cargo build --quiet --release --package loadtest --bin loadtest >&2
exec "${CARGO_TARGET_DIR:-target}/release/loadtest" "$@"

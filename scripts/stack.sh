#!/usr/bin/env bash
# scripts/stack.sh: run singleflight's PostgreSQL, Redis and Prometheus natively (no Docker), with
# all their state in a project-local .stack/ folder; with REPLICAS=3, a fleet of the service behind
# HAProxy too. Commands, variables and layout: scripts/stack.sh help
#
# The work is done by the launcher (launcher/, its `stack` binary), the same code that starts the
# tests' servers. This front only makes sure cargo is there, builds the launcher (a quick dev
# build, nothing when it is up to date) and runs it with the same arguments and environment under
# this script's name, so that its messages name the script as you called it.
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
ME=${0}
CMD=${1:-up}

# die "headline" ["next step" ...]: the launcher's way of failing, for the failures before it runs.
die() {
  printf 'stack: error: %s\n' "$1" >&2
  shift
  local line
  for line in "$@"; do printf '       %s\n' "$line" >&2; done
  exit 1
}

if ! command -v cargo >/dev/null 2>&1 && [[ -x ${HOME:-/nonexistent}/.cargo/bin/cargo ]]; then
  PATH=$HOME/.cargo/bin:$PATH
fi
command -v cargo >/dev/null 2>&1 ||
  die "cargo (Rust) is not installed (the service needs Rust 1.89 or newer)." \
    "install it with rustup, then run '$ME $CMD' again:" \
    "  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y && . \"\$HOME/.cargo/env\""

# Cargo says where it put the binary (CARGO_TARGET_DIR or a cargo config may move it).
launcher=$(cd "$ROOT" && cargo build -q -p launcher --bin stack --message-format=json-render-diagnostics |
  sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1) ||
  die "cargo could not build the launcher (output above)." "fix the build, then run '$ME $CMD' again."
[[ -x $launcher ]] ||
  die "cargo built the launcher, but did not say where it is (got: '$launcher')." \
    "see what it says: (cd $ROOT && cargo build -p launcher --bin stack --message-format=json)"
exec -a "$ME" "$launcher" "$@"

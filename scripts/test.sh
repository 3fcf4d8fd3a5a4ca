#!/usr/bin/env bash
# Runs the whole test suite: unit and integration tests against real sockets and a real HTTP
# upstream, the Redis bus against private redis-server processes, and the demo end to end.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
  echo "cargo is missing: install Rust from https://rustup.rs" >&2
  exit 1
fi

# The Redis tests start private redis-server processes: install it where we can.
if ! command -v redis-server >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing redis-server" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
if ! command -v redis-server >/dev/null; then
  echo "redis-server is missing: the Redis tests start their own. Install it with" >&2
  echo "  apt-get install redis-server   (Debian/Ubuntu)   or   brew install redis   (macOS)" >&2
  exit 1
fi

# The demo test runs the example binary itself, so build it first.
cargo build --locked --examples
cargo test --locked --all-targets

#!/usr/bin/env bash
# Runs the whole test suite: unit and integration tests against real sockets and a real HTTP
# upstream, and the demo end to end.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
  echo "cargo is missing: install Rust from https://rustup.rs" >&2
  exit 1
fi

# The demo test runs the example binary itself, so build it first.
cargo build --locked --examples
cargo test --locked --all-targets

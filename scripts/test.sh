#!/usr/bin/env bash
# Runs the whole test suite: unit and integration tests against real sockets and a real HTTP
# upstream, then builds the examples. Installs nothing it does not need.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
  echo "cargo is missing: install Rust from https://rustup.rs" >&2
  exit 1
fi

cargo test --locked --all-targets

#!/usr/bin/env bash
# Runs the whole test suite: the Rust unit and integration tests against real sockets and a
# real HTTP upstream, the Redis bus against private redis-server processes, the demo end to
# end; then the browser shim's unit tests, its integration tests against the real patchbay
# binary and the demo's REST API, and the demo page in headless Chromium.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() {
  echo "$*" >&2
  exit 1
}

command -v cargo >/dev/null || fail "cargo is missing: install Rust from https://rustup.rs"
command -v node >/dev/null || fail "node is missing: the shim's tests need Node.js 20 or later (https://nodejs.org, or your package manager)"
node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' ||
  fail "node $(node --version) is too old: the shim's tests need Node.js 20 or later"
command -v npm >/dev/null || fail "npm is missing: it comes with Node.js (on Debian: apt-get install npm)"

has_chromium() {
  if [ -n "${CHROMIUM:-}" ]; then
    [ -x "$CHROMIUM" ]
    return
  fi
  local name
  for name in chromium chromium-browser google-chrome google-chrome-stable; do
    command -v "$name" >/dev/null && return 0
  done
  return 1
}

# The Redis tests start private redis-server processes and the browser test drives Chromium:
# install what is missing where we can.
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v nginx >/dev/null || missing+=(nginx)
command -v openssl >/dev/null || missing+=(openssl)
command -v systemd-analyze >/dev/null || missing+=(systemd)
has_chromium || missing+=(chromium)
if [ "${#missing[@]}" -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
for tool in nginx openssl systemd-analyze; do
  command -v "$tool" >/dev/null ||
    fail "$tool is missing: the reverse-proxy, Redis TLS and deployment tests run it. Install it with apt-get install ${tool%-analyze} (Debian/Ubuntu)"
done
if ! command -v redis-server >/dev/null; then
  echo "redis-server is missing: the Redis tests start their own. Install it with" >&2
  fail "  apt-get install redis-server   (Debian/Ubuntu)   or   brew install redis   (macOS)"
fi
if ! has_chromium; then
  echo "Chromium is missing: the browser test drives it headless. Install it with" >&2
  echo "  apt-get install chromium   (Debian)   or   apt-get install chromium-browser   (Ubuntu)" >&2
  fail "or set CHROMIUM to the path of a Chromium or Chrome executable"
fi

# The Python example worker's test needs python3 with the `redis` package.
command -v python3 >/dev/null || fail "python3 is missing: the example Python worker is tested (apt-get install python3)"
if ! python3 -c 'import redis' 2>/dev/null; then
  echo "installing the Python redis package for the example worker's test" >&2
  python3 -m pip install --quiet --disable-pip-version-check redis 2>/dev/null ||
    { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-redis >/dev/null; } ||
    fail "cannot install the Python redis package: run \`python3 -m pip install redis\`"
  python3 -c 'import redis' 2>/dev/null || fail "python3 cannot import redis after installing it"
fi

# The shim's development dependencies (redux, ws, playwright-core, which brings no browser).
if [ ! -d webapp-shim/node_modules ]; then
  echo "installing the shim's development dependencies" >&2
  if [ -f webapp-shim/package-lock.json ]; then
    (cd webapp-shim && npm ci --no-audit --no-fund)
  else
    (cd webapp-shim && npm install --no-audit --no-fund)
  fi
fi

# The socket.io emitters (several versions) the emitter tests are run against.
if [ ! -d tests/emitter/node_modules ]; then
  echo "installing the socket.io emitters the tests use" >&2
  (cd tests/emitter && npm ci --no-audit --no-fund)
fi

# Tests run the patchbay binary and the demo example themselves, so build them first.
cargo build --locked --bins --examples
cargo test --locked --all-targets
# The benchmark tool builds and a tiny run (50 clients, 10 messages) completes with zero loss.
cargo run --locked -q -p patchbay-bench -- ci

# Each test file runs in its own process, in parallel; files under test/support/ are helpers.
cd webapp-shim
node --test test/*.test.js

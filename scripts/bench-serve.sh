#!/usr/bin/env bash
# Serving benchmark: `gpuwasm run` against `wasmtime serve` 48.0.8 on the
# Rust hello, a JavaScript and a Python component, at concurrency 1, 16
# and 64, each server also pinned to one core; prints req/s, p99, cores
# used and the kernel's share of CPU. Builds the guests (Rust, then JS and
# Python from gpuwasm's templates with their own toolchains) and the
# runtime, and installs wasmtime
# into target/tools when it is missing. Extra arguments go to
# `gpuwasm bench serve` (see its --help).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/build-guests.sh 2>/dev/null
scripts/build-guests-js-py.sh
wasmtime=$(scripts/wasmtime-cli.sh)
exec target/release/gpuwasm bench serve --wasmtime "$wasmtime" "$@"

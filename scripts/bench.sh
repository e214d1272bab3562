#!/usr/bin/env bash
# Benchmark: requests/s and latency p50/p99 of the hello handler at
# concurrency 1, 16 and 64 over loopback (server in-process, client in the
# same process; both share this machine's cores). Extra arguments go to
# `gpuwasm bench` (e.g. --duration 10).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/build-guests.sh 2>/dev/null
cargo build --release --locked -p gpuwasm-cli
nproc | xargs echo "cores:"
exec target/release/gpuwasm bench http target/wasm/hello.wasm --concurrency 1,16,64 "$@"

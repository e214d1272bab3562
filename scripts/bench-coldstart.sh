#!/usr/bin/env bash
# Cold-start benchmark: builds the guests and the runtime, then runs
# `gpuwasm bench coldstart`. Extra arguments go to that command.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/build-guests.sh 2>/dev/null
cargo build --release --locked -p gpuwasm-cli
exec target/release/gpuwasm bench coldstart --wasm-dir target/wasm "$@"

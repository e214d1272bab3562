#!/usr/bin/env bash
# Cold-start benchmark: builds the guests and the runtime, makes sure
# `wasmtime` 48.0.8 is there for the comparison (cargo install into
# target/tools when it is not on PATH: about 15 minutes on 2 cores, once),
# then runs `gpuwasm bench coldstart`. Extra arguments go to that command.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/build-guests.sh 2>/dev/null
cargo build --release --locked -p gpuwasm-cli
want=48.0.8
wasmtime=$(command -v wasmtime || true)
if [ -z "$wasmtime" ] || ! "$wasmtime" --version | grep -q " $want"; then
  wasmtime=$root/target/tools/bin/wasmtime
  if ! { [ -x "$wasmtime" ] && "$wasmtime" --version | grep -q " $want"; }; then
    echo "bench-coldstart: installing wasmtime-cli $want into target/tools (once)" >&2
    cargo install --locked --quiet --root "$root/target/tools" wasmtime-cli --version "$want"
  fi
fi
exec target/release/gpuwasm bench coldstart --wasm-dir target/wasm --wasmtime "$wasmtime" "$@"

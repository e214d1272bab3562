#!/usr/bin/env bash
# Prints the path of a `wasmtime` 48.0.8 executable, the version gpuwasm
# links, for benchmarks that compare with `wasmtime serve`: the one on PATH
# when it is that version, else target/tools/bin/wasmtime, installed there
# with `cargo install` the first time (about 15 minutes on 2 cores).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
want=48.0.8
wasmtime=$(command -v wasmtime || true)
if [ -n "$wasmtime" ] && "$wasmtime" --version | grep -q " $want"; then
  echo "$wasmtime"
  exit 0
fi
wasmtime=$root/target/tools/bin/wasmtime
if ! { [ -x "$wasmtime" ] && "$wasmtime" --version | grep -q " $want"; }; then
  echo "wasmtime-cli: installing wasmtime-cli $want into target/tools (once)" >&2
  cargo install --locked --quiet --root "$root/target/tools" wasmtime-cli --version "$want" >&2
fi
echo "$wasmtime"

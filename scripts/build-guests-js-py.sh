#!/usr/bin/env bash
# Builds a JavaScript and a Python handler the way a user does: projects
# from `gpuwasm new js|python` (templates/), built by `gpuwasm build`
# (componentize-js 0.23 through npx, componentize-py 0.25 in the project's
# .venv). Writes target/wasm/hello-js.wasm (about 13 MB) and
# target/wasm/hello-py.wasm (about 18 MB) for scripts/bench-serve.sh; a
# project is made again only when its template changed, and built again
# only when its sources did.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build --release --locked -p gpuwasm-cli
gpuwasm=$root/target/release/gpuwasm
work=$root/target/guests-js-py
mkdir -p target/wasm "$work"

for template in js python; do
  name=hello-${template/python/py}
  project=$work/$name
  # A project older than its template (or than the binary that writes it) is made again.
  if [ -n "$(find templates/$template wit/deps "$gpuwasm" -newer "$project/gpuwasm.toml" -print -quit 2>/dev/null)" ] ||
     [ ! -f "$project/gpuwasm.toml" ]; then
    rm -rf "$project"
    "$gpuwasm" new "$template" "$name" --dir "$project" >/dev/null
  fi
  out=$root/target/wasm/$name.wasm
  if [ ! -s "$out" ] || [ -n "$(find "$project" -path "$project/.venv" -prune -o -newer "$out" -type f -print -quit)" ]; then
    "$gpuwasm" build "$project" >/dev/null
    cp "$project/$name.wasm" "$out"
  fi
done
ls -l target/wasm/hello-js.wasm target/wasm/hello-py.wasm >&2

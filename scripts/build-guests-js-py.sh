#!/usr/bin/env bash
# Builds the JavaScript and Python handlers in bench/components/ with the
# toolchains their users use: componentize-js (StarlingMonkey, from npm,
# installed into target/tools/npm) and componentize-py (from PyPI, in
# target/componentize-venv). Writes target/wasm/hello-js.wasm and
# target/wasm/hello-py.wasm; a component is rebuilt only when its source,
# the WIT or the tool's version changed (about 25 s each).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
js_version=0.23.0
npm_dir=$root/target/tools/npm
work=$root/target/guests-js-py
mkdir -p "$root/target/wasm" "$work"

# Both tools take a WIT folder holding the world and its deps.
world() { # world DIR WASI_VERSION: the proxy world with WASI at that version
  rm -rf "$1" && mkdir -p "$1/deps"
  printf 'package gpuwasm:bench;\n\nworld hello {\n  include wasi:http/proxy@%s;\n}\n' "$2" >"$1/world.wit"
  for f in "$root"/wit/deps/*.wit; do
    sed "s/0\.2\.12/$2/g" "$f" >"$1/deps/$(basename "$f")" # packages, uses and @since gates
  done
}

fresh() { # fresh OUT INPUTS...: true when OUT exists and is newer than every input
  [ -s "$1" ] || return 1
  local out=$1; shift
  [ -z "$(find "$@" -newer "$out" -print -quit)" ]
}

# JavaScript. StarlingMonkey's engine implements WASI 0.2.10 (its imports and
# its incoming-handler export), so the world is given at that version; the
# runtime serves 0.2.0 through 0.2.12 alike. (`jco componentize` wraps the
# same tool but fails here reading the WIT folder through its WASI shim, so
# componentize-js is called directly.)
if [ "$(cat "$npm_dir/.componentize-js" 2>/dev/null)" != "$js_version" ]; then
  echo "build-guests-js-py: installing componentize-js $js_version (npm, into target/tools/npm)" >&2
  mkdir -p "$npm_dir"
  npm install --prefix "$npm_dir" --no-audit --no-fund --silent "@bytecodealliance/componentize-js@$js_version"
  echo "$js_version" >"$npm_dir/.componentize-js"
fi
out=$root/target/wasm/hello-js.wasm
if ! fresh "$out" "$root/bench/components/js" "$root/wit/deps" "$npm_dir/.componentize-js" "$0"; then
  echo "build-guests-js-py: bench/components/js (componentize-js $js_version)" >&2
  world "$work/js-wit" 0.2.10
  (cd "$root/bench/components/js" && "$npm_dir/node_modules/.bin/componentize-js" handler.js \
    --wit "$work/js-wit" --world-name hello -o "$work/hello-js.wasm")
  mv "$work/hello-js.wasm" "$out"
fi

# Python.
"$root/scripts/python-env.sh" componentize
venv=$root/target/componentize-venv
out=$root/target/wasm/hello-py.wasm
if ! fresh "$out" "$root/bench/components/python" "$root/wit/deps" "$venv/.requirements" "$0"; then
  echo "build-guests-js-py: bench/components/python ($("$venv/bin/componentize-py" --version))" >&2
  world "$work/py-wit" 0.2.12
  (cd "$root/bench/components/python" && PYTHONDONTWRITEBYTECODE=1 "$venv/bin/componentize-py" -d "$work/py-wit" -w hello \
    componentize app -o "$work/hello-py.wasm" >/dev/null)
  mv "$work/hello-py.wasm" "$out"
fi
ls -l "$root/target/wasm/hello-js.wasm" "$root/target/wasm/hello-py.wasm" >&2

#!/usr/bin/env bash
# The demo: builds the runtime and the hello example, starts a server on a
# free loopback port with a fresh data directory, deploys hello, sends it a
# request, shows the answer and the deployment list, then stops the server.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/build-guests.sh
cargo build --release --locked -p gpuwasm
gpuwasm=$root/target/release/gpuwasm
work=$(mktemp -d)
trap 'kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; rm -rf "$work"' EXIT

"$gpuwasm" serve --listen 127.0.0.1:0 --data-dir "$work/data" >"$work/serve.out" 2>"$work/serve.err" &
server_pid=$!
for _ in $(seq 100); do grep -q "listening on" "$work/serve.out" 2>/dev/null && break; sleep 0.1; done
url=$(sed -n 's/^gpuwasm listening on //p' "$work/serve.out")
[ -n "$url" ] || { cat "$work/serve.err" >&2; echo "demo: the server did not start" >&2; exit 1; }
export GPUWASM_SERVER=$url GPUWASM_TOKEN=$(cat "$work/data/admin-token")

echo "\$ gpuwasm serve                                  # listening on $url"
echo "\$ gpuwasm deploy target/wasm/hello.wasm --name hello"
"$gpuwasm" deploy target/wasm/hello.wasm --name hello
echo "\$ gpuwasm invoke hello /demo"
"$gpuwasm" invoke hello /demo
echo "\$ gpuwasm list"
"$gpuwasm" list
echo "\$ gpuwasm invoke hello /demo --include     # = GET $url/default/hello/demo"
"$gpuwasm" invoke hello /demo --include

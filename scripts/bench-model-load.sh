#!/usr/bin/env bash
# Model cold load to first result, through a real server: one `gpuwasm serve`
# node with a 1 s model idle timeout, MiniLM behind the embeddings example
# and SmolLM2-135M behind the chat example. Each round waits until the model
# has been evicted, then times a request that must load it (cold) and the
# same request again (warm), with curl. The model files were just read, so
# cold means "from the page cache". Prints each round, the medians, and the
# server's own load time from its log ("model loaded ... ms="). Not part of
# the tests: run it by hand on a quiet machine.
#   scripts/bench-model-load.sh [ROUNDS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
rounds=${1:-5}
scripts/build-guests.sh >/dev/null 2>&1
cargo build --release -q -p gpuwasm-cli
gpuwasm=$root/target/release/gpuwasm
eval "$(scripts/fetch-test-models.sh)"
work=$(mktemp -d)
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

RUST_LOG=info "$gpuwasm" serve --listen 127.0.0.1:0 --admin-token bench-token --data-dir "$work/data" \
  --model-idle-secs 1 >"$work/out" 2>"$work/log" &
pid=$!
for _ in $(seq 100); do
  grep -q "listening on" "$work/out" 2>/dev/null && break
  sleep 0.1
done
url=$(grep -o "http://[0-9.:]*" "$work/out" | head -1)
[ -n "$url" ] || { echo "bench-model-load: the server did not start:" >&2; cat "$work/log" >&2; exit 1; }
export GPUWASM_SERVER=$url GPUWASM_TOKEN=bench-token
"$gpuwasm" model push minilm "$minilm" >/dev/null 2>&1
"$gpuwasm" model push smollm2 "$smollm2" >/dev/null 2>&1
"$gpuwasm" deploy target/wasm/embeddings.wasm --manifest examples/embeddings/gpuwasm.toml >/dev/null
"$gpuwasm" deploy target/wasm/chat.wasm --manifest examples/chat/gpuwasm.toml >/dev/null

# evicted MODEL: waits until MODEL is no longer loaded.
evicted() {
  for _ in $(seq 100); do
    curl -s -H "authorization: Bearer bench-token" "$url/_gpuwasm/v1/models/$1" | grep -Eq '"loaded": ?null' && return
    sleep 0.1
  done
  echo "bench-model-load: $1 was never evicted" >&2
  exit 1
}
# timed PATH BODY: seconds to the whole answer (which must be 200).
timed() {
  curl -s -o "$work/body" -w '%{http_code} %{time_total}\n' -H 'content-type: application/json' -d "$2" "$url$1" |
    awk -v body="$work/body" '$1 != 200 { system("cat " body " >&2"); exit 1 } { print $2 }'
}
embed='{"model":"minilm","input":"How long does a cold model take to answer?"}'
chat='{"model":"smollm2","messages":[{"role":"user","content":"Say hi."}],"max_tokens":1,"temperature":0}'
results=$work/results.txt
echo "bench-model-load: $rounds rounds; cold = the request that loads the model, warm = the same request next"
for round in $(seq "$rounds"); do
  for model in minilm smollm2; do
    evicted "$model"
    if [ "$model" = minilm ]; then path=/default/embeddings/v1/embeddings body=$embed; else path=/default/chat/v1/chat/completions body=$chat; fi
    cold=$(timed "$path" "$body")
    warm=$(timed "$path" "$body")
    echo "$model $round $cold $warm" | tee -a "$results"
  done
done
python3 - "$results" "$work/log" <<'EOF'
import re, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    model, _round, cold, warm = line.split()
    rows.setdefault(model, []).append((float(cold) * 1000, float(warm) * 1000))
loads = {}
for line in open(sys.argv[2]):
    m = re.search(r'model loaded.*model=(\w+).*ms=(\d+)', re.sub(r'\x1b\[[0-9;]*m', '', line))
    if m:
        loads.setdefault(m.group(1), []).append(int(m.group(2)))
print(f"{'model':<10} {'cold ms':>8} {'warm ms':>8} {'cold-warm':>10} {'server load ms':>15}   (medians)")
for model, runs in rows.items():
    cold = statistics.median(c for c, _ in runs)
    warm = statistics.median(w for _, w in runs)
    load = statistics.median(loads[model]) if model in loads else float('nan')
    print(f"{model:<10} {cold:8.1f} {warm:8.1f} {cold - warm:10.1f} {load:15.0f}")
EOF

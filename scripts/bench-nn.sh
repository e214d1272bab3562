#!/usr/bin/env bash
# Benchmark: all-MiniLM-L6-v2 embeddings/s at batch 1 and 32 by ONNX
# Runtime (the same weights as an ONNX graph, scripts/export-minilm-onnx.py),
# sentence-transformers (PyTorch), gpuwasm's engine called natively and a
# component through wasi-nn, every side given the machine's cores as
# threads; then the latency of one short POST /v1/embeddings through the
# embeddings example on a real server (p50, p99). The sides alternate in
# rounds and every ratio is taken within a round, then the median over
# rounds is reported, so drift on a busy machine hits all sides alike.
# The baselines live in target/bench-venv (`scripts/python-env.sh bench`,
# about 6 GB with PyTorch), made on first use.
# Usage: scripts/bench-nn.sh [ROUNDS, default 5] [SECONDS per figure, default 2]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
rounds=${1:-5}
seconds=${2:-2}
minilm=$(scripts/fetch-test-models.sh | sed -n 's/^minilm=//p')
scripts/build-guests.sh 2>/dev/null
cargo build --release --locked -p gpuwasm-cli
scripts/python-env.sh bench
python=$root/target/bench-venv/bin/python
threads=$(nproc)
mkdir -p target/bench
onnx=target/bench/minilm.onnx
[ -s "$onnx" ] || "$python" scripts/export-minilm-onnx.py "$minilm" "$onnx"
echo "cores: $threads, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
work=$(mktemp -d)
trap 'kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; rm -rf "$work"' EXIT
server_pid=
out=$work/rounds
for round in $(seq "$rounds"); do
  echo "round $round" | tee -a "$out"
  "$python" scripts/bench-onnxruntime.py "$minilm" "$onnx" scripts/bench-sentences.txt "$seconds" "$threads" | tee -a "$out"
  "$python" scripts/bench-sentence-transformers.py "$minilm" scripts/bench-sentences.txt "$seconds" 2>/dev/null | tee -a "$out"
  target/release/gpuwasm bench nn --minilm "$minilm" --probe target/wasm/nn_probe.wasm \
    --sentences scripts/bench-sentences.txt --onnx examples/classify/digits.onnx --seconds "$seconds" --rounds 1 | tee -a "$out"
done

# One short embedding request end to end, through a real server.
target/release/gpuwasm serve --listen 127.0.0.1:0 --data-dir "$work/data" >"$work/serve.out" 2>"$work/serve.err" &
server_pid=$!
for _ in $(seq 100); do grep -q "listening on" "$work/serve.out" 2>/dev/null && break; sleep 0.1; done
url=$(sed -n 's/^gpuwasm listening on //p' "$work/serve.out")
[ -n "$url" ] || { cat "$work/serve.err" >&2; echo "bench-nn: the server did not start" >&2; exit 1; }
export GPUWASM_SERVER=$url GPUWASM_TOKEN=$(cat "$work/data/admin-token")
target/release/gpuwasm model push minilm "$minilm" >/dev/null
target/release/gpuwasm deploy target/wasm/embeddings.wasm --manifest examples/embeddings/gpuwasm.toml >/dev/null
"$python" scripts/bench-embed-latency.py "$url/default/embeddings/v1/embeddings" 500 | tee -a "$out"

PYTHONPATH=scripts "$python" - "$out" <<'PY'
import sys
import statistics
from bench_rounds import median, read_rounds
rounds = read_rounds(sys.argv[1])
latency = rounds[-1]
med = lambda f: median(rounds, f)
print()
print(f"all-MiniLM-L6-v2, embeddings/s, median of {len(rounds)} rounds   batch 1   batch 32")
for label, key in [("ONNX Runtime", "ort"), ("sentence-transformers", "st"), ("gpuwasm native engine", "native"), ("gpuwasm via wasi-nn", "wasi")]:
    print(f"{label:<48} {med(lambda r: r[key + '_b1']):>8.1f} {med(lambda r: r[key + '_b32']):>10.1f}")
for side, key in [("native engine", "native"), ("wasi-nn", "wasi")]:
    for base, bkey, goal in [("ONNX Runtime", "ort", " (goal >= 1.0x)"), ("sentence-transformers", "st", "")]:
        for b in ("b1", "b32"):
            ratios = sorted(r[f"{key}_{b}"] / r[f"{bkey}_{b}"] for r in rounds)
            print(f"{side} / {base}, {b}: median {statistics.median(ratios):.2f}x, rounds {ratios[0]:.2f}-{ratios[-1]:.2f}x{goal}")
for b in ("b1", "b32"):
    o = sorted(r["overhead_" + b] for r in rounds)
    print(f"wasi-nn overhead over native, {b}: median {statistics.median(o):.1f}%, rounds {o[0]:.1f} to {o[-1]:.1f}% (goal <= 5%)")
print(f"one short POST /v1/embeddings end to end: p50 {latency['embed_p50_ms']:.2f} ms (goal <= 4 ms), p99 {latency['embed_p99_ms']:.2f} ms")
print(f"model load: all-MiniLM-L6-v2 {med(lambda r: r['minilm_load_ms']):.0f} ms, digits.onnx {med(lambda r: r['onnx_load_ms']):.2f} ms")
PY

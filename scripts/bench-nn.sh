#!/usr/bin/env bash
# Benchmark: inference on all-MiniLM-L6-v2 (embeddings/s at batch 1 and 32)
# by gpuwasm's engine called natively, by a component through wasi-nn, and
# by sentence-transformers (PyTorch, all cores) on the same machine in the
# same run; the ratios against sentence-transformers and the wasi-nn
# overhead; model load times. The two sides alternate in rounds and every
# ratio is taken within a round, then the median over rounds is reported,
# so drift on a busy machine hits both sides alike. Installs
# sentence-transformers with pip when missing.
# Usage: scripts/bench-nn.sh [ROUNDS, default 5] [SECONDS per figure, default 2]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
rounds=${1:-5}
seconds=${2:-2}
shared=${GPUWASM_SHARED:-$root/../shared}
minilm=$("$shared/tools/fetch-test-models.sh" | sed -n 's/^minilm=//p')
scripts/build-guests.sh 2>/dev/null
cargo build --release --locked -p gpuwasm-cli
python3 -c "import sentence_transformers" 2>/dev/null || python3 -m pip install --quiet sentence-transformers
echo "cores: $(nproc), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for round in $(seq "$rounds"); do
  echo "round $round" | tee -a "$out"
  python3 scripts/bench-sentence-transformers.py "$minilm" scripts/bench-sentences.txt "$seconds" 2>/dev/null | tee -a "$out"
  target/release/gpuwasm bench nn --minilm "$minilm" --probe target/wasm/nn_probe.wasm \
    --sentences scripts/bench-sentences.txt --onnx examples/classify/digits.onnx --seconds "$seconds" --rounds 1 | tee -a "$out"
done
PYTHONPATH=scripts python3 - "$out" <<'PY'
import sys
import statistics
from bench_rounds import median, read_rounds
rounds = read_rounds(sys.argv[1])
med = lambda f: median(rounds, f)
print()
print(f"all-MiniLM-L6-v2, embeddings/s, median of {len(rounds)} rounds   batch 1   batch 32")
for label, key in [("sentence-transformers", "st"), ("gpuwasm native engine", "native"), ("gpuwasm via wasi-nn", "wasi")]:
    print(f"{label:<48} {med(lambda r: r[key + '_b1']):>8.1f} {med(lambda r: r[key + '_b32']):>10.1f}")
for b in ("b1", "b32"):
    ratios = sorted(r["wasi_" + b] / r["st_" + b] for r in rounds)
    print(f"wasi-nn / sentence-transformers, {b}: median {statistics.median(ratios):.2f}x, rounds {ratios[0]:.2f}-{ratios[-1]:.2f}x (goal >= 1.0x)")
for b in ("b1", "b32"):
    o = sorted(r["overhead_" + b] for r in rounds)
    print(f"wasi-nn overhead over native, {b}: median {statistics.median(o):.1f}%, rounds {o[0]:.1f} to {o[-1]:.1f}% (goal <= 5%)")
print(f"model load: all-MiniLM-L6-v2 {med(lambda r: r['minilm_load_ms']):.0f} ms, digits.onnx {med(lambda r: r['onnx_load_ms']):.2f} ms")
PY

#!/usr/bin/env bash
# Benchmark: inference on all-MiniLM-L6-v2 (embeddings/s at batch 1 and 32)
# by gpuwasm's engine called natively, by a component through wasi-nn, and
# by sentence-transformers (PyTorch) on the same machine in the same run;
# the ratios against sentence-transformers and the wasi-nn overhead; model
# load times. sentence-transformers runs before and after gpuwasm and its
# figures are averaged, so drift on a busy machine hits both sides alike.
# Installs sentence-transformers with pip when missing.
# Usage: scripts/bench-nn.sh [SECONDS per figure and round, default 1]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
seconds=${1:-1}
shared=${GPUWASM_SHARED:-$root/../shared}
minilm=$("$shared/tools/fetch-test-models.sh" | sed -n 's/^minilm=//p')
scripts/build-guests.sh 2>/dev/null
cargo build --release --locked -p gpuwasm
python3 -c "import sentence_transformers" 2>/dev/null || python3 -m pip install --quiet sentence-transformers
echo "cores: $(nproc)"
out=$(mktemp)
python3 scripts/bench-sentence-transformers.py "$minilm" scripts/bench-sentences.txt "$((5 * ${seconds%.*}))" | tee -a "$out"
target/release/gpuwasm bench nn --minilm "$minilm" --probe target/wasm/nn_probe.wasm \
  --sentences scripts/bench-sentences.txt --onnx examples/classify/digits.onnx --seconds "$seconds" | tee "$out"
python3 scripts/bench-sentence-transformers.py "$minilm" scripts/bench-sentences.txt "$seconds" | tee -a "$out"
python3 - "$out" <<'PY'
import sys
runs = {}
for line in open(sys.argv[1]):
    if line.startswith("key "):
        name, value = line[4:].strip().split("=")
        runs.setdefault(name, []).append(float(value))
k = {name: sum(v) / len(v) for name, v in runs.items()}
print()
print("embeddings/s          batch 1    batch 32")
for label, key in [("sentence-transformers", "st"), ("gpuwasm native", "native"), ("gpuwasm via wasi-nn", "wasi")]:
    print(f"{label:<21} {k[key + '_b1']:>8.1f} {k[key + '_b32']:>10.1f}")
for b in ("b1", "b32"):
    print(f"ratio, wasi-nn / sentence-transformers, {b}: {k['wasi_' + b] / k['st_' + b]:.2f}x (goal >= 1.0x)")
for b in ("b1", "b32"):
    print(f"wasi-nn overhead over native, {b}: {k['overhead_' + b]:.1f}% (paired per round; goal <= 5%)")
PY
rm -f "$out"

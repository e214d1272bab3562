#!/usr/bin/env bash
# Benchmark: text generation with SmolLM2-135M-Instruct Q4_1 (or the GGUF
# given) by gpuwasm (the chat example over loopback HTTP, `gpuwasm bench
# llm`) and by llama.cpp (llama-cpp-python built for AVX2 by
# scripts/llama-cpp-env.sh, installed here when missing) on the same file,
# same machine, same run: model load to first token, time to first token
# for a 200-token prompt, decode tokens/s of one sequence, and gpuwasm's
# aggregate tokens/s at 16 and 64 concurrent streams. The sides alternate
# in rounds; each ratio is taken within a round, the median reported.
# On a machine with an NVIDIA GPU, GPUS=auto adds nothing automatic: run
# `gpuwasm bench llm --gpus auto` by hand (see docs/performance.md).
# Usage: scripts/bench-llm.sh [ROUNDS, default 3] [MODEL.gguf]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
rounds=${1:-3}
model=${2:-$(scripts/fetch-test-models.sh | sed -n 's/^smollm2=//p')}
scripts/llama-cpp-env.sh
scripts/build-guests.sh >/dev/null
cargo build --release --locked -p gpuwasm-cli
echo "cores: $(nproc), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), model $model"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for round in $(seq "$rounds"); do
  echo "round $round" | tee -a "$out"
  target/release/gpuwasm bench llm --model "$model" --chat target/wasm/chat.wasm --gpus none | sed 's/^key /key ours_/' | tee -a "$out"
  target/llama-venv/bin/python scripts/bench-llm-llama-cpp.py "$model" | sed 's/^key /key theirs_/' | tee -a "$out"
done
PYTHONPATH=scripts python3 - "$out" <<'PY'
import sys
from bench_rounds import median, read_rounds
rounds = read_rounds(sys.argv[1])
med = lambda f: median(rounds, f)
print()
print(f"medians of {len(rounds)} rounds            gpuwasm   llama.cpp   ratio")
for name, label, better in [("decode_tok_s", "decode, 1 sequence, tok/s", "higher"),
                            ("ttft_ms", "first token, 200-token prompt, ms", "lower"),
                            ("load_to_first_token_ms", "load to first token, ms", "lower")]:
    ours, theirs = med(lambda r: r["ours_" + name]), med(lambda r: r["theirs_" + name])
    ratio = med(lambda r: r["ours_" + name] / r["theirs_" + name])
    print(f"{label:<36} {ours:>9.1f} {theirs:>11.1f} {ratio:>7.2f}x ({better} is better)")
for streams in (16, 64):
    agg = med(lambda r: r[f"ours_aggregate_{streams}_tok_s"])
    gain = med(lambda r: r[f"ours_aggregate_{streams}_tok_s"] / r["ours_decode_tok_s"])
    print(f"aggregate, {streams} streams, tok/s        {agg:>9.1f}           -   {gain:.2f}x gpuwasm's one sequence")
PY

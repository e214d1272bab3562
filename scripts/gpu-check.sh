#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, builds with CUDA, runs the
# conformance suite on CUDA and on wgpu (Vulkan on the NVIDIA driver, when
# it has one), the GPU path end to end, and prints the benchmarks: the
# backends side by side (CPU baseline), fair GPU time, and MiniLM against
# PyTorch on the same GPU when torch is installed. About 8 minutes.
#
#   scripts/gpu-check.sh            build here and run (needs cargo)
#   scripts/gpu-check.sh --prepare  build the binaries into target/gpu-check/
#                                   on another machine (no GPU needed) ...
#   scripts/gpu-check.sh --prebuilt ... and run them on the GPU machine
#
# Every step prints its own heading; a failed step fails the script at the
# end, after the others ran. Models come from scripts/fetch-test-models.sh
# (or GPUWASM_MINILM=DIR).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=$root/target/gpu-check
mode=${1:-build}
failed=()
step() { echo; echo "=== $1"; shift; "$@" || failed+=("$1"); }

if [ "$mode" = --prepare ] || [ "$mode" = build ]; then
  cargo build --release --locked -p gpuwasm-cli || exit 1
  mkdir -p "$out"
  for t in backends models cuda_kernels; do
    bin=$(cargo test --release --locked -p gpuwasm-tensor --test "$t" --no-run --message-format=json 2>/dev/null \
      | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
    cp "$bin" "$out/$t"
  done
  bin=$(cargo test --release --locked -p gpuwasm-cli --test gpu --no-run --message-format=json 2>/dev/null \
    | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
  cp "$bin" "$out/gpu" && cp target/release/gpuwasm "$out/gpuwasm"
  [ -f target/wasm/nn_probe.wasm ] || scripts/build-guests.sh
  cp target/wasm/nn_probe.wasm "$out/"
  [ "$mode" = --prepare ] && { ls -la "$out"; exit 0; }
fi

minilm=${GPUWASM_MINILM:-$("$root/scripts/fetch-test-models.sh" | sed -n 's/^minilm=//p')}
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
echo "=== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -5
"$out/gpuwasm" info --gpus software

# The conformance suite, on every backend found; CUDA must be among them.
cd "$root/tensor"
step "kernels compile (NVRTC found on this machine)" env GPUWASM_REQUIRE_NVRTC=1 "$out/cuda_kernels" --nocapture
step "operators on every backend" env GPUWASM_REQUIRE_BACKENDS=cuda "$out/backends" --nocapture --test-threads 1
step "MiniLM and digits on every backend" env GPUWASM_REQUIRE_BACKENDS=cuda "$out/models" --nocapture --test-threads 1
cd "$root/cli"
step "GPU path end to end" env CARGO_BIN_EXE_gpuwasm="$out/gpuwasm" "$out/gpu" --nocapture --test-threads 1
cd "$root"

step "benchmark: backends side by side" timeout 180 "$out/gpuwasm" bench nn --gpus auto --minilm "$minilm" \
  --probe "$out/nn_probe.wasm" --sentences scripts/bench-sentences.txt --onnx examples/classify/digits.onnx --seconds 2 --rounds 1 --large-batch 256
step "benchmark: fair GPU time" timeout 120 "$out/gpuwasm" bench gpu-share --gpus auto --minilm "$minilm" \
  --probe "$out/nn_probe.wasm" --seconds 20
if python3 -c "import torch, sentence_transformers; assert torch.cuda.is_available()" 2>/dev/null; then
  step "benchmark: PyTorch on the same GPU" timeout 120 python3 scripts/bench-sentence-transformers.py "$minilm" \
    scripts/bench-sentences.txt 2 --device cuda --batches 1,32,256
else
  echo; echo "=== PyTorch with CUDA is not installed here: no PyTorch comparison (pip install torch sentence-transformers)"
fi

echo
if ((${#failed[@]})); then
  echo "gpu-check: FAILED: ${failed[*]}"
  exit 1
fi
echo "gpu-check: all steps passed"

#!/usr/bin/env bash
# Sets up what the tests need on a fresh Debian machine (guest toolchain,
# guest components, the Python tools in target/venv, Mesa's lavapipe for the
# wgpu backend, PostgreSQL 15 and the S3-compatible s3s-fs for the
# scale-out tests, which they then require: GPUWASM_REQUIRE_POSTGRES=1,
# GPUWASM_REQUIRE_S3=1; the tests fetch their models with
# scripts/fetch-test-models.sh) and runs every test: unit,
# end-to-end, inference, GPU backends, examples; then fuzzes the model
# parsers for a bounded time (GPUWASM_FUZZ_SECS per target, 20).
#
# The GPU tests run on every backend the machine has: here at least wgpu on
# lavapipe, which this script requires (GPUWASM_REQUIRE_BACKENDS=wgpu), so
# a missing Vulkan device fails the run instead of skipping those tests.
# The CUDA kernels are compiled with NVRTC from PyPI's nvidia-cuda-nvrtc-cu12
# (in target/venv), which needs no GPU; running them needs one
# (scripts/gpu-check.sh).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/build-guests.sh
# Python tools the tests drive (the official OpenAI client, gguf, NVRTC), in target/venv.
scripts/python-env.sh
scripts/install-lavapipe.sh
scripts/install-postgres.sh
scripts/install-s3s.sh
# node and npx: the JavaScript template's build fetches componentize-js from
# npm. Fetched once here, before tests build JavaScript at the same time
# (older npm's npx cache is not safe for concurrent installs).
if ! command -v npx >/dev/null; then
  echo "test: installing nodejs and npm (apt)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
npx --yes -p @bytecodealliance/componentize-js@0.23.0 true
scripts/fetch-test-models.sh >/dev/null
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp} # else Mesa warns on every start
export GPUWASM_REQUIRE_BACKENDS=${GPUWASM_REQUIRE_BACKENDS:-wgpu}
nvrtc=$(echo "$root"/target/venv/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib)
export LD_LIBRARY_PATH=$nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export GPUWASM_REQUIRE_NVRTC=1
export GPUWASM_REQUIRE_POSTGRES=1
export GPUWASM_REQUIRE_S3=1
cargo build --release --workspace --locked
cargo test --release --workspace --locked "$@"
# Coverage-guided fuzzing of the model parsers and of guest tensors, for a
# bounded time (scripts/fuzz.sh runs every target, longer, by hand).
scripts/fuzz.sh "${GPUWASM_FUZZ_SECS:-20}" safetensors gguf onnx guest_tensor

#!/usr/bin/env bash
# Makes target/llama-venv with llama-cpp-python (llama.cpp, built from
# source: PyPI has no prebuilt wheel), the reference runner for the LLM
# fixtures (scripts/make-llm-fixture.py) and the LLM benchmark
# (scripts/bench-llm.sh). Built for AVX2 without native CPU flags: a native
# build crashed on this project's AMD EPYC machines (general protection
# faults; docs/performance.md, "AVX-512 on this CPU", traces them to an
# aligned 512-bit load). Takes 10-20 minutes on 2 cores the first
# time; does nothing when it is there.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$root/target/llama-venv
version=0.3.36
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$version')" 2>/dev/null; then
  exit 0
fi
command -v cmake >/dev/null && command -v g++ >/dev/null || {
  echo "llama-cpp-env: installing cmake and g++ (apt)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++ >/dev/null
}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
echo "llama-cpp-env: building llama-cpp-python $version (AVX2, no native flags)" >&2
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_OPENMP=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL=2 "$venv/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir "llama-cpp-python==$version" numpy
echo "llama-cpp-env: $venv ready" >&2

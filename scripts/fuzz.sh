#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz, libFuzzer) of what reads hostile
# bytes: the model parsers (safetensors, gguf, onnx), guest tensors through
# wasi-nn (guest_tensor), gpuwasm.toml (manifest) and the admin API's
# request decoding (admin_api). Each target starts from its folder of the
# committed corpus (tests/corpus) and runs SECONDS (default 60); a crash
# is copied into that folder as fuzz-crash-HASH and the script exits 1.
# Fix the crash, then commit the file: tests/security.rs sends every
# corpus file to a real server and expects a clean error (rename the file
# valid-... if the input is good and must be served instead).
#   scripts/fuzz.sh [SECONDS] [TARGET...]
# CI runs the model and tensor targets for a bounded time (the manifest
# and admin API targets build the whole server: by hand, and their corpus
# files run against a real server in tests/security.rs); run it longer by
# hand, e.g. scripts/fuzz.sh 600.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(safetensors gguf onnx guest_tensor manifest admin_api)

# The corpus folder each target reads.
kind() {
  case $1 in
    guest_tensor) echo tensors ;;
    manifest) echo manifests ;;
    admin_api) echo api ;;
    *) echo "$1" ;;
  esac
}

if ! command -v cargo-fuzz >/dev/null; then
  echo "fuzz: installing cargo-fuzz 0.13.2" >&2
  cargo install cargo-fuzz --version 0.13.2 --locked -q
fi
# libFuzzer's instrumentation needs unstable flags; the stable compiler
# accepts them under RUSTC_BOOTSTRAP. Optimised, with debug assertions
# and AddressSanitizer (cargo-fuzz's defaults).
export RUSTC_BOOTSTRAP=1
# The manifest and admin API targets need the server (and its much longer
# build): only when asked for.
features=()
for target in "${targets[@]}"; do
  case $target in manifest | admin_api) features=(--features server) ;; esac
done
echo "fuzz: building ${targets[*]}" >&2
(cd fuzz && cargo fuzz build "${features[@]}")

status=0
for target in "${targets[@]}"; do
  corpus=tests/corpus/$(kind "$target")
  work=fuzz/corpus/$target
  rm -rf "fuzz/artifacts/$target"
  mkdir -p "$work" "fuzz/artifacts/$target"
  echo "fuzz: $target for ${seconds}s from $corpus" >&2
  if ! (cd fuzz && cargo fuzz run "${features[@]}" "$target" "corpus/$target" "../$corpus" -- \
      -max_total_time="$seconds" -timeout=60 -rss_limit_mb=4096 -max_len=1048576 -print_final_stats=1 2>&1 | grep -vE '^("|#[0-9]+|###### |INFO: |\s+NEW_FUNC)' | tail -n 40); then
    status=1
  fi
  for crash in fuzz/artifacts/"$target"/*; do
    [ -f "$crash" ] || continue
    name=fuzz-crash-$(sha256sum "$crash" | cut -c1-16)
    cp "$crash" "$corpus/$name"
    echo "fuzz: $target crashed on $corpus/$name (reproduce: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run ${features[*]} $target ../$corpus/$name)" >&2
    status=1
  done
done
exit $status

#!/usr/bin/env bash
# Builds every guest component (examples/hello and the test guests) for
# wasm32-wasip2 and copies them to target/wasm/. Installs the guest toolchain
# first when it is missing (scripts/install-guest-toolchain.sh).
# Cargo's incremental target dir (target/guest) makes a rebuild with no
# change take about a second.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$root/target/wasm"
"$root/scripts/install-guest-toolchain.sh"
conf=$root/target/guest-toolchain.toml
# GUEST_CARGO, GUEST_RUSTC, GUEST_BOOTSTRAP.
source "$root/target/guest-toolchain.env"
bootstrap=()
[ -z "$GUEST_BOOTSTRAP" ] || bootstrap=(RUSTC_BOOTSTRAP=1)

guest_cargo() { # guest_cargo DIR ARGS...: a parent cargo's settings would leak into the guest build
  local dir=$1; shift
  (cd "$root/$dir" && env -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS -u CARGO_TARGET_DIR -u CARGO_BUILD_TARGET \
      -u RUSTC_WRAPPER -u RUSTC_WORKSPACE_WRAPPER "${bootstrap[@]}" RUSTC="$GUEST_RUSTC" \
      "$GUEST_CARGO" --config "$conf" "$@" --target-dir "$root/target/guest")
}

for dir in examples/hello examples/embeddings examples/classify examples/chat tests/guests; do
  echo "build-guests: $dir" >&2
  guest_cargo "$dir" build --release --locked --quiet
done
for name in hello embeddings classify chat behaviors unsupported_import stateful bigheap slowinit init_trap init_prints wizer_convention nn_probe; do
  cp "$root/target/guest/wasm32-wasip2/release/$name.wasm" "$root/target/wasm/$name.wasm"
done
ls -l "$root"/target/wasm/*.wasm >&2

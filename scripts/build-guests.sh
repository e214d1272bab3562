#!/usr/bin/env bash
# Builds every guest component (examples/hello and the test guests) for
# wasm32-wasip2 and copies them to target/wasm/. Installs the guest toolchain
# first when it is missing (Debian packages; see ../shared/tools/).
# Cargo's incremental target dir (target/guest) makes a rebuild with no
# change take about a second.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
shared=${GPUWASM_SHARED:-$root/../shared}
installer=$shared/tools/install-guest-toolchain.sh
[ -x "$installer" ] || { echo "build-guests: $installer not found (set GPUWASM_SHARED to the shared/ folder)" >&2; exit 1; }
mkdir -p "$root/target/wasm"
conf=$root/target/guest-toolchain.toml
GUEST_TC_PROOF=skip "$installer" "$conf" >/dev/null

guest_cargo() { # guest_cargo DIR ARGS...: the toolchain's pitfalls handled here
  local dir=$1; shift
  (cd "$root/$dir" && env -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS -u CARGO_TARGET_DIR -u CARGO_BUILD_TARGET \
      -u RUSTC_WRAPPER -u RUSTC_WORKSPACE_WRAPPER RUSTC_BOOTSTRAP=1 RUSTC=/usr/bin/rustc \
      /usr/bin/cargo --config "$conf" "$@" --target-dir "$root/target/guest")
}

for dir in examples/hello examples/embeddings examples/classify examples/chat tests/guests; do
  echo "build-guests: $dir" >&2
  guest_cargo "$dir" build --release --locked --quiet
done
for name in hello embeddings classify chat behaviors unsupported_import stateful bigheap slowinit init_trap init_prints wizer_convention nn_probe; do
  cp "$root/target/guest/wasm32-wasip2/release/$name.wasm" "$root/target/wasm/$name.wasm"
done
ls -l "$root"/target/wasm/*.wasm >&2

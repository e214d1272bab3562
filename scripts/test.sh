#!/usr/bin/env bash
# Sets up what the tests need on a fresh Debian machine (guest toolchain,
# guest components) and runs every test: unit, end-to-end, examples.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/build-guests.sh
cargo build --release --workspace --locked
cargo test --release --workspace --locked "$@"

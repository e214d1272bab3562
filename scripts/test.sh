#!/usr/bin/env bash
# Sets up what the tests need on a fresh Debian machine (guest toolchain,
# guest components, the Python tools in target/venv; the tests fetch their models
# with ../shared/tools/fetch-test-models.sh) and runs every test: unit,
# end-to-end, inference, examples.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/build-guests.sh
# Python tools the tests drive (the official OpenAI client, ...), in target/venv.
scripts/python-env.sh
cargo build --release --workspace --locked
cargo test --release --workspace --locked "$@"

#!/usr/bin/env bash
# Sets up what the tests need on a fresh Debian machine (guest toolchain,
# guest components, the openai Python client; the tests fetch their models
# with ../shared/tools/fetch-test-models.sh) and runs every test: unit,
# end-to-end, inference, examples.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/build-guests.sh
# The inference tests drive the official OpenAI client against the embeddings example.
python3 -c "import openai" 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check openai
cargo build --release --workspace --locked
cargo test --release --workspace --locked "$@"

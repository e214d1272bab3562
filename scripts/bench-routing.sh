#!/usr/bin/env bash
# Model-aware routing between nodes (docs/scale-out.md): three nodes over a
# PostgreSQL of their own serve the embeddings example over MiniLM; prints
# the cold loads avoided and the latency one hop adds (tests/scale_out.rs,
# bench_routing). Needs what scripts/test.sh sets up (guest components,
# PostgreSQL, the test models).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --locked -p gpuwasm-cli --test scale_out -- --ignored --nocapture bench_routing 2>&1 | grep -E "^(routing benchmark|  )|test result|FAILED|panicked"

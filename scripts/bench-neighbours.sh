#!/usr/bin/env bash
# Noisy neighbours: tenant A serves the Rust hello at a steady open-loop
# rate (RATE req/s, default 100, latency from each request's due time)
# while tenant B, one phase at a time (SECONDS each, default 8; each phase
# ROUNDS times, default 3, every run between two solo runs where B does
# nothing), spins guests to their CPU limit,
# fills their memory limit, traps, storms a small deployment with 200
# clients, holds 500 slow connections, and pushes a 29 MiB model over and
# over. Prints A's p50/p99, rate and errors, B's requests by status and
# the CPU of server, clients and others per run, and a Markdown table of
# each phase's runs pooled against the solo runs pooled; the goal is A's
# p99 within +20% of solo in every phase (PASS/MISS).
# scripts/bench-neighbours.py does the load and the report (what each
# phase sends is described there). Not part of the tests: run it by hand
# on a quiet machine (anything else using the cores shows as "others").
#   scripts/bench-neighbours.sh [SECONDS] [RATE] [ROUNDS]  # about 7 min as 8 100 3
#   PHASES=cpu,storm scripts/bench-neighbours.sh 3 100 1  # a subset, for a quick look
#   NO_BUILD=1 ...                                  # use target/ as built
#   SERVE_ARGS="--refusal-delay-ms 0" ...            # extra flags for the server
#
# The server is one `gpuwasm serve` with its defaults (pool of 256
# instances, half of it per tenant, upload slots, timeouts, --gpus auto)
# except for:
#   --listen 127.0.0.1:0      a free port, reported on stdout
#   --data-dir (a temp dir)   fresh state, removed on exit
#   --admin-token             a known token to create the two tenants
# and RUST_LOG=warn (as the other benchmarks: no log line per request; B's
# traps and limits still log their warnings). No rate limit or instance
# quota is set for either tenant: the node's defaults are what is measured.
# B's deployments set limits of their own at deploy time (B_DEPLOYMENTS in
# the .py: cpu_ms 1000 for /loop; concurrency 4 and queue 16 for the storm).
# The binary is copied into the temp dir first, so a rebuild of target/
# during the run changes nothing.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
seconds=${1:-8}
rate=${2:-100}
rounds=${3:-3}
if [ -z "${NO_BUILD:-}" ]; then
  scripts/build-guests.sh >/dev/null 2>&1
  cargo build --release -q -p gpuwasm-cli
fi
python=python3
[ -x target/venv/bin/python ] && python=target/venv/bin/python
for f in target/release/gpuwasm target/wasm/hello.wasm target/wasm/behaviors.wasm; do
  [ -e "$f" ] || { echo "bench-neighbours: $f is missing (build it, or run without NO_BUILD)" >&2; exit 1; }
done
work=$(mktemp -d)
pid=
cleanup() {
  [ -z "$pid" ] || kill "$pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
cp target/release/gpuwasm "$work/gpuwasm"

RUST_LOG=warn "$work/gpuwasm" serve --listen 127.0.0.1:0 --admin-token bench-token \
  --data-dir "$work/data" ${SERVE_ARGS:-} >"$work/server.out" 2>"$work/server.err" &
pid=$!
for _ in $(seq 100); do
  grep -q "listening on" "$work/server.out" 2>/dev/null && break
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.1
done
url=$(grep -o "http://[0-9.:]*" "$work/server.out" | head -1 || true)
[ -n "$url" ] || { echo "bench-neighbours: the server did not start:" >&2; cat "$work/server.err" >&2; exit 1; }

status=0
"$python" scripts/bench-neighbours.py --url "$url" --admin-token bench-token --server-pid "$pid" \
  --seconds "$seconds" --rate "$rate" --rounds "$rounds" ${PHASES:+--phases "$PHASES"} || status=$?
if ! kill -0 "$pid" 2>/dev/null; then
  echo "bench-neighbours: the server exited during the run; its log:" >&2
  tail -20 "$work/server.err" >&2
  status=1
elif [ "$status" -ne 0 ]; then
  echo "bench-neighbours: the server's last log lines:" >&2
  grep -v XDG_RUNTIME_DIR "$work/server.err" | tail -10 >&2 || true
fi
exit "$status"

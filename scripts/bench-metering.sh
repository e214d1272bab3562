#!/usr/bin/env bash
# What metering costs a request: two `gpuwasm serve` nodes side by side, one
# metering (the default) and one started with --no-metering, each serving
# the Rust hello; `gpuwasm bench http` loads them in turn, ROUNDS rounds
# (default 3) at concurrency 1 and 64, and the script prints each run and
# the metered node's req/s and p99 against the unmetered one's (medians of
# the rounds). Not part of the tests: run it by hand on a quiet machine.
#   scripts/bench-metering.sh [ROUNDS] [SECONDS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
rounds=${1:-3}
seconds=${2:-3}
scripts/build-guests.sh >/dev/null 2>&1
cargo build --release -q -p gpuwasm-cli
gpuwasm=target/release/gpuwasm
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# start NAME FLAGS...: a node on an ephemeral port; sets url_NAME.
start() {
  local name=$1
  shift
  RUST_LOG=warn "$gpuwasm" serve --listen 127.0.0.1:0 --admin-token bench-token \
    --data-dir "$work/$name" --max-instances 256 "$@" >"$work/$name.out" 2>"$work/$name.err" &
  pids+=($!)
  for _ in $(seq 100); do
    grep -q "listening on" "$work/$name.out" 2>/dev/null && break
    sleep 0.1
  done
  local url
  url=$(grep -o "http://[0-9.:]*" "$work/$name.out" | head -1)
  [ -n "$url" ] || { echo "bench-metering: the $name node did not start:" >&2; cat "$work/$name.err" >&2; exit 1; }
  GPUWASM_SERVER=$url GPUWASM_TOKEN=bench-token "$gpuwasm" deploy target/wasm/hello.wasm --name hello --concurrency 64 >/dev/null
  printf -v "url_$name" '%s' "$url"
}
start metered
start unmetered --no-metering

echo "bench-metering: Rust hello, $rounds rounds of $seconds s per node and level, nodes alternating"
results=$work/results.txt
for round in $(seq "$rounds"); do
  for name in metered unmetered; do
    url_var=url_$name
    "$gpuwasm" bench http --url "${!url_var}/default/hello/" --concurrency 1,64 --duration "$seconds" |
      awk -v node="$name" -v round="$round" '$1 ~ /^[0-9]+$/ { print node, round, $1, $3, $5 }' | tee -a "$results"
  done
done
python3 - "$results" <<'EOF'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    node, _round, c, rps, p99 = line.split()
    runs.setdefault((node, int(c)), []).append((float(rps), float(p99)))
print(f"{'concurrency':>11} {'metered req/s':>14} {'unmetered req/s':>16} {'ratio':>7} {'metered p99 ms':>15} {'unmetered p99 ms':>17}")
for c in sorted({c for _, c in runs}):
    m, u = runs[("metered", c)], runs[("unmetered", c)]
    mr, ur = statistics.median(r for r, _ in m), statistics.median(r for r, _ in u)
    mp, up = statistics.median(p for _, p in m), statistics.median(p for _, p in u)
    print(f"{c:>11} {mr:>14.0f} {ur:>16.0f} {mr / ur:>7.3f} {mp:>15.3f} {up:>17.3f}")
EOF

#!/usr/bin/env bash
# What metering costs a request: two `gpuwasm serve` nodes side by side, one
# metering (the default) and one started with --no-metering, each serving
# the Rust hello; `gpuwasm bench http` loads them in turn, ROUNDS rounds
# (default 3) at concurrency 1 and 64, and the script prints each run and
# the metered node's req/s and p99 against the unmetered one's, and the
# server's CPU time per request (from /proc, which other load on the
# machine disturbs less than throughput), medians of the rounds. Not part
# of the tests: run it by hand on a quiet machine.
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
  printf -v "pid_$name" '%s' "${pids[-1]}"
}
# cpu PID: the process's CPU time (user and system), in clock ticks.
cpu() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
ticks=$(getconf CLK_TCK)
start metered
start unmetered --no-metering

echo "bench-metering: Rust hello, $rounds rounds of $seconds s per node and level, nodes alternating"
results=$work/results.txt
for round in $(seq "$rounds"); do
  for level in 1 64; do
    for name in metered unmetered; do
      url_var=url_$name pid_var=pid_$name
      before=$(cpu "${!pid_var}")
      line=$("$gpuwasm" bench http --url "${!url_var}/default/hello/" --concurrency "$level" --duration "$seconds" |
        awk -v node="$name" -v round="$round" '$1 ~ /^[0-9]+$/ { print node, round, $1, $3, $5 }')
      spent=$(( $(cpu "${!pid_var}") - before ))
      # The server's CPU time per request answered, in microseconds.
      echo "$line $(awk -v t="$spent" -v hz="$ticks" -v s="$seconds" -v l="$line" 'BEGIN { split(l, f, " "); printf "%.1f", t / hz * 1e6 / (f[4] * s) }')" | tee -a "$results"
    done
  done
done
python3 - "$results" <<'EOF'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    node, _round, c, rps, p99, cpu_us = line.split()
    runs.setdefault((node, int(c)), []).append((float(rps), float(p99), float(cpu_us)))
print(f"{'concurrency':>11} {'metered req/s':>14} {'unmetered req/s':>16} {'ratio':>7} {'metered p99 ms':>15} {'unmetered p99 ms':>17} {'server CPU us/req':>18} {'ratio':>7}")
for c in sorted({c for _, c in runs}):
    m, u = runs[("metered", c)], runs[("unmetered", c)]
    mr, ur = (statistics.median(r[0] for r in x) for x in (m, u))
    mp, up = (statistics.median(r[1] for r in x) for x in (m, u))
    mc, uc = (statistics.median(r[2] for r in x) for x in (m, u))
    print(f"{c:>11} {mr:>14.0f} {ur:>16.0f} {mr / ur:>7.3f} {mp:>15.3f} {up:>17.3f} {f'{mc:.1f} vs {uc:.1f}':>18} {mc / uc:>7.3f}")
EOF

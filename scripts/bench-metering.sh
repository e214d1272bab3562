#!/usr/bin/env bash
# What metering costs a request. Three `gpuwasm serve` nodes serve the Rust
# hello: one metering (the default) and two started with --no-metering.
# Each round loads two nodes at the same time for SECONDS, first the
# metered one beside an unmetered one, then the two unmetered ones (the
# control: what the benchmark cannot tell apart), at concurrency 1 and 64.
# The servers share one core and the clients (`gpuwasm bench http`) the
# other, so that both nodes of a pair see the same machine at the same
# moment: on a shared 2-core VM, throughput measured one node after the
# other drifts by more than the 3% looked for. Each node's CPU time per
# request comes from /proc; its inverse is the node's throughput per core.
# The script prints each run, then medians over ROUNDS (default 5) of the
# CPU-per-request ratios within each pair, and the throughput per core
# that metering loses. Not part of the tests: run it by hand.
#   scripts/bench-metering.sh [ROUNDS] [SECONDS]
set -euo pipefail
command -v python3 >/dev/null || { echo "bench-metering: needs python3" >&2; exit 1; }
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
rounds=${1:-5}
seconds=${2:-3}
scripts/build-guests.sh >/dev/null 2>&1
cargo build --release -q -p gpuwasm-cli
gpuwasm=target/release/gpuwasm
# Servers on one core, clients on another, where this process may use two.
server_cpu=() client_cpu=()
mapfile -t allowed < <(python3 -c 'import os; print(*sorted(os.sched_getaffinity(0))[:2], sep="\n")')
if [ "${#allowed[@]}" -ge 2 ]; then
  server_cpu=(taskset -c "${allowed[0]}") client_cpu=(taskset -c "${allowed[1]}")
else
  echo "bench-metering: one core: servers and clients are not kept apart" >&2
fi
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# start NAME FLAGS...: a node on an ephemeral port; sets url_NAME, pid_NAME.
start() {
  local name=$1
  shift
  RUST_LOG=warn "${server_cpu[@]}" "$gpuwasm" serve --listen 127.0.0.1:0 --admin-token bench-token \
    --data-dir "$work/$name" --max-instances 256 "$@" >"$work/$name.out" 2>"$work/$name.err" &
  pids+=($!)
  for _ in $(seq 100); do
    grep -q "listening on" "$work/$name.out" 2>/dev/null && break
    sleep 0.1
  done
  local url
  url=$(grep -m1 -o "http://[0-9.:]*" "$work/$name.out" || true)
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
start control --no-metering

# pair ROUND LEVEL A B: loads nodes A and B at once; appends to the results
# "PAIR NODE ROUND LEVEL REQ/S P99_MS CPU_US_PER_REQUEST" for each.
results=$work/results.txt
pair() {
  local round=$1 level=$2 a=$3 b=$4 name url_var pid_var pid clients=()
  declare -A before
  for name in "$a" "$b"; do
    pid_var=pid_$name
    before[$name]=$(cpu "${!pid_var}")
  done
  for name in "$a" "$b"; do
    url_var=url_$name
    "${client_cpu[@]}" "$gpuwasm" bench http --url "${!url_var}/default/hello/" --concurrency "$level" --duration "$seconds" >"$work/$name.bench" &
    clients+=($!)
  done
  for pid in "${clients[@]}"; do wait "$pid"; done
  # The metering writer's work on the records of the run (once a second)
  # is the metered node's too.
  sleep 1.2
  for name in "$a" "$b"; do
    pid_var=pid_$name
    local now spent
    now=$(cpu "${!pid_var}")
    spent=$(( now - before[$name] ))
    awk -v pair="$a-$b" -v node="$name" -v round="$round" -v t="$spent" -v hz="$ticks" '
      $1 ~ /^[0-9]+$/ {
        seen = 1
        if ($6 != 0 || $2 == 0) { print "bench-metering: " node ": " $6 " errors, " $2 " requests" > "/dev/stderr"; exit 1 }
        printf "%s %s %s %s %s %s %.1f\n", pair, node, round, $1, $3, $5, t / hz * 1e6 / $2
      }
      END { if (!seen) { print "bench-metering: " node ": no result from gpuwasm bench http" > "/dev/stderr"; exit 1 } }' \
      "$work/$name.bench" | tee -a "$results"
  done
}

echo "bench-metering: Rust hello, $rounds rounds of $seconds s, two nodes at a time (servers on one core, clients on the other)"
echo "pair node round concurrency req/s p99_ms server_cpu_us_per_request"
for round in $(seq "$rounds"); do
  for level in 1 64; do
    pair "$round" "$level" metered unmetered
    pair "$round" "$level" control unmetered
  done
done
python3 - "$results" <<'EOF'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    pair, node, rnd, c, rps, p99, cpu_us = line.split()
    runs[(pair, node, int(rnd), int(c))] = (float(rps), float(p99), float(cpu_us))
levels = sorted({k[3] for k in runs})
rounds = sorted({k[2] for k in runs})
def median(pair, node, c, i):
    return statistics.median(runs[(pair, node, r, c)][i] for r in rounds)
def ratio(pair, a, b, c):
    # Per round, then the median: both nodes of a round saw the same machine.
    rs = [runs[(pair, a, r, c)][2] / runs[(pair, b, r, c)][2] for r in rounds]
    return statistics.median(rs), min(rs), max(rs)
print()
print(f"{'concurrency':>11} {'metered req/s':>14} {'unmetered req/s':>16} {'metered p99 ms':>15} {'unmetered p99 ms':>17} {'CPU us/req':>16} {'CPU ratio (min-max)':>22} {'throughput lost':>16} {'control ratio (min-max)':>24}")
for c in levels:
    p = "metered-unmetered"
    m, u = (median(p, n, c, 2) for n in ("metered", "unmetered"))
    r, lo, hi = ratio(p, "metered", "unmetered", c)
    cr, clo, chi = ratio("control-unmetered", "control", "unmetered", c)
    print(f"{c:>11} {median(p, 'metered', c, 0):>14.0f} {median(p, 'unmetered', c, 0):>16.0f} "
          f"{median(p, 'metered', c, 1):>15.3f} {median(p, 'unmetered', c, 1):>17.3f} {f'{m:.1f} vs {u:.1f}':>16} "
          f"{f'{r:.3f} ({lo:.3f}-{hi:.3f})':>22} {f'{(1 - 1 / r) * 100:.1f}%':>16} {f'{cr:.3f} ({clo:.3f}-{chi:.3f})':>24}")
EOF

#!/usr/bin/env python3
"""Reads `perf script` output of a call-graph profile (perf record -e
cpu-clock -g) from stdin and prints the share of samples spent in TLB-flush
IPIs (smp_call_function_many_cond, native_write_msr) and which kernel path
asked for each flush: copy-on-write faults (do_wp_page), madvise, munmap,
mprotect, ...

    perf record -e cpu-clock -g -p PID -o perf.data -- sleep 4
    perf script -i perf.data | scripts/tlb-flush-callers.py
"""

import collections
import sys

IPI = {"smp_call_function_many_cond", "native_write_msr"}
ASKERS = [
    "do_wp_page",
    "__x64_sys_madvise",
    "__x64_sys_munmap",
    "__x64_sys_mprotect",
    "__x64_sys_mmap",
    "__x64_sys_ioctl",
    "exit_mmap",
]


def samples(lines):
    """Yields each sample's stack, leaf first, as function names."""
    stack = []
    for line in lines:
        if not line.strip():
            if stack:
                yield stack
            stack = []
        elif line[0] in " \t":
            parts = line.split()
            if len(parts) >= 2:
                stack.append(parts[1].split("+")[0])
    if stack:
        yield stack


def main():
    total = 0
    askers = collections.Counter()
    for stack in samples(sys.stdin):
        total += 1
        if stack[0] in IPI:
            askers[next((f for f in stack if f in ASKERS), "(other)")] += 1
    if total == 0:
        sys.exit("tlb-flush-callers: no samples with call chains on stdin")
    flushes = sum(askers.values())
    print(f"samples {total}; in TLB-flush IPIs {flushes} ({100 * flushes / total:.1f}%), asked for by:")
    for name, n in askers.most_common():
        print(f"  {name:<22} {n:>8} {100 * n / total:5.1f}%")


if __name__ == "__main__":
    main()

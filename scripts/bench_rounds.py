"""Reading the rounds of a benchmark script's output (scripts/bench-nn.sh,
scripts/bench-llm.sh): `round N` lines start a round, `key NAME=VALUE`
lines are its figures. Ratios are taken within a round and the median over
rounds is reported, so drift on a busy machine hits both sides alike.
Also the baselines' one timing loop, `rate`."""
import statistics
import time


def rate(seconds, call):
    """Calls of `call` per second over `seconds`, after one to warm up."""
    call()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        call()
        calls += 1
    return calls / (time.perf_counter() - start)


def read_rounds(path):
    """The figures of each round in the file at `path`."""
    rounds = []
    for line in open(path):
        if line.startswith("round "):
            rounds.append({})
        elif line.startswith("key "):
            name, value = line[4:].strip().split("=")
            rounds[-1][name] = float(value)
    return rounds


def median(rounds, figure):
    """The median over `rounds` of `figure(round)`."""
    return statistics.median(figure(r) for r in rounds)

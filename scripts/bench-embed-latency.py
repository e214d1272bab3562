#!/usr/bin/env python3
"""Latency of one short embedding request end to end, for
scripts/bench-nn.sh: POST /v1/embeddings with one short input to the
embeddings example on a running server, one request at a time over a
keep-alive connection, as a client measures it.

Usage: bench-embed-latency.py URL (of /v1/embeddings) REQUESTS
Prints `key embed_p50_ms=...` and `key embed_p99_ms=...`.
"""
import http.client
import json
import statistics
import sys
import time
from urllib.parse import urlparse


def main():
    url, requests = urlparse(sys.argv[1]), int(sys.argv[2])
    conn = http.client.HTTPConnection(url.hostname, url.port)
    body = json.dumps({"model": "minilm", "input": "A short sentence to embed."})
    times = []
    for i in range(requests + 20):  # the first 20 warm up
        start = time.perf_counter()
        conn.request("POST", url.path, body, {"content-type": "application/json"})
        reply = conn.getresponse()
        data = reply.read()
        elapsed = (time.perf_counter() - start) * 1000
        if reply.status != 200 or len(json.loads(data)["data"][0]["embedding"]) != 384:
            sys.exit(f"request {i}: {reply.status} {data[:200]!r}")
        if i >= 20:
            times.append(elapsed)
    times.sort()
    p50, p99 = statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]
    print(f"one short embedding request, {requests} sequential: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    print(f"key embed_p50_ms={p50:.2f}")
    print(f"key embed_p99_ms={p99:.2f}")


if __name__ == "__main__":
    main()

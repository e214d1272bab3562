#!/usr/bin/env python3
"""Noisy neighbours: what tenant B's misbehaviour costs tenant A's latency.

Run by scripts/bench-neighbours.sh, which starts the server; this file sets
up the tenants and deployments through the admin API, drives the load and
prints the report. Stdlib only (target/venv/bin/python or any Python 3.9+).

Tenant A serves the Rust hello at a steady open-loop RATE (default 100
req/s) over 4 keep-alive connections: request i is due at t0 + i/RATE and
its latency is measured from that due time, so time spent waiting for a
free connection (queueing behind a slow answer) counts. Meanwhile tenant B
runs one phase at a time (SECONDS each, default 8, after 1.5 s of ramp-up
that is not measured), each phase ROUNDS times (default 3), every run of a
phase between two solo runs:

  solo     B sends nothing (A's baseline)
  cpu      4 clients, GET /loop: each request spins until its CPU limit
  memory   4 clients, GET /hog: each request fills its memory limit
  traps    4 clients, GET /trap: each request traps at once
  storm    200 clients against a deployment with concurrency 4, queue 16
  slow     500 connections: half trickle a request head one byte a second,
           half a request body (their requests hold instances meanwhile, as
           many as the server lets them); one the server answers or closes
           opens again a second later
  pushes   2 clients push a 29 MiB synthetic BERT model over and over
           (PUT model-files/SHA256: the server receives, hashes, writes and
           syncs all of it; then PUT models/NAME, which it checks)

Each load runs in its own process (A: one thread waiting in select(), whose
timeouts are precise to microseconds, at nice -10 when allowed, so that its
own late wake-ups do not count as A's latency; B: one asyncio loop at the
lowest priority, SCHED_IDLE and nice 19, as it stands for clients on
other machines and must not take a core from the server), so B's client
work never delays A's sends; the OS still shares the cores between them
all, which is why the report shows each process's CPU.

For every run it prints A's p50/p99 (ms), achieved rate and errors, B's
requests by status, the CPU of server, clients and everything else (others:
e.g. a compiler running beside), and p99 against the solo run before it.
The table at the end pools each phase's runs (A's answers of all of them)
and compares their p99 with that of all solo runs pooled (goal: within
+20%, PASS/MISS); beside it, each run's p99 against the mean of the solo
runs on either side. Solo runs between the phases, rather than one first
and one last, make the comparison hold on a machine whose speed drifts
within minutes (this VM's does, by a third). The exit status is 0 whatever the figures,
non-zero only if the benchmark itself failed: setup failed, A got any
error (A's requests must all succeed), or B's load did not reach the server.

  bench-neighbours.py --url URL --admin-token TOKEN [--server-pid PID]
                      [--seconds S] [--rate R] [--rounds N] [--phases cpu,storm,...]
"""

import argparse
import asyncio
import gc
import hashlib
import json
import math
import os
import random
import resource
import select
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

PHASES = ["solo", "cpu", "memory", "traps", "storm", "slow", "pushes"]
GOAL = 1.20  # A's p99 at most 20% over its solo p99
RAMP_S = 1.5  # B's load (and A's connections) settle before A is measured
SETTLE_S = 1.0  # after B stops, before the next phase starts
A_CONNECTIONS = 4

# B's deployments (behaviors.wasm; tests/guests/behaviors) and what each
# phase sends. Limits not named are the deployment defaults (`gpuwasm
# deploy --help`: 128 MiB, cpu 5000 ms, concurrency 64, queue 1024).
B_DEPLOYMENTS = {
    # A request of /loop ends at its CPU limit: 1 s keeps requests short
    # enough to count some in a phase (4 spinning on 2 cores: ~2 s each).
    "spin": "cpu_ms=1000",
    # /hog, /trap and the slow clients' requests: all defaults.
    "beh": "",
    # Far more clients than instances: 4 run, 16 wait, the rest get 503.
    "storm": "concurrency=4&queue=16",
}
CLOSED_LOOP = {
    # phase: (clients, path)
    "cpu": (4, "/tenant-b/spin/loop"),
    "memory": (4, "/tenant-b/beh/hog"),
    "traps": (4, "/tenant-b/beh/trap"),
    # /sleep holds an instance 100 ms without CPU: 40 req/s get in.
    "storm": (200, "/tenant-b/storm/sleep?ms=100"),
}
SLOW_CONNECTIONS = 500
PUSHERS = 2  # the node's default --tenant-uploads

DESCRIBE = {
    "solo": "nothing",
    "cpu": "4 clients, /loop to its 1 s CPU limit",
    "memory": "4 clients, /hog to its 128 MiB limit",
    "traps": "4 clients, /trap",
    "storm": "200 clients, /sleep 100 ms, concurrency 4 + queue 16",
    "slow": "500 slow connections (head or body 1 byte/s)",
    "pushes": "2 clients pushing a 29 MiB model",
}


# ---------------------------------------------------------------- helpers


def percentile(sorted_values, p):
    """Nearest-rank percentile of an ascending list (None if empty)."""
    if not sorted_values:
        return None
    k = max(0, math.ceil(p / 100 * len(sorted_values)) - 1)
    return sorted_values[k]


def split_url(url):
    parsed = urllib.parse.urlsplit(url)
    return parsed.hostname, parsed.port or 80


def api(url, token, method, path, body=b"", headers=None):
    """An admin API call: (status, parsed JSON or text)."""
    request = urllib.request.Request(f"{url}/_gpuwasm/v1/{path}", data=body, method=method)
    request.add_header("authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        request.add_header(k, v)
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            status, text = reply.status, reply.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def fail(message):
    print(f"bench-neighbours: FAILED: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def proc_cpu_ticks(pid):
    """utime + stime of a process (all its threads), in clock ticks; None
    if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return None


def all_processes():
    """{pid: (name, CPU ticks)} of every process now."""
    seen = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    text = f.read()
                name = text[text.index("(") + 1:text.rindex(")")]
                fields = text.rsplit(")", 1)[1].split()
                seen[int(entry)] = (name, int(fields[11]) + int(fields[12]))
            except (OSError, IndexError, ValueError):
                pass
    return seen


def machine_idle_ticks():
    """Idle (and I/O wait) clock ticks of all CPUs together, from
    /proc/stat: exact on tickless kernels, where the busy counters are
    sampled by the tick and miss short bursts."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return values[3] + values[4]


# ------------------------------------------------------- synthetic model


def synthetic_bert(directory):
    """Writes a BERT encoder of random weights that the server accepts
    (hidden 256, 4 layers, vocabulary 16000: 29 MiB of F32) with a small
    WordPiece tokenizer; returns {path in the model: local file}."""
    h, layers, inter, vocab, positions = 256, 4, 1024, 16000, 512
    shapes = [
        ("embeddings.word_embeddings.weight", [vocab, h]),
        ("embeddings.position_embeddings.weight", [positions, h]),
        ("embeddings.token_type_embeddings.weight", [2, h]),
        ("embeddings.LayerNorm.weight", [h]),
        ("embeddings.LayerNorm.bias", [h]),
    ]
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name in ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"]:
            shapes += [(p + name + ".weight", [h, h]), (p + name + ".bias", [h])]
        shapes += [
            (p + "attention.output.LayerNorm.weight", [h]),
            (p + "attention.output.LayerNorm.bias", [h]),
            (p + "intermediate.dense.weight", [inter, h]),
            (p + "intermediate.dense.bias", [inter]),
            (p + "output.dense.weight", [h, inter]),
            (p + "output.dense.bias", [h]),
            (p + "output.LayerNorm.weight", [h]),
            (p + "output.LayerNorm.bias", [h]),
        ]
    header, offset = {}, 0
    for name, shape in shapes:
        size = math.prod(shape) * 4
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    data = bytearray(os.urandom(offset))
    # Clear each float's top exponent bit: |x| < 2, never NaN or infinity.
    data[3::4] = bytes(data[3::4]).translate(bytes(b & 0xBF for b in range(256)))
    config = {
        "hidden_size": h, "num_hidden_layers": layers, "num_attention_heads": 4, "intermediate_size": inter,
        "max_position_embeddings": positions, "vocab_size": vocab, "type_vocab_size": 2, "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
    }
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?")
    words += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"] + ["the", "hello", "world"]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                       "strip_accents": None, "lowercase": True},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]},
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": {w: i for i, w in enumerate(words)}},
    }
    files = {
        "model.safetensors": len(head).to_bytes(8, "little") + head + bytes(data),
        "config.json": json.dumps(config).encode(),
        "tokenizer.json": json.dumps(tokenizer).encode(),
    }
    paths = {}
    for name, content in files.items():
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.write(content)
        paths[name] = path
    return paths


# ------------------------------------------------------------- tenant A


def parse_response(buf):
    """One whole response at the start of `buf`: (status, server-timing ms
    or None, close?, bytes it takes), or None while it is incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buf[:end].decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, chunked, close, server_ms = 0, False, False, None
    for line in lines[1:]:
        key, _, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if key == "content-length":
            length = int(value)
        elif key == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
        elif key == "connection" and value.lower() == "close":
            close = True
        elif key == "server-timing" and "dur=" in value:
            server_ms = float(value.split("dur=", 1)[1].split(";")[0].split(",")[0])
    pos = end + 4
    if chunked:
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(buf[pos:eol].split(b";")[0], 16)
            pos = eol + 2 + size + 2  # no trailers expected
            if len(buf) < pos:
                return None
            if size == 0:
                break
    else:
        pos += length
        if len(buf) < pos:
            return None
    return status, server_ms, close, pos


class AConnection:
    """A keep-alive connection of A's, non-blocking, driven by run_a's loop."""

    def __init__(self, addr):
        self.addr, self.sock, self.buf, self.due, self.sent = addr, None, b"", None, None

    def open(self):
        self.sock = socket.create_connection(self.addr, timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.buf = b""

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def run_a(args):
    """Tenant A's open-loop load; prints one JSON line of results.

    One thread, no event loop: select() (microsecond timeouts, unlike
    epoll's milliseconds) waits for the next due time or an answer. Request
    i is due at t0 + i/RATE and goes out on the first idle connection;
    with none idle it waits, and that wait is part of its latency."""
    gc.disable()  # no collector pauses inside the measurement
    try:
        # Woken ahead of the others on these shared cores: a late wake-up
        # of this client would count as A's latency (it uses ~2% of a core).
        os.setpriority(os.PRIO_PROCESS, 0, -10)
    except OSError:
        pass  # not root: a little more noise
    addr = split_url(args.url)
    raw = f"GET {args.path} HTTP/1.1\r\nhost: {addr[0]}:{addr[1]}\r\n\r\n".encode()
    connections = [AConnection(addr) for _ in range(args.connections)]
    for c in connections:
        c.open()
    idle = list(connections)
    busy = {}  # socket -> connection
    records = []  # (due, sent, done, status, server_ms or None, error or None)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter() + 0.05
    total = int(round(args.rate * (args.warmup + args.seconds)))
    give_up = t0 + args.warmup + args.seconds + 60
    i = 0

    def failed(c, error):
        records.append((c.due, c.sent, time.perf_counter(), 0, None, error))
        busy.pop(c.sock, None)
        c.close()
        try:
            c.open()
        except OSError:
            pass  # counted when its next request fails
        idle.append(c)

    while i < total or busy:
        now = time.perf_counter()
        if now > give_up:
            break
        while i < total and idle and t0 + i / args.rate <= now:
            c = idle.pop()
            c.due, c.sent = t0 + i / args.rate, time.perf_counter()
            i += 1
            try:
                if c.sock is None:
                    c.open()
                c.sock.send(raw)  # a few dozen bytes: the socket buffer takes them whole
                busy[c.sock] = c
            except OSError as e:
                failed(c, f"{type(e).__name__}: {e}")
        if i < total and idle:
            timeout = max(0.0, t0 + i / args.rate - time.perf_counter())
        else:
            timeout = 1.0
        if not busy:
            time.sleep(timeout)
            continue
        readable, _, _ = select.select(list(busy), [], [], timeout)
        for s in readable:
            c = busy[s]
            try:
                data = s.recv(65536)
                if not data:
                    raise ConnectionError("the server closed the connection")
                c.buf += data
                parsed = parse_response(c.buf)
            except (OSError, ValueError, IndexError) as e:
                failed(c, f"{type(e).__name__}: {e}")
                continue
            if parsed is None:
                continue
            status, server_ms, close, used = parsed
            records.append((c.due, c.sent, time.perf_counter(), status, server_ms, None))
            c.buf = c.buf[used:]
            del busy[s]
            if close:
                c.close()
            idle.append(c)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    start, end = t0 + args.warmup, t0 + args.warmup + args.seconds
    window = [r for r in records if start <= r[0] < end]
    scheduled = sum(1 for i in range(total) if start <= t0 + i / args.rate < end)
    ok = [r for r in window if r[3] == 200]
    errors = [r for r in window if r[3] != 200]
    latency = sorted((r[2] - r[0]) * 1e3 for r in ok)
    service = sorted((r[2] - r[1]) * 1e3 for r in ok)
    lag = sorted((r[1] - r[0]) * 1e3 for r in ok)
    server = sorted(r[4] for r in ok if r[4] is not None)
    # Each answer's latency, from its actual send, send lag and server
    # time (ms), for the report to pool over rounds.
    samples = [[round((r[2] - r[0]) * 1e3, 4), round((r[2] - r[1]) * 1e3, 4), round((r[1] - r[0]) * 1e3, 4),
                r[4]] for r in ok]
    error_kinds = {}
    for r in errors:
        kind = r[5] or f"status {r[3]}"
        error_kinds[kind] = error_kinds.get(kind, 0) + 1
    missing = scheduled - len(window)  # still waiting when the workers were given up on
    if missing:
        error_kinds["no answer within 60 s"] = missing
    result = {
        "scheduled": scheduled,
        "ok": len(ok),
        "errors": len(errors) + missing,
        "error_kinds": error_kinds,
        # Answers that arrived in the window, whenever they were due.
        "rate": sum(1 for r in records if r[3] == 200 and start <= r[2] < end) / args.seconds,
        "p50": percentile(latency, 50),
        "p99": percentile(latency, 99),
        "max": latency[-1] if latency else None,
        "service_p99": percentile(service, 99),
        "lag_p99": percentile(lag, 99),
        "server_p50": percentile(server, 50),
        "server_p99": percentile(server, 99),
        "cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
        "samples": samples,
    }
    print(json.dumps(result), flush=True)


# ------------------------------------------------------------- tenant B


class Tally:
    def __init__(self):
        self.statuses = {}

    def add(self, key):
        key = str(key)
        self.statuses[key] = self.statuses.get(key, 0) + 1


async def read_response(reader):
    """Reads one response: (status, close?)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, chunked, close = 0, False, False
    for line in lines[1:]:
        key, _, value = line.partition(":")
        key, value = key.strip().lower(), value.strip().lower()
        if key == "content-length":
            length = int(value)
        elif key == "transfer-encoding" and "chunked" in value:
            chunked = True
        elif key == "connection" and value == "close":
            close = True
    if chunked:
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status, close


class Deadline(Exception):
    """The phase ended while a request was in flight."""


async def before(deadline, awaitable):
    """`awaitable`, unless `deadline` (time.monotonic) comes first."""
    try:
        return await asyncio.wait_for(awaitable, max(0.001, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        raise Deadline() from None


async def open_connection(host, port):
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


def close_quietly(writer):
    if writer is not None:
        try:
            writer.transport.abort()
        except Exception:
            pass


async def request_loop(host, port, deadline, tally, exchange, pause):
    """Runs `exchange(reader, writer)` on one keep-alive connection until
    `deadline`, connecting again when it returns False (the server closed
    the connection) or fails (counted by the error's type, then `pause`
    seconds); a request cut off by the deadline counts as in flight."""
    writer = None
    try:
        while time.monotonic() < deadline:
            try:
                if writer is None:
                    reader, writer = await before(deadline, open_connection(host, port))
                if not await exchange(reader, writer):
                    close_quietly(writer)
                    writer = None
            except Deadline:
                tally.add("in flight at the end")
                break
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
                tally.add(f"{type(e).__name__}")
                close_quietly(writer)
                writer = None
                await asyncio.sleep(pause)
    finally:
        close_quietly(writer)


async def closed_loop_client(host, port, raw, deadline, tally):
    """Sends `raw` again as soon as each answer arrives, until `deadline`."""

    async def exchange(reader, writer):
        writer.write(raw)
        status, close = await before(deadline, read_response(reader))
        tally.add(status)
        return not close

    await request_loop(host, port, deadline, tally, exchange, 0.01)


async def slow_client(host, port, head, body_bytes, deadline, tally, start_delay):
    """Trickles `head` (if body_bytes is 0) or, after `head` whole, a body
    of `body_bytes`, one byte a second; when the server answers or ends
    the connection, counts how, waits a second (as a refused client told
    `retry-after: 1` would) and starts again."""
    await asyncio.sleep(start_delay)
    offset = random.random()
    while time.monotonic() < deadline:
        writer = None
        try:
            reader, writer = await before(deadline, open_connection(host, port))
            ended = asyncio.ensure_future(reader.read(65536))
            if body_bytes:
                writer.write(head)
                trickle, sent_limit = b"x", body_bytes
            else:
                trickle, sent_limit = None, len(head)
            sent = 0
            await asyncio.sleep(offset)
            while time.monotonic() < deadline and not ended.done():
                if sent < sent_limit:
                    writer.write(trickle if trickle else head[sent:sent + 1])
                    sent += 1
                await asyncio.wait([ended], timeout=max(0.001, min(1.0, deadline - time.monotonic())))
            if not ended.done():
                ended.cancel()
                tally.add("held to the end")
                break
            data = ended.result()
            tally.add(int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else "closed by the server")
            await asyncio.sleep(max(0.0, min(1.0, deadline - time.monotonic())))
        except Deadline:
            break
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
            tally.add(f"{type(e).__name__}")
            await asyncio.sleep(0.1)
        finally:
            close_quietly(writer)


async def pusher(url, token, files, deadline, tally, index):
    """Pushes the synthetic model again and again: its weights (PUT
    model-files/SHA256, 29 MiB), then the model (PUT models/NAME), which
    the server checks."""
    host, port = split_url(url)
    sha, content = files["model.safetensors"]
    spec = json.dumps({"format": "safetensors", "files": {name: sha for name, (sha, _) in files.items()}}).encode()
    auth = f"authorization: Bearer {token}\r\nhost: {host}:{port}\r\n"

    async def exchange(reader, writer):
        writer.write(f"PUT /_gpuwasm/v1/model-files/{sha} HTTP/1.1\r\n{auth}content-length: {len(content)}\r\n\r\n".encode())
        writer.write(content)
        status, close = await before(deadline, read_response(reader))
        tally.add(f"file {status}")
        if status == 429:  # the tenant's upload slots are busy
            await asyncio.sleep(0.05)
            return not close
        if close:
            return False
        writer.write(f"PUT /_gpuwasm/v1/models/synthetic-{index} HTTP/1.1\r\n{auth}content-type: application/json\r\n"
                     f"content-length: {len(spec)}\r\n\r\n".encode() + spec)
        status, close = await before(deadline, read_response(reader))
        tally.add(f"model {status}")
        return not close

    await request_loop(host, port, deadline, tally, exchange, 0.05)


async def b_load(args, tally):
    host, port = split_url(args.url)
    deadline = time.monotonic() + args.seconds
    authority = f"host: {host}:{port}\r\n"
    if args.phase in CLOSED_LOOP:
        clients, path = CLOSED_LOOP[args.phase]
        raw = f"GET {path} HTTP/1.1\r\n{authority}\r\n".encode()
        tasks = [closed_loop_client(host, port, raw, deadline, tally) for _ in range(clients)]
    elif args.phase == "slow":
        heads = f"GET /tenant-b/beh/ HTTP/1.1\r\n{authority}user-agent: slow-loris\r\n\r\n".encode()
        body = 1_000_000
        bodies = f"POST /tenant-b/beh/body-length HTTP/1.1\r\n{authority}content-length: {body}\r\n\r\n".encode()
        tasks = []
        for i in range(SLOW_CONNECTIONS):
            # Connect in batches of 50, 20 ms apart, not all at once.
            delay = (i // 50) * 0.02
            if i % 2:
                tasks.append(slow_client(host, port, heads, 0, deadline, tally, delay))
            else:
                tasks.append(slow_client(host, port, bodies, body, deadline, tally, delay))
    elif args.phase == "pushes":
        files = {}
        for name, path in json.loads(args.files).items():
            with open(path, "rb") as f:
                content = f.read()
            files[name] = (hashlib.sha256(content).hexdigest(), content)
        # The small files once (their blobs are then in place).
        for name, (sha, content) in files.items():
            if name != "model.safetensors":
                status, reply = await asyncio.to_thread(api, args.url, args.token, "PUT", f"model-files/{sha}", content)
                tally.add(f"file {status}")
        tasks = [pusher(args.url, args.token, files, deadline, tally, i) for i in range(PUSHERS)]
    else:
        raise SystemExit(f"unknown phase {args.phase}")
    await asyncio.gather(*tasks)


def run_b(args):
    # B's clients stand for other machines: on these shared cores, at the
    # server's priority, the pushing client alone kept the server's threads
    # waiting 64 times in 5 s (76 ms in all; perf sched), which is not
    # load the server can isolate A from; at nice 19 the slow clients
    # still did (147 times in 5 s, 124 ms). SCHED_IDLE, which any other
    # thread that wakes preempts, still gets B's client every cycle the
    # server and A leave (its requests are counted below).
    os.setpriority(os.PRIO_PROCESS, 0, 19)
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    tally = Tally()
    asyncio.run(b_load(args, tally))
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "statuses": tally.statuses,
        "seconds": time.monotonic() - started,
        "cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
    }), flush=True)


# ----------------------------------------------------------- orchestration


def setup(url, admin_token):
    """Tenants A and B, A's hello and B's deployments; returns B's token."""
    tokens = {}
    for name in ["tenant-a", "tenant-b"]:
        status, reply = api(url, admin_token, "POST", "tenants", json.dumps({"name": name}).encode())
        if status != 201:
            fail(f"creating tenant {name}: {status} {reply}")
        tokens[name] = reply["token"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    wasm = lambda name: open(os.path.join(root, "target", "wasm", f"{name}.wasm"), "rb").read()
    plan = [("tenant-a", "hello", "hello", "")] + [("tenant-b", name, "behaviors", s) for name, s in B_DEPLOYMENTS.items()]
    for tenant, name, component, settings in plan:
        status, reply = api(url, tokens[tenant], "PUT", f"deployments/{name}?{settings}", wasm(component))
        if status not in (200, 201):
            fail(f"deploying {tenant}/{name}: {status} {reply}")
    # Each answers once before anything is measured.
    for path in ["/tenant-a/hello/", "/tenant-b/beh/"]:
        with urllib.request.urlopen(url + path, timeout=30) as reply:
            if reply.status != 200:
                fail(f"GET {path}: {reply.status}")
    return tokens["tenant-b"]


def start_child(args, role, extra):
    command = [sys.executable, os.path.abspath(__file__), "--role", role, "--url", args.url] + extra
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def child_result(process, what):
    out, _ = process.communicate()
    if process.returncode != 0:
        fail(f"{what} exited with status {process.returncode}")
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        fail(f"{what} printed no result: {out!r}")


def run_phase(args, phase, token_b, model_files):
    b_kind = "solo" if phase.startswith("solo") else phase
    b = None
    if b_kind != "solo":
        extra = ["--phase", b_kind, "--seconds", str(RAMP_S + args.seconds), "--token", token_b, "--files", json.dumps(model_files)]
        b = start_child(args, "b", extra)
    a = start_child(args, "a", ["--path", "/tenant-a/hello/", "--rate", str(args.rate), "--warmup", str(RAMP_S),
                                "--seconds", str(args.seconds), "--connections", str(A_CONNECTIONS)])
    # CPU of everything over A's measured window (it starts ~0.1 s after launch).
    time.sleep(RAMP_S + 0.15)
    pids = {"server": args.server_pid, "a": a.pid, "b": b.pid if b else None}
    tick = os.sysconf("SC_CLK_TCK")
    procs_before, idle_before, wall_before = all_processes(), machine_idle_ticks(), time.monotonic()
    time.sleep(args.seconds)
    procs_after, idle_after, wall_after = all_processes(), machine_idle_ticks(), time.monotonic()
    a_result = child_result(a, "tenant A's load")
    b_result = child_result(b, "tenant B's load") if b else None
    if args.server_pid and proc_cpu_ticks(args.server_pid) is None:
        fail(f"the server (pid {args.server_pid}) is gone after phase {phase}")
    wall_ticks = (wall_after - wall_before) * tick  # of one CPU
    used = lambda pid: (procs_after[pid][1] - procs_before.get(pid, ("", 0))[1]) / wall_ticks * 100
    cpu = {k: used(p) for k, p in pids.items() if p in procs_after}
    cpu["all"] = max(0.0, (wall_ticks * os.cpu_count() - (idle_after - idle_before)) / wall_ticks * 100)
    cpu["others"] = max(0.0, cpu["all"] - sum(cpu.get(k, 0.0) for k in pids))
    # Who the others were (processes alive at the end; ones that came and
    # went inside the window count in "others" but are not named).
    ours = set(pids.values()) | {os.getpid()}
    others = sorted(((used(p), procs_after[p][0]) for p in procs_after if p not in ours), reverse=True)
    cpu["named"] = [f"{name} {pct:.0f}%" for pct, name in others[:3] if pct >= 3]
    time.sleep(SETTLE_S)
    return {"phase": phase, "a": a_result, "b": b_result, "cpu": cpu}


def fmt(ms):
    return "-" if ms is None else (f"{ms:.2f}" if ms < 100 else f"{ms:.0f}")


def fmt_ratio(ratio):
    return "-" if ratio is None else (f"{ratio:.2f}x" if ratio < 100 else f"{ratio:.0f}x")


def b_summary(b):
    if not b:
        return "-"
    statuses = b["statuses"]
    total = sum(statuses.values())
    mix = ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items(), key=lambda kv: -kv[1]))
    return f"{total} ({mix})"


def print_run(result, solo_p99, cores):
    """One run's figures; a phase's p99 against the solo run before it."""
    a, b, cpu = result["a"], result["b"], result["cpu"]
    print(f"phase {result['phase']}: B {DESCRIBE[result['phase']]}")
    print(f"  A: p50 {fmt(a['p50'])} ms, p99 {fmt(a['p99'])} ms (max {fmt(a['max'])}), "
          f"{a['rate']:.1f} req/s, {a['ok']} ok, errors {a['errors']}"
          + (f" {a['error_kinds']}" if a["errors"] else ""))
    if result["phase"] != "solo" and a["p99"] and solo_p99:
        print(f"     p99 / the solo run before it {fmt_ratio(a['p99'] / solo_p99)}")
    print(f"     diagnostics: p99 from the actual send {fmt(a['service_p99'])} ms, "
          f"send lag p99 {fmt(a['lag_p99'])} ms, server-timing p50 {fmt(a['server_p50'])} p99 {fmt(a['server_p99'])} ms")
    if b:
        print(f"  B: {b_summary(b)} in {b['seconds']:.1f} s")
    c = lambda k: f"{cpu[k]:.0f}%" if k in cpu else "-"
    print(f"  CPU (100% = one core, {cores} cores): server {c('server')}, A's client {c('a')}, "
          f"B's client {c('b')}, others {c('others')}" + (f" ({', '.join(cpu['named'])})" if cpu["named"] else "")
          + f", all {c('all')}", flush=True)


def pooled(runs):
    """A's figures over all of `runs` (one phase's), from their samples."""
    samples = [x for r in runs for x in r["a"]["samples"]]
    column = lambda k: sorted(x[k] for x in samples if x[k] is not None)
    latency, service, lag, server = column(0), column(1), column(2), column(3)
    return {"n": len(latency), "p50": percentile(latency, 50), "p99": percentile(latency, 99),
            "service_p99": percentile(service, 99), "lag_p99": percentile(lag, 99),
            "server_p99": percentile(server, 99)}


def schedule(phases, rounds):
    """Runs in order: each of B's phases between two solo runs, in every
    round, so that each is compared with A alone minutes, not a quarter
    of an hour, away (this VM's speed drifts by a third within minutes)."""
    b_phases = [p for p in phases if p != "solo"]
    order = []
    for _ in range(rounds):
        for p in b_phases:
            order += ["solo", p]
    return order + ["solo"] if b_phases else ["solo"] * rounds


def orchestrate(args):
    phases = args.phases.split(",") if args.phases else PHASES
    for p in phases:
        if p not in PHASES:
            fail(f"unknown phase {p!r} (phases: {', '.join(PHASES)})")
    cores = os.cpu_count()
    order = schedule(phases, args.rounds)
    print(f"bench-neighbours: A at {args.rate:g} req/s over {A_CONNECTIONS} connections, {args.seconds:g} s per run "
          f"after {RAMP_S:g} s of ramp-up, {args.rounds} rounds ({len(order)} runs, solo between phases); "
          f"{cores} cores; server pid {args.server_pid}", flush=True)
    token_b = setup(args.url, args.admin_token)
    model_dir = tempfile.mkdtemp(prefix="bench-neighbours-model-")
    try:
        model_files = synthetic_bert(model_dir) if "pushes" in phases else {}
        runs, failures = [], []
        last_solo = None
        for phase in order:
            result = run_phase(args, phase, token_b, model_files)
            a = result["a"]
            print_run(result, last_solo, cores)
            if phase == "solo":
                last_solo = a["p99"]
            if a["errors"]:
                failures.append(f"phase {phase}: tenant A got {a['errors']} errors: {a['error_kinds']}")
            if a["ok"] == 0:
                failures.append(f"phase {phase}: tenant A got no answers")
            b = result["b"]
            if b is not None and phase != "slow":
                answered = sum(v for k, v in b["statuses"].items() if any(ch.isdigit() for ch in k.split()[-1]))
                if answered == 0:
                    failures.append(f"phase {phase}: tenant B's load got no answers: {b['statuses']}")
            if phase == "pushes" and b is not None and not any(k.startswith("file 20") for k in b["statuses"]):
                failures.append(f"phase pushes: no model file upload succeeded: {b['statuses']}")
            runs.append(result)
    finally:
        for name in os.listdir(model_dir):
            os.remove(os.path.join(model_dir, name))
        os.rmdir(model_dir)
    if failures:
        for f in failures:
            print(f"bench-neighbours: {f}", file=sys.stderr)
        fail("see above: the figures are not a valid measurement")
    report(args, runs, [p for p in PHASES if p in phases or p == "solo"])


def report(args, runs, phases):
    """The table: each phase's runs pooled, against all solo runs pooled;
    beside it the range of its runs' p99 over the mean of the two solo
    runs around each."""
    solo = pooled([r for r in runs if r["phase"] == "solo"])
    print()
    print(f"A: Rust hello at {args.rate:g} req/s open loop ({A_CONNECTIONS} keep-alive connections, latency from each "
          f"request's due time); {args.rounds} runs of {args.seconds:g} s per phase, pooled; solo: all {solo['n']} "
          f"answers of the solo runs between them; goal: p99 / solo <= {GOAL:.2f}x")
    print()
    print("| phase | B's load | A p50 ms | A p99 ms | p99 / solo | runs: p99 / solo around | server p99 ms "
          "| send lag p99 ms | B requests (statuses) | CPU: server / B client / others | goal |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---|---|")
    misses, busy = [], []
    for phase in phases:
        mine = [(i, r) for i, r in enumerate(runs) if r["phase"] == phase]
        if not mine:
            continue
        a = pooled([r for _, r in mine])
        ratio = a["p99"] / solo["p99"] if a["p99"] and solo["p99"] else None
        verdict = "-" if phase == "solo" or ratio is None else ("PASS" if ratio <= GOAL else "MISS")
        if verdict == "MISS":
            misses.append(phase)
        local = []
        for i, r in mine:
            around = [runs[j]["a"]["p99"] for j in (i - 1, i + 1) if 0 <= j < len(runs) and runs[j]["phase"] == "solo"]
            if phase != "solo" and around and r["a"]["p99"]:
                local.append(r["a"]["p99"] / (sum(around) / len(around)))
        spread = f"{min(local):.2f}-{max(local):.2f}x" if local else "-"
        cpu = lambda k: sum(r["cpu"].get(k, 0.0) for _, r in mine) / len(mine)
        has_b = any(r["b"] for _, r in mine)
        statuses = {}
        for _, r in mine:
            for k, v in (r["b"] or {}).get("statuses", {}).items():
                statuses[k] = statuses.get(k, 0) + v
        b, b_cpu = (b_summary({"statuses": statuses}), f"{cpu('b'):.0f}%") if has_b else ("-", "-")
        print(f"| {phase} | {DESCRIBE[phase]} | {fmt(a['p50'])} | {fmt(a['p99'])} | {fmt_ratio(ratio)} | {spread} "
              f"| {fmt(a['server_p99'])} | {fmt(a['lag_p99'])} | {b} "
              f"| {cpu('server'):.0f}% / {b_cpu} / {cpu('others'):.0f}% | {verdict} |")
        busy += [f"{phase} ({r['cpu']['others']:.0f}%)" for _, r in mine if r["cpu"].get("others", 0) >= 20]
    print()
    print(f"goal (A's p99 within +{(GOAL - 1) * 100:.0f}% of solo): "
          + ("met in every phase" if not misses else f"missed in {', '.join(misses)}"))
    if busy:
        print(f"note: other processes took at least 20% of a core during {', '.join(busy)}: "
              "those runs' figures are distorted; rerun on a quiet machine")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["main", "a", "b"], default="main")
    parser.add_argument("--url", required=True)
    parser.add_argument("--admin-token")
    parser.add_argument("--server-pid", type=int)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each phase, each between two solo runs")
    parser.add_argument("--phases", help="comma-separated subset, e.g. cpu,storm (default: all; solo runs between them)")
    # Children's arguments.
    parser.add_argument("--path")
    parser.add_argument("--warmup", type=float)
    parser.add_argument("--connections", type=int)
    parser.add_argument("--phase")
    parser.add_argument("--token")
    parser.add_argument("--files")
    args = parser.parse_args()
    if args.role == "a":
        run_a(args)
    elif args.role == "b":
        run_b(args)
    else:
        if not args.admin_token:
            fail("--admin-token is needed")
        if args.seconds <= 0 or args.rate <= 0 or args.rounds < 1:
            fail("SECONDS, RATE and ROUNDS must be positive")
        orchestrate(args)


if __name__ == "__main__":
    main()

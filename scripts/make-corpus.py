#!/usr/bin/env python3
"""Writes the bad-input corpus under tests/corpus/ (committed; run again
only to change it): components and core modules, gpuwasm.toml manifests,
admin API requests, safetensors/GGUF/ONNX model files and guest tensors,
each truncated, bit-flipped, oversized, deeply nested or lying about its
counts. tests/security.rs sends every file to a real server and expects a
clean error while the server keeps serving; scripts/fuzz.sh seeds its
fuzz targets from the same folders (and adds what it finds to them).

A file whose name starts with `valid-` is good input (a seed for the
fuzzers): it must be served, not refused.

Formats of the files that are not plain files of their kind:
- api/: the first character picks the request, the rest is its body:
  0 a deploy's gpuwasm-spec header (JSON), 1 a deploy's query string,
  2 POST tenants, 3 PUT tenants/NAME/domains, 4 PUT tenants/NAME/limits,
  5 PUT models/NAME (as the admin_api fuzz target reads them).
- tensors/: byte 0 the wasi-nn type, byte 1 the rank (mod 5), two
  little-endian bytes per dimension, a byte choosing the input's name
  (pixels, text, other), then the data: given to the digits classifier
  (as the guest_tensor fuzz target and nn-probe's /raw-tensor read them).

Usage: scripts/make-corpus.py [HELLO_WASM]  (default target/wasm/hello.wasm)
"""

import json
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "corpus"


def write(kind, name, data):
    path = OUT / kind / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def leb(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n == 0:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def section(ident, body):
    return bytes([ident]) + leb(len(body)) + body


CORE = b"\0asm\x01\x00\x00\x00"
COMPONENT = b"\0asm\x0d\x00\x01\x00"


def nested_function_module(depth):
    """A core module of one function nesting `depth` blocks."""
    types = section(1, leb(1) + b"\x60\x00\x00")
    funcs = section(3, leb(1) + leb(0))
    body = leb(0) + b"\x02\x40" * depth + b"\x0b" * depth + b"\x0b"
    code = section(10, leb(1) + leb(len(body)) + body)
    return CORE + types + funcs + code


def components(hello):
    write("components", "empty.wasm", b"")
    write("components", "not-wasm.wasm", "this is not WebAssembly\n")
    write("components", "header-only.wasm", COMPONENT)
    write("components", "unknown-version.wasm", b"\0asm\x0e\x00\x01\x00")
    write("components", "truncated-8k.wasm", hello[:8192])
    write("components", "truncated-half.wasm", hello[: len(hello) // 2])
    write("components", "truncated-last-byte.wasm", hello[:-1])
    # The first section's size claims 4 GiB.
    write("components", "section-size-4g.wasm", COMPONENT + b"\x01" + b"\xff\xff\xff\xff\x0f" + hello[8:64])
    # A core module inside a component declaring 2^32-1 types in 3 bytes.
    module = CORE + section(1, b"\xff\xff\xff\xff\x0f\x60\x00")
    write("components", "huge-type-count.wasm", COMPONENT + section(1, module))
    # 20000 nested blocks in a function of an embedded core module.
    write("components", "deep-blocks.wasm", COMPONENT + section(1, nested_function_module(20000)))
    # The magic and layer right, every later byte inverted.
    write("components", "inverted-body.wasm", hello[:8] + bytes(b ^ 0xFF for b in hello[8:4096]))


def modules():
    write("modules", "minimal.wasm", CORE)
    write("modules", "deep-blocks.wasm", nested_function_module(20000))
    # Imports a 64-bit memory of 2^48 pages.
    imports = section(2, leb(1) + leb(3) + b"env" + leb(3) + b"mem" + b"\x02\x05" + leb(1 << 48) + leb(1 << 48))
    write("modules", "huge-memory-import.wasm", CORE + imports)


def manifests():
    m = {
        "deep-arrays.toml": "a = " + "[" * 20000 + "]" * 20000 + "\n",
        "deep-inline-tables.toml": "a = " + "{ b = " * 5000 + "1" + " }" * 5000 + "\n",
        "deep-dotted-table.toml": "[" + ".".join(["a"] * 5000) + "]\n",
        "huge-number.toml": "[limits]\nmemory_mb = 999999999999999999999999999\n",
        "wrong-type.toml": '[limits]\nmemory_mb = "lots"\n',
        "over-ceiling.toml": "[limits]\nmemory_mb = 1048576\n",
        "unknown-limit.toml": "[limits]\nmemory_gb = 1\n",
        "unknown-section.toml": "[limitz]\nmemory_mb = 1\n",
        "nul-in-env.toml": '[env]\nA = "x\\u0000y"\n',
        "bad-env-name.toml": '[env]\n"A=B" = "x"\n',
        "bad-outbound.toml": '[outbound]\nallow = ["http://evil/path"]\n',
        "warm-not-allowed.toml": '[models]\nallow = ["a"]\nwarm = ["b"]\n',
        "negative-idle-timeout.toml": '[models]\nallow = ["a"]\nidle_timeout_s = { a = -1 }\n',
        "bad-target.toml": '[models]\ntarget = "tpu"\n',
        "bad-host.toml": '[routes]\nhost = "*.*"\n',
        "bad-name.toml": 'name = "../etc"\n',
        "duplicate-key.toml": "[limits]\nmemory_mb = 1\nmemory_mb = 2\n",
        "long-name.toml": 'name = "' + "a" * 100_000 + '"\n',
    }
    for name, text in m.items():
        write("manifests", name, text)
    write("manifests", "not-utf8.toml", b'name = "\xff\xfe"\n')


def api():
    sha = "0" * 64
    requests = {
        # Deploy settings in the gpuwasm-spec header.
        "spec-deep-nesting.txt": "0" + "[" * 1000 + "]" * 1000,
        "spec-huge-limit.txt": '0{"limits": {"memory_mb": 99999999999999}}',
        "spec-number-overflow.txt": '0{"limits": {"memory_mb": 1e400}}',
        "spec-unknown-field.txt": '0{"limitz": {}}',
        "spec-bad-host.txt": '0{"host": "*.*.example.com"}',
        "spec-nul-env.txt": '0{"sandbox": {"env": {"A": "x\\u0000y"}}}',
        "spec-warm-not-allowed.txt": '0{"models": ["a"], "models_warm": ["b"]}',
        "spec-file-escape.txt": '0{"files": {"../etc/passwd": "' + sha + '"}}',
        "spec-bad-target.txt": '0{"model_target": "tpu"}',
        "spec-not-json.txt": "0{limits",
        # Deploy settings as a query string.
        "query-huge-number.txt": "1memory_mb=999999999999999999999999",
        "query-bad-bool.txt": "1preinit=maybe",
        "query-no-value.txt": "1memory_mb",
        "query-negative.txt": "1cpu_ms=-5",
        "query-unknown.txt": "1memory_gb=1",
        # Tenants.
        "tenant-name-number.txt": '2{"name": 5}',
        "tenant-bad-name.txt": '2{"name": "Bad Name"}',
        "tenant-deep-nesting.txt": '2{"name": ' + "[" * 1000 + "]" * 1000 + "}",
        "tenant-bad-domain.txt": '2{"name": "fine", "domains": ["*"]}',
        "tenant-not-json.txt": "2not json",
        "domains-bad.txt": '3{"domains": ["a..b"]}',
        "domains-not-a-list.txt": '3{"domains": "x"}',
        "limits-zero-instances.txt": '4{"instances": 0}',
        "limits-zero-rate.txt": '4{"requests_per_second": 0}',
        "limits-negative-storage.txt": '4{"storage_bytes": -1}',
        "limits-overflow.txt": '4{"instances": 99999999999999999999}',
        # Model pushes.
        "push-unknown-format.txt": '5{"format": "pickle", "files": {}}',
        "push-path-escape.txt": '5{"format": "onnx", "files": {"../x.onnx": "' + sha + '"}}',
        "push-not-hex.txt": '5{"format": "onnx", "files": {"model.onnx": "nothex"}}',
        "push-not-uploaded.txt": '5{"format": "onnx", "files": {"model.onnx": "' + sha + '"}}',
        "push-unexpected-file.txt": '5{"format": "safetensors", "files": {"evil.bin": "' + sha + '"}}',
        "push-two-files.txt": '5{"format": "gguf", "files": {"a.gguf": "' + sha + '", "b.gguf": "' + sha + '"}}',
    }
    for name, text in requests.items():
        write("api", name, text)


def safetensors_file(header, data=b""):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def safetensors():
    write("safetensors", "empty.safetensors", b"")
    write("safetensors", "four-bytes.safetensors", b"\x01\x02\x03\x04")
    write("safetensors", "header-length-huge.safetensors", b"\xff" * 8 + b"{}")
    write("safetensors", "header-not-json.safetensors", safetensors_file(b"not json at all"))
    write("safetensors", "header-deep-nesting.safetensors", safetensors_file(b"[" * 5000 + b"]" * 5000))
    write("safetensors", "offsets-past-data.safetensors", safetensors_file({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1 << 40]}}, b"\0" * 16))
    write("safetensors", "offsets-reversed.safetensors", safetensors_file({"w": {"dtype": "F32", "shape": [0], "data_offsets": [16, 0]}}, b"\0" * 16))
    write("safetensors", "shape-overflow.safetensors", safetensors_file({"w": {"dtype": "F32", "shape": [1 << 40, 1 << 40, 1 << 40], "data_offsets": [0, 16]}}, b"\0" * 16))
    write("safetensors", "negative-dimension.safetensors", safetensors_file({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4))
    write("safetensors", "unknown-dtype.safetensors", safetensors_file({"w": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}, b"\0"))
    write("safetensors", "integer-weights.safetensors", safetensors_file({"embeddings.word_embeddings.weight": {"dtype": "I64", "shape": [30522, 384], "data_offsets": [0, 30522 * 384 * 8]}}, b""))
    write("safetensors", "one-tensor-only.safetensors", safetensors_file({"embeddings.LayerNorm.weight": {"dtype": "F32", "shape": [384], "data_offsets": [0, 1536]}}, b"\0" * 1536))


def gguf_string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_kv(key, type_id, payload):
    return gguf_string(key) + struct.pack("<I", type_id) + payload


def gguf_files():
    write("gguf", "empty.gguf", b"")
    write("gguf", "magic-only.gguf", b"GGUF")
    write("gguf", "version-1.gguf", b"GGUF" + struct.pack("<IQQ", 1, 0, 0))
    write("gguf", "version-99.gguf", b"GGUF" + struct.pack("<IQQ", 99, 0, 0))
    write("gguf", "tensor-count-huge.gguf", b"GGUF" + struct.pack("<IQQ", 3, 1 << 62, 0))
    write("gguf", "metadata-count-huge.gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 1 << 62))
    write("gguf", "key-length-huge.gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 62) + b"k")
    write("gguf", "unknown-value-type.gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gguf_kv("k", 99, b""))
    # An array of arrays of arrays... 10000 deep.
    write("gguf", "deep-arrays.gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gguf_string("k") + struct.pack("<I", 9) + (struct.pack("<IQ", 9, 1)) * 10000 + struct.pack("<IQ", 4, 0))
    write("gguf", "array-count-huge.gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gguf_kv("k", 9, struct.pack("<IQ", 4, 1 << 61)))
    write("gguf", "alignment-zero.gguf", b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + gguf_kv("general.alignment", 4, struct.pack("<I", 0)) + gguf_string("t") + struct.pack("<I", 1) + struct.pack("<Q", 4) + struct.pack("<IQ", 0, 0))
    write("gguf", "alignment-three.gguf", b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + gguf_kv("general.alignment", 4, struct.pack("<I", 3)) + gguf_string("t") + struct.pack("<I", 1) + struct.pack("<Q", 4) + struct.pack("<IQ", 0, 0))
    tensor = lambda dims, ty, offset: gguf_string("t") + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ty, offset)
    write("gguf", "tensor-dims-overflow.gguf", b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + tensor([1 << 32, 1 << 32, 1 << 32], 0, 0))
    write("gguf", "tensor-rank-huge.gguf", b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + gguf_string("t") + struct.pack("<I", 1 << 30))
    write("gguf", "tensor-type-unknown.gguf", b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + tensor([4], 200, 0))
    write("gguf", "tensor-past-the-end.gguf", b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + tensor([1024], 0, 1 << 40))
    arch = gguf_kv("general.architecture", 8, gguf_string("llama"))
    write("gguf", "llama-without-sizes.gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + arch)
    sizes = arch + gguf_kv("llama.embedding_length", 4, struct.pack("<I", 1 << 31)) + gguf_kv("llama.block_count", 4, struct.pack("<I", 1 << 31))
    write("gguf", "llama-huge-sizes.gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 3) + sizes)


class Proto:
    """A protobuf message under construction."""

    def __init__(self):
        self.b = bytearray()

    def key(self, field, wire):
        self.b += leb((field << 3) | wire)
        return self

    def int(self, field, value):
        self.key(field, 0).b.extend(leb(value & ((1 << 64) - 1)))
        return self

    def bytes(self, field, value):
        self.key(field, 2).b.extend(leb(len(value)) + value)
        return self

    def str(self, field, value):
        return self.bytes(field, value.encode())

    def msg(self, field, value):
        return self.bytes(field, bytes(value.b))


def onnx_model(graph):
    return bytes(Proto().int(1, 8).msg(8, Proto().str(1, "").int(2, 13)).msg(7, graph).b)


def onnx_input(name, dims):
    shape = Proto()
    for d in dims:
        shape.msg(1, Proto().int(1, d))
    tensor_type = Proto().int(1, 1).msg(2, shape)
    return Proto().str(1, name).msg(2, Proto().msg(1, tensor_type))


def onnx_files(digits):
    write("onnx", "empty.onnx", b"")
    write("onnx", "truncated-tenth.onnx", digits[: len(digits) // 10])
    write("onnx", "truncated-half.onnx", digits[: len(digits) // 2])
    write("onnx", "truncated-last-byte.onnx", digits[:-1])
    write("onnx", "wire-type-7.onnx", b"\x0f\x01\x02\x03")
    write("onnx", "varint-eleven-bytes.onnx", b"\x08" + b"\xff" * 10 + b"\x01")
    write("onnx", "length-past-the-end.onnx", b"\x3a" + leb(1 << 40) + b"\x00")
    # A graph in an attribute of a node of a graph... 3000 deep.
    inner = Proto().str(2, "g")
    for _ in range(3000):
        node = Proto().str(4, "If").msg(5, Proto().str(1, "then_branch").msg(6, inner).int(20, 5))
        inner = Proto().str(2, "g").msg(1, node)
    write("onnx", "deep-subgraphs.onnx", onnx_model(inner))
    out = Proto().str(1, "out")
    write("onnx", "unknown-op.onnx", onnx_model(Proto().str(2, "g").msg(11, onnx_input("text", [4])).msg(1, Proto().str(1, "text").str(2, "out").str(4, "FooBar")).msg(12, out)))
    huge = Proto().int(1, 1 << 62).int(1, 1 << 62).int(2, 1).str(8, "A")
    write("onnx", "initializer-dims-overflow.onnx", onnx_model(Proto().str(2, "g").msg(11, onnx_input("text", [4])).msg(5, huge).msg(1, Proto().str(1, "text").str(1, "A").str(2, "out").str(4, "Add")).msg(12, out)))
    negative = Proto().int(1, -4).int(2, 1).str(8, "A")
    write("onnx", "initializer-negative-dims.onnx", onnx_model(Proto().str(2, "g").msg(11, onnx_input("text", [4])).msg(5, negative).msg(1, Proto().str(1, "text").str(1, "A").str(2, "out").str(4, "Add")).msg(12, out)))
    short = Proto().int(1, 1000).int(2, 1).str(8, "A").bytes(9, b"\0" * 8)
    write("onnx", "initializer-data-short.onnx", onnx_model(Proto().str(2, "g").msg(11, onnx_input("text", [1000])).msg(5, short).msg(1, Proto().str(1, "text").str(1, "A").str(2, "out").str(4, "Add")).msg(12, out)))
    write("onnx", "cycle.onnx", onnx_model(Proto().str(2, "g").msg(11, onnx_input("text", [4])).msg(1, Proto().str(1, "b").str(2, "a").str(4, "Relu")).msg(1, Proto().str(1, "a").str(2, "b").str(4, "Relu")).msg(1, Proto().str(1, "b").str(2, "out").str(4, "Relu")).msg(12, out)))
    write("onnx", "input-dims-huge.onnx", onnx_model(Proto().str(2, "g").msg(11, onnx_input("text", [1 << 40, 1 << 40])).msg(1, Proto().str(1, "text").str(2, "out").str(4, "Relu")).msg(12, out)))


def tensor(ty, dims, name, data):
    return bytes([ty, len(dims)]) + b"".join(struct.pack("<H", d) for d in dims) + bytes([name]) + data


def tensors():
    pixels, text, other = 0, 1, 2
    f32, u8, i64 = 1, 4, 6
    write("tensors", "valid-pixels.bin", tensor(f32, [1, 1, 8, 8], pixels, b"\0" * 256))
    write("tensors", "data-short.bin", tensor(f32, [1, 1, 8, 8], pixels, b"\0" * 10))
    write("tensors", "data-long.bin", tensor(f32, [1, 1, 8, 8], pixels, b"\0" * 300))
    write("tensors", "dims-huge.bin", tensor(u8, [65535, 65535, 65535, 65535], pixels, b"\0" * 16))
    write("tensors", "batch-huge-no-data.bin", tensor(f32, [65535, 1, 8, 8], pixels, b""))
    write("tensors", "scalar.bin", tensor(f32, [], pixels, b"\0" * 4))
    write("tensors", "wrong-name.bin", tensor(f32, [1, 1, 8, 8], text, b"\0" * 256))
    write("tensors", "unknown-name.bin", tensor(f32, [1, 1, 8, 8], other, b"\0" * 256))
    write("tensors", "wrong-type.bin", tensor(i64, [1, 1, 8, 8], pixels, b"\0" * 512))
    write("tensors", "wrong-shape.bin", tensor(f32, [1, 64], pixels, b"\0" * 256))
    write("tensors", "zero-batch.bin", tensor(f32, [0, 1, 8, 8], pixels, b""))
    write("tensors", "valid-nan-pixels.bin", tensor(f32, [1, 1, 8, 8], pixels, struct.pack("<f", float("nan")) * 64))
    write("tensors", "too-short.bin", b"\x01")


def main():
    hello = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "target/wasm/hello.wasm").read_bytes()
    digits = (ROOT / "examples/classify/digits.onnx").read_bytes()
    components(hello)
    modules()
    manifests()
    api()
    safetensors()
    gguf_files()
    onnx_files(digits)
    tensors()
    count = sum(1 for p in OUT.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"make-corpus: {count} files, {size / 1024:.0f} KiB under {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

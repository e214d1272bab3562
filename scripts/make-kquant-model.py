#!/usr/bin/env python3
"""A K-quant SmolLM2 for the tests, made from the Q4_1 file with our own
small quantiser (gguf-py only reads K-quants; llama.cpp's quantiser needs
a 15-minute build, too slow for CI).

Usage: make-kquant-model.py IN.gguf OUT.gguf

SmolLM2-135M is 576 wide, and K-quant rows must be whole blocks of 256,
so only the feed-forward down projections (1536 wide) can be K-quants
(llama.cpp's Q4_K_M falls back to Q5_0/Q8_0 for the rest). Those 30
tensors become Q4_K, Q5_K and Q6_K in turn (layer % 3); every other
tensor is copied as it is. The result is the same bytes on every machine:
the quantiser uses only element-wise arithmetic, minimums and maximums
(no sums, whose order could differ), so tests/fixtures/ can hold
llama.cpp's answers for its SHA-256.

Each tensor is checked after quantising: gguf-py's reference dequantiser
gives back the values within the format's usual error.
"""
import sys

import numpy as np
from gguf import GGMLQuantizationType as T, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize

F16_MAX = 65504.0


def f16(x):
    return np.asarray(x, dtype=np.float32).astype(np.float16)


def pack_scales_k(sc, m):
    """K-quant 6-bit scales and minimums of 8 sub-blocks, in 12 bytes
    (blocks x 8 each -> blocks x 12)."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 15) | ((m[:, 4:8] & 15) << 4)
    return out


def affine_k(x, levels):
    """Q4_K / Q5_K: x (blocks x 256) as d*sc*q - dmin*m per sub-block of 32."""
    sub = x.reshape(-1, 8, 32)
    lo = np.minimum(sub.min(axis=2), 0).astype(np.float32)
    hi = sub.max(axis=2).astype(np.float32)
    scale = (hi - lo) / np.float32(levels)
    offset = -lo
    d = f16(scale.max(axis=1) / np.float32(63)).astype(np.float32)
    dmin = f16(offset.max(axis=1) / np.float32(63)).astype(np.float32)
    safe = lambda v: np.where(v > 0, v, np.float32(1))  # noqa: E731
    sc = np.clip(np.round(scale / safe(d)[:, None]), 0, 63)
    m = np.clip(np.round(offset / safe(dmin)[:, None]), 0, 63)
    step = (d[:, None] * sc).astype(np.float32)
    base = (dmin[:, None] * m).astype(np.float32)
    q = np.round((sub + base[:, :, None]) / safe(step)[:, :, None])
    q = np.where(step[:, :, None] > 0, np.clip(q, 0, levels), 0).astype(np.uint8).reshape(-1, 256)
    return d, dmin, sc, m, q


def q4_k(x):
    d, dmin, sc, m, q = affine_k(x, 15)
    groups = q.reshape(-1, 4, 2, 32)
    qs = (groups[:, :, 0, :] | (groups[:, :, 1, :] << 4)).reshape(-1, 128)
    return np.concatenate([f16(d)[:, None].view(np.uint8), f16(dmin)[:, None].view(np.uint8), pack_scales_k(sc, m), qs], axis=1)


def q5_k(x):
    d, dmin, sc, m, q = affine_k(x, 31)
    groups = q.reshape(-1, 4, 2, 32)
    low = groups & 15
    qs = (low[:, :, 0, :] | (low[:, :, 1, :] << 4)).reshape(-1, 128)
    high = (groups >> 4) & 1
    qh = np.zeros((q.shape[0], 32), dtype=np.uint8)
    for g in range(4):
        qh |= (high[:, g, 0, :] << (2 * g)) | (high[:, g, 1, :] << (2 * g + 1))
    return np.concatenate([f16(d)[:, None].view(np.uint8), f16(dmin)[:, None].view(np.uint8), pack_scales_k(sc, m), qh, qs], axis=1)


def q6_k(x):
    """Q6_K: x (blocks x 256) as d*sc*(q-32), int8 scales per 16."""
    sub = x.reshape(-1, 16, 16)
    amax = np.abs(sub).max(axis=2).astype(np.float32)
    scale = amax / np.float32(32)
    d = f16(scale.max(axis=1) / np.float32(127)).astype(np.float32)
    safe = lambda v: np.where(v > 0, v, np.float32(1))  # noqa: E731
    sc = np.clip(np.round(scale / safe(d)[:, None]), 0, 127)
    step = (d[:, None] * sc).astype(np.float32)
    q = np.round(sub / safe(step)[:, :, None]) + 32
    q = np.where(step[:, :, None] > 0, np.clip(q, 0, 63), 32).astype(np.uint8).reshape(-1, 2, 4, 32)
    ql = np.zeros((q.shape[0], 2, 64), dtype=np.uint8)
    ql[:, :, 0:32] = (q[:, :, 0, :] & 15) | ((q[:, :, 2, :] & 15) << 4)
    ql[:, :, 32:64] = (q[:, :, 1, :] & 15) | ((q[:, :, 3, :] & 15) << 4)
    qh = (q[:, :, 0, :] >> 4) | ((q[:, :, 1, :] >> 4) << 2) | ((q[:, :, 2, :] >> 4) << 4) | ((q[:, :, 3, :] >> 4) << 6)
    return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.astype(np.int8).view(np.uint8), f16(d)[:, None].view(np.uint8)], axis=1)


QUANTISERS = {T.Q4_K: q4_k, T.Q5_K: q5_k, T.Q6_K: q6_k}
# Mean error over mean magnitude after a round trip through gguf-py's
# dequantiser (Gaussian rows give 0.082, 0.040 and 0.022): a wrong layout
# gives errors of the order of the values themselves.
BOUNDS = {T.Q4_K: 0.15, T.Q5_K: 0.08, T.Q6_K: 0.05}


def copy_metadata(reader, writer):
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        kind = field.types[0]
        value = field.contents()
        if kind == GGUFValueType.ARRAY:
            writer.add_key_value(name, value, kind, sub_type=field.types[-1])
        else:
            writer.add_key_value(name, value, kind)


def main():
    source, out = sys.argv[1], sys.argv[2]
    reader = GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(out, arch)
    copy_metadata(reader, writer)
    kinds = [T.Q4_K, T.Q5_K, T.Q6_K]
    for tensor in reader.tensors:
        shape = [int(n) for n in reversed(tensor.shape.tolist())]  # rows first
        name = tensor.name
        if name.endswith("ffn_down.weight"):
            kind = kinds[int(name.split(".")[1]) % 3]
            values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(-1, 256)
            encoded = QUANTISERS[kind](values)
            back = dequantize(encoded, kind).reshape(-1, 256)
            error = np.abs(back - values).mean() / np.abs(values).mean()
            assert error < BOUNDS[kind], f"{name} as {kind.name}: mean error {error:.3f} of the mean value"
            writer.add_tensor(name, encoded.reshape(shape[0], -1), raw_dtype=kind)
        else:
            writer.add_tensor(name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

// The CUDA backend's kernels, compiled at run time by NVRTC for the
// device found (tensor/tests/cuda_kernels.rs compiles them in CI without a
// GPU). No headers: NVRTC needs none for these. Products of float weights
// go to cuBLAS; everything else is here.
//
// Weight formats (value_at): 0 f32, 1 f16, 2 bf16, 3 Q4_0, 4 Q4_1, 5 Q8_0,
// 6 Q4_K, 7 Q5_K, 8 Q6_K, with GGUF's block layouts (src/quant.rs).

typedef unsigned char u8;
typedef unsigned int u32;

__device__ __forceinline__ float half_at(const u8* p) {
    unsigned short h = (unsigned short)(p[0] | (p[1] << 8));
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// The 6-bit scale and minimum of sub-block j of a Q4_K or Q5_K block.
__device__ __forceinline__ void scale_min_k4(int j, const u8* q, float* sc, float* m) {
    if (j < 4) {
        *sc = (float)(q[j] & 63);
        *m = (float)(q[j + 4] & 63);
    } else {
        *sc = (float)((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4));
        *m = (float)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

// Value c of the row that starts at `row`.
__device__ float value_at(int format, const u8* row, int c) {
    switch (format) {
    case 0: return ((const float*)row)[c];
    case 1: return half_at(row + 2 * c);
    case 2: return __uint_as_float((u32)(row[2 * c] | (row[2 * c + 1] << 8)) << 16);
    case 3: {
        const u8* b = row + (c / 32) * 18;
        int j = c % 32;
        u8 q = b[2 + j % 16];
        return ((float)(j < 16 ? (q & 15) : (q >> 4)) - 8.0f) * half_at(b);
    }
    case 4: {
        const u8* b = row + (c / 32) * 20;
        int j = c % 32;
        u8 q = b[4 + j % 16];
        return (float)(j < 16 ? (q & 15) : (q >> 4)) * half_at(b) + half_at(b + 2);
    }
    case 5: {
        const u8* b = row + (c / 32) * 34;
        return (float)(signed char)b[2 + c % 32] * half_at(b);
    }
    case 6:
    case 7: {
        const int size = format == 6 ? 144 : 176;
        const u8* b = row + (c / 256) * size;
        int i = c % 256, j = i / 64, l = i % 32, hi = (i % 64) >= 32;
        float sc, m;
        scale_min_k4(2 * j + hi, b + 4, &sc, &m);
        const u8* qs = b + (format == 6 ? 16 : 48);
        int q = hi ? (qs[32 * j + l] >> 4) : (qs[32 * j + l] & 15);
        if (format == 7 && (b[16 + l] & ((hi ? 2 : 1) << (2 * j)))) q += 16;
        return half_at(b) * sc * (float)q - half_at(b + 2) * m;
    }
    default: {
        const u8* b = row + (c / 256) * 210;
        int i = c % 256, n = i / 128, r = i % 128, quarter = r / 32, l = r % 32;
        const u8* ql = b + 64 * n;
        const u8* qh = b + 128 + 32 * n;
        const signed char* sc = (const signed char*)(b + 192 + 8 * n);
        u8 low = quarter & 1 ? ql[l + 32] : ql[l];
        int q = (quarter < 2 ? (low & 15) : (low >> 4)) | (((qh[l] >> (2 * quarter)) & 3) << 4);
        return half_at(b + 208) * (float)sc[l / 16 + 2 * quarter] * (float)(q - 32);
    }
    }
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, o));
    return v;
}

// Sum (or maximum) over a block of up to 1024 threads; every thread gets it.
__device__ float block_reduce(float v, bool max) {
    __shared__ float part[32];
    __shared__ float total;
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    v = max ? warp_max(v) : warp_sum(v);
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        int warps = (blockDim.x + 31) / 32;
        float w = lane < warps ? part[lane] : (max ? -3.4e38f : 0.0f);
        w = max ? warp_max(w) : warp_sum(w);
        if (lane == 0) total = w;
    }
    __syncthreads();
    float result = total;
    __syncthreads();
    return result;
}

// y[r, o] = x[r, :] · w[o, :] (+ bias[o]) for an encoded weight: one warp
// per (output, row), decoding as it goes. Grid (ceil(out / 8), rows).
extern "C" __global__ void linear_encoded(const float* x, const u8* w, const float* bias, float* y,
                                          int rows, int cols, int out, int format, int row_bytes, int has_bias) {
    int o = blockIdx.x * 8 + threadIdx.x / 32, r = blockIdx.y, lane = threadIdx.x % 32;
    if (o >= out || r >= rows) return;
    const u8* row = w + (size_t)o * row_bytes;
    const float* xr = x + (size_t)r * cols;
    float acc = 0.0f;
    for (int c = lane; c < cols; c += 32) acc += xr[c] * value_at(format, row, c);
    acc = warp_sum(acc);
    if (lane == 0) y[(size_t)r * out + o] = acc + (has_bias ? bias[o] : 0.0f);
}

// y[i, c] = table[ids[i], c].
extern "C" __global__ void gather(const u8* table, const u32* ids, float* y, int n, int cols, int format, int row_bytes) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    y[i] = value_at(format, table + (size_t)ids[i / cols] * row_bytes, i % cols);
}

// Activations: 0 gelu, 1 gelu (tanh), 2 silu, 3 relu, 4 sigmoid, 5 tanh, 6 erf.
extern "C" __global__ void unary(const float* x, float* y, int n, int op) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = x[i];
    switch (op) {
    case 0: y[i] = 0.5f * v * (1.0f + erff(v * 0.70710678f)); break;
    case 1: y[i] = 0.5f * v * (1.0f + tanhf(0.7978846f * (v + 0.044715f * v * v * v))); break;
    case 2: y[i] = v / (1.0f + expf(-v)); break;
    case 3: y[i] = fmaxf(v, 0.0f); break;
    case 4: y[i] = 1.0f / (1.0f + expf(-v)); break;
    case 5: y[i] = tanhf(v); break;
    default: y[i] = erff(v); break;
    }
}

// y = a + b (op 0) or a * b (op 1), b the same size or one row of `cols`
// (broadcast); y may be a.
extern "C" __global__ void binary(const float* a, const float* b, float* y, int n, int cols, int broadcast, int op) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float bv = b[broadcast ? i % cols : i];
    y[i] = op == 0 ? a[i] + bv : a[i] * bv;
}

// Layer (kind 0) or RMS (kind 1) normalisation; one block per row.
extern "C" __global__ void normalise(const float* x, const float* gamma, const float* beta, float* y, int rows, int cols, float eps, int kind) {
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (size_t)r * cols;
    float* yr = y + (size_t)r * cols;
    float mean = 0.0f;
    if (kind == 0) {
        float s = 0.0f;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) s += xr[c];
        mean = block_reduce(s, false) / cols;
    }
    float q = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) { float d = xr[c] - mean; q += d * d; }
    float inv = rsqrtf(block_reduce(q, false) / cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = (xr[c] - mean) * inv * gamma[c];
        yr[c] = kind == 0 ? v + beta[c] : v;
    }
}

// Softmax of each row; one block per row.
extern "C" __global__ void softmax(const float* x, float* y, int rows, int cols) {
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (size_t)r * cols;
    float* yr = y + (size_t)r * cols;
    float m = -3.4e38f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, xr[c]);
    m = block_reduce(m, true);
    float s = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) s += expf(xr[c] - m);
    s = block_reduce(s, false);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) yr[c] = expf(xr[c] - m) / s;
}

// Attention over packed sequences: one block of 128 threads per (query
// row, head), keys in chunks of 128 with a running (online) softmax, so
// sequences of any length fit. Head dimension at most 512.
#define CHUNK 128
#define DIMS_PER_THREAD 4
extern "C" __global__ void attention(const float* q, const float* k, const float* v, const u32* starts, const u32* lens, float* out,
                                     int heads, int kv_heads, int dim, int rows, int causal, float scale) {
    int i = blockIdx.x, h = blockIdx.y, t = threadIdx.x;
    if (i >= rows) return;
    __shared__ float w[CHUNK];
    u32 start = starts[i];
    int keys = causal ? (int)(i - start + 1) : (int)lens[i];
    int kvh = h / (heads / kv_heads), kvw = kv_heads * dim;
    const float* qr = q + (size_t)i * heads * dim + h * dim;
    float acc[DIMS_PER_THREAD] = {0.0f, 0.0f, 0.0f, 0.0f};
    float m = -3.4e38f, total = 0.0f;
    for (int base = 0; base < keys; base += CHUNK) {
        int j = base + t;
        float s = -3.4e38f;
        if (j < keys) {
            const float* kr = k + (size_t)(start + j) * kvw + kvh * dim;
            s = 0.0f;
            for (int d = 0; d < dim; d++) s += qr[d] * kr[d];
            s *= scale;
        }
        float top = fmaxf(m, block_reduce(s, true));
        float e = j < keys ? expf(s - top) : 0.0f;
        w[t] = e;
        float correction = expf(m - top);
        total = total * correction + block_reduce(e, false);
        m = top;
        for (int x = 0; x < DIMS_PER_THREAD; x++) {
            int d = t + x * CHUNK;
            if (d >= dim) break;
            float a = acc[x] * correction;
            int n = min(CHUNK, keys - base);
            for (int jj = 0; jj < n; jj++) a += w[jj] * v[(size_t)(start + base + jj) * kvw + kvh * dim + d];
            acc[x] = a;
        }
        __syncthreads();
    }
    float* o = out + (size_t)i * heads * dim + h * dim;
    for (int x = 0; x < DIMS_PER_THREAD; x++) {
        int d = t + x * CHUNK;
        if (d < dim) o[d] = acc[x] / total;
    }
}

// Rotary position embedding: one thread per (row, head, i < dim - rotated/2).
extern "C" __global__ void rope(const float* x, const u32* positions, float* y, int rows, int heads, int dim, int rotated, float theta, int interleaved) {
    int half = rotated / 2, per_head = dim - half;
    long t = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long)rows * heads * per_head) return;
    int row = t / (heads * per_head), rest = t % (heads * per_head), head = rest / per_head, i = rest % per_head;
    size_t base = (size_t)row * heads * dim + (size_t)head * dim;
    if (i >= half) {
        int c = i + half;
        if (c < dim) y[base + c] = x[base + c];
        return;
    }
    float angle = (float)positions[row] * powf(theta, -2.0f * i / rotated);
    float s, c;
    sincosf(angle, &s, &c);
    int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
    float x0 = x[base + a], x1 = x[base + b];
    y[base + a] = x0 * c - x1 * s;
    y[base + b] = x0 * s + x1 * c;
}

// y[r, c] += bias[c], in place (a linear layer's bias after cuBLAS).
extern "C" __global__ void add_bias(float* y, const float* bias, int n, int cols) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += bias[i % cols];
}

// Rows of src to rows slots[i] of dst (a key/value cache write).
extern "C" __global__ void scatter_rows(const float* src, const u32* slots, float* dst, int n, int width) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[(size_t)slots[i / width] * width + i % width] = src[i];
}

// Attention of query rows over a key/value cache: one block of 128 per
// (row, head); row r sees keys[r] keys at slots[offsets[r]..], in chunks
// with a running softmax (any number of keys). Heads of up to 512 values.
extern "C" __global__ void cached_attention(const float* q, const float* k, const float* v, const u32* offsets, const u32* keys,
                                            const u32* slots, float* out, int heads, int kv_heads, int dim, int rows, float scale) {
    int r = blockIdx.x, h = blockIdx.y, t = threadIdx.x;
    if (r >= rows) return;
    __shared__ float w[CHUNK];
    int n = (int)keys[r];
    const u32* seen = slots + offsets[r];
    int kvh = h / (heads / kv_heads), kvw = kv_heads * dim;
    const float* qr = q + (size_t)r * heads * dim + h * dim;
    float acc[DIMS_PER_THREAD] = {0.0f, 0.0f, 0.0f, 0.0f};
    float m = -3.4e38f, total = 0.0f;
    for (int base = 0; base < n; base += CHUNK) {
        int j = base + t;
        float s = -3.4e38f;
        if (j < n) {
            const float* kr = k + (size_t)seen[j] * kvw + kvh * dim;
            s = 0.0f;
            for (int d = 0; d < dim; d++) s += qr[d] * kr[d];
            s *= scale;
        }
        float top = fmaxf(m, block_reduce(s, true));
        float e = j < n ? expf(s - top) : 0.0f;
        w[t] = e;
        float correction = expf(m - top);
        total = total * correction + block_reduce(e, false);
        m = top;
        int chunk = min(CHUNK, n - base);
        for (int x = 0; x < DIMS_PER_THREAD; x++) {
            int d = t + x * CHUNK;
            if (d >= dim) break;
            float a = acc[x] * correction;
            for (int jj = 0; jj < chunk; jj++) a += w[jj] * v[(size_t)seen[base + jj] * kvw + kvh * dim + d];
            acc[x] = a;
        }
        __syncthreads();
    }
    float* o = out + (size_t)r * heads * dim + h * dim;
    for (int x = 0; x < DIMS_PER_THREAD; x++) {
        int d = t + x * CHUNK;
        if (d < dim) o[d] = acc[x] / total;
    }
}

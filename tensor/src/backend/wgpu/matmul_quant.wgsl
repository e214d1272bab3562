// y[rows, out] = x[rows, cols] . w^T (+ bias) for a weight of half-float or
// quantised rows (GGUF blocks, read as bytes; quant.wgsl comes first): each
// invocation decodes its output's row block by block as it goes, never the
// whole weight.
struct Params { rows: u32, cols: u32, out: u32, format: u32, row_bytes: u32, has_bias: u32, pad0: u32, pad1: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) g: vec3<u32>) {
    let o = g.x;
    let r = g.y;
    if (o >= p.out || r >= p.rows) { return; }
    let base = o * p.row_bytes;
    let xb = r * p.cols;
    var acc = 0.0;
    if (p.format >= 4u) {
        // Half floats and K-quants, value by value.
        for (var c = 0u; c < p.cols; c = c + 1u) { acc = acc + x[xb + c] * value_at(p.format, base, c); }
    } else {
        // Q4_0, Q4_1, Q8_0: a block's scale read once for its 32 values.
        for (var blk = 0u; blk < p.cols / 32u; blk = blk + 1u) {
            let xo = xb + blk * 32u;
            if (p.format == 1u) {
                let off = base + blk * 18u;
                let d = half_at(off);
                for (var j = 0u; j < 16u; j = j + 1u) {
                    let q = byte_at(off + 2u + j);
                    acc = acc + x[xo + j] * (f32(q & 15u) - 8.0) * d + x[xo + j + 16u] * (f32(q >> 4u) - 8.0) * d;
                }
            } else if (p.format == 2u) {
                let off = base + blk * 20u;
                let d = half_at(off);
                let m = half_at(off + 2u);
                for (var j = 0u; j < 16u; j = j + 1u) {
                    let q = byte_at(off + 4u + j);
                    acc = acc + x[xo + j] * (f32(q & 15u) * d + m) + x[xo + j + 16u] * (f32(q >> 4u) * d + m);
                }
            } else {
                let off = base + blk * 34u;
                let d = half_at(off);
                for (var j = 0u; j < 32u; j = j + 1u) {
                    acc = acc + x[xo + j] * signed(byte_at(off + 2u + j)) * d;
                }
            }
        }
    }
    if (p.has_bias == 1u) { acc = acc + bias[o]; }
    y[r * p.out + o] = acc;
}

// Rotary position embedding: one invocation per (row, head, rotated pair).
struct Params { rows: u32, heads: u32, dim: u32, rotated: u32, theta: f32, interleaved: u32, pad0: u32, pad1: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> positions: array<u32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>) {
    let t = (wg.y * nw.x + wg.x) * 256u + l.x;
    let half = p.rotated / 2u;
    let per_row = p.heads * (p.dim - half);
    if (t >= p.rows * per_row) { return; }
    let row = t / per_row;
    let rest = t % per_row;
    let head = rest / (p.dim - half);
    let i = rest % (p.dim - half);
    let base = row * p.heads * p.dim + head * p.dim;
    if (i >= half) {
        // The values past the rotated ones (and each pair's second half
        // is written by its first): copy the tail.
        let c = i + half;
        if (c < p.dim) { y[base + c] = x[base + c]; }
        return;
    }
    let freq = pow(p.theta, -2.0 * f32(i) / f32(p.rotated));
    let angle = f32(positions[row]) * freq;
    let s = sin(angle);
    let c = cos(angle);
    var a = i;
    var b = i + half;
    if (p.interleaved == 1u) { a = 2u * i; b = 2u * i + 1u; }
    let x0 = x[base + a];
    let x1 = x[base + b];
    y[base + a] = x0 * c - x1 * s;
    y[base + b] = x0 * s + x1 * c;
}

// Layer (kind 0) or RMS (kind 1) normalisation of each row; one workgroup
// per row, two passes (mean, then spread) for accuracy (reduce.wgsl comes
// first).
struct Params { rows: u32, cols: u32, eps: f32, kind: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> gamma: array<f32>;
@group(0) @binding(3) var<storage, read> beta: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>) {
    let r = wg.y * nw.x + wg.x;
    if (r >= p.rows) { return; }
    let off = r * p.cols;
    let n = f32(p.cols);
    var mean = 0.0;
    if (p.kind == 0u) {
        var s = 0.0;
        for (var c = l.x; c < p.cols; c = c + 64u) { s = s + x[off + c]; }
        mean = reduce_sum(s, l.x) / n;
    }
    var q = 0.0;
    for (var c = l.x; c < p.cols; c = c + 64u) { let d = x[off + c] - mean; q = q + d * d; }
    let inv = 1.0 / sqrt(reduce_sum(q, l.x) / n + p.eps);
    for (var c = l.x; c < p.cols; c = c + 64u) {
        var v = (x[off + c] - mean) * inv * gamma[c];
        if (p.kind == 0u) { v = v + beta[c]; }
        y[off + c] = v;
    }
}

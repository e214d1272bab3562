// Softmax of each row, one workgroup per row (reduce.wgsl comes first).
struct Params { rows: u32, cols: u32, pad0: u32, pad1: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>) {
    let r = wg.y * nw.x + wg.x;
    if (r >= p.rows) { return; }
    let off = r * p.cols;
    var m = -3.4e38;
    for (var c = l.x; c < p.cols; c = c + 64u) { m = max(m, x[off + c]); }
    let top = reduce_max(m, l.x);
    var sum = 0.0;
    for (var c = l.x; c < p.cols; c = c + 64u) { sum = sum + exp(x[off + c] - top); }
    let total = reduce_sum(sum, l.x);
    for (var c = l.x; c < p.cols; c = c + 64u) { y[off + c] = exp(x[off + c] - top) / total; }
}

// Attention over packed sequences: one workgroup per (query row, head).
// A row's sequence starts at starts[row] and has lens[row] rows; causal
// attention sees keys up to the row itself. Keys per sequence at most 1024
// (longer ones run on the host). reduce.wgsl comes first.
struct Params { heads: u32, kv_heads: u32, dim: u32, rows: u32, causal: u32, scale: f32, pad0: u32, pad1: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read> starts: array<u32>;
@group(0) @binding(5) var<storage, read> lens: array<u32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;

var<workgroup> scores: array<f32, 1024>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>) {
    let i = wg.y * nw.x + wg.x;
    let h = wg.z;
    if (i >= p.rows) { return; }
    let start = starts[i];
    var keys = lens[i];
    if (p.causal == 1u) { keys = i - start + 1u; }
    let kvh = h / (p.heads / p.kv_heads);
    let qoff = i * p.heads * p.dim + h * p.dim;
    let kvw = p.kv_heads * p.dim;
    for (var j = l.x; j < keys; j = j + 64u) {
        let koff = (start + j) * kvw + kvh * p.dim;
        var s = 0.0;
        for (var d = 0u; d < p.dim; d = d + 1u) { s = s + q[qoff + d] * k[koff + d]; }
        scores[j] = s * p.scale;
    }
    workgroupBarrier();
    var m = -3.4e38;
    for (var j = l.x; j < keys; j = j + 64u) { m = max(m, scores[j]); }
    let top = reduce_max(m, l.x);
    var sum = 0.0;
    for (var j = l.x; j < keys; j = j + 64u) {
        let e = exp(scores[j] - top);
        scores[j] = e;
        sum = sum + e;
    }
    let total = reduce_sum(sum, l.x);
    for (var d = l.x; d < p.dim; d = d + 64u) {
        var acc = 0.0;
        for (var j = 0u; j < keys; j = j + 1u) { acc = acc + scores[j] * v[(start + j) * kvw + kvh * p.dim + d]; }
        out[qoff + d] = acc / total;
    }
}

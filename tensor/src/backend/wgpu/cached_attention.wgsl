// Attention of query rows over a key/value cache: one workgroup of 64 per
// (row, head). Row r sees keys[r] keys, at the slots slots[offsets[r]..];
// keys go in chunks of 64 with a running (online) softmax, so any number
// of them fits. Heads of up to 256 values. reduce.wgsl comes first.
struct Params { heads: u32, kv_heads: u32, dim: u32, rows: u32, scale: f32, pad0: u32, pad1: u32, pad2: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read> offsets: array<u32>;
@group(0) @binding(5) var<storage, read> keys: array<u32>;
@group(0) @binding(6) var<storage, read> slots: array<u32>;
@group(0) @binding(7) var<storage, read_write> out: array<f32>;

var<workgroup> weights: array<f32, 64>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>) {
    let r = wg.y * nw.x + wg.x;
    let h = wg.z;
    if (r >= p.rows) { return; }
    let t = l.x;
    let kvh = h / (p.heads / p.kv_heads);
    let kvw = p.kv_heads * p.dim;
    let qoff = r * p.heads * p.dim + h * p.dim;
    let n = keys[r];
    let first = offsets[r];
    var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    var m = -3.4e38;
    var total = 0.0;
    for (var base = 0u; base < n; base = base + 64u) {
        let j = base + t;
        var s = -3.4e38;
        if (j < n) {
            let koff = slots[first + j] * kvw + kvh * p.dim;
            s = 0.0;
            for (var d = 0u; d < p.dim; d = d + 1u) { s = s + q[qoff + d] * k[koff + d]; }
            s = s * p.scale;
        }
        let top = max(m, reduce_max(s, t));
        var e = 0.0;
        if (j < n) { e = exp(s - top); }
        weights[t] = e;
        let correction = exp(m - top);
        total = total * correction + reduce_sum(e, t);
        m = top;
        let chunk = min(64u, n - base);
        for (var x = 0u; x < 4u; x = x + 1u) {
            let d = t + x * 64u;
            if (d < p.dim) {
                var a = acc[x] * correction;
                for (var jj = 0u; jj < chunk; jj = jj + 1u) {
                    a = a + weights[jj] * v[slots[first + base + jj] * kvw + kvh * p.dim + d];
                }
                acc[x] = a;
            }
        }
        workgroupBarrier();
    }
    for (var x = 0u; x < 4u; x = x + 1u) {
        let d = t + x * 64u;
        if (d < p.dim) { out[qoff + d] = acc[x] / total; }
    }
}

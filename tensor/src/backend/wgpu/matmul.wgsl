// c[batch, m, n] = alpha * a[batch, m, k] . b (+ bias[n]), tiled 16x16:
// b is [1 or batch, k, n], or [1 or batch, n, k] when transposed.
struct Params { m: u32, n: u32, k: u32, b_batched: u32, transpose_b: u32, has_bias: u32, alpha: f32, pad: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> c: array<f32>;

const T: u32 = 16u;
var<workgroup> ta: array<array<f32, 16>, 16>;
var<workgroup> tb: array<array<f32, 16>, 16>;

@compute @workgroup_size(16, 16, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>) {
    let row = wg.y * T + l.y;
    let col = wg.x * T + l.x;
    let a_off = wg.z * p.m * p.k;
    var b_off = 0u;
    if (p.b_batched == 1u) { b_off = wg.z * p.k * p.n; }
    var acc = 0.0;
    let tiles = (p.k + T - 1u) / T;
    for (var t = 0u; t < tiles; t = t + 1u) {
        let ka = t * T + l.x;
        var av = 0.0;
        if (row < p.m && ka < p.k) { av = a[a_off + row * p.k + ka]; }
        ta[l.y][l.x] = av;
        let kb = t * T + l.y;
        var bv = 0.0;
        if (col < p.n && kb < p.k) {
            if (p.transpose_b == 1u) { bv = b[b_off + col * p.k + kb]; } else { bv = b[b_off + kb * p.n + col]; }
        }
        tb[l.y][l.x] = bv;
        workgroupBarrier();
        for (var i = 0u; i < T; i = i + 1u) { acc = acc + ta[l.y][i] * tb[i][l.x]; }
        workgroupBarrier();
    }
    if (row < p.m && col < p.n) {
        var v = p.alpha * acc;
        if (p.has_bias == 1u) { v = v + bias[col]; }
        c[wg.z * p.m * p.n + row * p.n + col] = v;
    }
}

// Elementwise kernels over n values, 256 per workgroup (2-D grids past
// 65535 workgroups): `unary` applies an activation, `binary` adds or
// multiplies by an array of the same size or one row broadcast over rows.
struct Params { n: u32, op: u32, cols: u32, broadcast: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

fn index(wg: vec3<u32>, nw: vec3<u32>, l: vec3<u32>) -> u32 { return (wg.y * nw.x + wg.x) * 256u + l.x; }

// erf by Abramowitz & Stegun 7.1.26, as on the CPU.
fn erf(x: f32) -> f32 {
    let a = abs(x);
    let t = 1.0 / (1.0 + 0.3275911 * a);
    let poly = t * (0.2548296 + t * (-0.28449674 + t * (1.4214137 + t * (-1.453152 + t * 1.0614054))));
    return sign(x) * (1.0 - poly * exp(-a * a));
}

// Ops: 0 gelu, 1 gelu (tanh), 2 silu, 3 relu, 4 sigmoid, 5 tanh, 6 erf.
fn activate(v: f32, op: u32) -> f32 {
    switch op {
        case 0u: { return 0.5 * v * (1.0 + erf(v * 0.70710678)); }
        case 1u: { return 0.5 * v * (1.0 + tanh(0.7978846 * (v + 0.044715 * v * v * v))); }
        case 2u: { return v / (1.0 + exp(-v)); }
        case 3u: { return max(v, 0.0); }
        case 4u: { return 1.0 / (1.0 + exp(-v)); }
        case 5u: { return tanh(clamp(v, -15.0, 15.0)); }
        default: { return erf(v); }
    }
}

@compute @workgroup_size(256, 1, 1)
fn unary(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>) {
    let i = index(wg, nw, l);
    if (i >= p.n) { return; }
    y[i] = activate(a[i], p.op) + 0.0 * b[0];
}

// Ops: 0 add, 1 multiply.
@compute @workgroup_size(256, 1, 1)
fn binary(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>) {
    let i = index(wg, nw, l);
    if (i >= p.n) { return; }
    var j = i;
    if (p.broadcast == 1u) { j = i % p.cols; }
    if (p.op == 0u) { y[i] = a[i] + b[j]; } else { y[i] = a[i] * b[j]; }
}

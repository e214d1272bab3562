// Rows of `src` to rows `slots[i]` of `dst` (a key/value cache write).
struct Params { n: u32, width: u32, pad0: u32, pad1: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read> slots: array<u32>;
@group(0) @binding(3) var<storage, read_write> dst: array<f32>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>) {
    let i = (wg.y * nw.x + wg.x) * 256u + l.x;
    if (i >= p.n) { return; }
    dst[slots[i / p.width] * p.width + i % p.width] = src[i];
}

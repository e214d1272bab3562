// Embedding rows: y[i, c] = w[ids[i], c], the table f32 or quantised
// (quant.wgsl comes first).
struct Params { n: u32, cols: u32, format: u32, row_bytes: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>) {
    let i = (wg.y * nw.x + wg.x) * 256u + l.x;
    if (i >= p.n) { return; }
    y[i] = value_at(p.format, ids[i / p.cols] * p.row_bytes, i % p.cols);
}

// Reductions over a workgroup of 64 invocations, prepended to the kernels
// that use them (norm, softmax, attention); called from uniform control
// flow only, as they hold barriers. Every invocation gets the result.

var<workgroup> red: array<f32, 64>;

fn reduce_sum(v: f32, t: u32) -> f32 {
    red[t] = v;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s = s >> 1u) {
        if (t < s) { red[t] = red[t] + red[t + s]; }
        workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier();
    return total;
}

fn reduce_max(v: f32, t: u32) -> f32 {
    red[t] = v;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s = s >> 1u) {
        if (t < s) { red[t] = max(red[t], red[t + s]); }
        workgroupBarrier();
    }
    let top = red[0];
    workgroupBarrier();
    return top;
}

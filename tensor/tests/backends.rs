//! Every backend against plain reference arithmetic, operation by
//! operation: the CPU always, and each GPU backend this machine has
//! (lavapipe's Vulkan device in CI, see `common::backends`). The
//! references here are naive loops written for clarity, not the CPU
//! backend's kernels, so the CPU backend is checked too.

mod common;

use gpuwasm_tensor::backend::{Activation, AttentionSpec, Backend, CachedAttention, DeviceKind, CachedSeq, Epilogue, HostData, HostWeight, RopeSpec, WeightFormat};
use gpuwasm_tensor::quant;

/// A reproducible stream of numbers (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [-1, 1).
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn close(what: &str, backend: &dyn Backend, got: &[f32], want: &[f32], tolerance: f32) {
    assert_eq!(got.len(), want.len(), "{what} on {}: {} values, want {}", backend.info().name, got.len(), want.len());
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tolerance * scale,
            "{what} on {} ({}, {}): value {i} is {g}, want {w} (tolerance {tolerance} of {scale})",
            backend.info().name,
            backend.info().kind.name(),
            backend.info().driver
        );
    }
}

/// `x [rows, cols] · wᵀ + bias`.
fn reference_linear(x: &[f32], rows: usize, cols: usize, w: &[f32], out: usize, bias: Option<&[f32]>) -> Vec<f32> {
    let mut y = vec![0.0; rows * out];
    for r in 0..rows {
        for o in 0..out {
            let dot: f64 = (0..cols).map(|c| x[r * cols + c] as f64 * w[o * cols + c] as f64).sum();
            y[r * out + o] = dot as f32 + bias.map_or(0.0, |b| b[o]);
        }
    }
    y
}

/// Random encoded rows of `format` whose scales are small, finite halves.
fn encoded_rows(rng: &mut Rng, format: WeightFormat, rows: usize, cols: usize) -> Vec<u8> {
    let (values, size) = format.block();
    let mut bytes = rng.bytes(rows * cols / values * size);
    // Where each format keeps its f16 scales (and minimums).
    let halves: &[usize] = match format {
        WeightFormat::Q4_0 | WeightFormat::Q8_0 => &[0],
        WeightFormat::Q4_1 | WeightFormat::Q4K | WeightFormat::Q5K => &[0, 2],
        WeightFormat::Q6K => &[208],
        _ => &[],
    };
    for block in bytes.chunks_exact_mut(size) {
        for &at in halves {
            // Magnitude 2^-7 .. 2^-6, random sign.
            let h = 0x2000u16 | (u16::from_le_bytes([block[at], block[at + 1]]) & 0x83ff);
            block[at..at + 2].copy_from_slice(&h.to_le_bytes());
        }
    }
    bytes
}

fn half_bits(v: f32) -> u16 {
    // Values of the tests are exact in f16 or near enough: round by truncation.
    let bits = v.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32 - 127 + 15;
    if exp <= 0 {
        return sign;
    }
    sign | ((exp as u16) << 10) | ((bits >> 13) & 0x3ff) as u16
}

#[test]
fn linear_layers_in_every_weight_format() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (rows, cols, out) = (5, 512, 33);
    let x = rng.vec(rows * cols);
    let bias = rng.vec(out);
    for backend in common::backends() {
        let b = backend.as_ref();
        for format in WeightFormat::ALL {
            let data = match format {
                WeightFormat::F32 => HostData::F32(rng.vec(out * cols)),
                WeightFormat::F16 => HostData::Encoded(format, rng.vec(out * cols).iter().flat_map(|v| half_bits(*v).to_le_bytes()).collect()),
                WeightFormat::BF16 => {
                    HostData::Encoded(format, rng.vec(out * cols).iter().flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes()).collect())
                }
                _ => HostData::Encoded(format, encoded_rows(&mut rng, format, out, cols)),
            };
            let values = match &data {
                HostData::F32(v) => v.clone(),
                HostData::Encoded(format, bytes) => quant::decode(*format, bytes),
            };
            let weight = b.weight(HostWeight { rows: out, cols, data }).unwrap();
            let bias_w = b.weight(HostWeight::vector(bias.clone())).unwrap();
            let xa = b.upload(vec![rows, cols], x.clone()).unwrap();
            // The CPU multiplies quantised weights as llama.cpp does, with
            // the activations quantised to 8 bits per block of 32: each
            // product then carries up to 1/254 of relative error per
            // activation, which random rows of 512 sum to a few parts in a
            // thousand. Float weights and the GPUs' kernels use f32
            // activations and stay within 1e-4.
            let int8_activations = b.info().kind == DeviceKind::Cpu && !matches!(format, WeightFormat::F32 | WeightFormat::F16 | WeightFormat::BF16);
            let tolerance = if int8_activations { 1e-2 } else { 1e-4 };
            for with_bias in [false, true] {
                let y = b.linear(&xa, &weight, with_bias.then_some(&bias_w)).unwrap();
                assert_eq!(y.shape(), [rows, out]);
                let want = reference_linear(&x, rows, cols, &values, out, with_bias.then_some(&bias[..]));
                close(&format!("linear of {format:?} (bias {with_bias})"), b, &b.download(&y).unwrap(), &want, tolerance);
            }
            // Epilogues, fused or not: a residual added, an activation applied.
            let want = reference_linear(&x, rows, cols, &values, out, Some(&bias));
            let residual = rng.vec(rows * out);
            let ra = b.upload(vec![rows, out], residual.clone()).unwrap();
            let y = b.linear_then(&xa, &weight, Some(&bias_w), Epilogue::Residual(&ra)).unwrap();
            let plus: Vec<f32> = want.iter().zip(&residual).map(|(w, r)| w + r).collect();
            close(&format!("linear of {format:?} plus a residual"), b, &b.download(&y).unwrap(), &plus, tolerance);
            let y = b.linear_then(&xa, &weight, Some(&bias_w), Epilogue::Activation(Activation::Relu)).unwrap();
            let relu: Vec<f32> = want.iter().map(|w| w.max(0.0)).collect();
            close(&format!("linear of {format:?} then ReLU"), b, &b.download(&y).unwrap(), &relu, tolerance);
            let wrong = b.upload(vec![rows, out + 1], rng.vec(rows * (out + 1))).unwrap();
            assert!(b.linear_then(&xa, &weight, None, Epilogue::Residual(&wrong)).is_err(), "{}: a residual of another shape", b.info().name);
        }
        // Shapes that disagree are refused, not computed.
        let w = b.weight(HostWeight::f32(3, 7, rng.vec(21))).unwrap();
        let xa = b.upload(vec![2, 8], rng.vec(16)).unwrap();
        assert!(b.linear(&xa, &w, None).is_err(), "{}: a 2x8 input by a 3x7 weight", b.info().name);
    }
}

#[test]
fn embeddings_from_float_and_quantised_tables() {
    let mut rng = Rng(7);
    let (vocab, cols) = (50, 64);
    for backend in common::backends() {
        let b = backend.as_ref();
        let (vocab, cols) = (vocab, cols * 4); // whole K-quant blocks
        for format in WeightFormat::ALL {
            let (data, values) = match format {
                WeightFormat::F32 => {
                    let v = rng.vec(vocab * cols);
                    (HostData::F32(v.clone()), v)
                }
                WeightFormat::F16 | WeightFormat::BF16 => {
                    let v = rng.vec(vocab * cols);
                    let bytes: Vec<u8> = v
                        .iter()
                        .flat_map(|x| if format == WeightFormat::F16 { half_bits(*x) } else { (x.to_bits() >> 16) as u16 }.to_le_bytes())
                        .collect();
                    let decoded = quant::decode(format, &bytes);
                    (HostData::Encoded(format, bytes), decoded)
                }
                _ => {
                    let bytes = encoded_rows(&mut rng, format, vocab, cols);
                    let v = quant::decode(format, &bytes);
                    (HostData::Encoded(format, bytes), v)
                }
            };
            let table = b.weight(HostWeight { rows: vocab, cols, data }).unwrap();
            let ids = [3u32, 0, 49, 3, 17];
            let got = b.download(&b.embedding(&table, &ids).unwrap()).unwrap();
            let want: Vec<f32> = ids.iter().flat_map(|&i| values[i as usize * cols..][..cols].to_vec()).collect();
            close(&format!("embedding of {format:?}"), b, &got, &want, 0.0);
            let err = b.embedding(&table, &[50]).err().expect("an id past the vocabulary");
            assert!(err.to_string().contains("outside the vocabulary"), "{err}");
        }
    }
}

#[test]
fn matrix_products() {
    let mut rng = Rng(11);
    let (batch, m, k, n) = (3, 17, 40, 19);
    for backend in common::backends() {
        let b = backend.as_ref();
        let a = rng.vec(batch * m * k);
        for (transpose, shared) in [(false, false), (true, false), (false, true), (true, true)] {
            let bb = if shared { 1 } else { batch };
            let bv = rng.vec(bb * k * n);
            let bshape = if transpose { vec![bb, n, k] } else { vec![bb, k, n] };
            let got = b.matmul(&b.upload(vec![batch, m, k], a.clone()).unwrap(), &b.upload(bshape, bv.clone()).unwrap(), transpose, 0.5).unwrap();
            assert_eq!(got.shape(), [batch, m, n]);
            let mut want = vec![0.0; batch * m * n];
            for z in 0..batch {
                let zb = if shared { 0 } else { z };
                for i in 0..m {
                    for j in 0..n {
                        let dot: f32 = (0..k)
                            .map(|t| a[z * m * k + i * k + t] * if transpose { bv[zb * n * k + j * k + t] } else { bv[zb * k * n + t * n + j] })
                            .sum();
                        want[z * m * n + i * n + j] = 0.5 * dot;
                    }
                }
            }
            close(&format!("matmul (transposed {transpose}, shared {shared})"), b, &b.download(&got).unwrap(), &want, 1e-5);
        }
    }
}

#[test]
fn elementwise_norms_activations_and_softmax() {
    let mut rng = Rng(23);
    let (rows, cols) = (6, 300);
    let x: Vec<f32> = rng.vec(rows * cols).iter().map(|v| v * 4.0).collect();
    let y = rng.vec(rows * cols);
    let row = rng.vec(cols);
    let gamma = rng.vec(cols);
    let beta = rng.vec(cols);
    for backend in common::backends() {
        let b = backend.as_ref();
        let xa = b.upload(vec![rows, cols], x.clone()).unwrap();
        let ya = b.upload(vec![rows, cols], y.clone()).unwrap();
        let ra = b.upload(vec![cols], row.clone()).unwrap();
        let rw = b.weight(HostWeight::vector(row.clone())).unwrap();
        let get = |a| b.download(&a).unwrap();
        let each = |f: &dyn Fn(usize) -> f32| (0..rows * cols).map(f).collect::<Vec<f32>>();
        close("add", b, &get(b.add(&xa, &ya).unwrap()), &each(&|i| x[i] + y[i]), 1e-6);
        close("mul", b, &get(b.mul(&xa, &ya).unwrap()), &each(&|i| x[i] * y[i]), 1e-6);
        close("add of a row", b, &get(b.add(&xa, &ra).unwrap()), &each(&|i| x[i] + row[i % cols]), 1e-6);
        close("mul by a row", b, &get(b.mul(&xa, &ra).unwrap()), &each(&|i| x[i] * row[i % cols]), 1e-6);
        close("add_row", b, &get(b.add_row(&xa, &rw).unwrap()), &each(&|i| x[i] + row[i % cols]), 1e-6);
        assert!(b.add(&xa, &b.upload(vec![7], rng.vec(7)).unwrap()).is_err(), "mismatched elementwise shapes");

        let g = b.weight(HostWeight::vector(gamma.clone())).unwrap();
        let be = b.weight(HostWeight::vector(beta.clone())).unwrap();
        let (mut ln, mut rms) = (Vec::new(), Vec::new());
        for r in x.chunks(cols) {
            let mean = r.iter().map(|v| *v as f64).sum::<f64>() / cols as f64;
            let var = r.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / cols as f64;
            let ms = r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / cols as f64;
            for c in 0..cols {
                ln.push(((r[c] as f64 - mean) / (var + 1e-5).sqrt()) as f32 * gamma[c] + beta[c]);
                rms.push((r[c] as f64 / (ms + 1e-6).sqrt()) as f32 * gamma[c]);
            }
        }
        close("layer norm", b, &get(b.layer_norm(&xa, &g, &be, 1e-5).unwrap()), &ln, 1e-5);
        close("rms norm", b, &get(b.rms_norm(&xa, &g, 1e-6).unwrap()), &rms, 1e-5);
        // Scales in half precision (as models in f16 give them): rounded, else the same.
        let g16: Vec<u8> = gamma.iter().flat_map(|v| half_bits(*v).to_le_bytes()).collect();
        let rounded = quant::decode(WeightFormat::F16, &g16);
        let g16 = b.weight(HostWeight { rows: 1, cols, data: HostData::Encoded(WeightFormat::F16, g16) }).unwrap();
        let rms16: Vec<f32> = rms.iter().enumerate().map(|(i, v)| v / gamma[i % cols] * rounded[i % cols]).collect();
        close("rms norm by f16 scales", b, &get(b.rms_norm(&xa, &g16, 1e-6).unwrap()), &rms16, 1e-5);

        let erf = |v: f64| {
            // A series accurate far past f32 for |v| ≤ 4, then its limit.
            if v.abs() > 4.0 {
                return v.signum();
            }
            let (mut sum, mut term, mut k) = (v, v, 0.0);
            while term.abs() > 1e-17 {
                k += 1.0;
                term *= -v * v / k;
                sum += term / (2.0 * k + 1.0);
            }
            2.0 / std::f64::consts::PI.sqrt() * sum
        };
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        let cases: [(Activation, &dyn Fn(f64) -> f64); 7] = [
            (Activation::Gelu, &|v| 0.5 * v * (1.0 + erf(v / 2f64.sqrt()))),
            (Activation::GeluTanh, &|v| 0.5 * v * (1.0 + (0.7978845608 * (v + 0.044715 * v * v * v)).tanh())),
            (Activation::Silu, &|v| v * sig(v)),
            (Activation::Relu, &|v| v.max(0.0)),
            (Activation::Sigmoid, &sig),
            (Activation::Tanh, &|v| v.tanh()),
            (Activation::Erf, &erf),
        ];
        for (f, reference) in cases {
            let want: Vec<f32> = x.iter().map(|v| reference(*v as f64) as f32).collect();
            close(&format!("{f:?}"), b, &get(b.activation(&xa, f).unwrap()), &want, 2e-6);
        }

        let mut soft = Vec::new();
        for r in x.chunks(cols) {
            let top = r.iter().fold(f32::MIN, |m, v| m.max(*v)) as f64;
            let total: f64 = r.iter().map(|v| (*v as f64 - top).exp()).sum();
            soft.extend(r.iter().map(|v| ((*v as f64 - top).exp() / total) as f32));
        }
        close("softmax", b, &get(b.softmax(&xa).unwrap()), &soft, 1e-6);
    }
}

/// Attention of packed sequences, one head at a time, in f64.
fn reference_attention(q: &[f32], k: &[f32], v: &[f32], spec: &AttentionSpec) -> Vec<f32> {
    let (qw, kw) = (spec.heads * spec.dim, spec.kv_heads * spec.dim);
    let group = spec.heads / spec.kv_heads;
    let tokens: usize = spec.lens.iter().sum();
    let mut out = vec![0.0; tokens * qw];
    let mut start = 0;
    for &len in &spec.lens {
        for h in 0..spec.heads {
            let kv = h / group;
            for i in 0..len {
                let keys = if spec.causal { i + 1 } else { len };
                let scores: Vec<f64> = (0..keys)
                    .map(|j| {
                        (0..spec.dim).map(|d| q[(start + i) * qw + h * spec.dim + d] as f64 * k[(start + j) * kw + kv * spec.dim + d] as f64).sum::<f64>()
                            * spec.scale as f64
                    })
                    .collect();
                let top = scores.iter().cloned().fold(f64::MIN, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - top).exp()).collect();
                let total: f64 = weights.iter().sum();
                for d in 0..spec.dim {
                    let acc: f64 = (0..keys).map(|j| weights[j] * v[(start + j) * kw + kv * spec.dim + d] as f64).sum();
                    out[(start + i) * qw + h * spec.dim + d] = (acc / total) as f32;
                }
            }
        }
        start += len;
    }
    out
}

#[test]
fn attention_of_packed_sequences() {
    let mut rng = Rng(31);
    // Two short sequences and, past the wgpu kernel's 1024 keys, a long
    // one; heads of 16 and of 128 values (more than one value per thread).
    for (lens, dim) in [(vec![5, 1, 9], 16), (vec![3, 6], 128), (vec![1100], 16)] {
        let tokens: usize = lens.iter().sum();
        let (heads, kv_heads) = (4, 2);
        let q = rng.vec(tokens * heads * dim);
        let k = rng.vec(tokens * kv_heads * dim);
        let v = rng.vec(tokens * kv_heads * dim);
        for backend in common::backends() {
            let b = backend.as_ref();
            for causal in [false, true] {
                let spec = AttentionSpec { lens: lens.clone(), heads, kv_heads, dim, causal, scale: 0.25 };
                let got = b
                    .attention(
                        &b.upload(vec![tokens, heads * dim], q.clone()).unwrap(),
                        &b.upload(vec![tokens, kv_heads * dim], k.clone()).unwrap(),
                        &b.upload(vec![tokens, kv_heads * dim], v.clone()).unwrap(),
                        &spec,
                    )
                    .unwrap();
                close(&format!("attention of {lens:?} (causal {causal})"), b, &b.download(&got).unwrap(), &reference_attention(&q, &k, &v, &spec), 1e-5);
            }
            let spec = AttentionSpec { lens: vec![tokens + 1], heads, kv_heads, dim, causal: false, scale: 1.0 };
            let qa = b.upload(vec![tokens, heads * dim], q.clone()).unwrap();
            let ka = b.upload(vec![tokens, kv_heads * dim], k.clone()).unwrap();
            assert!(b.attention(&qa, &ka, &ka, &spec).is_err(), "lengths that do not add up to the rows");
        }
    }
}

#[test]
fn rotary_embeddings() {
    let mut rng = Rng(43);
    let (rows, heads, dim) = (4, 3, 16);
    let x = rng.vec(rows * heads * dim);
    let positions = [0u32, 1, 7, 300];
    for backend in common::backends() {
        let b = backend.as_ref();
        for (rotated, interleaved) in [(16, false), (16, true), (8, false), (8, true)] {
            let spec = RopeSpec { heads, dim, rotated, theta: 10000.0, interleaved };
            let mut want = x.clone();
            for (r, &pos) in positions.iter().enumerate() {
                for h in 0..heads {
                    let head = &mut want[(r * heads + h) * dim..][..dim];
                    for i in 0..rotated / 2 {
                        let angle = pos as f64 * 10000f64.powf(-2.0 * i as f64 / rotated as f64);
                        let (a, c) = if interleaved { (2 * i, 2 * i + 1) } else { (i, i + rotated / 2) };
                        let (x0, x1) = (head[a] as f64, head[c] as f64);
                        head[a] = (x0 * angle.cos() - x1 * angle.sin()) as f32;
                        head[c] = (x0 * angle.sin() + x1 * angle.cos()) as f32;
                    }
                }
            }
            let got = b.rope(&b.upload(vec![rows, heads * dim], x.clone()).unwrap(), &positions, &spec).unwrap();
            close(&format!("rope of {rotated} (interleaved {interleaved})"), b, &b.download(&got).unwrap(), &want, 1e-4);
        }
    }
}

#[test]
fn rows_are_selected() {
    let mut rng = Rng(53);
    let x = rng.vec(6 * 10);
    for backend in common::backends() {
        let b = backend.as_ref();
        let xa = b.upload(vec![6, 10], x.clone()).unwrap();
        let got = b.download(&b.select_rows(&xa, &[5, 0, 5]).unwrap()).unwrap();
        let want: Vec<f32> = [5, 0, 5].iter().flat_map(|&r| x[r * 10..][..10].to_vec()).collect();
        close("select_rows", b, &got, &want, 0.0);
        assert!(b.select_rows(&xa, &[6]).is_err(), "a row past the end");
    }
}

/// Two sequences in a paged cache, their slots scattered: one prefilling
/// three new positions after five cached ones, one decoding its 71st
/// position (more keys than one chunk of the GPU kernels).
#[test]
fn attention_over_a_paged_cache() {
    for dim in [16, 128] {
        paged_attention(dim);
    }
}

fn paged_attention(dim: usize) {
    let mut rng = Rng(61);
    let (heads, kv_heads, cache_slots) = (4, 2, 200);
    let width = kv_heads * dim;
    let lens = [8usize, 71];
    let queries = [3usize, 1];
    // Distinct slots, scattered over the cache.
    let mut free: Vec<u32> = (0..cache_slots as u32).collect();
    for i in (1..free.len()).rev() {
        free.swap(i, rng.next() as usize % (i + 1));
    }
    let slots: Vec<Vec<u32>> = lens.iter().map(|&n| free.drain(..n).collect()).collect();
    let k: Vec<Vec<f32>> = lens.iter().map(|&n| rng.vec(n * width)).collect();
    let v: Vec<Vec<f32>> = lens.iter().map(|&n| rng.vec(n * width)).collect();
    let q: Vec<f32> = rng.vec(queries.iter().sum::<usize>() * heads * dim);
    let spec = CachedAttention {
        heads,
        kv_heads,
        dim,
        scale: 0.25,
        seqs: (0..2).map(|s| CachedSeq { queries: queries[s], slots: slots[s].clone() }).collect(),
    };
    // The reference: query i of a sequence at position p sees positions 0..=p.
    let mut want = Vec::new();
    for s in 0..2 {
        for i in 0..queries[s] {
            let row = queries[..s].iter().sum::<usize>() + i;
            let position = lens[s] - queries[s] + i;
            for h in 0..heads {
                let kv = h / (heads / kv_heads);
                let qr = &q[(row * heads + h) * dim..][..dim];
                let scores: Vec<f64> = (0..=position)
                    .map(|j| (0..dim).map(|d| qr[d] as f64 * k[s][j * width + kv * dim + d] as f64).sum::<f64>() * 0.25)
                    .collect();
                let top = scores.iter().cloned().fold(f64::MIN, f64::max);
                let total: f64 = scores.iter().map(|x| (x - top).exp()).sum();
                for d in 0..dim {
                    let acc: f64 = (0..=position).map(|j| (scores[j] - top).exp() * v[s][j * width + kv * dim + d] as f64).sum();
                    want.push((acc / total) as f32);
                }
            }
        }
    }
    for backend in common::backends() {
        let b = backend.as_ref();
        let mut cache = b.kv_cache(cache_slots, width).unwrap();
        for s in 0..2 {
            let (ka, va) = (b.upload(vec![lens[s], width], k[s].clone()).unwrap(), b.upload(vec![lens[s], width], v[s].clone()).unwrap());
            b.write_kv(&mut cache, &ka, &va, &slots[s]).unwrap();
        }
        let qa = b.upload(vec![4, heads * dim], q.clone()).unwrap();
        let got = b.download(&b.cached_attention(&qa, &cache, &spec).unwrap()).unwrap();
        close("attention over a paged cache", b, &got, &want, 1e-5);
        // A slot past the cache is refused.
        let bad = CachedAttention { seqs: vec![CachedSeq { queries: 1, slots: vec![cache_slots as u32] }], ..spec.clone() };
        assert!(b.cached_attention(&b.upload(vec![1, heads * dim], q[..heads * dim].to_vec()).unwrap(), &cache, &bad).is_err());
    }
}

/// CPU passes, many at once, on a pool with more threads than cores, some
/// starting inside others' spinners: the workers that spin while a pass
/// runs must never stall one, and every pass computes what the product
/// alone computes.
#[test]
fn concurrent_cpu_passes_on_a_wide_pool_finish() {
    use gpuwasm_tensor::backend::{Pass, cpu::CpuBackend};
    use rayon::prelude::*;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(8).build().unwrap();
    let cpu = CpuBackend::new();
    let mut rng = Rng(7);
    let w = cpu.weight(HostWeight::f32(512, 512, rng.vec(512 * 512))).unwrap();
    let x = cpu.upload(vec![16, 512], rng.vec(16 * 512)).unwrap();
    let want = cpu.download(&cpu.linear(&x, &w, None).unwrap()).unwrap();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let passes: usize = pool.install(|| {
            (0..64)
                .into_par_iter()
                .map(|_| {
                    let budget = gpuwasm_tensor::Budget::unlimited();
                    let pass = Pass::new(&cpu, &budget);
                    let y = pass.run(|p| (0..8).map(|_| p.download(&p.linear(&x, &w, None).unwrap()).unwrap()).last().unwrap());
                    assert_eq!(y, want, "a pass's product differs from the same product alone");
                    1
                })
                .sum()
        });
        done.send(passes).unwrap();
    });
    let passes = finished.recv_timeout(std::time::Duration::from_secs(120)).expect("64 concurrent passes on an 8-thread pool finish within 2 minutes");
    assert_eq!(passes, 64);
}

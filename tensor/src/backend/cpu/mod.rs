//! The CPU backend and its kernels: products with float weights packed in
//! panels when they load (`panels`: AVX-512, AVX2 or portable kernels,
//! chosen at run time), products with quantised weights in their blocks
//! (`qdot`), products of two activations (matrixmultiply's sgemm, one
//! thread per product: parallelism comes from rayon's pool, the one pool
//! of the process), the row operations transformers and small classifiers
//! need, attention over packed sequences one query row at a time, and
//! rotary embeddings.

use super::{
    Activation, Array, AttentionSpec, Backend, CachedAttention, DeviceInfo, DeviceKind, Epilogue, HostData, HostWeight, KvCache,
    MatmulDims, RopeSpec, Weight, WeightFormat, check_attention, check_cached_attention, check_elementwise, check_epilogue, check_linear, check_matmul,
    check_rope, check_rows, check_values, check_write_kv,
};
mod panels;
mod qdot;

pub use panels::Isa;
use panels::Panels;

use crate::error::{Error, invalid_input};
use crate::quant;
use rayon::prelude::*;

/// A matrix view: `data[offset + i * row_stride + j * col_stride]` for
/// `i < rows`, `j < cols`.
#[derive(Clone, Copy, Debug)]
pub struct View {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// First element.
    pub offset: usize,
    /// Distance between rows.
    pub row_stride: usize,
    /// Distance between columns.
    pub col_stride: usize,
}

impl View {
    /// A dense row-major `rows x cols` matrix at `offset`.
    pub fn dense(rows: usize, cols: usize, offset: usize) -> View {
        View { rows, cols, offset, row_stride: cols, col_stride: 1 }
    }

    /// The same elements seen transposed.
    pub fn t(self) -> View {
        View { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }

    /// Whether every element lies inside a buffer of `len`.
    fn fits(&self, len: usize) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last = (self.rows - 1)
            .checked_mul(self.row_stride)
            .and_then(|r| r.checked_add((self.cols - 1).checked_mul(self.col_stride)?))
            .and_then(|x| x.checked_add(self.offset));
        last.is_some_and(|last| last < len)
    }
}

/// `c = alpha * a·b + beta * c` on views; panics when a view leaves its
/// buffer or the dimensions disagree (callers check shapes first).
pub fn gemm(alpha: f32, a: &[f32], av: View, b: &[f32], bv: View, beta: f32, c: &mut [f32], cv: View) {
    assert!(av.cols == bv.rows && av.rows == cv.rows && bv.cols == cv.cols, "gemm dimensions disagree");
    assert!(av.fits(a.len()) && bv.fits(b.len()) && cv.fits(c.len()), "gemm view out of bounds");
    if cv.rows == 0 || cv.cols == 0 {
        return;
    }
    // SAFETY: every element the views address is inside its slice (checked
    // above), `c` is borrowed mutably and the strides fit in isize because
    // the addressed offsets fit in the slices.
    unsafe {
        matrixmultiply::sgemm(
            av.rows,
            av.cols,
            bv.cols,
            alpha,
            a.as_ptr().add(av.offset),
            av.row_stride as isize,
            av.col_stride as isize,
            b.as_ptr().add(bv.offset),
            bv.row_stride as isize,
            bv.col_stride as isize,
            beta,
            c.as_mut_ptr().add(cv.offset),
            cv.row_stride as isize,
            cv.col_stride as isize,
        );
    }
}

/// `x[rows, inp] · wᵀ + bias` for a weight stored `[out, inp]` (the
/// PyTorch `Linear` layout); returns `[rows, out]`.
pub fn linear(x: &[f32], rows: usize, inp: usize, w: &[f32], out: usize, bias: Option<&[f32]>) -> Vec<f32> {
    debug_assert!(x.len() == rows * inp && w.len() == out * inp);
    let mut y = vec![0.0; rows * out];
    if let Some(bias) = bias {
        for row in y.chunks_exact_mut(out) {
            row.copy_from_slice(bias);
        }
    }
    let beta = if bias.is_some() { 1.0 } else { 0.0 };
    gemm(1.0, x, View::dense(rows, inp, 0), w, View::dense(out, inp, 0).t(), beta, &mut y, View::dense(rows, out, 0));
    y
}

/// `Σ f(v)` over `v`, in eight independent lanes so the compiler
/// vectorises it.
#[inline(always)]
fn sum_by(v: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|x| f(*x)).sum();
    for c in chunks {
        lanes.iter_mut().zip(c).for_each(|(l, x)| *l += f(*x));
    }
    lanes.iter().sum::<f32>() + tail
}

/// Layer normalisation of each row of `x` (width `gamma.len()`), in place.
pub fn layer_norm(x: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let width = gamma.len();
    if width == 0 {
        return;
    }
    fast(
        #[inline(always)]
        || {
            for row in x.chunks_exact_mut(width) {
                let mean = sum_by(row, |v| v) / width as f32;
                let var = sum_by(row, |v| (v - mean) * (v - mean)) / width as f32;
                let inv = 1.0 / (var + eps).sqrt();
                for ((v, g), b) in row.iter_mut().zip(gamma).zip(beta) {
                    *v = (*v - mean) * inv * g + b;
                }
            }
        },
    )
}

/// Runs `f` compiled for AVX2 and FMA where the CPU has them (the crate
/// itself targets the x86-64 baseline, whose vectors hold 4 floats): the
/// loops the compiler vectorises then take 8 floats a step and fuse their
/// multiply-adds. `f` is inlined into the AVX2 copy, with whatever it calls
/// that is `#[inline(always)]`; what it calls otherwise keeps the baseline.
#[inline(always)]
fn fast<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2_fma<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        // SAFETY: the CPU has AVX2 and FMA, checked just above.
        return unsafe { avx2_fma(f) };
    }
    f()
}

/// The erf GELU, in place: `x/2 * (1 + erf(x/sqrt 2))`, with erf from
/// Abramowitz & Stegun 7.1.26 (absolute error below 1e-6 in f32) and a
/// branch-free exp, so the loop vectorises.
pub fn gelu(x: &mut [f32]) {
    fast(
        #[inline(always)]
        || {
            for v in x {
                *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2));
            }
        },
    )
}

/// erf by Abramowitz & Stegun 7.1.26.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp(-a * a);
    y.copysign(x)
}

/// e^x without branches or library calls: 2^n by exponent bits times a
/// degree-6 polynomial on the remainder (relative error below 5e-6);
/// inputs are clamped to [-87, 88].
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // Round x / ln 2 to the nearest integer with the 1.5 * 2^23 trick.
    const SHIFT: f32 = 12_582_912.0;
    let n = (x * std::f32::consts::LOG2_E + SHIFT) - SHIFT;
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

/// Softmax of each row of width `width`, in place.
pub fn softmax_rows(x: &mut [f32], width: usize) {
    if width == 0 {
        return;
    }
    fast(
        #[inline(always)]
        || x.chunks_exact_mut(width).for_each(softmax),
    )
}

/// Softmax of one row, in place, with the branch-free [`exp`] so it vectorises.
#[inline(always)]
fn softmax(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    row.iter_mut().for_each(|v| *v = exp(*v - max));
    let inv = 1.0 / sum_by(row, |v| v);
    row.iter_mut().for_each(|v| *v *= inv);
}

/// RMS normalisation of each row of `x` (width `gamma.len()`), in place.
pub fn rms_norm(x: &mut [f32], gamma: &[f32], eps: f32) {
    let width = gamma.len();
    if width == 0 {
        return;
    }
    for row in x.chunks_exact_mut(width) {
        let mean_square = row.iter().map(|v| v * v).sum::<f32>() / width as f32;
        let inv = 1.0 / (mean_square + eps).sqrt();
        row.iter_mut().zip(gamma).for_each(|(v, g)| *v *= inv * g);
    }
}

/// `x σ(x)`, in place.
pub fn silu(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v /= 1.0 + exp(-*v));
}

/// `f` applied to every element of `x`, in place.
pub fn activate(x: &mut [f32], f: Activation) {
    match f {
        Activation::Gelu => gelu(x),
        Activation::Silu => silu(x),
        Activation::GeluTanh => x.iter_mut().for_each(|v| *v = 0.5 * *v * (1.0 + (0.797_884_6 * (*v + 0.044715 * *v * *v * *v)).tanh())),
        Activation::Relu => x.iter_mut().for_each(|v| *v = v.max(0.0)),
        Activation::Sigmoid => x.iter_mut().for_each(|v| *v = 1.0 / (1.0 + exp(-*v))),
        Activation::Tanh => x.iter_mut().for_each(|v| *v = v.tanh()),
        Activation::Erf => x.iter_mut().for_each(|v| *v = erf(*v)),
    }
}

/// Rotary position embedding of each row of `x` at `positions[row]`, in place.
pub fn rope(x: &mut [f32], positions: &[u32], spec: &RopeSpec) {
    let width = spec.heads * spec.dim;
    let half = spec.rotated / 2;
    let freqs: Vec<f32> = (0..half).map(|i| spec.theta.powf(-2.0 * i as f32 / spec.rotated as f32)).collect();
    for (row, &pos) in x.chunks_exact_mut(width).zip(positions) {
        for head in row.chunks_exact_mut(spec.dim) {
            for (i, f) in freqs.iter().enumerate() {
                let (sin, cos) = (pos as f32 * f).sin_cos();
                let (a, b) = if spec.interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos - x1 * sin;
                head[b] = x0 * sin + x1 * cos;
            }
        }
    }
}

/// Multiply-adds of attention worth one task of rayon's pool.
const ATTENTION_TASK: usize = 1 << 16;

/// `Σ a·b`, in eight independent lanes so the compiler vectorises it.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        lanes.iter_mut().zip(x.iter().zip(y)).for_each(|(l, (x, y))| *l += x * y);
    }
    lanes.iter().sum::<f32>() + tail
}

/// `out = Σⱼ scores[j] · vⱼ` for the values `v(j)`.
#[inline(always)]
fn weigh<'a>(scores: &[f32], v: impl Fn(usize) -> &'a [f32], out: &mut [f32]) {
    out.fill(0.0);
    for (j, w) in scores.iter().enumerate() {
        out.iter_mut().zip(v(j)).for_each(|(o, v)| *o += w * v);
    }
}

/// One query row of one head attending to `n` keys and values, which
/// `kv(j)` gives: `out = softmax(scale · q·kⱼ) · vⱼ`. `scores` is scratch.
#[inline(always)]
fn attend<'a>(q: &[f32], n: usize, kv: impl Fn(usize) -> (&'a [f32], &'a [f32]), scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) {
    scores.clear();
    scores.extend((0..n).map(|j| dot(q, kv(j).0) * scale));
    softmax(scores);
    weigh(scores, |j| kv(j).1, out);
}

/// Attention over packed sequences (see [`AttentionSpec`]), one task per
/// sequence and head: the head's keys are laid out transposed once, so
/// each query row's scores are multiply-adds along a row of keys (no sum
/// across a vector per key), and nothing larger than one row of scores is
/// materialised. Tasks run in parallel.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], spec: &AttentionSpec) -> Vec<f32> {
    let (heads, dim) = (spec.heads, spec.dim);
    let (qw, kw) = (heads * dim, spec.kv_heads * dim);
    let group = heads / spec.kv_heads.max(1);
    if dim == 0 {
        return Vec::new();
    }
    // (first row, rows, head) of each task.
    let mut tasks = Vec::with_capacity(spec.lens.len() * heads);
    let mut start = 0;
    for &len in &spec.lens {
        tasks.extend((0..heads).map(|head| (start, len, head)));
        start += len;
    }
    let longest = spec.lens.iter().copied().max().unwrap_or(0);
    let min_tasks = (ATTENTION_TASK / (dim * longest * longest).max(1)).max(1);
    let heads_out: Vec<Vec<f32>> = tasks
        .par_iter()
        .with_min_len(min_tasks)
        .map(|&(start, len, head)| {
            fast(
                #[inline(always)]
                || {
                    let at = (head / group) * dim;
                    // The head's keys, transposed: `keys_t[d * len + j]`.
                    let mut keys_t = vec![0.0; dim * len];
                    for j in 0..len {
                        for (d, value) in k[(start + j) * kw + at..][..dim].iter().enumerate() {
                            keys_t[d * len + j] = *value;
                        }
                    }
                    let mut out = vec![0.0; len * dim];
                    let mut scores = vec![0.0; len];
                    for (i, o) in out.chunks_exact_mut(dim).enumerate() {
                        let seen = if spec.causal { i + 1 } else { len };
                        let scores = &mut scores[..seen];
                        scores.fill(0.0);
                        let query = &q[(start + i) * qw + head * dim..][..dim];
                        for (d, qd) in query.iter().enumerate() {
                            let qd = qd * spec.scale;
                            scores.iter_mut().zip(&keys_t[d * len..][..seen]).for_each(|(s, k)| *s += qd * k);
                        }
                        softmax(scores);
                        weigh(scores, |j| &v[(start + j) * kw + at..][..dim], o);
                    }
                    out
                },
            )
        })
        .collect();
    let mut context = vec![0.0; start * qw];
    for (&(start, _, head), out) in tasks.iter().zip(&heads_out) {
        for (i, row) in out.chunks_exact(dim).enumerate() {
            context[(start + i) * qw + head * dim..][..dim].copy_from_slice(row);
        }
    }
    context
}

/// Attention of query rows over cached keys and values (see
/// [`CachedAttention`]); (row, head) pairs run in parallel.
pub fn cached_attention(q: &[f32], keys: &[f32], vals: &[f32], spec: &CachedAttention) -> Vec<f32> {
    let (heads, dim) = (spec.heads, spec.dim);
    let (qw, kw) = (heads * dim, spec.kv_heads * dim);
    let group = heads / spec.kv_heads;
    let (offsets, counts, slots) = spec.rows();
    let mut out = vec![0.0; offsets.len() * qw];
    out.par_chunks_mut(dim).enumerate().for_each_init(Vec::new, |scores, (i, o)| {
        let (row, head) = (i / heads, i % heads);
        let at = (head / group) * dim;
        let seen = &slots[offsets[row] as usize..][..counts[row] as usize];
        let kv = |j: usize| {
            let s = seen[j] as usize * kw + at;
            (&keys[s..][..dim], &vals[s..][..dim])
        };
        fast(
            #[inline(always)]
            || attend(&q[row * qw + head * dim..][..dim], seen.len(), kv, spec.scale, scores, o),
        );
    });
    out
}

/// The host's CPUs.
pub struct CpuBackend {
    info: DeviceInfo,
    isa: Isa,
}

impl CpuBackend {
    /// The CPU backend, computing on the threads of rayon's global pool
    /// with the fastest float kernels the CPU runs.
    pub fn new() -> CpuBackend {
        CpuBackend::with_isa(Isa::best()).expect("the best kernels run")
    }

    /// The CPU backend with float kernels `isa` (to test or compare them),
    /// or an error when this CPU cannot run them.
    pub fn with_isa(isa: Isa) -> Result<CpuBackend, Error> {
        if !Isa::available().contains(&isa) {
            return Err(Error::Unsupported(format!("{} kernels on this CPU", isa.name())));
        }
        let threads = rayon::current_num_threads();
        Ok(CpuBackend {
            info: DeviceInfo {
                kind: DeviceKind::Cpu,
                name: "cpu".into(),
                driver: format!("{threads} threads, {}", isa.name()),
                memory_bytes: None,
                f16: false,
            },
            isa,
        })
    }
}

impl Default for CpuBackend {
    fn default() -> Self {
        CpuBackend::new()
    }
}

/// The values of a host array, or an error for another backend's.
fn values(a: &Array) -> Result<&[f32], Error> {
    a.host_values().ok_or_else(wrong_device)
}

fn wrong_device() -> Error {
    Error::Unsupported("memory of another device was given to the CPU backend".into())
}

/// A float weight's values (every weight of this backend but a linear
/// layer's is kept as floats).
fn floats(w: &Weight) -> Result<&[f32], Error> {
    match w.host_data() {
        Some(HostData::F32(v)) => Ok(v),
        _ => Err(invalid_input(format!("a {:?} weight where floats are needed", w.format))),
    }
}

/// `then(y)`, for products that do not fuse their epilogue.
fn finish(mut y: Vec<f32>, then: Epilogue<&[f32]>) -> Vec<f32> {
    match then {
        Epilogue::None => y,
        Epilogue::Activation(f) => {
            activate(&mut y, f);
            y
        }
        Epilogue::Residual(r) => combine(&y, r, |a, b| a + b),
    }
}

fn elementwise(a: &Array, b: &Array, f: impl Fn(f32, f32) -> f32) -> Result<Array, Error> {
    check_elementwise(a, b)?;
    Ok(Array::host(a.shape().to_vec(), combine(values(a)?, values(b)?, f)))
}

/// `f(a, b)` elementwise, `b` of `a`'s length or one row repeated over
/// `a`'s rows; written in place over a copy of `a` so the loop vectorises.
fn combine(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> Vec<f32> {
    let mut out = a.to_vec();
    fast(
        #[inline(always)]
        || {
            for row in out.chunks_mut(b.len().max(1)) {
                row.iter_mut().zip(b).for_each(|(x, y)| *x = f(*x, *y));
            }
        },
    );
    out
}

impl Backend for CpuBackend {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn upload(&self, shape: Vec<usize>, values: Vec<f32>) -> Result<Array, Error> {
        check_values(&shape, values.len())?;
        Ok(Array::host(shape, values))
    }

    fn download(&self, array: &Array) -> Result<Vec<f32>, Error> {
        Ok(values(array)?.to_vec())
    }

    fn weight(&self, weight: HostWeight) -> Result<Weight, Error> {
        // Half floats become floats (the CPU computes in f32) and float
        // matrices are packed in panels for the product kernels; vectors
        // stay as they are, and quantised blocks stay blocks, decoded as
        // products run.
        let (rows, cols) = (weight.rows, weight.cols);
        let floats = match weight.data {
            HostData::Encoded(format @ (WeightFormat::F16 | WeightFormat::BF16), bytes) => quant::decode(format, &bytes),
            HostData::F32(values) => values,
            HostData::Encoded(..) => return Ok(Weight::host(weight)),
        };
        Ok(match rows {
            1 => Weight::host(HostWeight::f32(rows, cols, floats)),
            _ => Weight::device(rows, cols, WeightFormat::F32, Box::new(Panels::pack(rows, cols, &floats))),
        })
    }

    fn embedding(&self, table: &Weight, ids: &[u32]) -> Result<Array, Error> {
        let cols = table.cols;
        let mut out = Vec::with_capacity(ids.len() * cols);
        for &id in ids {
            let id = id as usize;
            if id >= table.rows {
                return Err(invalid_input(format!("token id {id} outside the vocabulary of {}", table.rows)));
            }
            match table.host_data() {
                Some(HostData::F32(v)) => out.extend_from_slice(&v[id * cols..(id + 1) * cols]),
                Some(HostData::Encoded(format, bytes)) => {
                    let row = format.row_bytes(cols).expect("checked when loaded");
                    out.extend(quant::decode(*format, &bytes[id * row..(id + 1) * row]));
                }
                None => table.device_memory::<Panels>()?.push_row(id, &mut out),
            }
        }
        Ok(Array::host(vec![ids.len(), cols], out))
    }

    fn linear(&self, x: &Array, w: &Weight, bias: Option<&Weight>) -> Result<Array, Error> {
        self.linear_then(x, w, bias, Epilogue::None)
    }

    fn linear_then(&self, x: &Array, w: &Weight, bias: Option<&Weight>, then: Epilogue<&Array>) -> Result<Array, Error> {
        let (rows, cols, out) = check_linear(x, w, bias)?;
        check_epilogue(then, rows, out)?;
        let then = then.try_map(values)?;
        let xv = values(x)?;
        let bias = bias.map(floats).transpose()?;
        let y = match w.host_data() {
            Some(HostData::F32(wv)) => finish(linear(xv, rows, cols, wv, out, bias), then),
            // Half floats were widened to floats when prepared: what is
            // encoded here is quantised.
            Some(HostData::Encoded(format, bytes)) => {
                let mut y = qdot::linear(&qdot::quantize_rows(xv, rows, cols), *format, bytes, out);
                if let Some(b) = bias {
                    y.chunks_exact_mut(out).for_each(|row| row.iter_mut().zip(b).for_each(|(v, b)| *v += b));
                }
                finish(y, then)
            }
            None => w.device_memory::<Panels>()?.linear(self.isa, xv, rows, bias, then),
        };
        Ok(Array::host(vec![rows, out], y))
    }

    fn matmul(&self, a: &Array, b: &Array, transpose_b: bool, alpha: f32) -> Result<Array, Error> {
        let MatmulDims { batch, b_batched, m, k, n, shape } = check_matmul(a, b, transpose_b)?;
        let (av, bv) = (values(a)?, values(b)?);
        let mut out = vec![0.0; batch * m * n];
        if batch * m * n > 0 {
            out.par_chunks_mut(m * n).enumerate().for_each(|(i, c)| {
                let boff = if b_batched { i * k * n } else { 0 };
                let bview = if transpose_b { View::dense(n, k, boff).t() } else { View::dense(k, n, boff) };
                gemm(alpha, av, View::dense(m, k, i * m * k), bv, bview, 0.0, c, View::dense(m, n, 0));
            });
        }
        Ok(Array::host(shape, out))
    }

    fn add(&self, a: &Array, b: &Array) -> Result<Array, Error> {
        elementwise(a, b, |x, y| x + y)
    }

    fn mul(&self, a: &Array, b: &Array) -> Result<Array, Error> {
        elementwise(a, b, |x, y| x * y)
    }

    fn add_row(&self, x: &Array, row: &Weight) -> Result<Array, Error> {
        let r = floats(row)?;
        let xv = values(x)?;
        if r.len() != x.matrix().1 {
            return Err(invalid_input(format!("adding a row of {} to {:?}", r.len(), x.shape())));
        }
        Ok(Array::host(x.shape().to_vec(), combine(xv, r, |a, b| a + b)))
    }

    fn layer_norm(&self, x: &Array, gamma: &Weight, beta: &Weight, eps: f32) -> Result<Array, Error> {
        let (g, b) = (floats(gamma)?, floats(beta)?);
        if g.len() != x.matrix().1 || b.len() != g.len() {
            return Err(invalid_input(format!("layer norm of {:?} with {} scales and {} biases", x.shape(), g.len(), b.len())));
        }
        let mut v = values(x)?.to_vec();
        layer_norm(&mut v, g, b, eps);
        Ok(Array::host(x.shape().to_vec(), v))
    }

    fn rms_norm(&self, x: &Array, gamma: &Weight, eps: f32) -> Result<Array, Error> {
        let g = floats(gamma)?;
        if g.len() != x.matrix().1 {
            return Err(invalid_input(format!("RMS norm of {:?} with {} scales", x.shape(), g.len())));
        }
        let mut v = values(x)?.to_vec();
        rms_norm(&mut v, g, eps);
        Ok(Array::host(x.shape().to_vec(), v))
    }

    fn activation(&self, x: &Array, f: Activation) -> Result<Array, Error> {
        let mut v = values(x)?.to_vec();
        activate(&mut v, f);
        Ok(Array::host(x.shape().to_vec(), v))
    }

    fn softmax(&self, x: &Array) -> Result<Array, Error> {
        let mut v = values(x)?.to_vec();
        softmax_rows(&mut v, x.matrix().1);
        Ok(Array::host(x.shape().to_vec(), v))
    }

    fn attention(&self, q: &Array, k: &Array, v: &Array, spec: &AttentionSpec) -> Result<Array, Error> {
        let tokens = check_attention(q, k, v, spec)?;
        let out = attention(values(q)?, values(k)?, values(v)?, spec);
        Ok(Array::host(vec![tokens, spec.heads * spec.dim], out))
    }

    fn rope(&self, x: &Array, positions: &[u32], spec: &RopeSpec) -> Result<Array, Error> {
        check_rope(x, positions, spec)?;
        let mut v = values(x)?.to_vec();
        rope(&mut v, positions, spec);
        Ok(Array::host(x.shape().to_vec(), v))
    }

    fn select_rows(&self, x: &Array, rows: &[u32]) -> Result<Array, Error> {
        check_rows(x, rows)?;
        let (v, cols) = (values(x)?, x.matrix().1);
        let out = rows.iter().flat_map(|&r| v[r as usize * cols..][..cols].iter().copied()).collect();
        Ok(Array::host(vec![rows.len(), cols], out))
    }

    fn kv_cache(&self, slots: usize, width: usize) -> Result<KvCache, Error> {
        Ok(KvCache::host(slots, width))
    }

    fn write_kv(&self, cache: &mut KvCache, k: &Array, v: &Array, slots: &[u32]) -> Result<(), Error> {
        check_write_kv(cache, k, v, slots)?;
        let width = cache.width;
        let (kv, vv) = (values(k)?, values(v)?);
        let (keys, vals) = cache.host_values_mut().ok_or_else(wrong_device)?;
        for (row, &slot) in slots.iter().enumerate() {
            let at = slot as usize * width;
            keys[at..at + width].copy_from_slice(&kv[row * width..][..width]);
            vals[at..at + width].copy_from_slice(&vv[row * width..][..width]);
        }
        Ok(())
    }

    fn cached_attention(&self, q: &Array, cache: &KvCache, spec: &CachedAttention) -> Result<Array, Error> {
        let rows = check_cached_attention(q, cache, spec)?;
        let (keys, vals) = cache.host_values().ok_or_else(wrong_device)?;
        Ok(Array::host(vec![rows, spec.heads * spec.dim], cached_attention(values(q)?, keys, vals, spec)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_matches_naive() {
        for (rows, inp, out) in [(3, 5, 4), (7, 37, 70), (60, 24, 9)] {
            check_linear(rows, inp, out);
        }
    }

    fn check_linear(rows: usize, inp: usize, out: usize) {
        let x: Vec<f32> = (0..rows * inp).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..out * inp).map(|i| (i as f32 * 0.11).cos()).collect();
        let b: Vec<f32> = (0..out).map(|i| i as f32).collect();
        let y = linear(&x, rows, inp, &w, out, Some(&b));
        for r in 0..rows {
            for o in 0..out {
                let want: f32 = b[o] + (0..inp).map(|k| x[r * inp + k] * w[o * inp + k]).sum::<f32>();
                assert!((y[r * out + o] - want).abs() < 1e-4, "{rows}x{inp}x{out} at {r},{o}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn views_are_bounds_checked() {
        let a = [0.0; 4];
        let mut c = [0.0; 4];
        gemm(1.0, &a, View::dense(2, 3, 0), &a, View::dense(3, 2, 0), 0.0, &mut c, View::dense(2, 2, 0));
    }

    #[test]
    fn erf_and_exp_are_accurate() {
        for i in -2000..=2000 {
            let x = i as f32 / 250.0;
            assert!((erf(x) - libm::erff(x)).abs() < 1e-6, "erf({x}) = {}, want {}", erf(x), libm::erff(x));
            let e = exp(x * 10.0);
            let want = (x as f64 * 10.0).exp() as f32;
            assert!(((e - want) / want).abs() < 5e-6, "exp({}) = {e}, want {want}", x * 10.0);
        }
        assert!(exp(-200.0) >= 0.0 && exp(-200.0) < 1e-37 && exp(200.0).is_finite());
    }

    #[test]
    fn rows_ops() {
        let mut x = vec![1.0, 2.0, 3.0, 1000.0, 1000.0, 1000.0];
        softmax_rows(&mut x, 3);
        assert!((x[0..3].iter().sum::<f32>() - 1.0).abs() < 1e-6 && x[2] > x[1]);
        assert!((x[3] - 1.0 / 3.0).abs() < 1e-6);
        let mut y = vec![1.0, 3.0];
        layer_norm(&mut y, &[1.0, 1.0], &[0.0, 0.0], 0.0);
        assert!((y[0] + 1.0).abs() < 1e-6 && (y[1] - 1.0).abs() < 1e-6);
        let mut g = vec![0.0, 1.0];
        gelu(&mut g);
        assert!(g[0] == 0.0 && (g[1] - 0.841_344_7).abs() < 1e-6);
    }
}

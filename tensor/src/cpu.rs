//! CPU kernels: matrix multiply (matrixmultiply's sgemm, which picks
//! AVX2/FMA or SSE at run time and threads large products) and the row
//! operations transformers and small classifiers need.

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

/// Layer normalisation of each row of `x` (width `gamma.len()`), in place.
pub fn layer_norm(x: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let width = gamma.len();
    if width == 0 {
        return;
    }
    for row in x.chunks_exact_mut(width) {
        let mean = row.iter().sum::<f32>() / width as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / width as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, g), b) in row.iter_mut().zip(gamma).zip(beta) {
            *v = (*v - mean) * inv * g + b;
        }
    }
}

/// The erf GELU, in place: `x/2 * (1 + erf(x/sqrt 2))`, with erf from
/// Abramowitz & Stegun 7.1.26 (absolute error below 1e-6 in f32) and a
/// branch-free exp, so the loop vectorises (8 lanes with AVX2 and FMA,
/// chosen at run time; 4 with the SSE2 baseline).
pub fn gelu(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA, checked just above.
        return unsafe { gelu_avx2(x) };
    }
    gelu_portable(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_avx2(x: &mut [f32]) {
    gelu_portable(x)
}

#[inline(always)]
fn gelu_portable(x: &mut [f32]) {
    for v in x {
        *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2));
    }
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
    for row in x.chunks_exact_mut(width) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        for v in row.iter_mut() {
            *v /= sum;
        }
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

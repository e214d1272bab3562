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
    for row in x.chunks_exact_mut(width) {
        let mean = row.iter().sum::<f32>() / width as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / width as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, g), b) in row.iter_mut().zip(gamma).zip(beta) {
            *v = (*v - mean) * inv * g + b;
        }
    }
}

/// The exact (erf) GELU, in place.
pub fn gelu(x: &mut [f32]) {
    for v in x {
        *v = 0.5 * *v * (1.0 + libm::erff(*v * std::f32::consts::FRAC_1_SQRT_2));
    }
}

/// Softmax of each row of width `width`, in place.
pub fn softmax_rows(x: &mut [f32], width: usize) {
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
        let (rows, inp, out) = (3, 5, 4);
        let x: Vec<f32> = (0..rows * inp).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..out * inp).map(|i| (i as f32 * 0.11).cos()).collect();
        let b: Vec<f32> = (0..out).map(|i| i as f32).collect();
        let y = linear(&x, rows, inp, &w, out, Some(&b));
        for r in 0..rows {
            for o in 0..out {
                let want: f32 = b[o] + (0..inp).map(|k| x[r * inp + k] * w[o * inp + k]).sum::<f32>();
                assert!((y[r * out + o] - want).abs() < 1e-5);
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
        assert!(g[0] == 0.0 && (g[1] - 0.841_344_7).abs() < 1e-5);
    }
}

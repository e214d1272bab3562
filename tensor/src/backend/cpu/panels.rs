//! Float weights prepared once, when a model loads, in the layout the
//! CPU's product kernels read, and those kernels.
//!
//! A linear layer's weight `[out, inp]` is stored as panels of
//! [`WIDTH`] output features, each input-major (`[inp][WIDTH]`, the last
//! panel padded with zeros). A product `x [rows, inp] · wᵀ` then runs as
//! blocks of a few rows times one panel: every step of the inner loop
//! loads one panel row and multiplies it by one broadcast activation per
//! row, accumulating `rows x WIDTH` outputs in registers. Nothing is
//! repacked per call, and a batch of one streams every weight once.
//!
//! Kernels exist for AVX-512, AVX2 with FMA and portable code; the fastest
//! the CPU runs is chosen at run time ([`Isa::best`]), and every one is
//! tested against the portable one. Large products are split across the
//! threads of rayon's global pool (one pool per process, shared by every
//! model) by panels; small ones run on the calling thread.

use crate::backend::{DeviceMemory, Epilogue};
use rayon::prelude::*;
use std::any::Any;

/// Output features per panel.
pub const WIDTH: usize = 16;

/// Rows one kernel call computes at most, of every kernel set.
const MAX_BLOCK: usize = 24;

/// Multiply-adds one thread does before a product is worth splitting:
/// below this, waking another thread costs more than it saves.
const MIN_SPLIT: usize = 1 << 18;

/// Bytes of activations one tile of rows may take, so a tile stays in the
/// core's L2 cache while every panel passes over it.
const TILE_BYTES: usize = 128 << 10;

/// The instructions the float kernels use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust (vectorised by the compiler for the baseline target).
    Portable,
    /// AVX2 and FMA: blocks of 6 rows, two 8-lane registers per row.
    Avx2,
    /// AVX-512F: blocks of 24 rows, one 16-lane register per row (of 32).
    Avx512,
}

impl Isa {
    /// The fastest kernels this CPU runs.
    pub fn best() -> Isa {
        *Isa::available().last().expect("the portable kernels always run")
    }

    /// Every kernel set this CPU runs, slowest first.
    pub fn available() -> Vec<Isa> {
        let mut all = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                all.push(Isa::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                all.push(Isa::Avx512);
            }
        }
        all
    }

    /// Its name, as `DeviceInfo::driver` shows it.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "AVX2",
            Isa::Avx512 => "AVX-512",
        }
    }

    /// Rows one kernel call computes at most.
    fn block_rows(self) -> usize {
        match self {
            Isa::Portable | Isa::Avx2 => 6,
            Isa::Avx512 => 24,
        }
    }
}

/// A float weight `[out, inp]` in panels (see the module's documentation).
pub struct Panels {
    out: usize,
    inp: usize,
    data: Vec<f32>,
}

impl DeviceMemory for Panels {
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Panels {
    /// Packs `w` (`out` rows of `inp` values), on every thread of the pool.
    pub fn pack(out: usize, inp: usize, w: &[f32]) -> Panels {
        assert_eq!(w.len(), out * inp, "a weight of {out} x {inp} needs {} values", out * inp);
        let mut data = vec![0.0; out.div_ceil(WIDTH) * inp * WIDTH];
        if inp > 0 {
            data.par_chunks_mut(inp * WIDTH).enumerate().for_each(|(p, panel)| {
                for (lane, row) in w[p * WIDTH * inp..].chunks_exact(inp).take(WIDTH).enumerate() {
                    for (k, v) in row.iter().enumerate() {
                        panel[k * WIDTH + lane] = *v;
                    }
                }
            });
        }
        Panels { out, inp, data }
    }

    /// Row `o` of the weight (a table's entry), appended to `dst`.
    pub fn push_row(&self, o: usize, dst: &mut Vec<f32>) {
        let panel = &self.data[o / WIDTH * self.inp * WIDTH..][..self.inp * WIDTH];
        dst.extend(panel.iter().skip(o % WIDTH).step_by(WIDTH));
    }

    /// `then(x [rows, inp] · wᵀ + bias)`: `[rows, out]`, with kernels
    /// `isa` (which the CPU must run: one of [`Isa::available`]). The
    /// epilogue runs on each part's own columns as soon as a tile of rows
    /// is done, while they are still in cache.
    pub fn linear(&self, isa: Isa, x: &[f32], rows: usize, bias: Option<&[f32]>, then: Epilogue<&[f32]>) -> Vec<f32> {
        let (inp, out) = (self.inp, self.out);
        assert_eq!(x.len(), rows * inp, "{rows} rows of {inp} values");
        assert!(bias.is_none_or(|b| b.len() == out), "a bias of {out} values");
        assert!(!matches!(then, Epilogue::Residual(r) if r.len() != rows * out), "a residual of {rows} x {out}");
        let panels = out.div_ceil(WIDTH);
        if rows == 0 || panels == 0 || inp == 0 {
            let mut y = vec![0.0; rows * out];
            if let Some(b) = bias.filter(|_| out > 0) {
                y.chunks_exact_mut(out).for_each(|row| row.copy_from_slice(b));
            }
            let target = Target { y: y.as_mut_ptr(), out };
            // SAFETY: this thread alone writes `y`, which holds `rows * out` values.
            unsafe { target.finish(0..rows, 0..out, then) };
            return y;
        }
        // Not zeroed first: the parts write every element before anything reads it.
        let mut y = Vec::with_capacity(rows * out);
        // Tests see an element the parts failed to write as NaN, not as
        // whatever the allocator handed back.
        #[cfg(test)]
        y.spare_capacity_mut().iter_mut().for_each(|v| {
            v.write(f32::NAN);
        });
        let work = rows * inp * out;
        let parts = (work / MIN_SPLIT).clamp(1, rayon::current_num_threads().min(panels));
        let target = Target { y: y.as_mut_ptr(), out };
        let run = |part: usize| {
            let (from, to) = (part * panels / parts, (part + 1) * panels / parts);
            // SAFETY: parts cover disjoint panels, so disjoint columns of `y`.
            unsafe { self.run(isa, x, rows, bias, then, from..to, &target) }
        };
        if parts == 1 {
            run(0);
        } else {
            (0..parts).into_par_iter().for_each(run);
        }
        // SAFETY: the parts' panels cover every column of every row, and
        // each wrote its columns of every row.
        unsafe { y.set_len(rows * out) };
        y
    }

    /// The panels `range` of the product, into their columns of `y`.
    ///
    /// # Safety
    /// No other thread writes these columns of `target` meanwhile, and
    /// `target` holds `rows * out` values.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run(
        &self,
        isa: Isa,
        x: &[f32],
        rows: usize,
        bias: Option<&[f32]>,
        then: Epilogue<&[f32]>,
        range: std::ops::Range<usize>,
        target: &Target,
    ) {
        let inp = self.inp;
        let block = isa.block_rows();
        let tile = (TILE_BYTES / (4 * inp.max(1))).max(block) / block * block;
        let mut acc = [[0f32; WIDTH]; MAX_BLOCK];
        for tile_start in (0..rows).step_by(tile) {
            let tile_end = (tile_start + tile).min(rows);
            // Blocks of equal size (AVX2, 7 rows: 4 and 3, not 6 and 1): a
            // kernel on a few rows waits on its sums' latency.
            let blocks = (tile_end - tile_start).div_ceil(block);
            let bound = |b: usize| tile_start + b * (tile_end - tile_start) / blocks;
            for p in range.clone() {
                let panel = &self.data[p * inp * WIDTH..][..inp * WIDTH];
                // The panel after it, fetched into cache while this one is
                // multiplied (the last one fetches itself again: a no-op).
                let next = self.data.get((p + 1) * inp * WIDTH..(p + 2) * inp * WIDTH).unwrap_or(panel);
                let cols = (self.out - p * WIDTH).min(WIDTH);
                for b in 0..blocks {
                    let (r, n) = (bound(b), bound(b + 1) - bound(b));
                    let xs = &x[r * inp..(r + n) * inp];
                    kernel(isa, xs, n, inp, panel, next, &mut acc[..n]);
                    for (i, a) in acc[..n].iter().enumerate() {
                        let bias = bias.map_or(&[0.0; WIDTH][..], |b| &b[p * WIDTH..]);
                        // SAFETY: row r + i < rows and columns p * WIDTH + cols <= out;
                        // the caller owns these columns. Written, not read: they may
                        // not hold values yet.
                        let dst = unsafe { target.y.add((r + i) * target.out + p * WIDTH) };
                        for (j, (a, b)) in a[..cols].iter().zip(bias).enumerate() {
                            // SAFETY: j < cols, as above.
                            unsafe { dst.add(j).write(a + b) };
                        }
                    }
                }
            }
            let columns = range.start * WIDTH..(range.end * WIDTH).min(self.out);
            // SAFETY: the caller owns these columns, inside `target`.
            unsafe { target.finish(tile_start..tile_end, columns, then) };
        }
    }
}

/// Where a product's parts write: `[rows, out]` floats (not initialised
/// until the parts have stored them).
struct Target {
    y: *mut f32,
    out: usize,
}

// SAFETY: parts write disjoint columns (see `Panels::run`).
unsafe impl Sync for Target {}

impl Target {
    /// Applies `then` to columns `cols` of `rows`.
    ///
    /// # Safety
    /// No other thread touches these elements meanwhile, and they lie
    /// inside the target.
    unsafe fn finish(&self, rows: std::ops::Range<usize>, cols: std::ops::Range<usize>, then: Epilogue<&[f32]>) {
        if matches!(then, Epilogue::None) {
            return;
        }
        for r in rows {
            let at = r * self.out + cols.start;
            // SAFETY: the caller's contract.
            let dst = unsafe { std::slice::from_raw_parts_mut(self.y.add(at), cols.len()) };
            match then {
                Epilogue::None => {}
                Epilogue::Activation(f) => super::activate(dst, f),
                Epilogue::Residual(res) => dst.iter_mut().zip(&res[at..]).for_each(|(d, r)| *d += r),
            }
        }
    }
}

/// `acc[i] = Σ_k xs[i * inp + k] · panel[k]` for the `n` rows of `xs`,
/// while the SIMD kernels ask for `next` (a panel of the same size) to be
/// brought into cache: a batch of one is bound by memory, and the
/// hardware's prefetcher alone kept one core at half the speed it has on
/// weights already in cache.
fn kernel(isa: Isa, xs: &[f32], n: usize, inp: usize, panel: &[f32], next: &[f32], acc: &mut [[f32; WIDTH]]) {
    debug_assert!(xs.len() == n * inp && panel.len() == inp * WIDTH && next.len() == panel.len() && acc.len() == n);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is one the CPU runs (the callers' contract), and
        // the slices hold what the kernels read.
        Isa::Avx2 => unsafe { x86::avx2(xs, n, inp, panel, next, acc) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx512 => unsafe { x86::avx512(xs, n, inp, panel, next, acc) },
        _ => portable(xs, inp, panel, acc),
    }
}

fn portable(xs: &[f32], inp: usize, panel: &[f32], acc: &mut [[f32; WIDTH]]) {
    for (row, a) in xs.chunks_exact(inp).zip(acc.iter_mut()) {
        let mut sums = [0f32; WIDTH];
        for (v, w) in row.iter().zip(panel.chunks_exact(WIDTH)) {
            let w: &[f32; WIDTH] = w.try_into().expect("panel rows of WIDTH");
            for (s, w) in sums.iter_mut().zip(w) {
                *s += v * w;
            }
        }
        *a = sums;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::WIDTH;
    use std::arch::x86_64::*;

    /// `kernel::<n>(args)` for a run-time `n` among `sizes`.
    macro_rules! rows {
        ($n:expr, $kernel:ident $args:tt, $($size:literal)*, $why:literal) => {
            match $n {
                $($size => $kernel::<$size> $args,)*
                _ => unreachable!($why),
            }
        };
    }

    /// Up to 6 rows with AVX2 and FMA.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `xs` holds `n * inp` values, `panel`
    /// `inp * WIDTH`, `acc` `n` rows, `n <= 6`.
    pub unsafe fn avx2(xs: &[f32], n: usize, inp: usize, panel: &[f32], next: &[f32], acc: &mut [[f32; WIDTH]]) {
        // SAFETY: forwarded from the caller.
        unsafe {
            rows!(n, avx2_rows(xs, inp, panel, next, acc), 1 2 3 4 5 6, "AVX2 blocks hold 6 rows")
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2_rows<const R: usize>(xs: &[f32], inp: usize, panel: &[f32], next: &[f32], acc: &mut [[f32; WIDTH]]) {
        let mut sums = [[_mm256_setzero_ps(); 2]; R];
        let (x, w) = (xs.as_ptr(), panel.as_ptr());
        for k in 0..inp {
            // SAFETY: `next` holds as many values as `panel`; one line of it a step.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(next.as_ptr().add(k * WIDTH).cast()) };
            // SAFETY: k < inp, so panel row k and column k of each row are in bounds.
            let (lo, hi) = unsafe { (_mm256_loadu_ps(w.add(k * WIDTH)), _mm256_loadu_ps(w.add(k * WIDTH + 8))) };
            for (r, s) in sums.iter_mut().enumerate() {
                // SAFETY: as above.
                let v = _mm256_set1_ps(unsafe { *x.add(r * inp + k) });
                s[0] = _mm256_fmadd_ps(v, lo, s[0]);
                s[1] = _mm256_fmadd_ps(v, hi, s[1]);
            }
        }
        for (s, a) in sums.iter().zip(acc.iter_mut()) {
            // SAFETY: `a` holds 16 floats.
            unsafe {
                _mm256_storeu_ps(a.as_mut_ptr(), s[0]);
                _mm256_storeu_ps(a.as_mut_ptr().add(8), s[1]);
            }
        }
    }

    /// Up to 24 rows with AVX-512F.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `xs` holds `n * inp` values, `panel`
    /// `inp * WIDTH`, `acc` `n` rows, `n <= 24`.
    pub unsafe fn avx512(xs: &[f32], n: usize, inp: usize, panel: &[f32], next: &[f32], acc: &mut [[f32; WIDTH]]) {
        // SAFETY: forwarded from the caller.
        unsafe {
            rows!(n, avx512_rows(xs, inp, panel, next, acc), 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24, "AVX-512 blocks hold 24 rows")
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn avx512_rows<const R: usize>(xs: &[f32], inp: usize, panel: &[f32], next: &[f32], acc: &mut [[f32; WIDTH]]) {
        let mut sums = [_mm512_setzero_ps(); R];
        let (x, w) = (xs.as_ptr(), panel.as_ptr());
        for k in 0..inp {
            // SAFETY: `next` holds as many values as `panel`; one line of it a step.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(next.as_ptr().add(k * WIDTH).cast()) };
            // SAFETY: k < inp, so panel row k and column k of each row are in bounds.
            let row = unsafe { _mm512_loadu_ps(w.add(k * WIDTH)) };
            for (r, s) in sums.iter_mut().enumerate() {
                // SAFETY: as above.
                *s = _mm512_fmadd_ps(_mm512_set1_ps(unsafe { *x.add(r * inp + k) }), row, *s);
            }
        }
        for (s, a) in sums.iter().zip(acc.iter_mut()) {
            // SAFETY: `a` holds 16 floats.
            unsafe { _mm512_storeu_ps(a.as_mut_ptr(), *s) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Activation;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / (1 << 24) as f32 - 0.5).collect()
    }

    /// Every kernel set against a plain triple loop, for shapes with
    /// partial panels, partial and uneven blocks, tiles and threaded
    /// splits, with each epilogue.
    #[test]
    fn every_isa_matches_the_plain_product() {
        let shapes = [(1, 1, 1), (1, 384, 384), (7, 33, 17), (12, 384, 1536), (13, 100, 31), (25, 384, 384), (300, 40, 70), (64, 1536, 384)];
        for &(rows, inp, out) in &shapes {
            let (x, w, bias, residual) = (values(rows * inp, 1), values(out * inp, 2), values(out, 3), values(rows * out, 4));
            let mut want = vec![0.0f64; rows * out];
            for r in 0..rows {
                for o in 0..out {
                    want[r * out + o] = bias[o] as f64 + (0..inp).map(|k| x[r * inp + k] as f64 * w[o * inp + k] as f64).sum::<f64>();
                }
            }
            let plus_residual: Vec<f64> = want.iter().zip(&residual).map(|(w, r)| w + *r as f64).collect();
            let relu: Vec<f64> = want.iter().map(|w| w.max(0.0)).collect();
            let panels = Panels::pack(out, inp, &w);
            for isa in Isa::available() {
                for (then, want) in [
                    (Epilogue::None, &want),
                    (Epilogue::Residual(residual.as_slice()), &plus_residual),
                    (Epilogue::Activation(Activation::Relu), &relu),
                ] {
                    let got = panels.linear(isa, &x, rows, Some(&bias), then);
                    assert_eq!(got.len(), rows * out);
                    assert!(got.iter().all(|v| v.is_finite()), "{isa:?} {rows}x{inp}x{out}: an element not written");
                    let worst = got.iter().zip(want).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max);
                    assert!(worst < 1e-4 * (inp as f64).sqrt(), "{isa:?} {rows}x{inp}x{out} {then:?}: off by {worst}");
                }
            }
            let mut row = Vec::new();
            panels.push_row(out - 1, &mut row);
            assert_eq!(row, w[(out - 1) * inp..]);
        }
        eprintln!("float kernels tested: {:?}", Isa::available());
    }
}

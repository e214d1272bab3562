//! Products with quantised weights, computed as llama.cpp computes them:
//! each row of activations is quantised to 8 bits per block of 32 values
//! (one f32 scale a block), and every weight block meets it in an integer
//! dot product, scaled once per block (per sub-block for the K-quants).
//! The weight is read once, in its file's encoding, whatever the number of
//! rows. AVX2 (chosen at run time) unpacks 32 weights and multiplies them
//! with 32 activations in a few instructions; other CPUs run the portable
//! code, which gives the same integers.

use crate::backend::WeightFormat;
use crate::quant::f16_to_f32;
use rayon::prelude::*;

/// Rows of activations quantised per block of 32.
pub struct QuantRows {
    rows: usize,
    cols: usize,
    /// `rows * cols` values.
    q: Vec<i8>,
    /// The scale of each block of 32.
    d: Vec<f32>,
    /// The sum of each block of 16's values (for the weights' offsets).
    sum16: Vec<i32>,
    /// Each block of 32's sum, times its scale: the activations' own sum,
    /// which a weight block's minimum (or offset) multiplies.
    s: Vec<f32>,
}

/// Quantises `rows` rows of `cols` values (a multiple of 32). Values
/// round to the nearest integer, ties to even (as llama.cpp's AVX2 code
/// rounds).
pub fn quantize_rows(x: &[f32], rows: usize, cols: usize) -> QuantRows {
    debug_assert!(cols.is_multiple_of(32) && x.len() == rows * cols);
    let blocks = x.len() / 32;
    let mut q = vec![0i8; x.len()];
    let mut d = vec![0f32; blocks];
    let mut sum16 = vec![0i32; blocks * 2];
    let mut sums = vec![0f32; blocks];
    for (b, (xs, qs)) in x.chunks_exact(32).zip(q.chunks_exact_mut(32)).enumerate() {
        let xs: &[f32; 32] = xs.try_into().expect("blocks of 32");
        let qs: &mut [i8; 32] = qs.try_into().expect("blocks of 32");
        #[cfg(target_arch = "x86_64")]
        let (scale, halves) = if avx2() {
            // Safety: AVX2, FMA and F16C are present (checked at run time).
            unsafe { avx2::quantize32(xs, qs) }
        } else {
            quantize32(xs, qs)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let (scale, halves) = quantize32(xs, qs);
        d[b] = scale;
        sum16[2 * b] = halves[0];
        sum16[2 * b + 1] = halves[1];
        sums[b] = (halves[0] + halves[1]) as f32 * scale;
    }
    QuantRows { rows, cols, q, d, sum16, s: sums }
}

/// One block of 32 values to 8 bits: its scale and the sums of its two
/// halves' integers.
fn quantize32(xs: &[f32; 32], qs: &mut [i8; 32]) -> (f32, [i32; 2]) {
    let max = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = max / 127.0;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    for (o, v) in qs.iter_mut().zip(xs) {
        *o = (v * inv).round_ties_even() as i8;
    }
    let half = |r: std::ops::Range<usize>| qs[r].iter().map(|v| *v as i32).sum::<i32>();
    (scale, [half(0..16), half(16..32)])
}

fn half(b: &[u8]) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[0], b[1]]))
}

/// The 6-bit scale and minimum of sub-block `j` of a Q4_K/Q5_K block.
fn scale_min(j: usize, q: &[u8]) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    };
    (sc as f32, m as f32)
}

/// Integer dot products of 32 weights with 32 activations: the sums over
/// the first 16 and the last 16. Weights are unsigned and below 128, or,
/// when `signed`, signed bytes.
#[inline]
fn dot32(w: &[u8; 32], signed: bool, x: &[i8]) -> (i32, i32) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // Safety: AVX2 is present (checked at run time).
        return unsafe { avx2::dot32(w, signed, x) };
    }
    let value = |i: usize| if signed { w[i] as i8 as i32 } else { w[i] as i32 };
    let half = |r: std::ops::Range<usize>| r.map(|i| value(i) * x[i] as i32).sum::<i32>();
    (half(0..16), half(16..32))
}

#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("f16c")
    })
}

#[cfg(target_arch = "x86_64")]
// The kernels index several arrays by the row `k` of a tile of constant
// size, which the compiler unrolls: a range loop says that best.
#[allow(clippy::needless_range_loop)]
mod avx2 {
    use super::{QuantRows, WeightFormat, row_unpacked, scale_min};
    use std::arch::x86_64::*;

    /// Weight rows `start..end` times `x`, the formats llama files use
    /// most with kernels of their own, the others through the generic
    /// unpacking (compiled here with AVX2 too).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows(format: WeightFormat, w: &[u8], row_bytes: usize, start: usize, end: usize, x: &QuantRows, acc: &mut [f32]) {
        // What the kernels' unchecked reads rely on.
        assert!(x.cols.is_multiple_of(32) && format.row_bytes(x.cols) == Some(row_bytes));
        assert!(x.q.len() >= x.rows * x.cols && x.d.len() * 32 >= x.rows * x.cols && x.s.len() * 32 >= x.rows * x.cols);
        assert!(w.len() >= end * row_bytes && acc.len() >= (end - start) * x.rows);
        for o in start..end {
            let row = &w[o * row_bytes..(o + 1) * row_bytes];
            let acc = &mut acc[(o - start) * x.rows..][..x.rows];
            // Rows of x up to four at a time: each weight block is unpacked
            // once for them, their sums stay in registers.
            let mut first = 0;
            while first < x.rows {
                let n = (x.rows - first).min(TILE);
                let out = &mut acc[first..first + n];
                // Safety: AVX2, FMA and F16C are enabled here; x holds rows
                // first..first + n and row holds x.cols values (asserted above).
                unsafe {
                    match format {
                        WeightFormat::Q4_0 => tile!(n, q4, row, x, first, out, false),
                        WeightFormat::Q4_1 => tile!(n, q4, row, x, first, out, true),
                        WeightFormat::Q8_0 => tile!(n, q8_0, row, x, first, out),
                        WeightFormat::Q4K => tile!(n, q4_k, row, x, first, out),
                        _ => {
                            for (k, a) in out.iter_mut().enumerate() {
                                let mut one = [0f32];
                                row_unpacked(format, row, &one_row(x, first + k), &mut one);
                                *a = one[0];
                            }
                        }
                    }
                }
                first += n;
            }
        }
    }

    /// [`super::quantize32`] in a few instructions.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn quantize32(xs: &[f32; 32], qs: &mut [i8; 32]) -> (f32, [i32; 2]) {
        // Safety: 32 floats read and 32 bytes written, unaligned.
        unsafe {
            let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(xs.as_ptr().add(8 * i)));
            let sign = _mm256_set1_ps(-0.0);
            let abs = |v: __m256| _mm256_andnot_ps(sign, v);
            let m = _mm256_max_ps(_mm256_max_ps(abs(v[0]), abs(v[1])), _mm256_max_ps(abs(v[2]), abs(v[3])));
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let max = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1)));
            let scale = max / 127.0;
            let inv = _mm256_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
            let i: [__m256i; 4] =
                std::array::from_fn(|k| _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[k], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
            let sum = |a: __m256i, b: __m256i| {
                let s = _mm256_add_epi32(a, b);
                let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
                hsum(s)
            };
            let halves = [sum(i[0], i[1]), sum(i[2], i[3])];
            // Pack to bytes (lane-wise), then put the 32-bit groups back in order.
            let packed = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
            let ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(qs.as_mut_ptr() as *mut __m256i, ordered);
            (scale, halves)
        }
    }

    /// Rows of x that share one unpacking of a weight block.
    const TILE: usize = 4;

    /// Calls kernel `$f::<N>` for a tile of `$n` rows (1 to [`TILE`]).
    macro_rules! tile {
        ($n:expr, $f:ident, $($arg:expr),*) => {
            match $n {
                1 => $f::<1>($($arg),*),
                2 => $f::<2>($($arg),*),
                3 => $f::<3>($($arg),*),
                _ => $f::<4>($($arg),*),
            }
        };
    }
    use tile;

    /// Row `r` of `x` alone.
    fn one_row(x: &QuantRows, r: usize) -> QuantRows {
        let (blocks, cols) = (x.cols / 32, x.cols);
        QuantRows {
            rows: 1,
            cols,
            q: x.q[r * cols..(r + 1) * cols].to_vec(),
            d: x.d[r * blocks..(r + 1) * blocks].to_vec(),
            sum16: x.sum16[2 * r * blocks..2 * (r + 1) * blocks].to_vec(),
            s: x.s[r * blocks..(r + 1) * blocks].to_vec(),
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn half(b: &[u8]) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(u16::from_le_bytes([b[0], b[1]]) as i32)))
    }

    /// The f16 at `b`, as f32.
    ///
    /// Safety: two readable bytes at `b`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn half_at(b: *const u8) -> f32 {
        // Safety: as the caller promises.
        let bits = unsafe { u16::from_le_bytes([*b, *b.add(1)]) };
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// 32 nibbles of 16 bytes: low nibbles, then high nibbles.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibbles16(q: *const u8) -> __m256i {
        // Safety: the caller gives 16 readable bytes; unaligned load.
        let v = unsafe { _mm_loadu_si128(q as *const __m128i) };
        let mask = _mm_set1_epi8(15);
        _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), mask), _mm_and_si128(v, mask))
    }

    /// 32 unsigned weights (< 128) times 32 activations, as 8 f32 partial sums.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_ps(w: __m256i, x: *const i8) -> __m256 {
        // Safety: the caller gives 32 readable bytes; unaligned load.
        let xv = unsafe { _mm256_loadu_si256(x as *const __m256i) };
        _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(w, xv), _mm256_set1_epi16(1)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn sum_ps(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Q4_0 (`value = d (q - 8)`) or Q4_1 (`value = d q + m`): the `N`
    /// rows of x from `first`, one per value of `out`.
    ///
    /// Safety: x holds rows `first..first + N`, `row` `x.cols` values.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4<const N: usize>(row: &[u8], x: &QuantRows, first: usize, out: &mut [f32], with_min: bool) {
        let blocks = x.cols / 32;
        let (size, data) = if with_min { (20, 4) } else { (18, 2) };
        let (xq, xd, xs) = (x.q.as_ptr(), x.d.as_ptr(), x.s.as_ptr());
        let mut acc = [_mm256_setzero_ps(); N];
        let mut rest = [0f32; N];
        for b in 0..blocks {
            // Safety: block b of the row and of rows first.. of x exist.
            unsafe {
                let blk = row.as_ptr().add(b * size);
                let d = half_at(blk);
                let offset = if with_min { half_at(blk.add(2)) } else { -8.0 * d };
                let w = nibbles16(blk.add(data));
                for k in 0..N {
                    let at = (first + k) * blocks + b;
                    acc[k] = _mm256_fmadd_ps(dot_ps(w, xq.add(at * 32)), _mm256_set1_ps(d * *xd.add(at)), acc[k]);
                    rest[k] = offset.mul_add(*xs.add(at), rest[k]);
                }
            }
        }
        for (k, o) in out.iter_mut().enumerate() {
            // Safety: the features are enabled here.
            *o = unsafe { sum_ps(acc[k]) } + rest[k];
        }
    }

    /// Q8_0: signed weights, |w| times x with w's sign; the `N` rows of x
    /// from `first`, one per value of `out`.
    ///
    /// Safety: as [`q4`].
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0<const N: usize>(row: &[u8], x: &QuantRows, first: usize, out: &mut [f32]) {
        let blocks = x.cols / 32;
        let (xq, xd) = (x.q.as_ptr(), x.d.as_ptr());
        let mut acc = [_mm256_setzero_ps(); N];
        let ones = _mm256_set1_epi16(1);
        for b in 0..blocks {
            // Safety: block b of the row and of rows first.. of x exist.
            unsafe {
                let blk = row.as_ptr().add(b * 34);
                let w = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                let (magnitude, d) = (_mm256_sign_epi8(w, w), half_at(blk));
                for k in 0..N {
                    let at = (first + k) * blocks + b;
                    let xv = _mm256_loadu_si256(xq.add(at * 32) as *const __m256i);
                    let p = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(xv, w));
                    let s = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
                    acc[k] = _mm256_fmadd_ps(s, _mm256_set1_ps(d * *xd.add(at)), acc[k]);
                }
            }
        }
        for (k, o) in out.iter_mut().enumerate() {
            // Safety: the features are enabled here.
            *o = unsafe { sum_ps(acc[k]) };
        }
    }

    /// Q4_K row `r`: per 256 values, 8 sub-blocks of 32 with 6-bit scales
    /// and minimums; pair j's 32 bytes hold sub-block 2j in their low
    /// nibbles and 2j+1 in their high ones.
    ///
    /// Safety: as [`q4`].
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_k<const N: usize>(row: &[u8], x: &QuantRows, first: usize, out: &mut [f32]) {
        let blocks = x.cols / 32;
        let (xq, xd, xs) = (x.q.as_ptr(), x.d.as_ptr(), x.s.as_ptr());
        let mut acc = [_mm256_setzero_ps(); N];
        let mut rest = [0f32; N];
        let mask = _mm256_set1_epi8(15);
        for sb in 0..blocks / 8 {
            let blk = &row[sb * 144..][..144];
            // Safety: the features are enabled here; block sb of rows
            // first.. of x exists.
            unsafe {
                let (d, dmin) = (half(blk), half(&blk[2..]));
                for pair in 0..4 {
                    let v = _mm256_loadu_si256(blk[16 + 32 * pair..].as_ptr() as *const __m256i);
                    let halves = [_mm256_and_si256(v, mask), _mm256_and_si256(_mm256_srli_epi16(v, 4), mask)];
                    for (h, w) in halves.into_iter().enumerate() {
                        let sub = 2 * pair + h;
                        let (sc, m) = scale_min(sub, &blk[4..16]);
                        let (scale, min) = (d * sc, -dmin * m);
                        for k in 0..N {
                            let at = (first + k) * blocks + sb * 8 + sub;
                            acc[k] = _mm256_fmadd_ps(dot_ps(w, xq.add(at * 32)), _mm256_set1_ps(scale * *xd.add(at)), acc[k]);
                            rest[k] = min.mul_add(*xs.add(at), rest[k]);
                        }
                    }
                }
            }
        }
        for (k, o) in out.iter_mut().enumerate() {
            // Safety: the features are enabled here.
            *o = unsafe { sum_ps(acc[k]) } + rest[k];
        }
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn dot32(w: &[u8; 32], signed: bool, x: &[i8]) -> (i32, i32) {
        assert!(x.len() >= 32);
        // Safety: both slices hold 32 bytes; unaligned loads.
        unsafe {
            let mut wv = _mm256_loadu_si256(w.as_ptr() as *const __m256i);
            let mut xv = _mm256_loadu_si256(x.as_ptr() as *const __m256i);
            if signed {
                // |w| times x with w's sign: u8 x i8 again (|w| <= 128 keeps
                // pairs within i16).
                xv = _mm256_sign_epi8(xv, wv);
                wv = _mm256_sign_epi8(wv, wv);
            }
            // u8 x i8 -> adjacent pairs summed to i16 (weights < 128: no saturation).
            let pairs = _mm256_maddubs_epi16(wv, xv);
            let quads = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
            let lo = _mm256_castsi256_si128(quads);
            let hi = _mm256_extracti128_si256(quads, 1);
            (hsum(lo), hsum(hi))
        }
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn hsum(v: __m128i) -> i32 {
        let v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0b01_00_11_10));
        let v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0b10_11_00_01));
        _mm_cvtsi128_si32(v)
    }
}

/// The weights of one block of 32 values of a row, unpacked to unsigned
/// integers, and how to scale the integer dot products: `value =
/// scale_k * (w - offset) + min_k` for the value's half k (0: values
/// 0..16, 1: 16..32).
struct Unpacked {
    w: [u8; 32],
    /// Whether `w` holds signed bytes.
    signed: bool,
    scale: [f32; 2],
    offset: i32,
    min: [f32; 2],
}

/// Unpacks block `i` (of 32 values) of a row of `format`.
fn unpack(format: WeightFormat, row: &[u8], i: usize, out: &mut Unpacked) {
    out.signed = false;
    let nibbles = |w: &mut [u8; 32], q: &[u8], high: bool| {
        for (o, b) in w.iter_mut().zip(q) {
            *o = if high { b >> 4 } else { b & 15 };
        }
    };
    match format {
        WeightFormat::Q4_0 | WeightFormat::Q4_1 => {
            let (size, data) = if format == WeightFormat::Q4_0 { (18, 2) } else { (20, 4) };
            let b = &row[i * size..][..size];
            let d = half(b);
            for j in 0..16 {
                out.w[j] = b[data + j] & 15;
                out.w[j + 16] = b[data + j] >> 4;
            }
            out.scale = [d, d];
            if format == WeightFormat::Q4_0 {
                out.offset = 8;
                out.min = [0.0; 2];
            } else {
                out.offset = 0;
                let m = half(&b[2..]);
                out.min = [m, m];
            }
        }
        WeightFormat::Q8_0 => {
            let b = &row[i * 34..][..34];
            let d = half(b);
            out.w.copy_from_slice(&b[2..34]);
            out.signed = true;
            out.scale = [d, d];
            out.offset = 0;
            out.min = [0.0; 2];
        }
        WeightFormat::Q4K | WeightFormat::Q5K => {
            let size = if format == WeightFormat::Q4K { 144 } else { 176 };
            let b = &row[(i / 8) * size..][..size];
            let sub = i % 8; // sub-block of 32 within the 256
            let (pair, high) = (sub / 2, sub % 2 == 1);
            let (d, dmin) = (half(b), half(&b[2..]));
            let (sc, m) = scale_min(sub, &b[4..16]);
            let qs = if format == WeightFormat::Q4K { &b[16..144] } else { &b[48..176] };
            nibbles(&mut out.w, &qs[32 * pair..32 * pair + 32], high);
            if format == WeightFormat::Q5K {
                let bit = if high { 2u8 } else { 1u8 } << (2 * pair);
                for (o, h) in out.w.iter_mut().zip(&b[16..48]) {
                    if h & bit != 0 {
                        *o += 16;
                    }
                }
            }
            out.scale = [d * sc; 2];
            out.offset = 0;
            out.min = [-dmin * m; 2];
        }
        WeightFormat::Q6K => {
            let b = &row[(i / 8) * 210..][..210];
            let sub = i % 8; // 32 values: half n, quarter
            let (n, quarter) = (sub / 4, sub % 4);
            let (ql, qh, sc) = (&b[64 * n..], &b[128 + 32 * n..], &b[192 + 8 * n..]);
            let d = half(&b[208..]);
            for l in 0..32 {
                let low = if quarter & 1 == 1 { ql[l + 32] } else { ql[l] };
                let low = if quarter < 2 { low & 15 } else { low >> 4 };
                out.w[l] = low | (((qh[l] >> (2 * quarter)) & 3) << 4);
            }
            out.scale = [d * sc[2 * quarter] as i8 as f32, d * sc[2 * quarter + 1] as i8 as f32];
            out.offset = 32;
            out.min = [0.0; 2];
        }
        WeightFormat::F32 | WeightFormat::F16 | WeightFormat::BF16 => unreachable!("float weights take the float path"),
    }
}

/// One weight row times every row of `x`, added to `acc` (one per row
/// of `x`), through [`unpack`] and [`dot32`]: every format.
#[inline(always)]
fn row_unpacked(format: WeightFormat, row: &[u8], x: &QuantRows, acc: &mut [f32]) {
    let blocks = x.cols / 32;
    let mut u = Unpacked { w: [0; 32], signed: false, scale: [0.0; 2], offset: 0, min: [0.0; 2] };
    for b in 0..blocks {
        unpack(format, row, b, &mut u);
        for (r, a) in acc.iter_mut().enumerate() {
            let at = r * blocks + b;
            let (s0, s1) = dot32(&u.w, u.signed, &x.q[at * 32..at * 32 + 32]);
            let (n0, n1) = (x.sum16[2 * at], x.sum16[2 * at + 1]);
            let d = x.d[at];
            *a += d * (u.scale[0] * (s0 - u.offset * n0) as f32 + u.scale[1] * (s1 - u.offset * n1) as f32)
                + d * (u.min[0] * n0 as f32 + u.min[1] * n1 as f32);
        }
    }
}

/// Weight rows `start..end` times `x`: `acc` holds `x.rows` values per
/// weight row, in order.
fn rows(format: WeightFormat, w: &[u8], row_bytes: usize, start: usize, end: usize, x: &QuantRows, acc: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // Safety: AVX2, FMA and F16C are present (checked at run time).
        unsafe { avx2::rows(format, w, row_bytes, start, end, x, acc) };
        return;
    }
    for o in start..end {
        row_unpacked(format, &w[o * row_bytes..(o + 1) * row_bytes], x, &mut acc[(o - start) * x.rows..][..x.rows]);
    }
}

/// `x · wᵀ` for a weight of `out` rows of `format` (`x.cols` values
/// each): `[x.rows, out]`. Output rows are split across threads in chunks.
pub fn linear(x: &QuantRows, format: WeightFormat, w: &[u8], out: usize) -> Vec<f32> {
    let row_bytes = format.row_bytes(x.cols).expect("checked by the caller");
    let chunk = out.div_ceil(4 * rayon::current_num_threads()).max(8);
    let columns: Vec<Vec<f32>> = (0..out.div_ceil(chunk))
        .into_par_iter()
        .map(|c| {
            let (start, end) = (c * chunk, ((c + 1) * chunk).min(out));
            let mut y = vec![0f32; (end - start) * x.rows];
            rows(format, w, row_bytes, start, end, x, &mut y);
            y
        })
        .collect();
    // Columns are stored column-major per chunk: transpose to [rows, out].
    let mut y = vec![0f32; x.rows * out];
    for (c, col) in columns.iter().enumerate() {
        for (o, values) in (c * chunk..).zip(col.chunks_exact(x.rows)) {
            for (r, v) in values.iter().enumerate() {
                y[r * out + o] = *v;
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant;

    fn rng(seed: &mut u64) -> f32 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        (*seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// Random blocks with small finite f16 scales.
    fn blocks(format: WeightFormat, rows: usize, cols: usize, seed: &mut u64) -> Vec<u8> {
        let (values, size) = format.block();
        let mut bytes: Vec<u8> = (0..rows * cols / values * size).map(|_| (rng(seed) * 128.0 + 128.0) as u8).collect();
        let halves: &[usize] = match format {
            WeightFormat::Q4_0 | WeightFormat::Q8_0 => &[0],
            WeightFormat::Q4_1 | WeightFormat::Q4K | WeightFormat::Q5K => &[0, 2],
            _ => &[208],
        };
        for block in bytes.chunks_exact_mut(size) {
            for &at in halves {
                let h = 0x2000u16 | (u16::from_le_bytes([block[at], block[at + 1]]) & 0x83ff);
                block[at..at + 2].copy_from_slice(&h.to_le_bytes());
            }
        }
        bytes
    }

    /// Against the decoded weights times the quantised activations (what
    /// the integers stand for), every format: equal but for rounding.
    /// Row counts of x that take every tile size (1 to 4) and several tiles.
    const ROWS: [usize; 5] = [1, 2, 4, 5, 9];

    #[test]
    fn integer_products_match_decoded_weights() {
        let mut seed = 0x5eed;
        let (cols, out) = (512, 21);
        for rows in ROWS {
            let x: Vec<f32> = (0..rows * cols).map(|_| rng(&mut seed) * 2.0).collect();
            let qx = quantize_rows(&x, rows, cols);
            let xq: Vec<f32> = qx.q.iter().enumerate().map(|(i, q)| *q as f32 * qx.d[i / 32]).collect();
            for format in [WeightFormat::Q4_0, WeightFormat::Q4_1, WeightFormat::Q8_0, WeightFormat::Q4K, WeightFormat::Q5K, WeightFormat::Q6K] {
                let w = blocks(format, out, cols, &mut seed);
                let dw = quant::decode(format, &w);
                let y = linear(&qx, format, &w, out);
                for r in 0..rows {
                    for o in 0..out {
                        let want: f64 = (0..cols).map(|c| xq[r * cols + c] as f64 * dw[o * cols + c] as f64).sum();
                        let got = y[r * out + o] as f64;
                        assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "{format:?}, {rows} rows, at {r},{o}: {got} vs {want}");
                    }
                }
            }
        }
    }

    /// The generic unpacking path (what CPUs without AVX2 run for every
    /// format) against the AVX2 kernels, tile sizes 1 to 4.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_unpacking_path_agrees_with_the_avx2_kernels() {
        if !avx2() {
            eprintln!("NOT RUN: this CPU has no AVX2");
            return;
        }
        let mut seed = 0xa11;
        let (cols, out) = (512, 7);
        for rows in ROWS {
            let x: Vec<f32> = (0..rows * cols).map(|_| rng(&mut seed) * 2.0).collect();
            let qx = quantize_rows(&x, rows, cols);
            for format in [WeightFormat::Q4_0, WeightFormat::Q4_1, WeightFormat::Q8_0, WeightFormat::Q4K] {
                let w = blocks(format, out, cols, &mut seed);
                let row_bytes = format.row_bytes(cols).unwrap();
                let mut fast = vec![0f32; out * rows];
                // Safety: AVX2, FMA and F16C are present (checked above).
                unsafe { avx2::rows(format, &w, row_bytes, 0, out, &qx, &mut fast) };
                for o in 0..out {
                    let mut slow = vec![0f32; rows];
                    row_unpacked(format, &w[o * row_bytes..(o + 1) * row_bytes], &qx, &mut slow);
                    for r in 0..rows {
                        let (a, b) = (fast[o * rows + r], slow[r]);
                        assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{format:?}, {rows} rows, at {o},{r}: {a} vs {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_portable_dot_agrees_with_avx2() {
        let mut seed = 7;
        let w: [u8; 32] = std::array::from_fn(|_| (rng(&mut seed) * 63.0 + 64.0) as u8);
        let x: Vec<i8> = (0..32).map(|_| (rng(&mut seed) * 127.0) as i8).collect();
        let portable = |r: std::ops::Range<usize>| r.map(|i| w[i] as i32 * x[i] as i32).sum::<i32>();
        assert_eq!(dot32(&w, false, &x), (portable(0..16), portable(16..32)));
        // Signed weights, the extremes included.
        let s: [u8; 32] = std::array::from_fn(|i| if i == 0 { 0x80 } else { (rng(&mut seed) * 127.0) as i8 as u8 });
        let signed = |r: std::ops::Range<usize>| r.map(|i| s[i] as i8 as i32 * x[i] as i32).sum::<i32>();
        assert_eq!(dot32(&s, true, &x), (signed(0..16), signed(16..32)));
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_avx2_quantiser_agrees_with_the_portable_one() {
        if !avx2() {
            eprintln!("NOT RUN: this CPU has no AVX2");
            return;
        }
        let mut seed = 11;
        for case in 0..200 {
            // Ties (x.5 after scaling) and all-zero blocks included.
            let xs: [f32; 32] = std::array::from_fn(|i| match case % 3 {
                0 => rng(&mut seed) * 10.0,
                1 => (i as f32 - 16.0) * 0.5,
                _ => 0.0,
            });
            let (mut a, mut b) = ([0i8; 32], [0i8; 32]);
            // Safety: AVX2 is present (checked above).
            let fast = unsafe { avx2::quantize32(&xs, &mut a) };
            assert_eq!(fast, quantize32(&xs, &mut b), "case {case}");
            assert_eq!(a, b, "case {case}");
        }
    }
}

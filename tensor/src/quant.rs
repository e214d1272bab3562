//! GGUF's weight encodings, block by block: half and bfloat16 floats, and
//! the quantised blocks (Q4_0, Q4_1, Q8_0; the K-quants Q4_K, Q5_K, Q6_K).
//! Each decoder turns one block into its values; kernels decode blocks as
//! they compute rather than keeping whole tensors as floats.

use crate::backend::WeightFormat;

/// IEEE half precision bits to `f32`.
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: normalise.
            let shift = frac.leading_zeros() - 21;
            let frac = (frac << shift) & 0x3ff;
            sign | ((113 - shift) << 23) | (frac << 13)
        }
        (0x1f, _) => sign | 0x7f80_0000 | (frac << 13),
        _ => sign | ((exp + 112) << 23) | (frac << 13),
    };
    f32::from_bits(bits)
}

/// bfloat16 bits to `f32`.
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

fn half(b: &[u8]) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[0], b[1]]))
}

/// Decodes one block of `format` (`block` is exactly its bytes) into `out`
/// (exactly its values).
pub fn decode_block(format: WeightFormat, block: &[u8], out: &mut [f32]) {
    debug_assert_eq!((block.len(), out.len()), (format.block().1, format.block().0));
    match format {
        WeightFormat::F32 => out[0] = f32::from_le_bytes([block[0], block[1], block[2], block[3]]),
        WeightFormat::F16 => out[0] = half(block),
        WeightFormat::BF16 => out[0] = bf16_to_f32(u16::from_le_bytes([block[0], block[1]])),
        WeightFormat::Q4_0 => {
            let d = half(block);
            for (j, q) in block[2..18].iter().enumerate() {
                out[j] = ((q & 0x0f) as f32 - 8.0) * d;
                out[j + 16] = ((q >> 4) as f32 - 8.0) * d;
            }
        }
        WeightFormat::Q4_1 => {
            let (d, m) = (half(block), half(&block[2..]));
            for (j, q) in block[4..20].iter().enumerate() {
                out[j] = (q & 0x0f) as f32 * d + m;
                out[j + 16] = (q >> 4) as f32 * d + m;
            }
        }
        WeightFormat::Q8_0 => {
            let d = half(block);
            for (o, q) in out.iter_mut().zip(&block[2..34]) {
                *o = *q as i8 as f32 * d;
            }
        }
        WeightFormat::Q4K => {
            let (d, dmin) = (half(block), half(&block[2..]));
            let (scales, qs) = (&block[4..16], &block[16..144]);
            for j in 0..4 {
                let (sc1, m1) = scale_min_k4(2 * j, scales);
                let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
                let q = &qs[32 * j..32 * j + 32];
                let y = &mut out[64 * j..64 * j + 64];
                for l in 0..32 {
                    y[l] = d * sc1 as f32 * (q[l] & 0x0f) as f32 - dmin * m1 as f32;
                    y[l + 32] = d * sc2 as f32 * (q[l] >> 4) as f32 - dmin * m2 as f32;
                }
            }
        }
        WeightFormat::Q5K => {
            let (d, dmin) = (half(block), half(&block[2..]));
            let (scales, qh, qs) = (&block[4..16], &block[16..48], &block[48..176]);
            for j in 0..4 {
                let (sc1, m1) = scale_min_k4(2 * j, scales);
                let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
                let (u1, u2) = (1u8 << (2 * j), 2u8 << (2 * j));
                let q = &qs[32 * j..32 * j + 32];
                let y = &mut out[64 * j..64 * j + 64];
                for l in 0..32 {
                    let lo = (q[l] & 0x0f) + if qh[l] & u1 != 0 { 16 } else { 0 };
                    let hi = (q[l] >> 4) + if qh[l] & u2 != 0 { 16 } else { 0 };
                    y[l] = d * sc1 as f32 * lo as f32 - dmin * m1 as f32;
                    y[l + 32] = d * sc2 as f32 * hi as f32 - dmin * m2 as f32;
                }
            }
        }
        WeightFormat::Q6K => {
            let (ql, qh, scales) = (&block[0..128], &block[128..192], &block[192..208]);
            let d = half(&block[208..]);
            for n in 0..2 {
                let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &scales[8 * n..]);
                let y = &mut out[128 * n..128 * n + 128];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    y[l] = d * (sc[is] as i8 as f32) * q1 as f32;
                    y[l + 32] = d * (sc[is + 2] as i8 as f32) * q2 as f32;
                    y[l + 64] = d * (sc[is + 4] as i8 as f32) * q3 as f32;
                    y[l + 96] = d * (sc[is + 6] as i8 as f32) * q4 as f32;
                }
            }
        }
    }
}

/// The 6-bit scale and minimum of sub-block `j` of a Q4_K or Q5_K block.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Decodes whole rows: `bytes` holds a whole number of `format` blocks;
/// returns their values.
pub fn decode(format: WeightFormat, bytes: &[u8]) -> Vec<f32> {
    // Plain floats element by element, without a block decoder per value
    // (models load hundreds of MiB of them).
    match format {
        WeightFormat::F32 => return bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        WeightFormat::F16 => return bytes.chunks_exact(2).map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect(),
        WeightFormat::BF16 => return bytes.chunks_exact(2).map(|b| bf16_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect(),
        _ => {}
    }
    let (values, size) = format.block();
    let mut out = vec![0.0; bytes.len() / size * values];
    for (block, y) in bytes.chunks_exact(size).zip(out.chunks_exact_mut(values)) {
        decode_block(format, block, y);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 5.960_464_5e-8);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert!(f16_to_f32(0x7c00).is_infinite());
        assert_eq!(bf16_to_f32(0x3f80), 1.0);
    }

    #[test]
    fn simple_blocks_decode_by_hand() {
        // Q8_0: scale 0.5 (0x3800), values -2, 0, 4, ...
        let mut block = vec![0x00, 0x38];
        block.extend((0..32).map(|i: i32| ((i - 2) * 2) as i8 as u8));
        let out = decode(WeightFormat::Q8_0, &block);
        assert_eq!(&out[..3], &[-2.0, -1.0, 0.0]);
        // Q4_0: scale 1, nibbles 0 and 15 -> -8 and 7.
        let mut block = vec![0x00, 0x3c];
        block.extend([0xf0u8; 16]);
        let out = decode(WeightFormat::Q4_0, &block);
        assert_eq!((out[0], out[16]), (-8.0, 7.0));
    }
}

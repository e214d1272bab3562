// Reading GGUF-encoded weight rows, prepended to the kernels that bind the
// weight as `w: array<u32>` (WGSL lets functions name module variables
// declared later). Formats: 0 f32, 1 Q4_0, 2 Q4_1, 3 Q8_0, 4 f16, 5 bf16,
// 6 Q4_K, 7 Q5_K, 8 Q6_K, with GGUF's block layouts (src/quant.rs). Half
// floats are read with unpack2x16float, so no SHADER_F16 is needed.

fn byte_at(i: u32) -> u32 { return (w[i >> 2u] >> ((i & 3u) * 8u)) & 0xffu; }
fn half_at(i: u32) -> f32 { return unpack2x16float(byte_at(i) | (byte_at(i + 1u) << 8u)).x; }
fn signed(b: u32) -> f32 { return f32(bitcast<i32>(b << 24u) >> 24u); }

// The 6-bit scale (x) and minimum (y) of sub-block j of a Q4_K or Q5_K
// block whose scales start at byte `q`.
fn scale_min_k4(j: u32, q: u32) -> vec2<f32> {
    if (j < 4u) {
        return vec2<f32>(f32(byte_at(q + j) & 63u), f32(byte_at(q + j + 4u) & 63u));
    }
    let sc = (byte_at(q + j + 4u) & 15u) | ((byte_at(q + j - 4u) >> 6u) << 4u);
    let m = (byte_at(q + j + 4u) >> 4u) | ((byte_at(q + j) >> 6u) << 4u);
    return vec2<f32>(f32(sc), f32(m));
}

// Value `c` of the row that starts at byte `row`.
fn value_at(format: u32, row: u32, c: u32) -> f32 {
    let j = c % 32u;
    switch format {
        case 4u: { return half_at(row + 2u * c); }
        case 5u: { return bitcast<f32>((byte_at(row + 2u * c) | (byte_at(row + 2u * c + 1u) << 8u)) << 16u); }
        case 6u, 7u: {
            var size = 144u;
            var qs = 16u;
            if (format == 7u) { size = 176u; qs = 48u; }
            let b = row + (c / 256u) * size;
            let i = c % 256u;
            let pair = i / 64u;
            let l = i % 32u;
            let hi = (i % 64u) >= 32u;
            let sm = scale_min_k4(2u * pair + select(0u, 1u, hi), b + 4u);
            let byte = byte_at(b + qs + 32u * pair + l);
            var q = select(byte & 15u, byte >> 4u, hi);
            if (format == 7u && (byte_at(b + 16u + l) & (select(1u, 2u, hi) << (2u * pair))) != 0u) { q = q + 16u; }
            return half_at(b) * sm.x * f32(q) - half_at(b + 2u) * sm.y;
        }
        case 8u: {
            let b = row + (c / 256u) * 210u;
            let i = c % 256u;
            let n = i / 128u;
            let quarter = (i % 128u) / 32u;
            let l = i % 32u;
            let low = byte_at(b + 64u * n + l + select(0u, 32u, (quarter & 1u) == 1u));
            let high = (byte_at(b + 128u + 32u * n + l) >> (2u * quarter)) & 3u;
            let q = select(low & 15u, low >> 4u, quarter >= 2u) | (high << 4u);
            let sc = signed(byte_at(b + 192u + 8u * n + l / 16u + 2u * quarter));
            return half_at(b + 208u) * sc * (f32(q) - 32.0);
        }
        case 0u: { return bitcast<f32>(w[row / 4u + c]); }
        case 1u: {
            let off = row + (c / 32u) * 18u;
            let q = byte_at(off + 2u + j % 16u);
            return (f32(select(q & 15u, q >> 4u, j >= 16u)) - 8.0) * half_at(off);
        }
        case 2u: {
            let off = row + (c / 32u) * 20u;
            let q = byte_at(off + 4u + j % 16u);
            return f32(select(q & 15u, q >> 4u, j >= 16u)) * half_at(off) + half_at(off + 2u);
        }
        default: {
            let off = row + (c / 32u) * 34u;
            return signed(byte_at(off + 2u + j)) * half_at(off);
        }
    }
}

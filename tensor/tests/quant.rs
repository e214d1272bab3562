//! GGUF's block formats decoded by `quant.rs` against the reference: the
//! `gguf` Python package (llama.cpp's own, from PyPI, in target/venv via
//! scripts/python-env.sh), on random blocks of every format. Every
//! backend's quantised kernels are tested against `quant::decode`
//! (tests/backends.rs), so this pins them all to llama.cpp's layouts.

use gpuwasm_tensor::backend::WeightFormat;
use gpuwasm_tensor::quant;
use std::path::Path;
use std::process::Command;

/// Random bytes whose f16 scales (at `halves` in each block) are small
/// and finite, as a real model's are.
fn blocks(format: WeightFormat, count: usize, seed: u64) -> Vec<u8> {
    let (_, size) = format.block();
    let mut state = seed;
    let mut bytes: Vec<u8> = (0..count * size)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let halves: &[usize] = match format {
        WeightFormat::Q4_0 | WeightFormat::Q8_0 => &[0],
        WeightFormat::Q4_1 | WeightFormat::Q4K | WeightFormat::Q5K => &[0, 2],
        WeightFormat::Q6K => &[208],
        // Every value is a half (or a bfloat16): keep them finite.
        WeightFormat::F16 | WeightFormat::BF16 => &[0],
        WeightFormat::F32 => &[],
    };
    for block in bytes.chunks_exact_mut(size) {
        for &at in halves {
            let h = match format {
                // bfloat16 of magnitude 2^-6..2^2, random sign.
                WeightFormat::BF16 => 0x3c80 | (u16::from_le_bytes([block[at], block[at + 1]]) & 0x837f),
                // f16 of magnitude 2^-7..2^0, random sign.
                _ => 0x2000 | (u16::from_le_bytes([block[at], block[at + 1]]) & 0x8fff),
            };
            block[at..at + 2].copy_from_slice(&h.to_le_bytes());
        }
    }
    bytes
}

#[test]
fn block_formats_decode_as_llama_cpp_does() {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/venv/bin/python");
    let has_gguf = python.exists() && Command::new(&python).args(["-c", "import gguf"]).status().is_ok_and(|s| s.success());
    assert!(has_gguf, "{} has no gguf package: run scripts/python-env.sh first (scripts/test.sh does)", python.display());
    let dir = tempfile::tempdir().unwrap();
    let formats = [
        (WeightFormat::F16, "F16"),
        (WeightFormat::BF16, "BF16"),
        (WeightFormat::Q4_0, "Q4_0"),
        (WeightFormat::Q4_1, "Q4_1"),
        (WeightFormat::Q8_0, "Q8_0"),
        (WeightFormat::Q4K, "Q4_K"),
        (WeightFormat::Q5K, "Q5_K"),
        (WeightFormat::Q6K, "Q6_K"),
    ];
    for (i, (format, name)) in formats.into_iter().enumerate() {
        let bytes = blocks(format, 64, 0x1234_5678 + i as u64);
        let input = dir.path().join(format!("{name}.bin"));
        let output = dir.path().join(format!("{name}.f32"));
        std::fs::write(&input, &bytes).unwrap();
        let script = "import sys, numpy as np, gguf\n\
            from gguf.quants import dequantize\n\
            data = np.fromfile(sys.argv[1], dtype=np.uint8)\n\
            dequantize(data, gguf.GGMLQuantizationType[sys.argv[2]]).astype(np.float32).tofile(sys.argv[3])\n";
        let status = Command::new(&python).args(["-c", script, input.to_str().unwrap(), name, output.to_str().unwrap()]).status().unwrap();
        assert!(status.success(), "gguf failed on {name}");
        let reference: Vec<f32> = std::fs::read(&output).unwrap().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let ours = quant::decode(format, &bytes);
        assert_eq!(ours.len(), reference.len(), "{name}: value count");
        for (j, (a, b)) in ours.iter().zip(&reference).enumerate() {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-3), "{name}: value {j} is {a}, llama.cpp's gguf says {b}");
        }
        eprintln!("quant: {name}: {} values match llama.cpp's gguf", ours.len());
    }
}

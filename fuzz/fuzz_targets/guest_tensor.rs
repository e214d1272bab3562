//! A tensor as a guest sends it through wasi-nn (type, dimensions, bytes),
//! decoded as the host decodes it, then given to a real graph (the
//! digits classifier) as its input, within a call's memory.
//!
//! Input: byte 0 picks the type, byte 1 the rank (0 to 4), then two bytes
//! per dimension (little-endian), a byte choosing the input's name, and
//! the rest is the tensor's data.
#![no_main]

use gpuwasm_tensor::backend::cpu::CpuBackend;
use gpuwasm_tensor::{Budget, DType, Format, Graph, Tensor};
use std::sync::{Arc, OnceLock};

fn digits() -> &'static Arc<dyn Graph> {
    static GRAPH: OnceLock<Arc<dyn Graph>> = OnceLock::new();
    GRAPH.get_or_init(|| {
        let bytes = include_bytes!("../../examples/classify/digits.onnx");
        let files = [("digits.onnx".to_string(), bytes.to_vec().into())].into();
        gpuwasm_tensor::load(Format::Onnx, &files, Arc::new(CpuBackend::new())).expect("the digits model loads")
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let [ty, rank, rest @ ..] = data else { return };
    let types = [DType::F16, DType::F32, DType::F64, DType::BF16, DType::U8, DType::I32, DType::I64];
    let ty = types[*ty as usize % types.len()];
    let rank = (*rank % 5) as usize;
    if rest.len() < rank * 2 + 1 {
        return;
    }
    let shape: Vec<usize> = rest[..rank * 2].chunks(2).map(|d| u16::from_le_bytes([d[0], d[1]]) as usize).collect();
    let name = ["pixels", "text", "other"][rest[rank * 2] as usize % 3];
    let Ok(tensor) = Tensor::from_bytes(shape, ty, &rest[rank * 2 + 1..]) else { return };
    let _ = digits().run(vec![(name.to_string(), tensor)], &Budget::new(64 << 20));
});

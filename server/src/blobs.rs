//! Durable, content-addressed bytes: uploaded components, pre-initialised
//! snapshots, deployment files and model files. [`BlobStore`] is the seam:
//! the local directory here is the single-node default; an S3-compatible
//! store for several nodes implements the same methods. (Compiled artifacts
//! are a per-node cache beside it, rebuilt from these blobs when missing.)

use crate::durable::write_atomic;
use crate::error::Error;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// A stored blob, as [`BlobStore::list`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobInfo {
    /// Its key.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
    /// When it was stored.
    pub stored_at: SystemTime,
}

/// Stores immutable blobs by key. Keys are `/`-separated plain names.
pub trait BlobStore: Send + Sync {
    /// Stores `bytes` under `key`, durably; storing the same key again is
    /// a no-op.
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), Error>;
    /// Stores the contents of the local file `path` under `key` (durably,
    /// a no-op when the key is stored), consuming the file: what uploads
    /// streamed to disk use, so a large blob is never held in memory.
    fn put_file(&self, key: &str, path: &Path) -> Result<(), Error>;
    /// The bytes under `key`, if stored.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Error>;
    /// Whether `key` is stored.
    fn contains(&self, key: &str) -> Result<bool, Error>;
    /// Every blob whose key starts with `prefix` (a whole number of
    /// segments, ending in `/`).
    fn list(&self, prefix: &str) -> Result<Vec<BlobInfo>, Error>;
    /// Removes `key`; removing a key that is not stored is a no-op.
    fn delete(&self, key: &str) -> Result<(), Error>;
    /// A local file holding the blob, when the store keeps one (so that
    /// deployment files can be hard-linked rather than copied).
    fn local_path(&self, key: &str) -> Option<PathBuf>;
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
        check_key(key)?;
        Ok(self.dir.join(key))
    }

    /// The path for `key` with its parent directory created.
    fn path_for_writing(&self, key: &str) -> Result<PathBuf, Error> {
        let path = self.path(key)?;
        let parent = path.parent().expect("blob paths have a parent");
        std::fs::create_dir_all(parent).map_err(|e| Error::io("creating a blob directory", parent, e))?;
        Ok(path)
    }
}

impl BlobStore for LocalBlobStore {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), Error> {
        let path = self.path(key)?;
        if path.exists() {
            return touch(&path);
        }
        write_atomic(&self.path_for_writing(key)?, bytes)
    }

    fn put_file(&self, key: &str, file: &Path) -> Result<(), Error> {
        let path = self.path_for_writing(key)?;
        if path.exists() {
            std::fs::remove_file(file).map_err(|e| Error::io("removing an upload", file, e))?;
            return touch(&path);
        }
        let io = |e| Error::io("storing an upload", &path, e);
        std::fs::File::open(file).and_then(|f| f.sync_all()).map_err(io)?;
        match std::fs::rename(file, &path) {
            // A shared blob directory (a network file system) is another
            // file system than the node's uploads: copy it over, then move
            // it into place.
            Err(e) if e.kind() == std::io::ErrorKind::CrossesDevices => {
                let tmp = path.with_file_name(format!(".{}.tmp-{}", path.file_name().and_then(|n| n.to_str()).unwrap_or("blob"), std::process::id()));
                let copied = std::fs::copy(file, &tmp).and_then(|_| std::fs::File::open(&tmp)?.sync_all()).and_then(|()| std::fs::rename(&tmp, &path));
                if copied.is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
                copied.map_err(io)?;
                std::fs::remove_file(file).map_err(|e| Error::io("removing an upload", file, e))?;
            }
            moved => moved.map_err(io)?,
        }
        std::fs::File::open(path.parent().expect("blob paths have a parent")).and_then(|d| d.sync_all()).map_err(io)
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

    fn list(&self, prefix: &str) -> Result<Vec<BlobInfo>, Error> {
        let root = self.path(prefix.trim_end_matches('/'))?;
        let mut out = Vec::new();
        let mut pending = vec![root];
        while let Some(dir) = pending.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("listing blobs", &dir, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| Error::io("listing blobs", &dir, e))?;
                let name = entry.file_name();
                // Leftovers of interrupted writes are not blobs.
                if name.to_string_lossy().starts_with('.') {
                    continue;
                }
                let meta = entry.metadata().map_err(|e| Error::io("listing blobs", entry.path(), e))?;
                if meta.is_dir() {
                    pending.push(entry.path());
                } else if let Ok(relative) = entry.path().strip_prefix(&self.dir) {
                    out.push(BlobInfo {
                        key: relative.to_string_lossy().into_owned(),
                        size: meta.len(),
                        stored_at: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    });
                }
            }
        }
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<(), Error> {
        let path = self.path(key)?;
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io("removing a blob", &path, e)),
            _ => Ok(()),
        }
    }

    fn local_path(&self, key: &str) -> Option<PathBuf> {
        self.path(key).ok().filter(|p| p.is_file())
    }
}

/// Refuses a key that is not a `/`-separated list of plain names.
pub(crate) fn check_key(key: &str) -> Result<(), Error> {
    let plain = !key.is_empty() && key.split('/').all(|s| !s.is_empty() && s != "." && s != ".." && !s.contains('\0'));
    if !plain {
        return Err(Error::BlobKey(key.to_string()));
    }
    Ok(())
}

/// Marks a blob stored again as new: the collector counts an unreferenced
/// blob's age from its last upload, so a deploy or push about to use it
/// again does not lose it.
fn touch(path: &Path) -> Result<(), Error> {
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(SystemTime::now()))
        .map_err(|e| Error::io("touching a blob", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_contains_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(dir.path().to_path_buf()).unwrap();
        assert!(!store.contains("a/b").unwrap());
        assert_eq!(store.get("a/b").unwrap(), None);
        store.put("a/b", b"one").unwrap();
        let old = SystemTime::now() - std::time::Duration::from_secs(3600);
        std::fs::File::options().write(true).open(dir.path().join("a/b")).unwrap().set_modified(old).unwrap();
        store.put("a/b", b"ignored: blobs are immutable").unwrap();
        let fresh = store.list("a/").unwrap()[0].stored_at.elapsed().unwrap();
        assert!(fresh < std::time::Duration::from_secs(60), "storing it again makes it new for the collector");
        assert_eq!(store.get("a/b").unwrap().as_deref(), Some(&b"one"[..]));
        assert!(store.contains("a/b").unwrap());
        assert!(store.put("../escape", b"x").is_err());

        let upload = dir.path().join("upload.tmp");
        std::fs::write(&upload, b"streamed").unwrap();
        store.put_file("a/c/d", &upload).unwrap();
        assert!(!upload.exists(), "the upload is moved into the store");
        assert_eq!(store.get("a/c/d").unwrap().as_deref(), Some(&b"streamed"[..]));
        let mut keys: Vec<(String, u64)> = store.list("a/").unwrap().into_iter().map(|b| (b.key, b.size)).collect();
        keys.sort();
        assert_eq!(keys, [("a/b".to_string(), 3), ("a/c/d".to_string(), 8)]);
        assert!(store.list("nothing/").unwrap().is_empty());
        assert_eq!(store.local_path("a/b"), Some(dir.path().join("a/b")));
        store.delete("a/b").unwrap();
        store.delete("a/b").unwrap();
        assert!(!store.contains("a/b").unwrap() && store.local_path("a/b").is_none());
    }
}

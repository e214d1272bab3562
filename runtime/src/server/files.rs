//! Files a deployment serves read-only (`[files]` in gpuwasm.toml):
//! uploaded by a tenant as content-addressed blobs (`files/<tenant>/<sha256>`
//! in the [`BlobStore`]), assembled on this node into a directory tree named
//! by the hash of its file map, and preopened read-only at `/` for every
//! instance.

use crate::artifacts::sha256_hex;
use crate::blobs::BlobStore;
use crate::error::Error;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

pub(crate) struct FileStore {
    /// Where trees are assembled.
    root: PathBuf,
    blobs: Arc<dyn BlobStore>,
}

impl FileStore {
    pub fn open(root: PathBuf, blobs: Arc<dyn BlobStore>) -> Result<Self, Error> {
        std::fs::create_dir_all(&root).map_err(|e| Error::io("creating the files directory", &root, e))?;
        Ok(FileStore { root, blobs })
    }

    fn blob_key(tenant: &str, sha256: &str) -> String {
        format!("files/{tenant}/{sha256}")
    }

    /// Stores `bytes` for `tenant` under `expected` (its SHA-256), once.
    pub fn put_blob(&self, tenant: &str, expected: &str, bytes: &[u8]) -> Result<(), String> {
        let actual = sha256_hex(bytes);
        if actual != expected {
            return Err(format!("content has SHA-256 {actual}, not {expected}"));
        }
        self.blobs.put(&Self::blob_key(tenant, expected), bytes).map_err(|e| e.to_string())
    }

    /// Checks `files` (guest path -> SHA-256): sane paths, and every blob
    /// uploaded by `tenant`.
    pub fn check(&self, tenant: &str, files: &BTreeMap<String, String>) -> Result<(), String> {
        for (path, sha256) in files {
            check_file_path(path)?;
            if !self.blobs.contains(&Self::blob_key(tenant, sha256)).map_err(|e| e.to_string())? {
                return Err(format!("file {path:?}: content {sha256} was not uploaded (PUT /_gpuwasm/v1/files/SHA256 first)"));
            }
        }
        Ok(())
    }

    /// The directory holding `files`, assembled from `tenant`'s blobs if
    /// it is not there yet; `None` for no files.
    pub fn tree(&self, tenant: &str, files: &BTreeMap<String, String>) -> Result<Option<PathBuf>, Error> {
        if files.is_empty() {
            return Ok(None);
        }
        let id = sha256_hex(serde_json::to_string(files).expect("file maps serialise").as_bytes());
        let dest = self.root.join("trees").join(tenant).join(&id);
        if dest.is_dir() {
            return Ok(Some(dest));
        }
        let unique = super::control::random_hex(8).map_err(|e| Error::io("assembling the deployment's files", &dest, e))?;
        let tmp = self.root.join("trees").join(tenant).join(format!(".{id}.tmp-{unique}"));
        let build = || -> Result<(), Error> {
            let io = |e| Error::io("assembling the deployment's files", &dest, e);
            for (path, sha256) in files {
                let target = tmp.join(path);
                std::fs::create_dir_all(target.parent().unwrap_or(&tmp)).map_err(io)?;
                let bytes = self.blobs.get(&Self::blob_key(tenant, sha256))?.ok_or_else(|| Error::CorruptState {
                    path: dest.clone(),
                    message: format!("file {path:?} ({sha256}) is missing from the blob store"),
                })?;
                std::fs::write(&target, bytes).map_err(io)?;
            }
            match std::fs::rename(&tmp, &dest) {
                // Assembled concurrently by another deploy: theirs is the same.
                Err(_) if dest.is_dir() => Ok(std::fs::remove_dir_all(&tmp).map_err(io)?),
                result => result.map_err(io),
            }
        };
        build().inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&tmp);
        })?;
        Ok(Some(dest))
    }
}

/// A file path inside the tree: relative, `/`-separated plain names only
/// (no empty, `.` or `..` segments).
pub(crate) fn check_file_path(path: &str) -> Result<(), String> {
    let plain = !path.is_empty()
        && path.len() <= 1024
        && !path.contains('\0')
        && path.split('/').all(|seg| !seg.is_empty() && seg != "." && seg != ".." && !seg.contains('\\'));
    if plain { Ok(()) } else { Err(format!("invalid file path {path:?}: use a relative path without `..`")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        for ok in ["a.txt", "dir/b.json", "x/y/z"] {
            assert!(check_file_path(ok).is_ok(), "{ok}");
        }
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "./a", "a/./b", "a//b", "a/"] {
            assert!(check_file_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn blobs_are_verified_and_trees_assembled() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Arc::new(crate::blobs::LocalBlobStore::open(dir.path().join("blobs")).unwrap());
        let store = FileStore::open(dir.path().join("trees"), blobs).unwrap();
        let sha = sha256_hex(b"hi");
        assert!(store.put_blob("t", &sha256_hex(b"other"), b"hi").unwrap_err().contains("not"));
        store.put_blob("t", &sha, b"hi").unwrap();
        let files = BTreeMap::from([("a/b.txt".to_string(), sha.clone())]);
        assert!(store.check("t", &files).is_ok());
        assert!(store.check("u", &files).unwrap_err().contains("was not uploaded"), "blobs are per tenant");
        let tree = store.tree("t", &files).unwrap().unwrap();
        assert_eq!(std::fs::read(tree.join("a/b.txt")).unwrap(), b"hi");
        assert_eq!(store.tree("t", &files).unwrap().unwrap(), tree);
        assert_eq!(store.tree("t", &BTreeMap::new()).unwrap(), None);
    }
}

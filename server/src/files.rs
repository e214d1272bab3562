//! Files a deployment serves read-only (`[files]` in gpuwasm.toml):
//! uploaded by a tenant as content-addressed blobs (`files/<tenant>/<sha256>`
//! in the [`BlobStore`]), assembled on this node into a directory tree named
//! by the hash of its file map, and preopened read-only at `/` for every
//! instance. Trees are built of hard links to the blobs where the store
//! keeps local files (copies otherwise), so a tree costs directory entries,
//! not bytes; trees no active deployment uses are removed.

use crate::api::ApiError;
use crate::blobs::BlobStore;
use crate::error::Error;
use crate::hex::sha256_hex;
use crate::uploads::Upload;
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Files one deployment may have.
pub(crate) const MAX_FILES: usize = 4096;
/// Folders one deployment's files may sit in.
pub(crate) const MAX_FOLDERS: usize = 1024;

pub(crate) struct FileStore {
    /// Where trees are assembled: `trees/<tenant>/<id>`.
    root: PathBuf,
    blobs: Arc<dyn BlobStore>,
}

impl FileStore {
    pub fn open(root: PathBuf, blobs: Arc<dyn BlobStore>) -> Result<Self, Error> {
        std::fs::create_dir_all(&root).map_err(|e| Error::io("creating the files directory", &root, e))?;
        Ok(FileStore { root, blobs })
    }

    pub(crate) fn blob_key(tenant: &str, sha256: &str) -> String {
        format!("files/{tenant}/{sha256}")
    }

    /// Stores `upload` for `tenant` under `expected` (its SHA-256), once.
    pub async fn put(&self, tenant: &str, expected: &str, upload: Upload) -> Result<(), ApiError> {
        store_upload(&self.blobs, Self::blob_key(tenant, expected), expected, upload).await
    }

    /// Checks `files` (guest path -> SHA-256): sane paths that do not
    /// collide (no path is both a file and a folder), at most
    /// [`MAX_FILES`], and every blob uploaded by `tenant`.
    pub fn check(&self, tenant: &str, files: &BTreeMap<String, String>) -> Result<(), String> {
        if files.len() > MAX_FILES {
            return Err(format!("{} files; a deployment may have at most {MAX_FILES}", files.len()));
        }
        let folders: HashSet<&str> = files.keys().flat_map(|p| p.match_indices('/').map(|(i, _)| &p[..i])).collect();
        if folders.len() > MAX_FOLDERS {
            return Err(format!("the files sit in {} folders; a deployment's may sit in at most {MAX_FOLDERS}", folders.len()));
        }
        for (path, sha256) in files {
            check_file_path(path)?;
            // In sorted order, "a/b" follows "a" and anything else starting with "a".
            let folder = format!("{path}/");
            if let Some((inside, _)) = files.range(folder.clone()..).next().filter(|(p, _)| p.starts_with(&folder)) {
                return Err(format!("file path {path:?} is also the folder of {inside:?}"));
            }
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
        let dest = self.root.join("trees").join(tenant).join(tree_id(files));
        if dest.is_dir() {
            // In use again: the collector counts its age from now.
            let _ = std::fs::File::open(&dest).and_then(|d| d.set_modified(SystemTime::now()));
            return Ok(Some(dest));
        }
        let unique = crate::hex::random_hex(8).map_err(|e| Error::io("assembling the deployment's files", &dest, e))?;
        let tmp = self.root.join("trees").join(tenant).join(format!(".{}.tmp-{unique}", tree_id(files)));
        let build = || -> Result<(), Error> {
            let io = |e| Error::io("assembling the deployment's files", &dest, e);
            for (path, sha256) in files {
                let target = tmp.join(path);
                std::fs::create_dir_all(target.parent().unwrap_or(&tmp)).map_err(io)?;
                let key = Self::blob_key(tenant, sha256);
                let missing = || Error::CorruptState {
                    path: dest.clone(),
                    message: format!("file {path:?} ({sha256}) is missing from the blob store"),
                };
                // Blobs are immutable and the guest sees the tree read-only:
                // a hard link shares the bytes safely.
                let linked = self.blobs.local_path(&key).is_some_and(|blob| std::fs::hard_link(blob, &target).is_ok());
                if !linked {
                    let bytes = self.blobs.get(&key)?.ok_or_else(missing)?;
                    std::fs::write(&target, bytes).map_err(io)?;
                }
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

    /// Removes the trees no deployment in `keep` ((tenant, file map))
    /// uses, if they were assembled more than `grace` ago (a deploy in
    /// progress may be about to use a newer one). A removed tree is
    /// assembled again if a rollback needs it.
    pub fn remove_unused_trees<'a>(&self, keep: impl IntoIterator<Item = (&'a str, &'a BTreeMap<String, String>)>, grace: Duration) {
        let keep: HashSet<PathBuf> =
            keep.into_iter().filter(|(_, f)| !f.is_empty()).map(|(t, f)| self.root.join("trees").join(t).join(tree_id(f))).collect();
        let Ok(tenants) = std::fs::read_dir(self.root.join("trees")) else { return };
        let old_enough = |path: &PathBuf| {
            let modified = std::fs::metadata(path).and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
            modified.elapsed().is_ok_and(|age| age >= grace)
        };
        for tenant in tenants.flatten() {
            let Ok(trees) = std::fs::read_dir(tenant.path()) else { continue };
            for tree in trees.flatten().map(|t| t.path()) {
                if !keep.contains(&tree) && old_enough(&tree) && std::fs::remove_dir_all(&tree).is_ok() {
                    tracing::info!(tree = %tree.display(), "removed a file tree no deployment uses");
                }
            }
        }
    }
}

/// Stores `upload` under `key` when its SHA-256 is `expected` (on a
/// blocking thread: it is synced and moved into the store).
pub(crate) async fn store_upload(blobs: &Arc<dyn BlobStore>, key: String, expected: &str, upload: Upload) -> Result<(), ApiError> {
    if upload.sha256 != expected {
        return Err(ApiError::bad_request("bad_file", format!("content has SHA-256 {}, not {expected}", upload.sha256)));
    }
    let blobs = blobs.clone();
    tokio::task::spawn_blocking(move || blobs.put_file(&key, &upload.path))
        .await
        .map_err(|e| ApiError::internal(format!("storing the upload failed: {e}")))??;
    Ok(())
}

/// A tree's name: the hash of its file map.
fn tree_id(files: &BTreeMap<String, String>) -> String {
    sha256_hex(serde_json::to_string(files).expect("file maps serialise").as_bytes())
}

/// A file path inside the tree: relative, `/`-separated plain names of at
/// most 255 bytes each (no empty, `.` or `..` segments).
pub(crate) fn check_file_path(path: &str) -> Result<(), String> {
    let plain = !path.is_empty()
        && path.len() <= 1024
        && !path.contains('\0')
        && path.split('/').all(|seg| !seg.is_empty() && seg.len() <= 255 && seg != "." && seg != ".." && !seg.contains('\\'));
    if plain {
        Ok(())
    } else {
        Err(format!("invalid file path {path:?}: use a relative path without `..`, of names at most 255 bytes long"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        for ok in ["a.txt", "dir/b.json", "x/y/z"] {
            assert!(check_file_path(ok).is_ok(), "{ok}");
        }
        let long = "x".repeat(300);
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "./a", "a/./b", "a//b", "a/", long.as_str()] {
            assert!(check_file_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn blobs_are_verified_and_trees_linked_checked_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Arc::new(crate::blobs::LocalBlobStore::open(dir.path().join("blobs")).unwrap());
        let store = FileStore::open(dir.path().join("trees"), blobs.clone()).unwrap();
        let sha = sha256_hex(b"hi");
        blobs.put(&FileStore::blob_key("t", &sha), b"hi").unwrap();
        let files = BTreeMap::from([("a/b.txt".to_string(), sha.clone())]);
        assert!(store.check("t", &files).is_ok());
        assert!(store.check("u", &files).unwrap_err().contains("was not uploaded"), "blobs are per tenant");
        let colliding = BTreeMap::from([("a".to_string(), sha.clone()), ("a/b".to_string(), sha.clone())]);
        assert_eq!(store.check("t", &colliding).unwrap_err(), "file path \"a\" is also the folder of \"a/b\"");
        let many: BTreeMap<String, String> = (0..=MAX_FILES).map(|i| (format!("f{i}"), sha.clone())).collect();
        assert!(store.check("t", &many).unwrap_err().contains("at most 4096"));
        let deep: BTreeMap<String, String> = (0..100).map(|i| (format!("{i}/{}", "a/".repeat(20)) + "f", sha.clone())).collect();
        assert!(store.check("t", &deep).unwrap_err().contains("2100 folders"));

        let tree = store.tree("t", &files).unwrap().unwrap();
        assert_eq!(std::fs::read(tree.join("a/b.txt")).unwrap(), b"hi");
        use std::os::unix::fs::MetadataExt;
        let (linked, blob) = (std::fs::metadata(tree.join("a/b.txt")).unwrap(), std::fs::metadata(blobs.local_path(&FileStore::blob_key("t", &sha)).unwrap()).unwrap());
        assert_eq!(linked.ino(), blob.ino(), "the tree holds a hard link, not a copy");
        assert_eq!(store.tree("t", &files).unwrap().unwrap(), tree);
        assert_eq!(store.tree("t", &BTreeMap::new()).unwrap(), None);

        store.remove_unused_trees([("t", &files)], Duration::ZERO);
        assert!(tree.is_dir(), "a tree in use stays");
        store.remove_unused_trees([], Duration::from_secs(3600));
        assert!(tree.is_dir(), "a tree younger than the grace period stays");
        store.remove_unused_trees([], Duration::ZERO);
        assert!(!tree.exists());
        assert_eq!(store.tree("t", &files).unwrap().unwrap(), tree, "and is assembled again when needed");
    }
}

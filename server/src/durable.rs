//! Durable writes to the data directory: files are written whole or not
//! at all, and what interrupted writes leave behind is swept at start.

use crate::error::Error;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Removes what interrupted atomic writes left under `dir` (names starting
/// with `.` and holding `.tmp-`), at any depth. Call it only while no other
/// writer uses `dir`: the server does at start, holding the state database.
pub fn sweep_temporaries(dir: &Path) {
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
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
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

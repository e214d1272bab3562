//! Blobs in an S3-compatible object store, shared by nodes
//! (`gpuwasm serve --blobs s3://BUCKET/PREFIX`), through the `object_store`
//! crate.
//!
//! - **Configuration.** Credentials, region and endpoint are `AWS_*`
//!   settings as AWS tools read them from the environment (the server
//!   passes its environment): `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//!   `AWS_REGION`; `AWS_ENDPOINT_URL` for an S3-compatible server, and
//!   `AWS_ALLOW_HTTP=true` for one on plain HTTP. The bucket is reached
//!   once at start, so a wrong setting fails then.
//! - **Keys.** A blob's key is `PREFIX/KEY`.
//! - **Large blobs.** A file is uploaded in parts of [`PART`] (multipart
//!   upload), read from disk as it goes: never whole in memory.
//! - **Integrity.** Every key the server writes ends in the SHA-256 of its
//!   content; a blob read back is checked against it, and one that does not
//!   match is an error, never served.
//! - **No local files.** `local_path` is `None`: readers get the bytes.
//!   Storing a key again uploads it again (the same content), which also
//!   makes it new for the collector.

use crate::blobs::{BlobInfo, BlobStore, check_key};
use crate::error::Error;
use crate::hex::sha256_hex;
use crate::off_runtime;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, PutPayload, WriteMultipart};
use std::future::Future;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Size of each part of a multipart upload (S3's smallest is 5 MiB).
const PART: usize = 8 << 20;

/// Parts uploaded at once.
const PARTS_AT_ONCE: usize = 4;

/// Blobs under a prefix of an S3 bucket.
pub struct S3BlobStore {
    store: Box<dyn ObjectStore>,
    /// `PREFIX` without slashes at its ends; empty for the whole bucket.
    prefix: String,
    /// Drives the client's requests; `None` only while dropping.
    runtime: Option<tokio::runtime::Runtime>,
}

impl S3BlobStore {
    /// Opens `s3://BUCKET[/PREFIX]` with the `AWS_*` settings among
    /// `settings` (name, value), and checks the bucket can be listed.
    pub fn open(url: &str, settings: impl IntoIterator<Item = (String, String)>) -> Result<S3BlobStore, Error> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| Error::Blobs(format!("{url:?} is not an s3://BUCKET/PREFIX URL")))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(Error::Blobs(format!("{url:?} names no bucket")));
        }
        let mut builder = AmazonS3Builder::new();
        for (name, value) in settings {
            let key = name.strip_prefix("AWS_").and_then(|_| name.to_ascii_lowercase().parse::<AmazonS3ConfigKey>().ok());
            if let Some(key) = key {
                builder = builder.with_config(key, value);
            }
        }
        let store = builder.with_bucket_name(bucket).build().map_err(|e| Error::Blobs(format!("{url}: {e}")))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("gpuwasm-s3")
            .enable_all()
            .build()
            .map_err(|e| Error::Blobs(format!("starting the S3 client's threads: {e}")))?;
        let s3 = S3BlobStore { store: Box::new(store), prefix: prefix.trim_matches('/').to_string(), runtime: Some(runtime) };
        let root = s3.location("")?;
        s3.run(async { s3.store.list_with_delimiter(Some(&root)).await.map_err(|e| Error::Blobs(format!("{url}: {e}"))) })?;
        Ok(s3)
    }

    /// Where `key` is in the bucket (`""`: the prefix itself).
    fn location(&self, key: &str) -> Result<StorePath, Error> {
        if !key.is_empty() {
            check_key(key.trim_end_matches('/'))?;
        }
        let full = [self.prefix.as_str(), key.trim_end_matches('/')].iter().filter(|s| !s.is_empty()).copied().collect::<Vec<_>>().join("/");
        StorePath::parse(&full).map_err(|e| Error::Blobs(format!("key {key:?}: {e}")))
    }

    /// Runs `work` on the client's runtime, from a thread of its own (so it
    /// may be called from any thread, a tokio worker's included).
    fn run<T: Send>(&self, work: impl Future<Output = Result<T, Error>> + Send) -> Result<T, Error> {
        let runtime = self.runtime.as_ref().expect("the runtime lives until drop");
        off_runtime(|| runtime.block_on(work))
    }
}

impl Drop for S3BlobStore {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn s3_error(key: &str) -> impl Fn(object_store::Error) -> Error + '_ {
    move |e| Error::Blobs(format!("{key}: {e}"))
}

/// Checks `bytes` against the SHA-256 that ends `key` (`.../HASH` or
/// `.../HASH.wasm`).
fn check_content(key: &str, bytes: &[u8]) -> Result<(), Error> {
    let last = key.rsplit('/').next().unwrap_or(key);
    let expected = last.strip_suffix(".wasm").unwrap_or(last);
    let named = expected.len() == 64 && expected.bytes().all(|b| b.is_ascii_hexdigit());
    match named {
        true if sha256_hex(bytes) != expected => Err(Error::Blobs(format!("{key}: the stored content has SHA-256 {}, not the one its key names", sha256_hex(bytes)))),
        _ => Ok(()),
    }
}

impl BlobStore for S3BlobStore {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), Error> {
        let location = self.location(key)?;
        let payload = PutPayload::from(bytes.to_vec());
        self.run(async { self.store.put(&location, payload).await.map(drop).map_err(s3_error(key)) })
    }

    fn put_file(&self, key: &str, path: &Path) -> Result<(), Error> {
        let location = self.location(key)?;
        let io = |e| Error::io("uploading a file to S3", path, e);
        let mut file = std::fs::File::open(path).map_err(io)?;
        self.run(async {
            let upload = self.store.put_multipart(&location).await.map_err(s3_error(key))?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
            let mut buffer = vec![0; 1 << 20];
            let written: Result<(), Error> = async {
                loop {
                    let n = file.read(&mut buffer).map_err(io)?;
                    if n == 0 {
                        return Ok(());
                    }
                    writer.wait_for_capacity(PARTS_AT_ONCE).await.map_err(s3_error(key))?;
                    writer.write(&buffer[..n]);
                }
            }
            .await;
            match written {
                Ok(()) => writer.finish().await.map(drop).map_err(s3_error(key)),
                Err(e) => {
                    let _ = writer.abort().await;
                    Err(e)
                }
            }
        })?;
        std::fs::remove_file(path).map_err(|e| Error::io("removing an upload", path, e))
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        let location = self.location(key)?;
        let bytes = self.run(async {
            match self.store.get(&location).await {
                Ok(found) => found.bytes().await.map(Some).map_err(s3_error(key)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(s3_error(key)(e)),
            }
        })?;
        match bytes {
            Some(bytes) => check_content(key, &bytes).map(|()| Some(bytes.to_vec())),
            None => Ok(None),
        }
    }

    fn contains(&self, key: &str) -> Result<bool, Error> {
        let location = self.location(key)?;
        self.run(async {
            match self.store.head(&location).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(s3_error(key)(e)),
            }
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<BlobInfo>, Error> {
        let location = self.location(prefix)?;
        let found = self.run(async { self.store.list(Some(&location)).try_collect::<Vec<_>>().await.map_err(s3_error(prefix)) })?;
        let strip = match self.prefix.is_empty() {
            true => String::new(),
            false => format!("{}/", self.prefix),
        };
        Ok(found
            .into_iter()
            .filter_map(|meta| {
                let key = meta.location.as_ref().strip_prefix(strip.as_str())?.to_string();
                Some(BlobInfo { key, size: meta.size, stored_at: meta.last_modified.into() })
            })
            .collect())
    }

    fn delete(&self, key: &str) -> Result<(), Error> {
        let location = self.location(key)?;
        self.run(async {
            match self.store.delete(&location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(s3_error(key)(e)),
            }
        })
    }

    fn local_path(&self, _key: &str) -> Option<PathBuf> {
        None
    }
}

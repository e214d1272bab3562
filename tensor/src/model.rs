//! Model formats and the graph interface every model presents.

use crate::backend::{DeviceInfo, SharedBackend, cpu::CpuBackend};
use crate::budget::Budget;
use crate::error::{Error, invalid_model};
use crate::tensor::Tensor;
use crate::{bert, gguf, onnx};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The formats models are pushed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A BERT-style encoder: `model.safetensors`, `config.json`,
    /// `tokenizer.json` (and optionally the sentence-transformers files
    /// `modules.json`, `sentence_bert_config.json`, `1_Pooling/config.json`).
    Safetensors,
    /// One `.onnx` file.
    Onnx,
    /// One `.gguf` file (llama.cpp).
    Gguf,
}

impl Format {
    /// Every format, by name.
    pub const ALL: [Format; 3] = [Format::Safetensors, Format::Onnx, Format::Gguf];

    /// Its lower-case name, as the CLI and API spell it.
    pub fn name(self) -> &'static str {
        match self {
            Format::Safetensors => "safetensors",
            Format::Onnx => "onnx",
            Format::Gguf => "gguf",
        }
    }

    /// The format called `name`.
    pub fn from_name(name: &str) -> Option<Format> {
        Format::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The files of a model of this format that matter, relative to its
    /// directory; `None` means the model is a single file.
    pub fn files(self) -> Option<&'static [&'static str]> {
        match self {
            Format::Safetensors => Some(bert::FILES),
            Format::Onnx | Format::Gguf => None,
        }
    }
}

/// A model's files: relative path to contents. Single-file formats hold
/// exactly one entry.
pub type ModelFiles = BTreeMap<String, FileBytes>;

/// The contents of one model file: bytes in memory, or a file mapped
/// read-only (no copy, and pages shared with the page cache).
pub enum FileBytes {
    /// Bytes read or received.
    Owned(Vec<u8>),
    /// A mapped file.
    Mapped(memmap2::Mmap),
}

impl FileBytes {
    /// Maps the file at `path` read-only.
    ///
    /// The file must not change while it is mapped: map only files that
    /// are never written in place (content-addressed blobs, written once
    /// and renamed into place; removing one leaves the mapping intact).
    ///
    /// `populate` reads the whole file in at once (what a load that reads
    /// every byte wants: one pass, no page faults); without it, pages are
    /// read as they are touched (what a check of headers wants: a large
    /// file costs what is read of it).
    pub fn map(path: &std::path::Path, populate: bool) -> std::io::Result<FileBytes> {
        let file = std::fs::File::open(path)?;
        if file.metadata()?.len() == 0 {
            return Ok(FileBytes::Owned(Vec::new()));
        }
        let mut options = memmap2::MmapOptions::new();
        if populate {
            options.populate();
        }
        // SAFETY: see above; the callers map files nothing writes in place.
        let map = unsafe { options.map(&file)? };
        Ok(FileBytes::Mapped(map))
    }
}

impl From<FileBytes> for Vec<u8> {
    /// The bytes, copied only when mapped.
    fn from(bytes: FileBytes) -> Vec<u8> {
        match bytes {
            FileBytes::Owned(bytes) => bytes,
            FileBytes::Mapped(map) => map.to_vec(),
        }
    }
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Owned(bytes) => bytes,
            FileBytes::Mapped(map) => map,
        }
    }
}

impl From<Vec<u8>> for FileBytes {
    fn from(bytes: Vec<u8>) -> FileBytes {
        FileBytes::Owned(bytes)
    }
}

impl std::fmt::Debug for FileBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if matches!(self, FileBytes::Mapped(_)) { "mapped" } else { "owned" };
        write!(f, "FileBytes({kind}, {} bytes)", self.len())
    }
}

/// A loaded model: named tensors in, named tensors out. Shared by every
/// instance that uses it; `run` may be called from many threads at once.
///
/// Every run reserves the host memory it allocates from `budget` first and
/// fails with [`Error::TooLarge`] when it does not fit.
pub trait Graph: Send + Sync {
    /// What the graph takes and gives, in one line (for errors and logs).
    fn signature(&self) -> String;

    /// The device its weights live on and its passes run on.
    fn device(&self) -> &DeviceInfo;

    /// Bytes of the device's memory its weights hold while it is loaded
    /// (what GPU memory budgets count; host-resident weights of the CPU
    /// backend count too).
    fn resident_bytes(&self) -> u64;

    /// Runs one inference.
    fn run(&self, inputs: Vec<(String, Tensor)>, budget: &Budget) -> Result<Vec<(String, Tensor)>, Error>;

    /// Runs several independent inferences, merged into one pass where the
    /// graph can; one result per request, in order. The default runs them
    /// one by one, each under the whole `budget`.
    fn run_batch(&self, requests: Vec<Vec<(String, Tensor)>>, budget: &Budget) -> Vec<Result<Vec<(String, Tensor)>, Error>> {
        requests.into_iter().map(|inputs| self.run(inputs, budget)).collect()
    }
}

/// The single file of a one-file model (an error naming the count otherwise).
pub fn single_file(files: &ModelFiles) -> Result<&[u8], Error> {
    match files.values().collect::<Vec<_>>().as_slice() {
        [only] => Ok(only),
        _ => Err(invalid_model(format!("expected one file, got {}", files.len()))),
    }
}

/// Loads a model into a runnable graph on `backend`, checking everything
/// about it.
pub fn load(format: Format, files: &ModelFiles, backend: SharedBackend) -> Result<Arc<dyn Graph>, Error> {
    match format {
        Format::Safetensors => Ok(Arc::new(bert::Bert::load(files, backend)?)),
        Format::Onnx => Ok(Arc::new(onnx::Model::load(single_file(files)?, backend)?)),
        Format::Gguf => {
            let file = gguf::Gguf::parse(single_file(files)?)?;
            Err(Error::Unsupported(format!(
                "a GGUF model ({} architecture) generates text; wasi-nn graphs cannot run it",
                file.architecture().unwrap_or("unknown")
            )))
        }
    }
}

/// Checks a model without keeping it (on the CPU): what `gpuwasm model
/// push` runs before accepting one. Returns a one-line description.
///
/// An ONNX graph also runs once on zeros at its declared input shapes
/// (symbolic dimensions at 1), under `budget`: a graph whose smallest run
/// needs more memory than a call may have is refused here rather than
/// failing every call later. A safetensors encoder is checked by its
/// config, tokenizer and header (every tensor's name, shape and type),
/// its weights never read: memory does not grow with the file.
pub fn check(format: Format, files: &ModelFiles, budget: &Budget) -> Result<String, Error> {
    match format {
        Format::Gguf => {
            // A decoder of an architecture we run is checked whole (shapes,
            // tokenizer, template); other GGUF files only parse, and their
            // loads say what is unsupported.
            let file = gguf::Gguf::parse(single_file(files)?)?;
            match file.architecture() {
                Some(arch) if crate::llm::model::ARCHITECTURES.contains(&arch) => {
                    Ok(format!("{}: {}", file.describe(), crate::llm::Llm::check(&file)?))
                }
                _ => Ok(file.describe()),
            }
        }
        Format::Onnx => {
            let model = onnx::Model::load(single_file(files)?, Arc::new(CpuBackend::new()))?;
            model.smallest_run(budget)?;
            Ok(model.signature())
        }
        Format::Safetensors => bert::check(files),
    }
}

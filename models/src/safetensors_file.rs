//! One safetensors file, memory-mapped on first use, its header parsed and validated once.

use std::collections::HashMap;
use std::fs::File;
use std::ops::{Deref, Range};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use memmap2::{Mmap, MmapOptions};
use safetensors::Dtype;
use sluice_tensor::Tensor;

use crate::checkpoint::CheckpointError;
use crate::safetensors_bytes::SafetensorsBytes;

/// A safetensors file that is mapped when a tensor in it is first asked for, and at most once.
#[derive(Debug)]
pub(crate) struct SafetensorsFile {
    path: PathBuf,
    mapped: Mutex<Option<Arc<SafetensorsBytes>>>,
}

impl SafetensorsFile {
    /// A file that is not mapped yet.
    pub(crate) fn new(path: PathBuf) -> Self {
        SafetensorsFile { path, mapped: Mutex::new(None) }
    }

    /// The file's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file has been mapped.
    pub(crate) fn is_mapped(&self) -> bool {
        self.mapped.lock().unwrap_or_else(PoisonError::into_inner).is_some()
    }

    /// Whether the header lists a tensor of exactly this name (maps the file).
    pub(crate) fn contains(&self, name: &str) -> Result<bool, CheckpointError> {
        Ok(self.map()?.contains(name))
    }

    /// The names of the tensors the header lists, sorted (maps the file).
    pub(crate) fn names(&self) -> Result<Vec<String>, CheckpointError> {
        Ok(self.map()?.names().into_iter().map(str::to_owned).collect())
    }

    /// The header's `__metadata__` strings (maps the file).
    pub(crate) fn metadata(&self) -> Result<HashMap<String, String>, CheckpointError> {
        Ok(self.map()?.metadata().clone())
    }

    /// Where the tensor of exactly this name lies, or `None` if the header does not list it (maps
    /// the file, reads only its header).
    pub(crate) fn location(&self, name: &str) -> Result<Option<TensorLocation>, CheckpointError> {
        Ok(self.map()?.location(name))
    }

    /// The tensor of exactly this name, or `None` if the header does not list it (maps the file);
    /// see [`SafetensorsBytes::tensor`].
    pub(crate) fn tensor(&self, name: &str) -> Result<Option<Tensor>, CheckpointError> {
        self.map()?.tensor(name)
    }

    /// The mapped file, mapping it and parsing its header on first use.
    fn map(&self) -> Result<Arc<SafetensorsBytes>, CheckpointError> {
        // A poisoned lock only means another thread panicked while mapping; the slot is still
        // either empty or a complete mapping.
        let mut slot = self.mapped.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(mapped) = slot.as_ref() {
            return Ok(Arc::clone(mapped));
        }
        let mapped = Arc::new(self.map_now()?);
        *slot = Some(Arc::clone(&mapped));
        Ok(mapped)
    }

    fn map_now(&self) -> Result<SafetensorsBytes, CheckpointError> {
        let io = |source| CheckpointError::Io { path: self.path.clone(), source };
        let file = File::open(&self.path).map_err(io)?;
        // SAFETY: the mapping is only ever read. Its contents are undefined if another process
        // modifies or truncates the file while it is mapped; `Checkpoint`'s documentation makes
        // leaving the files alone a precondition, as every memory-mapped loader must.
        let bytes = unsafe { Mmap::map(&file) }.map_err(io)?;
        tracing::debug!(file = %self.path.display(), bytes = bytes.len(), "mapped safetensors file");
        SafetensorsBytes::parse(Arc::new(bytes), self.path.clone())
    }
}

/// Where one tensor's bytes lie in a safetensors file: the file, the dtype and shape its header
/// gives, and the byte range from the start of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorLocation {
    /// The tensor's name.
    pub name: String,
    /// The file holding it.
    pub path: PathBuf,
    /// The dtype as stored, also where sluice has no [`DType`](sluice_tensor::DType) for it.
    pub dtype: Dtype,
    /// The shape.
    pub shape: Vec<usize>,
    /// The bytes, from the start of the file.
    pub range: Range<usize>,
}

impl TensorLocation {
    /// Maps exactly this tensor's bytes, read-only.
    ///
    /// A checkpoint keeps its mapping of a whole file for as long as it lives, so every page read
    /// through it stays in the process's memory. This mapping ends when the returned value drops,
    /// and the memory its pages took with it: copying tensors one mapping at a time needs memory
    /// for the largest of them only.
    pub fn map(&self) -> Result<MappedBytes, CheckpointError> {
        let io = |source| CheckpointError::Io { path: self.path.clone(), source };
        let file = File::open(&self.path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        // Reading a mapped page past the end of the file is a fatal signal, not an error: the
        // header was checked against the file's length, but the file may have shrunk since.
        let inside = u64::try_from(self.range.end).is_ok_and(|end| end <= file_len);
        if !inside || self.range.start > self.range.end {
            return Err(CheckpointError::Io {
                path: self.path.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "tensor `{}` needs bytes {}..{}, but the file now has {file_len}",
                        self.name, self.range.start, self.range.end
                    ),
                ),
            });
        }
        let mut options = MmapOptions::new();
        options.offset(self.range.start as u64).len(self.range.len());
        // SAFETY: the mapping is only ever read, and lies inside the file as it is now (checked
        // above). Its contents are undefined if another process modifies or truncates the file
        // while it is mapped; `Checkpoint`'s documentation makes leaving the files alone a
        // precondition, as every memory-mapped loader must.
        let map = unsafe { options.map(&file) }.map_err(io)?;
        Ok(MappedBytes(map))
    }
}

/// One tensor's bytes, mapped read-only from its file by [`TensorLocation::map`]; unmapped on drop.
#[derive(Debug)]
pub struct MappedBytes(Mmap);

impl Deref for MappedBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

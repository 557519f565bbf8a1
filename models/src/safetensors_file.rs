//! One safetensors file, memory-mapped on first use, its header parsed and validated once.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensors};
use serde_json::Value;
use sluice_tensor::{DType, SharedBytes, Tensor};

use crate::checkpoint::CheckpointError;

/// A safetensors file that is mapped when a tensor in it is first asked for, and at most once.
#[derive(Debug)]
pub(crate) struct SafetensorsFile {
    path: PathBuf,
    mapped: Mutex<Option<Arc<MappedFile>>>,
}

/// A mapped safetensors file and its validated header.
#[derive(Debug)]
struct MappedFile {
    bytes: Arc<Mmap>,
    tensors: HashMap<String, TensorEntry>,
    metadata: HashMap<String, String>,
}

#[derive(Debug)]
struct TensorEntry {
    dtype: StDtype,
    shape: Vec<usize>,
    /// Byte range from the start of the file.
    start: usize,
    end: usize,
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
        Ok(self.map()?.tensors.contains_key(name))
    }

    /// The header's `__metadata__` strings (maps the file).
    pub(crate) fn metadata(&self) -> Result<HashMap<String, String>, CheckpointError> {
        Ok(self.map()?.metadata.clone())
    }

    /// The tensor of exactly this name, or `None` if the header does not list it (maps the file).
    ///
    /// The tensor is a zero-copy, read-only view of the mapping, which it keeps alive; data that is
    /// not aligned for its dtype is copied instead.
    pub(crate) fn tensor(&self, name: &str) -> Result<Option<Tensor>, CheckpointError> {
        let mapped = self.map()?;
        let Some(entry) = mapped.tensors.get(name) else { return Ok(None) };
        let dtype = dtype_of(entry.dtype).ok_or_else(|| CheckpointError::UnsupportedDType {
            name: name.to_owned(),
            path: self.path.clone(),
            dtype: entry.dtype.to_string(),
        })?;
        let file_len = mapped.bytes.len();
        let expected = entry
            .shape
            .iter()
            .try_fold(dtype.size_in_bytes(), |n, &d| n.checked_mul(d))
            .unwrap_or(usize::MAX);
        if entry.end < entry.start || entry.end - entry.start != expected || entry.end > file_len {
            return Err(CheckpointError::ByteRange {
                name: name.to_owned(),
                path: self.path.clone(),
                dtype,
                shape: entry.shape.clone(),
                start: entry.start,
                end: entry.end,
                expected,
                file_len,
            });
        }
        let tensor_error = |source| CheckpointError::Tensor {
            name: name.to_owned(),
            path: self.path.clone(),
            source,
        };
        let address = mapped.bytes.as_ptr() as usize + entry.start;
        let tensor = if address.is_multiple_of(dtype.size_in_bytes()) {
            let region: SharedBytes = Arc::clone(&mapped.bytes) as SharedBytes;
            Tensor::from_mapped(region, entry.start, dtype, &entry.shape)
        } else {
            tracing::debug!(tensor = name, "misaligned in the file: copied");
            let bytes = mapped.bytes.get(entry.start..entry.end).unwrap_or_default();
            Tensor::from_bytes(bytes, dtype, &entry.shape)
        };
        tensor.map(Some).map_err(tensor_error)
    }

    /// The mapped file, mapping it and parsing its header on first use.
    fn map(&self) -> Result<Arc<MappedFile>, CheckpointError> {
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

    fn map_now(&self) -> Result<MappedFile, CheckpointError> {
        let io = |source| CheckpointError::Io { path: self.path.clone(), source };
        let file = File::open(&self.path).map_err(io)?;
        // SAFETY: the mapping is only ever read. Its contents are undefined if another process
        // modifies or truncates the file while it is mapped; `Checkpoint`'s documentation makes
        // leaving the files alone a precondition, as every memory-mapped loader must.
        let bytes = unsafe { Mmap::map(&file) }.map_err(io)?;
        let (header_len, header) =
            SafeTensors::read_metadata(&bytes).map_err(|source| CheckpointError::Header {
                path: self.path.clone(),
                tensor: inconsistent_entry(&bytes),
                source,
            })?;
        let data_start = header_len + 8;
        let tensors = header
            .tensors()
            .into_iter()
            .map(|(name, info)| {
                let (start, end) = info.data_offsets;
                let entry = TensorEntry {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start.saturating_add(start),
                    end: data_start.saturating_add(end),
                };
                (name, entry)
            })
            .collect();
        let metadata = header.metadata().clone().unwrap_or_default();
        tracing::debug!(file = %self.path.display(), bytes = bytes.len(), "mapped safetensors file");
        Ok(MappedFile { bytes: Arc::new(bytes), tensors, metadata })
    }
}

/// The first tensor of a safetensors header whose byte range disagrees with its dtype and shape,
/// for error messages: the parser reports such a mismatch without naming the tensor.
fn inconsistent_entry(bytes: &[u8]) -> Option<String> {
    let header_len = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
    let header: BTreeMap<String, Value> =
        serde_json::from_slice(bytes.get(8..8usize.checked_add(header_len)?)?).ok()?;
    let entry_len = |entry: &Value| -> Option<(usize, usize)> {
        let dtype: StDtype = serde_json::from_value(entry.get("dtype")?.clone()).ok()?;
        let shape: Vec<usize> = serde_json::from_value(entry.get("shape")?.clone()).ok()?;
        let offsets: (usize, usize) =
            serde_json::from_value(entry.get("data_offsets")?.clone()).ok()?;
        let bits = shape.iter().try_fold(dtype.bitsize(), |n, &d| n.checked_mul(d))?;
        Some((offsets.1.checked_sub(offsets.0)?, bits / 8))
    };
    header
        .iter()
        .filter(|(name, _)| name.as_str() != "__metadata__")
        .find(|(_, entry)| entry_len(entry).is_none_or(|(given, needed)| given != needed))
        .map(|(name, _)| name.clone())
}

/// The sluice dtype of a safetensors dtype, if there is one.
fn dtype_of(dtype: StDtype) -> Option<DType> {
    Some(match dtype {
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::F64 => DType::F64,
        StDtype::I32 => DType::I32,
        StDtype::I64 => DType::I64,
        StDtype::U8 => DType::U8,
        StDtype::BOOL => DType::Bool,
        StDtype::F8_E4M3 => DType::F8E4M3,
        _ => return None,
    })
}

//! [`SafetensorsBytes`]: the bytes of one safetensors file with its header parsed and validated,
//! the one parser every checkpoint file goes through.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use safetensors::{Dtype as StDtype, SafeTensors};
use serde_json::Value;
use sluice_tensor::{DType, SharedBytes, Tensor};

use crate::checkpoint::CheckpointError;
use crate::safetensors_file::TensorLocation;

/// The bytes of one safetensors file (a memory mapping, or any buffer) and its validated header.
///
/// [`parse`](SafetensorsBytes::parse) refuses every malformed file with
/// [`CheckpointError::Header`]: fewer than 8 bytes, a header length past the end of the file, a
/// header that is not UTF-8 JSON of the safetensors form, byte ranges that overlap, leave gaps, run
/// past the end of the file or disagree with their tensor's dtype and shape. The error names the
/// file, and the first offending tensor where there is one. Once parsed, every tensor the header
/// lists can be read without touching memory outside the buffer.
///
/// ```
/// use std::sync::Arc;
/// use sluice_models::SafetensorsBytes;
///
/// let header = br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
/// let mut file = (header.len() as u64).to_le_bytes().to_vec();
/// file.extend_from_slice(header);
/// file.extend_from_slice(&[0, 0, 128, 63, 0, 0, 0, 64]); // 1.0, 2.0
/// let parsed = SafetensorsBytes::parse(Arc::new(file), "w.safetensors")?;
/// assert_eq!(parsed.names(), ["w"]);
/// let w = parsed.tensor("w")?.expect("listed");
/// assert_eq!(w.to_vec::<f32>()?, [1.0, 2.0]);
///
/// let truncated = SafetensorsBytes::parse(Arc::new(b"\x10\0\0\0\0\0\0\0{".to_vec()), "t");
/// assert!(truncated.is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct SafetensorsBytes {
    path: PathBuf,
    bytes: SharedBytes,
    tensors: HashMap<String, TensorEntry>,
    metadata: HashMap<String, String>,
}

impl std::fmt::Debug for SafetensorsBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsBytes")
            .field("path", &self.path)
            .field("len", &self.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

#[derive(Debug)]
struct TensorEntry {
    dtype: StDtype,
    shape: Vec<usize>,
    /// Byte range from the start of the file.
    start: usize,
    end: usize,
}

impl SafetensorsBytes {
    /// Parses and validates the header of a safetensors file held in `bytes`; `path` is only used
    /// in error messages. Nothing is copied: tensors read later are views of `bytes`.
    pub fn parse(bytes: SharedBytes, path: impl Into<PathBuf>) -> Result<Self, CheckpointError> {
        let path = path.into();
        let data: &[u8] = (*bytes).as_ref();
        let (header_len, header) = SafeTensors::read_metadata(data).map_err(|source| {
            CheckpointError::Header { tensor: offending_entry(data), path: path.clone(), source }
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
        tracing::debug!(file = %path.display(), bytes = data.len(), "parsed safetensors header");
        Ok(SafetensorsBytes { path, bytes, tensors, metadata })
    }

    /// The file named in error messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's length in bytes.
    pub fn len(&self) -> usize {
        (*self.bytes).as_ref().len()
    }

    /// Whether the file is empty (never true for a parsed file: it holds at least its header).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The names of the tensors the header lists, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Whether the header lists a tensor of exactly this name.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The header's `__metadata__` strings.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// Where the tensor of exactly this name lies in the file, as the header says, or `None` if the
    /// header does not list it. Touches no tensor data.
    pub fn location(&self, name: &str) -> Option<TensorLocation> {
        let entry = self.tensors.get(name)?;
        Some(TensorLocation {
            name: name.to_owned(),
            path: self.path.clone(),
            dtype: entry.dtype,
            shape: entry.shape.clone(),
            range: entry.start..entry.end,
        })
    }

    /// The tensor of exactly this name, or `None` if the header does not list it.
    ///
    /// The tensor is a zero-copy, read-only view of the buffer, which it keeps alive; data that is
    /// not aligned for its dtype is copied instead. A dtype sluice has no [`DType`] for is
    /// [`CheckpointError::UnsupportedDType`].
    pub fn tensor(&self, name: &str) -> Result<Option<Tensor>, CheckpointError> {
        let Some(entry) = self.tensors.get(name) else { return Ok(None) };
        let dtype = dtype_of(entry.dtype).ok_or_else(|| CheckpointError::UnsupportedDType {
            name: name.to_owned(),
            path: self.path.clone(),
            dtype: entry.dtype.to_string(),
        })?;
        let data: &[u8] = (*self.bytes).as_ref();
        let file_len = data.len();
        let expected = entry
            .shape
            .iter()
            .try_fold(dtype.size_in_bytes(), |n, &d| n.checked_mul(d))
            .unwrap_or(usize::MAX);
        // The parser has checked this already; checked again here because reading out of bounds
        // must not depend on another crate's validation.
        let Some(bytes) = data.get(entry.start..entry.end).filter(|b| b.len() == expected) else {
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
        };
        let tensor = if (bytes.as_ptr() as usize).is_multiple_of(dtype.size_in_bytes()) {
            Tensor::from_mapped(Arc::clone(&self.bytes), entry.start, dtype, &entry.shape)
        } else {
            tracing::debug!(tensor = name, "misaligned in the file: copied");
            Tensor::from_bytes(bytes, dtype, &entry.shape)
        };
        tensor.map(Some).map_err(|source| CheckpointError::Tensor {
            name: name.to_owned(),
            path: self.path.clone(),
            source,
        })
    }
}

/// The first tensor of a safetensors header whose byte range is wrong, for error messages: the
/// parser reports most such errors without naming the tensor. In offset order, a range is wrong if
/// it does not start where the previous one ended (an overlap or a gap), ends before it starts,
/// disagrees with its dtype and shape, or runs past the end of the file.
fn offending_entry(bytes: &[u8]) -> Option<String> {
    let header_len = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
    let header_end = 8usize.checked_add(header_len)?;
    let header: BTreeMap<String, Value> = serde_json::from_slice(bytes.get(8..header_end)?).ok()?;
    let data_len = bytes.len() - header_end;
    let mut entries: Vec<(&str, Option<EntryRange>)> = header
        .iter()
        .filter(|(name, _)| name.as_str() != "__metadata__")
        .map(|(name, entry)| (name.as_str(), EntryRange::of(entry)))
        .collect();
    // Malformed entries (`None`) first, then by start offset.
    entries.sort_by_key(|(_, range)| range.as_ref().map(|r| r.start));
    let mut previous_end = 0;
    for (name, range) in entries {
        let Some(EntryRange { start, end, needed }) = range else { return Some(name.to_owned()) };
        if start != previous_end || end < start || end - start != needed || end > data_len {
            return Some(name.to_owned());
        }
        previous_end = end;
    }
    None
}

/// One header entry's byte range and the bytes its dtype and shape need.
struct EntryRange {
    start: usize,
    end: usize,
    needed: usize,
}

impl EntryRange {
    /// The range of a header entry, if the entry is well-formed.
    fn of(entry: &Value) -> Option<Self> {
        let dtype: StDtype = serde_json::from_value(entry.get("dtype")?.clone()).ok()?;
        let shape: Vec<usize> = serde_json::from_value(entry.get("shape")?.clone()).ok()?;
        let (start, end): (usize, usize) =
            serde_json::from_value(entry.get("data_offsets")?.clone()).ok()?;
        let bits = shape.iter().try_fold(dtype.bitsize(), |n, &d| n.checked_mul(d))?;
        Some(EntryRange { start, end, needed: bits / 8 })
    }
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

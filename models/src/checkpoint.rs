//! Hugging Face checkpoints: `config.json` plus safetensors weights, memory-mapped and zero-copy.
//!
//! A checkpoint folder holds either one `model.safetensors` or shards listed in
//! `model.safetensors.index.json` (`weight_map`: tensor name -> shard file). Files are mapped
//! lazily, each at most once, when a tensor in them is first requested; loading one layer's gate
//! from a 163-shard DeepSeek-V3 checkpoint maps only the shards holding it.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensorError, SafeTensors};
use serde_json::Value;
use sluice_tensor::{DType, SharedBytes, Tensor, TensorError};
use thiserror::Error;

use crate::config::{ConfigError, ModelConfig};

/// The single-file weights name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The shard index name.
pub const SHARD_INDEX: &str = "model.safetensors.index.json";
/// The config name.
pub const CONFIG_FILE: &str = "config.json";

/// Why a checkpoint or one of its tensors could not be read. Every variant names the file, and the
/// tensor where there is one.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// `config.json` is missing or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The folder holds neither weights file.
    #[error("{}: no `{SINGLE_FILE}` and no `{SHARD_INDEX}`", dir.display())]
    NoWeights {
        /// The checkpoint folder.
        dir: PathBuf,
    },
    /// A file could not be opened, read or mapped.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The shard index is not valid JSON or lacks a proper `weight_map`.
    #[error("{}: malformed shard index: {message}", path.display())]
    Index {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The index maps a tensor to a shard name that is not a plain relative file name.
    #[error("{}: tensor `{tensor}` is mapped to `{shard}`, which is not a file inside the checkpoint", index.display())]
    BadShardName {
        /// The index file.
        index: PathBuf,
        /// The tensor.
        tensor: String,
        /// The shard name as written.
        shard: String,
    },
    /// The index names a shard that does not exist.
    #[error("{}: shard `{shard}` (holding `{tensor}`, among others) does not exist", index.display())]
    MissingShard {
        /// The index file.
        index: PathBuf,
        /// The shard name.
        shard: String,
        /// One tensor mapped to it.
        tensor: String,
    },
    /// A safetensors header is malformed (or disagrees with the file's length).
    #[error("{}: malformed safetensors file: {source}{}", path.display(),
        tensor.as_ref().map(|t| format!(" (tensor `{t}`)")).unwrap_or_default())]
    Header {
        /// The file.
        path: PathBuf,
        /// The first tensor whose header entry is inconsistent, where one could be named.
        tensor: Option<String>,
        /// What the safetensors parser said.
        source: SafeTensorError,
    },
    /// No tensor of that exact name exists in the checkpoint.
    #[error("tensor `{name}` is not in {}", location.display())]
    TensorNotFound {
        /// The tensor.
        name: String,
        /// The weights file, or the shard index.
        location: PathBuf,
    },
    /// The index maps a tensor to a shard whose header does not list it.
    #[error("{}: tensor `{name}` is missing from shard {} although the index maps it there", index.display(), shard.display())]
    TensorNotInShard {
        /// The tensor.
        name: String,
        /// The shard.
        shard: PathBuf,
        /// The index.
        index: PathBuf,
    },
    /// A tensor's dtype has no sluice [`DType`].
    #[error("{}: tensor `{name}` has dtype {dtype}, which sluice does not support", path.display())]
    UnsupportedDType {
        /// The tensor.
        name: String,
        /// The file.
        path: PathBuf,
        /// The safetensors dtype.
        dtype: String,
    },
    /// A tensor's byte range disagrees with its dtype and shape, or lies outside the file.
    #[error(
        "{}: tensor `{name}` ({dtype} {shape:?}) has bytes {start}..{end}, expected {expected} bytes \
         inside a file of {file_len}", path.display()
    )]
    ByteRange {
        /// The tensor.
        name: String,
        /// The file.
        path: PathBuf,
        /// Its dtype.
        dtype: DType,
        /// Its shape.
        shape: Vec<usize>,
        /// First byte, from the start of the file.
        start: usize,
        /// One past the last byte.
        end: usize,
        /// The length dtype and shape imply.
        expected: usize,
        /// The file's length.
        file_len: usize,
    },
    /// The tensor core refused the tensor.
    #[error("{}: tensor `{name}`: {source}", path.display())]
    Tensor {
        /// The tensor.
        name: String,
        /// The file.
        path: PathBuf,
        /// What the tensor core said.
        source: TensorError,
    },
}

/// A Hugging Face checkpoint folder: its config and its (lazily mapped) safetensors weights.
///
/// Tensors come out zero-copy over the mapping ([`Tensor::from_mapped`]), read-only, and keep the
/// mapping alive; a tensor whose data is not aligned for its dtype is copied instead.
///
/// The files must not be modified or truncated while the checkpoint or any tensor read from it is
/// alive: like every memory-mapped loader, sluice reads whatever the file holds at the time.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    config: ModelConfig,
    weights: Weights,
}

#[derive(Debug)]
enum Weights {
    Single(WeightsFile),
    Sharded { index: PathBuf, weight_map: HashMap<String, usize>, shards: Vec<WeightsFile> },
}

/// One safetensors file, mapped on first use.
#[derive(Debug)]
struct WeightsFile {
    path: PathBuf,
    mapped: Mutex<Option<Arc<MappedFile>>>,
}

/// A mapped safetensors file and its validated header.
#[derive(Debug)]
struct MappedFile {
    bytes: Arc<Mmap>,
    tensors: HashMap<String, TensorEntry>,
}

#[derive(Debug)]
struct TensorEntry {
    dtype: StDtype,
    shape: Vec<usize>,
    /// Byte range from the start of the file.
    start: usize,
    end: usize,
}

impl Checkpoint {
    /// Opens a checkpoint folder: parses `config.json` and the shard index (if any) and checks that
    /// every shard exists. No weights file is mapped yet.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, CheckpointError> {
        let dir = dir.as_ref().to_path_buf();
        let _span = tracing::debug_span!("checkpoint_open", dir = %dir.display()).entered();
        let config = ModelConfig::from_file(dir.join(CONFIG_FILE))?;
        let single = dir.join(SINGLE_FILE);
        let index = dir.join(SHARD_INDEX);
        let weights = if single.is_file() {
            Weights::Single(WeightsFile::new(single))
        } else if index.is_file() {
            read_index(&dir, index)?
        } else {
            return Err(CheckpointError::NoWeights { dir });
        };
        if let Weights::Sharded { shards, .. } = &weights {
            tracing::debug!(shards = shards.len(), "sharded checkpoint");
        }
        Ok(Checkpoint { dir, config, weights })
    }

    /// The checkpoint folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Whether a tensor of exactly this name exists. For a single-file checkpoint this maps the
    /// file (to read its header); for a sharded one it only consults the index.
    pub fn contains(&self, name: &str) -> Result<bool, CheckpointError> {
        match &self.weights {
            Weights::Single(file) => Ok(file.map()?.tensors.contains_key(name)),
            Weights::Sharded { weight_map, .. } => Ok(weight_map.contains_key(name)),
        }
    }

    /// The tensor of exactly this name, zero-copy over the mapped file (`requires_grad` false).
    pub fn tensor(&self, name: &str) -> Result<Tensor, CheckpointError> {
        let (file, index) = match &self.weights {
            Weights::Single(file) => (file, None),
            Weights::Sharded { index, weight_map, shards } => {
                let shard = weight_map.get(name).and_then(|&i| shards.get(i)).ok_or_else(|| {
                    CheckpointError::TensorNotFound {
                        name: name.to_owned(),
                        location: index.clone(),
                    }
                })?;
                (shard, Some(index))
            }
        };
        let mapped = file.map()?;
        let entry = mapped.tensors.get(name).ok_or_else(|| match index {
            Some(index) => CheckpointError::TensorNotInShard {
                name: name.to_owned(),
                shard: file.path.clone(),
                index: index.clone(),
            },
            None => CheckpointError::TensorNotFound {
                name: name.to_owned(),
                location: file.path.clone(),
            },
        })?;
        file.tensor(&mapped, name, entry)
    }

    /// The weights files mapped so far, in the order the index lists them.
    pub fn mapped_files(&self) -> Vec<&Path> {
        let files = match &self.weights {
            Weights::Single(file) => std::slice::from_ref(file),
            Weights::Sharded { shards, .. } => shards.as_slice(),
        };
        files.iter().filter(|f| f.is_mapped()).map(|f| f.path.as_path()).collect()
    }

    /// Every weights file of the checkpoint (one, or the shards the index names).
    pub fn files(&self) -> Vec<&Path> {
        match &self.weights {
            Weights::Single(file) => vec![file.path.as_path()],
            Weights::Sharded { shards, .. } => shards.iter().map(|f| f.path.as_path()).collect(),
        }
    }
}

/// Reads `model.safetensors.index.json` and checks that every shard it names exists.
fn read_index(dir: &Path, index: PathBuf) -> Result<Weights, CheckpointError> {
    let malformed = |message: String| CheckpointError::Index { path: index.clone(), message };
    let text = std::fs::read_to_string(&index)
        .map_err(|source| CheckpointError::Io { path: index.clone(), source })?;
    let root: Value = serde_json::from_str(&text).map_err(|e| malformed(e.to_string()))?;
    let map = match root.get("weight_map") {
        Some(Value::Object(map)) => map,
        Some(other) => {
            return Err(malformed(format!("`weight_map` is {other}, expected an object")));
        }
        None => return Err(malformed("no `weight_map` object".to_owned())),
    };
    let mut shard_ids: HashMap<&str, usize> = HashMap::new();
    let mut shards = Vec::new();
    let mut weight_map = HashMap::with_capacity(map.len());
    for (tensor, shard) in map {
        let Value::String(shard) = shard else {
            return Err(malformed(format!(
                "`weight_map.{tensor}` is {shard}, expected a file name"
            )));
        };
        let id = match shard_ids.get(shard.as_str()) {
            Some(&id) => id,
            None => {
                let path = shard_path(dir, shard).ok_or_else(|| CheckpointError::BadShardName {
                    index: index.clone(),
                    tensor: tensor.clone(),
                    shard: shard.clone(),
                })?;
                if !path.is_file() {
                    return Err(CheckpointError::MissingShard {
                        index: index.clone(),
                        shard: shard.clone(),
                        tensor: tensor.clone(),
                    });
                }
                shards.push(WeightsFile::new(path));
                shard_ids.insert(shard, shards.len() - 1);
                shards.len() - 1
            }
        };
        weight_map.insert(tensor.clone(), id);
    }
    Ok(Weights::Sharded { index, weight_map, shards })
}

/// The path of a shard named in the index, if the name stays inside the checkpoint folder.
fn shard_path(dir: &Path, shard: &str) -> Option<PathBuf> {
    let relative = Path::new(shard);
    let inside = !shard.is_empty()
        && relative.components().all(|component| matches!(component, Component::Normal(_)));
    inside.then(|| dir.join(relative))
}

impl WeightsFile {
    fn new(path: PathBuf) -> Self {
        WeightsFile { path, mapped: Mutex::new(None) }
    }

    fn is_mapped(&self) -> bool {
        self.mapped.lock().unwrap_or_else(PoisonError::into_inner).is_some()
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
        let (header_len, metadata) =
            SafeTensors::read_metadata(&bytes).map_err(|source| CheckpointError::Header {
                path: self.path.clone(),
                tensor: inconsistent_entry(&bytes),
                source,
            })?;
        let data_start = header_len + 8;
        let tensors = metadata
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
        tracing::debug!(file = %self.path.display(), bytes = bytes.len(), "mapped weights file");
        Ok(MappedFile { bytes: Arc::new(bytes), tensors })
    }

    /// A tensor of a mapped file, validated against the file.
    fn tensor(
        &self,
        mapped: &MappedFile,
        name: &str,
        entry: &TensorEntry,
    ) -> Result<Tensor, CheckpointError> {
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
        if address.is_multiple_of(dtype.size_in_bytes()) {
            let region: SharedBytes = Arc::clone(&mapped.bytes) as SharedBytes;
            Tensor::from_mapped(region, entry.start, dtype, &entry.shape).map_err(tensor_error)
        } else {
            tracing::debug!(tensor = name, "misaligned in the file: copied");
            let bytes = mapped.bytes.get(entry.start..entry.end).unwrap_or_default();
            Tensor::from_bytes(bytes, dtype, &entry.shape).map_err(tensor_error)
        }
    }
}

/// The first tensor of a safetensors header whose byte range disagrees with its dtype and shape,
/// for error messages: the parser reports such a mismatch without naming the tensor.
fn inconsistent_entry(bytes: &[u8]) -> Option<String> {
    let header_len = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
    let header: std::collections::BTreeMap<String, Value> =
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

#[cfg(test)]
mod tests;

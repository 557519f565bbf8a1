//! Hugging Face checkpoints: `config.json` plus safetensors weights, memory-mapped and zero-copy.
//!
//! A checkpoint folder holds either one `model.safetensors` or shards listed in
//! `model.safetensors.index.json` (`weight_map`: tensor name -> shard file). Files are mapped
//! lazily, each at most once, when a tensor in them is first requested; loading one layer's gate
//! from a 163-shard DeepSeek-V3 checkpoint maps only the shards holding it.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use safetensors::SafeTensorError;
use serde_json::Value;
use sluice_tensor::{DType, Tensor, TensorError};
use thiserror::Error;

use crate::config::{ConfigError, ModelConfig};
use crate::safetensors_file::{SafetensorsFile, TensorLocation};

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
    Single(SafetensorsFile),
    Sharded { index: PathBuf, weight_map: HashMap<String, usize>, shards: Vec<SafetensorsFile> },
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
            Weights::Single(SafetensorsFile::new(single))
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
            Weights::Single(file) => file.contains(name),
            Weights::Sharded { weight_map, .. } => Ok(weight_map.contains_key(name)),
        }
    }

    /// The names of every tensor in the checkpoint, sorted. For a single-file checkpoint this maps
    /// the file (to read its header); for a sharded one it only consults the index.
    pub fn tensor_names(&self) -> Result<Vec<String>, CheckpointError> {
        match &self.weights {
            Weights::Single(file) => file.names(),
            Weights::Sharded { weight_map, .. } => {
                let mut names: Vec<String> = weight_map.keys().cloned().collect();
                names.sort_unstable();
                Ok(names)
            }
        }
    }

    /// The tensor of exactly this name, zero-copy over the mapped file (`requires_grad` false).
    pub fn tensor(&self, name: &str) -> Result<Tensor, CheckpointError> {
        let (file, index) = self.file_holding(name)?;
        file.tensor(name)?.ok_or_else(|| not_in_file(name, file, index))
    }

    /// Where the tensor of exactly this name lies: its file, stored dtype, shape and byte range.
    /// Reads the header of the file holding it (mapping that file, as [`tensor`](Self::tensor)
    /// does), never the tensor's data; [`TensorLocation::map`] maps just those bytes.
    pub fn tensor_location(&self, name: &str) -> Result<TensorLocation, CheckpointError> {
        let (file, index) = self.file_holding(name)?;
        file.location(name)?.ok_or_else(|| not_in_file(name, file, index))
    }

    /// The file that holds (or should hold) a tensor, and the shard index that says so.
    fn file_holding(
        &self,
        name: &str,
    ) -> Result<(&SafetensorsFile, Option<&PathBuf>), CheckpointError> {
        match &self.weights {
            Weights::Single(file) => Ok((file, None)),
            Weights::Sharded { index, weight_map, shards } => {
                let shard = weight_map.get(name).and_then(|&i| shards.get(i)).ok_or_else(|| {
                    CheckpointError::TensorNotFound {
                        name: name.to_owned(),
                        location: index.clone(),
                    }
                })?;
                Ok((shard, Some(index)))
            }
        }
    }

    /// The weights files mapped so far, in the order their first tensor appears in the index.
    pub fn mapped_files(&self) -> Vec<&Path> {
        let files = match &self.weights {
            Weights::Single(file) => std::slice::from_ref(file),
            Weights::Sharded { shards, .. } => shards.as_slice(),
        };
        files.iter().filter(|f| f.is_mapped()).map(SafetensorsFile::path).collect()
    }

    /// Every weights file of the checkpoint (one, or the shards the index names).
    pub fn files(&self) -> Vec<&Path> {
        match &self.weights {
            Weights::Single(file) => vec![file.path()],
            Weights::Sharded { shards, .. } => shards.iter().map(SafetensorsFile::path).collect(),
        }
    }
}

/// The error for a tensor that the file chosen for it does not list.
fn not_in_file(name: &str, file: &SafetensorsFile, index: Option<&PathBuf>) -> CheckpointError {
    match index {
        Some(index) => CheckpointError::TensorNotInShard {
            name: name.to_owned(),
            shard: file.path().to_path_buf(),
            index: index.clone(),
        },
        None => CheckpointError::TensorNotFound {
            name: name.to_owned(),
            location: file.path().to_path_buf(),
        },
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
                shards.push(SafetensorsFile::new(path));
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

#[cfg(test)]
mod tests;

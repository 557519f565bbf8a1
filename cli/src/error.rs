//! The CLI's error: everything that can go wrong, each rendered as one line.

use std::path::PathBuf;

use sluice_models::{CheckpointError, ModelError};
use sluice_tensor::{BackendError, TensorError};
use thiserror::Error;

/// Why a command failed.
#[derive(Debug, Error)]
pub enum CliError {
    /// The model layer (checkpoint, config, gate).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Routing one decoder layer failed, and the error does not say which.
    #[error("layer {layer}: {source}")]
    InLayer {
        /// The decoder layer.
        layer: usize,
        /// What failed.
        source: Box<ModelError>,
    },
    /// Opening a checkpoint.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A tensor could not be built or read.
    #[error(transparent)]
    Tensor(#[from] TensorError),
    /// The backend refused or failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A safetensors file is malformed.
    #[error("{}: not a valid safetensors file: {message}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        message: String,
    },
    /// Input that parses but does not fit what the command needs.
    #[error("{0}")]
    Input(String),
    /// The demo's self-check against the reference failed.
    #[error("self-check against the reference router failed: {0}")]
    SelfCheck(String),
}

impl CliError {
    /// An error of decoder layer `layer`, naming it unless the error already does.
    pub fn in_layer(layer: usize, source: ModelError) -> Self {
        match source.layer() {
            Some(_) => CliError::Model(source),
            None => CliError::InLayer { layer, source: Box::new(source) },
        }
    }

    /// The message on a single line (nested causes joined with `: `).
    pub fn one_line(&self) -> String {
        self.to_string().replace('\n', " ")
    }
}

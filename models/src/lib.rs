//! DeepSeek V2 / V2-Lite / V2.5 / V3 / R1 and Kimi-K2 / K2.5 MoE gates from Hugging Face
//! checkpoints, and the scalar reference router every backend is tested against.
//!
//! - [`ModelConfig`] reads a checkpoint's `config.json` (as the model authors or transformers'
//!   `save_pretrained` wrote it) into a validated [`RoutingSpec`](sluice_tensor::RoutingSpec).
//! - [`reference`] is the one source of truth for routing semantics.

mod checkpoint;
mod config;
pub mod reference;

pub use checkpoint::{Checkpoint, CheckpointError};
pub use config::{ConfigError, ModelConfig, ModelFamily};

//! [`ModelError`]: everything that can go wrong between a checkpoint folder and routed tokens.

use std::path::PathBuf;

use sluice_tensor::{BackendError, DType, DlpackError, HashTableError, TensorError, TopkMethod};
use thiserror::Error;

use crate::checkpoint::CheckpointError;
use crate::config::ConfigError;
use crate::reference::ReferenceError;

/// Why a gate could not be loaded, prepared or run.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ModelError {
    /// `config.json` is missing or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The checkpoint or one of its tensors could not be read.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The tensor core refused an operation.
    #[error(transparent)]
    Tensor(#[from] TensorError),
    /// A tensor could not cross the DLPack bridge.
    #[error(transparent)]
    Dlpack(#[from] DlpackError),
    /// The backend refused its inputs or failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The reference router refused its inputs.
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    /// The layer exists but has a dense MLP, not an MoE block.
    #[error(
        "{}: layer {layer} is dense, not MoE (MoE layers are >= first_k_dense_replace = \
         {first_k_dense_replace} and multiples of moe_layer_freq = {moe_layer_freq})",
        dir.display()
    )]
    DenseLayer {
        /// The checkpoint folder.
        dir: PathBuf,
        /// The layer asked for.
        layer: usize,
        /// The number of leading dense layers.
        first_k_dense_replace: usize,
        /// The MoE layer frequency.
        moe_layer_freq: usize,
    },
    /// The layer index is not below `num_hidden_layers`.
    #[error("{}: layer {layer} does not exist (num_hidden_layers = {num_layers})", dir.display())]
    LayerOutOfRange {
        /// The checkpoint folder.
        dir: PathBuf,
        /// The layer asked for.
        layer: usize,
        /// The number of decoder layers.
        num_layers: usize,
    },
    /// An MoE layer whose gate weight is not in the checkpoint under any name it may have.
    #[error("{}: MoE layer {layer} has no gate weight (looked for {tried:?})", dir.display())]
    MissingGate {
        /// The checkpoint folder.
        dir: PathBuf,
        /// The layer.
        layer: usize,
        /// The names looked for.
        tried: Vec<String>,
    },
    /// A gate whose routing takes a bias (`noaux_tc`'s correction bias, gpt-oss's router bias)
    /// without it.
    #[error("{}: `{tensor}` is missing, but the model's routing needs this bias", dir.display())]
    MissingBias {
        /// The checkpoint folder.
        dir: PathBuf,
        /// The tensor name looked for.
        tensor: String,
    },
    /// A bias for a routing that takes none.
    #[error(
        "{}: `{tensor}` exists, but `{}` routing of this model takes no bias (noaux_tc takes a \
         correction bias, gpt-oss a router bias); the config and the weights disagree",
        dir.display(), method.name()
    )]
    UnexpectedBias {
        /// The checkpoint folder.
        dir: PathBuf,
        /// The tensor found.
        tensor: String,
        /// The method the config names.
        method: TopkMethod,
    },
    /// A hash-routed layer whose table `tid2eid` is not in the checkpoint.
    #[error("{}: layer {layer} is hash-routed, but `{tensor}` is missing", dir.display())]
    MissingHashTable {
        /// The checkpoint folder.
        dir: PathBuf,
        /// The layer.
        layer: usize,
        /// The tensor name looked for.
        tensor: String,
    },
    /// A hash table that would index out of range or route a token twice to one expert.
    #[error("{}: `{tensor}` {source}", dir.display())]
    HashTable {
        /// The checkpoint folder (empty for a gate built in memory).
        dir: PathBuf,
        /// The tensor.
        tensor: String,
        /// What is wrong with it.
        source: HashTableError,
    },
    /// A hash-routed layer was routed without token ids.
    #[error(
        "layer {layer} is hash-routed: it chooses experts by token id, so it needs the token ids \
         (`input_ids`) of the hidden states"
    )]
    MissingTokenIds {
        /// The layer.
        layer: usize,
    },
    /// Token ids of the wrong dtype or shape.
    #[error("layer {layer}: token ids are {dtype} {shape:?}, expected i32 or i64 [{tokens}]")]
    TokenIds {
        /// The layer.
        layer: usize,
        /// Their dtype.
        dtype: DType,
        /// Their shape.
        shape: Vec<usize>,
        /// The number of hidden-state rows.
        tokens: usize,
    },
    /// A token id that names no row of the layer's hash table.
    #[error("layer {layer}: token id {id} (row {row}) is outside the hash table's {vocab} rows")]
    TokenIdOutsideTable {
        /// The layer.
        layer: usize,
        /// The row of the batch.
        row: usize,
        /// The id.
        id: i64,
        /// Rows of the table.
        vocab: usize,
    },
    /// A gate tensor has the wrong shape.
    #[error("{}: `{tensor}` has shape {shape:?}, expected {expected:?}", dir.display())]
    GateShape {
        /// The checkpoint folder.
        dir: PathBuf,
        /// The tensor.
        tensor: String,
        /// Its shape.
        shape: Vec<usize>,
        /// The shape the config implies.
        expected: Vec<usize>,
    },
    /// A gate tensor has a dtype the gate does not take.
    #[error("{}: `{tensor}` has dtype {dtype}; supported: {supported}", dir.display())]
    GateDType {
        /// The checkpoint folder.
        dir: PathBuf,
        /// The tensor.
        tensor: String,
        /// Its dtype.
        dtype: DType,
        /// What the gate takes.
        supported: &'static str,
    },
    /// A gate built from tensors in memory has an inconsistent part.
    #[error("gate {part} {problem}")]
    GatePart {
        /// `weight` or `bias`.
        part: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// Hidden states that are not `[T, H]` with the gate's hidden size.
    #[error("layer {layer}: hidden states have shape {shape:?}, expected [tokens, {hidden_size}]")]
    HiddenShape {
        /// The gate's layer.
        layer: usize,
        /// The shape given.
        shape: Vec<usize>,
        /// The gate's hidden size.
        hidden_size: usize,
    },
    /// A golden fixture file lacks an entry or holds a malformed one.
    #[error("{}: `{entry}` {message}", path.display())]
    Fixture {
        /// The fixture file.
        path: PathBuf,
        /// The tensor or metadata key.
        entry: String,
        /// What is wrong.
        message: String,
    },
    /// A backend's routing breaks the backend contract: an id out of range or repeated, a weight
    /// that is not finite, or a row marked invalid where the policy allows none.
    #[error("backend `{backend}` returned an invalid routing in row {row}: {problem}")]
    InvalidRouting {
        /// The backend's name.
        backend: String,
        /// The first bad row.
        row: usize,
        /// What is wrong with it.
        problem: RoutingProblem,
    },
    /// A backend returned an output that breaks the backend contract.
    #[error(
        "backend `{backend}` returned `{output}` as {dtype} {shape:?}, expected {expected_dtype} \
         {expected_shape:?}"
    )]
    BackendOutput {
        /// The backend's name.
        backend: String,
        /// The output.
        output: &'static str,
        /// Its dtype.
        dtype: DType,
        /// Its shape.
        shape: Vec<usize>,
        /// The dtype the contract says.
        expected_dtype: DType,
        /// The shape the contract says.
        expected_shape: Vec<usize>,
    },
}

impl ModelError {
    /// The decoder layer the message already names, if any; callers that add context name the
    /// layer only when this is `None`.
    pub fn layer(&self) -> Option<usize> {
        match self {
            ModelError::DenseLayer { layer, .. }
            | ModelError::LayerOutOfRange { layer, .. }
            | ModelError::MissingGate { layer, .. }
            | ModelError::MissingHashTable { layer, .. }
            | ModelError::MissingTokenIds { layer }
            | ModelError::TokenIds { layer, .. }
            | ModelError::TokenIdOutsideTable { layer, .. }
            | ModelError::HiddenShape { layer, .. } => Some(*layer),
            _ => None,
        }
    }
}

/// What is wrong with a row a backend returned.
#[derive(Debug, Clone, Copy, PartialEq, Error)]
#[non_exhaustive]
pub enum RoutingProblem {
    /// An expert id outside `[0, E)`.
    #[error("expert id {id} is outside [0, {experts})")]
    IdOutOfRange {
        /// The id.
        id: i32,
        /// `E`.
        experts: usize,
    },
    /// The same expert twice in one row.
    #[error("expert {id} appears twice")]
    RepeatedId {
        /// The id.
        id: i32,
    },
    /// A weight that is NaN or infinite.
    #[error("weight {value} of expert {id} is not finite")]
    NonFiniteWeight {
        /// The expert.
        id: i32,
        /// The weight.
        value: f32,
    },
    /// A row marked invalid (`-1`) only in part, or with non-zero weights, or under the error
    /// policy, which never marks rows.
    #[error("the row is marked invalid (id -1) where the contract allows no such mark")]
    UnexpectedInvalidMark,
}

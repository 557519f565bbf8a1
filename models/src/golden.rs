//! Golden router fixtures: the outputs of transformers' own routers for a checkpoint, as written
//! by `cargo xtask fixtures` into `golden.safetensors` beside the checkpoint (see the fixtures'
//! README for how they are made).
//!
//! The file holds the hidden states (`hidden_states.f32` and the same values rounded,
//! `hidden_states.bf16`) and, for every MoE layer `L` and input kind, the logits
//! (`layers.{L}.{kind}.logits`) and transformers' top-k ids (i64, unsorted) and weights. Its
//! metadata lists the MoE layers, the token count and the near-tie rows per layer and kind.
//! Fixtures with hash-routed layers also hold the token ids those layers were called with
//! (`input_ids`, i64 `[T]`).
//!
//! Every routing test in the workspace (the reference router here, each backend in its own crate)
//! reads the fixtures through this one reader.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::Value;
use sluice_tensor::{DType, Tensor};

use crate::error::ModelError;
use crate::reference::Routing;
use crate::safetensors_file::SafetensorsFile;

/// The name of the fixture file inside a checkpoint folder.
pub const GOLDEN_FILE: &str = "golden.safetensors";

/// Which hidden states the router was called with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InputKind {
    /// `hidden_states.f32`.
    F32,
    /// `hidden_states.bf16`: the f32 hidden states rounded to bf16 (nearest even).
    Bf16,
}

impl InputKind {
    /// Both kinds.
    pub const ALL: [InputKind; 2] = [InputKind::F32, InputKind::Bf16];

    /// The kind's name in tensor names: `f32` or `bf16`.
    pub const fn name(self) -> &'static str {
        match self {
            InputKind::F32 => "f32",
            InputKind::Bf16 => "bf16",
        }
    }

    const fn dtype(self) -> DType {
        match self {
            InputKind::F32 => DType::F32,
            InputKind::Bf16 => DType::BF16,
        }
    }
}

impl fmt::Display for InputKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One `golden.safetensors`, memory-mapped.
#[derive(Debug)]
pub struct GoldenFixture {
    file: SafetensorsFile,
    tokens: usize,
    moe_layers: Vec<usize>,
    near_ties: HashMap<String, Vec<usize>>,
}

impl GoldenFixture {
    /// Opens `golden.safetensors` in a checkpoint folder.
    pub fn in_checkpoint(dir: impl AsRef<Path>) -> Result<Self, ModelError> {
        Self::open(dir.as_ref().join(GOLDEN_FILE))
    }

    /// Opens a fixture file and reads its metadata.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, ModelError> {
        let file = SafetensorsFile::new(path.into());
        let metadata = file.metadata()?;
        let field = |key: &str| -> Result<Value, ModelError> {
            let text = metadata.get(key).ok_or_else(|| fixture_error(&file, key, "missing"))?;
            serde_json::from_str(text).map_err(|e| fixture_error(&file, key, &e.to_string()))
        };
        let tokens = serde_json::from_value(field("tokens")?)
            .map_err(|e| fixture_error(&file, "tokens", &e.to_string()))?;
        let moe_layers = serde_json::from_value(field("moe_layers")?)
            .map_err(|e| fixture_error(&file, "moe_layers", &e.to_string()))?;
        let near_ties = serde_json::from_value(field("near_ties")?)
            .map_err(|e| fixture_error(&file, "near_ties", &e.to_string()))?;
        Ok(GoldenFixture { file, tokens, moe_layers, near_ties })
    }

    /// The fixture file.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The number of tokens `T`.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// The MoE layers the fixture has outputs for.
    pub fn moe_layers(&self) -> &[usize] {
        &self.moe_layers
    }

    /// The hidden states `[T, H]`, f32 or bf16 as `kind` says (zero-copy, read-only).
    pub fn hidden_states(&self, kind: InputKind) -> Result<Tensor, ModelError> {
        let name = format!("hidden_states.{kind}");
        let tensor = self.tensor(&name, kind.dtype())?;
        match *tensor.shape() {
            [tokens, _] if tokens == self.tokens => Ok(tensor),
            _ => Err(self.shape_error(&name, tensor.shape(), "[tokens, hidden]")),
        }
    }

    /// The logits transformers computed, f32 `[T, E]` row-major.
    pub fn logits(&self, layer: usize, kind: InputKind) -> Result<Vec<f32>, ModelError> {
        let name = format!("layers.{layer}.{kind}.logits");
        let tensor = self.tensor(&name, DType::F32)?;
        match *tensor.shape() {
            [tokens, _] if tokens == self.tokens => Ok(tensor.to_vec::<f32>()?),
            _ => Err(self.shape_error(&name, tensor.shape(), "[tokens, experts]")),
        }
    }

    /// transformers' routing: ids (unsorted, as it returns them) and weights (scaling included).
    pub fn routing(&self, layer: usize, kind: InputKind) -> Result<Routing, ModelError> {
        let prefix = format!("layers.{layer}.{kind}");
        let ids = self.tensor(&format!("{prefix}.topk_ids"), DType::I64)?;
        let weights = self.tensor(&format!("{prefix}.topk_weights"), DType::F32)?;
        let [tokens, top_k] = *ids.shape() else {
            return Err(self.shape_error(&format!("{prefix}.topk_ids"), ids.shape(), "[T, K]"));
        };
        if weights.shape() != ids.shape() || tokens != self.tokens {
            return Err(self.shape_error(
                &format!("{prefix}.topk_weights"),
                weights.shape(),
                "[T, K]",
            ));
        }
        let ids = ids
            .to_vec::<i64>()?
            .into_iter()
            .map(i32::try_from)
            .collect::<Result<Vec<i32>, _>>()
            .map_err(|_| {
                fixture_error(&self.file, &format!("{prefix}.topk_ids"), "an id does not fit i32")
            })?;
        Ok(Routing::new(tokens, top_k, ids, weights.to_vec::<f32>()?)?)
    }

    /// The token ids `[T]` the hash-routed layers were called with (`input_ids`), if the fixture
    /// has such layers.
    pub fn input_ids(&self) -> Result<Option<Tensor>, ModelError> {
        let Some(ids) = self.file.tensor("input_ids")? else { return Ok(None) };
        if ids.dtype() != DType::I64 || ids.shape() != [self.tokens] {
            return Err(self.shape_error("input_ids", ids.shape(), "i64 [tokens]"));
        }
        Ok(Some(ids))
    }

    /// The rows the fixture generator found to be near ties for this layer and input kind.
    pub fn near_ties(&self, layer: usize, kind: InputKind) -> &[usize] {
        self.near_ties.get(&format!("layers.{layer}.{kind}")).map_or(&[], Vec::as_slice)
    }

    fn tensor(&self, name: &str, dtype: DType) -> Result<Tensor, ModelError> {
        let tensor =
            self.file.tensor(name)?.ok_or_else(|| fixture_error(&self.file, name, "missing"))?;
        if tensor.dtype() != dtype {
            let message = format!("has dtype {}, expected {dtype}", tensor.dtype());
            return Err(fixture_error(&self.file, name, &message));
        }
        Ok(tensor)
    }

    fn shape_error(&self, name: &str, shape: &[usize], expected: &str) -> ModelError {
        let message = format!("has shape {shape:?}, expected {expected} with T = {}", self.tokens);
        fixture_error(&self.file, name, &message)
    }
}

fn fixture_error(file: &SafetensorsFile, entry: &str, message: &str) -> ModelError {
    ModelError::Fixture {
        path: file.path().to_path_buf(),
        entry: entry.to_owned(),
        message: message.to_owned(),
    }
}

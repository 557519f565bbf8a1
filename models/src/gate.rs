//! [`MoeGate`]: one MoE layer's router weight, bias (correction bias, or the router's own bias on
//! the logits) and routing spec, loaded from a checkpoint.

use std::path::Path;

use half::{bf16, f16};
use sluice_tensor::{
    Backend, BackendError, DType, NonFinitePolicy, RoutingSpec, Tensor, TopkMethod,
    check_router_weight,
};

use crate::checkpoint::Checkpoint;
use crate::config::{ModelConfig, ModelFamily};
use crate::error::ModelError;
use crate::hash_table::{hash_table_tensor, load_hash_table};
use crate::prepared::{GateRouting, PreparedGate, check_hidden, export_detached, import_checked};

/// One MoE layer's gate: the router weight `[E, H]`, the f32 bias `[E]` (the correction bias of
/// `noaux_tc`, or gpt-oss's router bias added to the logits: whatever
/// [`RoutingSpec::takes_bias`] says) or the hash table `tid2eid` (i32 `[vocab, K]`, hash-routed layers only), and the routing
/// spec.
///
/// The weight is held as a **parameter** (`requires_grad = true`), the way a training framework
/// holds it; that is what made the original DLPack export fail. The gate never exports it as is:
/// [`prepare`](MoeGate::prepare) and [`route`](MoeGate::route) detach the weight, the bias and the
/// hidden states (O(1), same storage) before they cross the bridge.
#[derive(Debug, Clone)]
pub struct MoeGate {
    layer: usize,
    spec: RoutingSpec,
    hidden_size: usize,
    weight: Tensor,
    bias: Option<Tensor>,
    hash_table: Option<Tensor>,
}

/// The names one MoE layer's gate tensors have in a checkpoint, under one naming convention.
///
/// [`candidates`](GateTensorNames::candidates) is the one place that knows how a checkpoint names
/// a gate: [`MoeGate::load`], `sluice inspect` and `sluice extract-gates` all go through it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateTensorNames {
    /// The router weight `[E, H]`.
    pub weight: String,
    /// The bias `[E]`, stored exactly when the routing takes one
    /// ([`RoutingSpec::takes_bias`]): the correction bias of `noaux_tc`, or the router bias
    /// added to the logits (gpt-oss).
    pub bias: String,
    /// The hash table `tid2eid` `[vocab, K]`, stored exactly for hash-routed layers; only
    /// DeepSeek-V4's conventions have one.
    pub hash_table: Option<String>,
}

impl GateTensorNames {
    /// The names layer `layer`'s gate may have, one per naming convention of the model, in the
    /// order they are looked for: `model.layers.` for text models; Kimi-K2.5's multimodal
    /// checkpoints prefix the language model, as released (`language_model.model.`) or as
    /// transformers saves it (`model.language_model.`).
    ///
    /// | checkpoints | weight | bias | hash table |
    /// | --- | --- | --- | --- |
    /// | text models (V2, V3, V3.2, Kimi-K2) | `model.layers.{L}.mlp.gate.weight` | `….e_score_correction_bias` | - |
    /// | Kimi-K2.5 as released / as transformers saves it | `language_model.model.layers.{L}.mlp.gate.weight` / `model.language_model.layers.{L}…` | as above | - |
    /// | DeepSeek-V4 as released | `layers.{L}.ffn.gate.weight` | `….bias` | `….tid2eid` |
    /// | DeepSeek-V4 as transformers 5.24 saves it (it maps the names back, keeping its `model.` prefix) | `model.layers.{L}.ffn.gate.weight` | `….bias` | `….tid2eid` |
    /// | DeepSeek-V4 under transformers' module names | `model.layers.{L}.mlp.gate.weight` | `….e_score_correction_bias` | `….tid2eid` |
    /// | Qwen3-MoE, GLM-4.5 | `model.layers.{L}.mlp.gate.weight` | `….e_score_correction_bias` (Qwen3-MoE: none, looked for and refused if present) | - |
    /// | Mixtral | `model.layers.{L}.block_sparse_moe.gate.weight` | none (as above) | - |
    /// | MiniMax-M2 | `model.layers.{L}.block_sparse_moe.gate.weight` | `model.layers.{L}.block_sparse_moe.e_score_correction_bias` (on the block, not the gate) | - |
    /// | gpt-oss | `model.layers.{L}.mlp.router.weight` | `….bias` (added to the logits) | - |
    /// | Llama 4 (`text_config`) as released / as transformers saves it | `language_model.model.layers.{L}.feed_forward.router.weight` / `model.language_model.layers.{L}…` | none (as above) | - |
    /// | Llama 4 text-only (`llama4_text`) | `model.layers.{L}.feed_forward.router.weight` | none (as above) | - |
    pub fn candidates(config: &ModelConfig, layer: usize) -> Vec<Self> {
        const NESTED: [&str; 2] = ["language_model.model.layers.", "model.language_model.layers."];
        const TEXT: [&str; 1] = ["model.layers."];
        // (layer prefixes, the gate module, the bias: its path under the layer)
        let (prefixes, gate, bias): (&[&str], &str, &str) =
            match (config.family(), config.has_nested_text_config()) {
                (ModelFamily::Mixtral, _) => (
                    &TEXT,
                    "block_sparse_moe.gate",
                    "block_sparse_moe.gate.e_score_correction_bias",
                ),
                (ModelFamily::MinimaxM2, _) => {
                    (&TEXT, "block_sparse_moe.gate", "block_sparse_moe.e_score_correction_bias")
                }
                (ModelFamily::GptOss, _) => (&TEXT, "mlp.router", "mlp.router.bias"),
                (ModelFamily::Llama4, nested) => {
                    let prefixes: &[&str] = if nested { &NESTED } else { &TEXT };
                    (prefixes, "feed_forward.router", "feed_forward.router.bias")
                }
                (ModelFamily::DeepseekV4, _) => return Self::deepseek_v4(layer),
                (_, true) => (&NESTED, "mlp.gate", "mlp.gate.e_score_correction_bias"),
                (_, false) => (&TEXT, "mlp.gate", "mlp.gate.e_score_correction_bias"),
            };
        prefixes
            .iter()
            .map(|prefix| GateTensorNames {
                weight: format!("{prefix}{layer}.{gate}.weight"),
                bias: format!("{prefix}{layer}.{bias}"),
                hash_table: None,
            })
            .collect()
    }

    /// DeepSeek-V4's three conventions, each with a hash table beside the gate.
    fn deepseek_v4(layer: usize) -> Vec<Self> {
        [("layers.", "ffn.gate", "bias"), ("model.layers.", "ffn.gate", "bias")]
            .into_iter()
            .chain([("model.layers.", "mlp.gate", "e_score_correction_bias")])
            .map(|(prefix, gate, bias)| {
                let gate = format!("{prefix}{layer}.{gate}");
                GateTensorNames {
                    weight: format!("{gate}.weight"),
                    bias: format!("{gate}.{bias}"),
                    hash_table: Some(format!("{gate}.tid2eid")),
                }
            })
            .collect()
    }

    /// Every tensor name of the gate, the weight first: what a copy of the gate carries (those
    /// of them that the checkpoint holds).
    pub fn all(&self) -> Vec<&str> {
        let mut names = vec![self.weight.as_str(), &self.bias];
        names.extend(self.hash_table.as_deref());
        names
    }
}

impl MoeGate {
    /// Loads the gate of MoE layer `layer`.
    ///
    /// The weight must be bf16 or f32 `[E, H]`, the bias (present exactly when the spec takes one:
    /// `noaux_tc`'s correction bias, gpt-oss's bias on the logits) `[E]`. A hash-routed layer has no bias but a table `tid2eid` (i32 or i64
    /// `[vocab_size, K]`), refused when a row names an expert outside `[0, E)` or one twice. An f32 bias is used as stored, zero-copy; an f64 one is rounded once to
    /// f32, a bf16 or f16 one widened exactly. It is never narrowed to bf16: rounding the bias
    /// changes which experts are selected.
    pub fn load(checkpoint: &Checkpoint, layer: usize) -> Result<Self, ModelError> {
        let config = checkpoint.config();
        let dir = checkpoint.dir();
        let _span = tracing::debug_span!("gate_load", layer).entered();
        let spec = config.layer_routing(layer);
        let hidden_size = config.hidden_size();
        let names = Self::find_tensor_names(checkpoint, layer)?;
        let (weight_name, bias_name) = (&names.weight, &names.bias);

        let weight = checkpoint.tensor(weight_name)?;
        check_shape(dir, weight_name, &weight, &[spec.num_experts, hidden_size])?;
        if !matches!(weight.dtype(), DType::BF16 | DType::F32) {
            return Err(ModelError::GateDType {
                dir: dir.to_path_buf(),
                tensor: weight_name.clone(),
                dtype: weight.dtype(),
                supported: "bf16, f32",
            });
        }

        let has_bias = checkpoint.contains(bias_name)?;
        let bias = match (spec.takes_bias(), has_bias) {
            (true, true) => Some(load_bias(checkpoint, bias_name, &spec)?),
            (true, false) => {
                return Err(ModelError::MissingBias {
                    dir: dir.to_path_buf(),
                    tensor: bias_name.clone(),
                });
            }
            (false, true) => {
                return Err(ModelError::UnexpectedBias {
                    dir: dir.to_path_buf(),
                    tensor: bias_name.clone(),
                    method: spec.method,
                });
            }
            (false, false) => None,
        };
        tracing::debug!(
            layer,
            weight = %weight_name,
            dtype = %weight.dtype(),
            bias = bias.is_some(),
            "loaded gate"
        );
        if spec.method != TopkMethod::Hash {
            return Self::new(layer, spec, weight, bias);
        }
        // Every family with hash layers has a vocabulary size (defaulted when absent).
        let vocab = config.vocab_size().unwrap_or_default();
        // Only V4 has hash layers, and its conventions all name a table.
        let table_name = names.hash_table.as_deref().unwrap_or("tid2eid");
        let table = load_hash_table(checkpoint, layer, table_name, vocab, &spec)?;
        Self::hashed(layer, spec, weight, table)
    }

    /// A hash-routed gate from tensors in memory: the weight as for [`new`](MoeGate::new) and the
    /// table `tid2eid` (i32 or i64 `[vocab, K]`), whose rows must name `K` distinct experts of
    /// `[0, E)`. The spec's method must be [`TopkMethod::Hash`].
    pub fn hashed(
        layer: usize,
        spec: RoutingSpec,
        weight: Tensor,
        table: Tensor,
    ) -> Result<Self, ModelError> {
        if spec.method != TopkMethod::Hash {
            return Err(ModelError::GatePart {
                part: "hash table",
                problem: format!("is not used by {} routing", spec.method.name()),
            });
        }
        let table = hash_table_tensor(Path::new(""), "tid2eid", &table, &spec)?;
        let gate = Self::checked(layer, spec, weight, None)?;
        Ok(MoeGate { hash_table: Some(table), ..gate })
    }

    /// The names of MoE layer `layer`'s gate tensors in `checkpoint`: the naming convention under
    /// which the checkpoint holds the gate weight. Reads only the index (sharded) or the header
    /// (single file), never the weights.
    ///
    /// A layer that is out of range or dense is an error, and so is one whose weight the
    /// checkpoint does not hold under any name ([`ModelError::MissingGate`], listing the names
    /// looked for): a partial checkpoint holds only some layers' gates.
    pub fn find_tensor_names(
        checkpoint: &Checkpoint,
        layer: usize,
    ) -> Result<GateTensorNames, ModelError> {
        let config = checkpoint.config();
        let dir = checkpoint.dir();
        if layer >= config.num_layers() {
            return Err(ModelError::LayerOutOfRange {
                dir: dir.to_path_buf(),
                layer,
                num_layers: config.num_layers(),
            });
        }
        if !config.is_moe_layer(layer) {
            return Err(ModelError::DenseLayer {
                dir: dir.to_path_buf(),
                layer,
                first_k_dense_replace: config.first_k_dense_replace(),
                moe_layer_freq: config.moe_layer_freq(),
            });
        }
        let candidates = GateTensorNames::candidates(config, layer);
        for names in &candidates {
            if checkpoint.contains(&names.weight)? {
                return Ok(names.clone());
            }
        }
        Err(ModelError::MissingGate {
            dir: dir.to_path_buf(),
            layer,
            tried: candidates.into_iter().map(|names| names.weight).collect(),
        })
    }

    /// A gate from tensors already in memory (synthetic weights, another loader).
    ///
    /// The weight must be bf16 or f32 `[E, H]` with `E = spec.num_experts`; the bias, present
    /// exactly when the spec takes one ([`RoutingSpec::takes_bias`]), f32 `[E]`. The spec is validated. The weight is held
    /// as a parameter (`requires_grad = true`), like a loaded one. Hash-routed gates are made by
    /// [`hashed`](MoeGate::hashed).
    pub fn new(
        layer: usize,
        spec: RoutingSpec,
        weight: Tensor,
        bias: Option<Tensor>,
    ) -> Result<Self, ModelError> {
        if spec.method == TopkMethod::Hash {
            return Err(ModelError::GatePart {
                part: "hash table",
                problem: "is missing; hash routing needs one (MoeGate::hashed)".to_owned(),
            });
        }
        Self::checked(layer, spec, weight, bias)
    }

    /// Validates the spec, the weight and the bias.
    fn checked(
        layer: usize,
        spec: RoutingSpec,
        weight: Tensor,
        bias: Option<Tensor>,
    ) -> Result<Self, ModelError> {
        spec.validate().map_err(BackendError::from)?;
        let invalid = |part: &'static str, problem: String| ModelError::GatePart { part, problem };
        check_router_weight("MoeGate::new", weight.shape(), &spec)
            .map_err(|error| invalid("weight", error.to_string()))?;
        let (experts, hidden_size) = (spec.num_experts, weight.shape()[1]);
        if !matches!(weight.dtype(), DType::BF16 | DType::F32) {
            return Err(invalid(
                "weight",
                format!("has dtype {}; supported: bf16, f32", weight.dtype()),
            ));
        }
        match (&bias, spec.takes_bias()) {
            (Some(b), true) => {
                if b.dtype() != DType::F32 || b.shape() != [experts] {
                    return Err(invalid(
                        "bias",
                        format!("is {} {:?}, expected f32 [{experts}]", b.dtype(), b.shape()),
                    ));
                }
            }
            (None, true) => {
                return Err(invalid("bias", format!("is missing; {spec} routing needs it")));
            }
            (Some(_), false) => {
                return Err(invalid("bias", format!("is not used by {}", spec.method.name())));
            }
            (None, false) => {}
        }
        let weight = weight.with_requires_grad(true);
        Ok(MoeGate { layer, spec, hidden_size, weight, bias, hash_table: None })
    }

    /// Loads the gate of every MoE layer, in layer order.
    pub fn load_all(checkpoint: &Checkpoint) -> Result<Vec<Self>, ModelError> {
        checkpoint.config().moe_layers().map(|layer| Self::load(checkpoint, layer)).collect()
    }

    /// Leaves `routed_scaling_factor` to the caller (`false`), for engines that scale after the
    /// experts, or applies it in the gate (`true`, the default). It is applied exactly once either
    /// way.
    pub fn with_apply_scaling(mut self, apply: bool) -> Self {
        self.spec.apply_scaling = apply;
        self
    }

    /// Sets what happens to tokens with non-finite logits (default: an error naming the first).
    pub fn with_non_finite(mut self, policy: NonFinitePolicy) -> Self {
        self.spec.non_finite = policy;
        self
    }

    /// The decoder layer.
    pub fn layer(&self) -> usize {
        self.layer
    }

    /// The routing spec, with this gate's scaling and non-finite options.
    pub fn spec(&self) -> &RoutingSpec {
        &self.spec
    }

    /// The hidden size `H`.
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    /// The number of routed experts `E`.
    pub fn num_experts(&self) -> usize {
        self.spec.num_experts
    }

    /// The router weight `[E, H]`, bf16 or f32, as a parameter (`requires_grad = true`).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The f32 bias `[E]`: the correction bias (`noaux_tc`), or the router bias added to the
    /// logits (gpt-oss).
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The hash table `tid2eid`, i32 `[vocab, K]` (hash-routed layers only).
    pub fn hash_table(&self) -> Option<&Tensor> {
        self.hash_table.as_ref()
    }

    /// Hands the detached weight and bias (or hash table) to `backend` to prepare for repeated
    /// routing.
    pub fn prepare(&self, backend: &dyn Backend) -> Result<PreparedGate, ModelError> {
        let _span =
            tracing::debug_span!("gate_prepare", layer = self.layer, backend = backend.name())
                .entered();
        let weight = export_detached(&self.weight)?;
        let (router, vocab) = match &self.hash_table {
            Some(table) => {
                let vocab = table.shape()[0];
                let table = export_detached(table)?;
                (backend.prepare_hash_router(weight, table, &self.spec)?, Some(vocab))
            }
            None => {
                let bias = self.bias.as_ref().map(export_detached).transpose()?;
                (backend.prepare_router(weight, bias, &self.spec)?, None)
            }
        };
        Ok(PreparedGate::new(self.layer, self.hidden_size, vocab, backend.name(), router))
    }

    /// Routes hidden states `[T, H]` once: [`prepare`](MoeGate::prepare), then
    /// [`PreparedGate::route`]. Keep the [`PreparedGate`] to route more than once.
    pub fn route(&self, backend: &dyn Backend, hidden: &Tensor) -> Result<GateRouting, ModelError> {
        self.prepare(backend)?.route(hidden)
    }

    /// [`route`](MoeGate::route) with the token ids `[T]` that a hash-routed layer needs.
    pub fn route_with_token_ids(
        &self,
        backend: &dyn Backend,
        hidden: &Tensor,
        token_ids: Option<&Tensor>,
    ) -> Result<GateRouting, ModelError> {
        self.prepare(backend)?.route_with_token_ids(hidden, token_ids)
    }

    /// Router logits `x · Wᵀ`, f32 `[T, E]`, computed by `backend` without preparing a router.
    pub fn router_gemm(
        &self,
        backend: &dyn Backend,
        hidden: &Tensor,
    ) -> Result<Tensor, ModelError> {
        let tokens = check_hidden(self.layer, self.hidden_size, hidden)?;
        let logits =
            backend.router_gemm(&export_detached(hidden)?, &export_detached(&self.weight)?)?;
        import_checked(backend.name(), "logits", logits, DType::F32, &[tokens, self.num_experts()])
    }
}

fn check_shape(
    dir: &Path,
    name: &str,
    tensor: &Tensor,
    expected: &[usize],
) -> Result<(), ModelError> {
    if tensor.shape() == expected {
        Ok(())
    } else {
        Err(ModelError::GateShape {
            dir: dir.to_path_buf(),
            tensor: name.to_owned(),
            shape: tensor.shape().to_vec(),
            expected: expected.to_vec(),
        })
    }
}

/// The bias as f32, without ever rounding it through bf16.
fn load_bias(
    checkpoint: &Checkpoint,
    name: &str,
    spec: &RoutingSpec,
) -> Result<Tensor, ModelError> {
    let (dir, experts) = (checkpoint.dir(), spec.num_experts);
    let stored = checkpoint.tensor(name)?;
    check_shape(dir, name, &stored, &[experts])?;
    let widened: Vec<f32> = match stored.dtype() {
        DType::F32 => return Ok(stored),
        DType::F64 => stored.to_vec::<f64>()?.into_iter().map(|b| b as f32).collect(),
        DType::BF16 => stored.to_vec::<bf16>()?.into_iter().map(f32::from).collect(),
        DType::F16 => stored.to_vec::<f16>()?.into_iter().map(f32::from).collect(),
        dtype => {
            return Err(ModelError::GateDType {
                dir: dir.to_path_buf(),
                tensor: name.to_owned(),
                dtype,
                supported: "f32 (or f64, bf16, f16, converted to f32)",
            });
        }
    };
    // A router bias on the logits is released in bf16 (gpt-oss) and trained that way; a correction
    // bias in half precision has lost bits the selection depends on.
    if matches!(stored.dtype(), DType::BF16 | DType::F16) && !spec.bias_on_logits() {
        tracing::warn!(
            tensor = name,
            dtype = %stored.dtype(),
            "correction bias stored in half precision: it has already lost bits that f32 would keep"
        );
    }
    Ok(Tensor::from_vec(widened, &[experts])?)
}

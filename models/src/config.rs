//! `config.json` of DeepSeek V2 / V2-Lite / V2.5 / V3 / R1 / V3.2 / V4, Kimi-K2 / K2.5, Qwen3-MoE,
//! Mixtral, GLM-4.5 / 4.6, gpt-oss, MiniMax-M2 and Llama 4 checkpoints.
//!
//! Only what the MoE gate needs is read: the family, the hidden size, the layer count, the MoE layer
//! rule and the routing fields, which become a validated [`RoutingSpec`].
//!
//! # Where the fields live
//!
//! Text models keep them at the top level. Kimi-K2.5 is multimodal and nests them under
//! `text_config` (whose `model_type` is `kimi_k2`, or `deepseek_v3` once transformers has rewritten
//! it); errors then name the field as `text_config.<field>`.
//!
//! # Missing fields
//!
//! Configs written by the model authors carry every routing field. Configs written by transformers'
//! `save_pretrained` carry every field of transformers' own config class, which for DeepSeek-V3 has
//! no `scoring_func`, `topk_method` or `moe_layer_freq`, and for DeepSeek-V2 no `scoring_func` or
//! `moe_layer_freq`. A missing field (or a JSON `null`, which is how `None` is saved) is read the
//! way transformers 5.24 reads it:
//!
//! | field | `deepseek_v2` | `deepseek_v3`, `deepseek_v32`, `kimi_k2` | `deepseek_v4` |
//! | --- | --- | --- | --- |
//! | `scoring_func` | `softmax` | `sigmoid` (nothing else accepted) | `sqrtsoftplus` (`sigmoid`, `softmax` accepted) |
//! | `topk_method` | `greedy` when `n_group` is absent or 1; refused otherwise | `noaux_tc` | `noaux_tc` (nothing else accepted) |
//! | `n_group`, `topk_group` | 1 for `greedy`; required for a grouped method | 8 and 4 | 1 and 1 (more groups refused) |
//! | `norm_topk_prob` | false | true | true (`false` refused: both transformers and DeepSeek's code renormalise regardless) |
//! | `routed_scaling_factor` | 1.0 | 2.5 | 1.5 |
//! | `first_k_dense_replace` | 0 | 3 | not read: every layer is MoE |
//! | `moe_layer_freq` | 1 | 1 | not read |
//! | `mlp_layer_types` | not read | `deepseek_v32` only: `"dense"` / `"sparse"` per layer, overrides the two above | `"hash_moe"` / `"moe"` per layer |
//! | `num_hash_layers` | - | - | 3, when `mlp_layer_types` is absent: the first layers are hash-routed |
//! | `vocab_size` | not read | not read | 129280: the rows of the hash table |
//!
//! transformers' `DeepseekV2Config` defaults `topk_method` to `greedy` even when `n_group` > 1,
//! which silently ignores the groups; every released grouped V2 checkpoint says
//! `group_limited_greedy`. That combination is ambiguous, so it is refused with an error that asks
//! for an explicit `topk_method`. The sizes (`hidden_size`, `num_hidden_layers`,
//! `n_routed_experts`, `num_experts_per_tok`) are always required.
//!
//! # Qwen3-MoE and Mixtral
//!
//! Both route with softmax over all experts, then a plain top-k of the probabilities (softmax +
//! greedy): no groups, no correction bias, no scaling factor (`routed_scaling_factor` is not read).
//! The sizes (`hidden_size`, `num_hidden_layers`, the expert count, `num_experts_per_tok`) are
//! required; the other fields default as transformers 5.24 reads them:
//!
//! | field | `qwen3_moe` | `mixtral` |
//! | --- | --- | --- |
//! | expert count | `num_experts` | `num_local_experts` |
//! | `norm_topk_prob` | false | not a field: always renormalised (`false` refused) |
//! | `decoder_sparse_step` | 1: layer `L` is MoE when `(L + 1) % step == 0` | not read: every layer is MoE |
//! | `mlp_only_layers` | empty: the layers listed are dense (a layer past the last refused) | not read |
//!
//! # GLM-4.5 / 4.6, gpt-oss, MiniMax-M2 and Llama 4
//!
//! The sizes (`hidden_size`, `num_hidden_layers`, the expert count, `num_experts_per_tok`) are
//! required; the other fields default as transformers 5.24 reads them. A field transformers
//! ignores but that would change the routing if honoured is refused when it says so.
//!
//! | | `glm4_moe` | `gpt_oss` | `minimax_m2` | `llama4` (`text_config`, `llama4_text`) |
//! | --- | --- | --- | --- | --- |
//! | router | DeepSeek-V3's: sigmoid, correction bias for selection, top-2-sum groups | bias added to the logits, top-k of the logits, softmax of the selected | sigmoid, correction bias for selection, no groups | top-k of the logits, sigmoid of the selected |
//! | expert count | `n_routed_experts` | `num_local_experts` | `num_local_experts` | `num_local_experts` |
//! | groups | `n_group` 1, `topk_group` 1 | none | none | none |
//! | renormalised | `norm_topk_prob`, true | no | always (`norm_topk_prob` false refused) | no |
//! | scaling | `routed_scaling_factor`, 1.0 | none | none (not read) | none |
//! | MoE layers | `L >= first_k_dense_replace` (1) | every layer | every layer | `moe_layers`, else every `interleave_moe_layer_step`-th (1) counting from 1 |
//! | refused | `scoring_func` other than sigmoid, `topk_method` other than noaux_tc | | `scoring_func` other than sigmoid, `use_routing_bias` false | a `llama4` config without `text_config` |

use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use sluice_tensor::{BiasRole, RoutingSpec, ScoringFunc, ScoringOrder, SpecError, TopkMethod};
use thiserror::Error;

/// The model family, from `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelFamily {
    /// `deepseek_v2`: DeepSeek-V2, V2-Lite, V2.5 (softmax scoring).
    DeepseekV2,
    /// `deepseek_v3`: DeepSeek-V3, R1 (sigmoid scoring with a correction bias). Kimi checkpoints
    /// whose config says `deepseek_v3` are reported as this family too.
    DeepseekV3,
    /// `deepseek_v32`: DeepSeek-V3.2; the V3 router, with the MoE layers optionally listed in
    /// `mlp_layer_types` (`"dense"` / `"sparse"`).
    DeepseekV32,
    /// `deepseek_v4`: DeepSeek-V4; sqrt-softplus scores with a correction bias and no groups, and
    /// hash-routed first layers (`mlp_layer_types` `"hash_moe"`, or `num_hash_layers`).
    DeepseekV4,
    /// `kimi_k2`: Kimi-K2, and Kimi-K2.5 (`kimi_k25` with a `text_config`). The V3 architecture.
    KimiK2,
    /// `qwen3_moe`: Qwen3-MoE (softmax over all experts, top-k, renormalised when
    /// `norm_topk_prob`); the MoE layers follow `decoder_sparse_step` and `mlp_only_layers`.
    Qwen3Moe,
    /// `mixtral`: Mixtral (softmax over all experts, top-k, always renormalised); every layer is
    /// an MoE layer.
    Mixtral,
    /// `glm4_moe`: GLM-4.5, GLM-4.5-Air, GLM-4.6 (DeepSeek-V3's router); dense first layers by
    /// `first_k_dense_replace`.
    Glm4Moe,
    /// `gpt_oss`: gpt-oss (router bias added to the logits, top-k of the logits, softmax of the
    /// selected); every layer is an MoE layer.
    GptOss,
    /// `minimax_m2`: MiniMax-M2 (sigmoid, correction bias for selection, renormalised); every
    /// layer is an MoE layer.
    MinimaxM2,
    /// `llama4_text` (the `text_config` of `llama4`): Llama 4 (top-k of the logits, sigmoid of the
    /// selected); MoE layers by `moe_layers` or `interleave_moe_layer_step`.
    Llama4,
}

impl ModelFamily {
    /// The family for a `model_type` string, if it is one sluice knows.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "deepseek_v2" => Some(ModelFamily::DeepseekV2),
            "deepseek_v3" => Some(ModelFamily::DeepseekV3),
            "deepseek_v32" => Some(ModelFamily::DeepseekV32),
            "deepseek_v4" => Some(ModelFamily::DeepseekV4),
            "kimi_k2" => Some(ModelFamily::KimiK2),
            "qwen3_moe" => Some(ModelFamily::Qwen3Moe),
            "mixtral" => Some(ModelFamily::Mixtral),
            "glm4_moe" => Some(ModelFamily::Glm4Moe),
            "gpt_oss" => Some(ModelFamily::GptOss),
            "minimax_m2" => Some(ModelFamily::MinimaxM2),
            "llama4_text" => Some(ModelFamily::Llama4),
            _ => None,
        }
    }

    /// A display name.
    pub const fn name(self) -> &'static str {
        match self {
            ModelFamily::DeepseekV2 => "DeepSeek-V2",
            ModelFamily::DeepseekV3 => "DeepSeek-V3",
            ModelFamily::DeepseekV32 => "DeepSeek-V3.2",
            ModelFamily::DeepseekV4 => "DeepSeek-V4",
            ModelFamily::KimiK2 => "Kimi-K2",
            ModelFamily::Qwen3Moe => "Qwen3-MoE",
            ModelFamily::Mixtral => "Mixtral",
            ModelFamily::Glm4Moe => "GLM-4.5",
            ModelFamily::GptOss => "gpt-oss",
            ModelFamily::MinimaxM2 => "MiniMax-M2",
            ModelFamily::Llama4 => "Llama 4",
        }
    }

    /// Whether the family uses the V2 routing (softmax scores, no correction bias).
    const fn is_v2(self) -> bool {
        matches!(self, ModelFamily::DeepseekV2)
    }

    /// Whether the family uses the V4 routing (no groups, hash layers).
    const fn is_v4(self) -> bool {
        matches!(self, ModelFamily::DeepseekV4)
    }

    /// The `mlp_layer_types` values the family writes: (dense or the MoE one, MoE, hash MoE).
    const fn layer_type_names(self) -> &'static [(&'static str, MlpKind)] {
        match self {
            ModelFamily::DeepseekV4 => &[("moe", MlpKind::Moe), ("hash_moe", MlpKind::HashMoe)],
            _ => &[("dense", MlpKind::Dense), ("sparse", MlpKind::Moe)],
        }
    }
}

/// What a decoder layer's MLP is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MlpKind {
    /// A dense MLP: no gate.
    Dense,
    /// An MoE block whose gate ranks expert scores.
    Moe,
    /// An MoE block whose gate takes its experts from a frozen per-token table (DeepSeek-V4).
    HashMoe,
}

impl MlpKind {
    /// Whether the layer has a gate.
    pub const fn is_moe(self) -> bool {
        !matches!(self, MlpKind::Dense)
    }

    /// An MoE layer if `moe`, else a dense one.
    const fn moe_if(moe: bool) -> Self {
        if moe { MlpKind::Moe } else { MlpKind::Dense }
    }
}

impl fmt::Display for ModelFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a `config.json` could not be used. Every variant names the file.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not JSON, or its top level is not an object.
    #[error("{}: malformed JSON: {message}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A required field is absent (or `null`).
    #[error("{}: missing field `{field}`{hint}", path.display())]
    Missing {
        /// The file.
        path: PathBuf,
        /// The field, with its `text_config.` prefix where nested.
        field: String,
        /// Extra context, empty or starting with a separator.
        hint: &'static str,
    },
    /// A field holds a JSON value of the wrong type.
    #[error("{}: field `{field}` is {found}, expected {expected}", path.display())]
    WrongType {
        /// The file.
        path: PathBuf,
        /// The field.
        field: String,
        /// The value found, as JSON.
        found: String,
        /// What was expected, in words.
        expected: &'static str,
    },
    /// A field holds a value sluice does not accept.
    #[error("{}: field `{field}` = {value}: {reason}", path.display())]
    BadValue {
        /// The file.
        path: PathBuf,
        /// The field.
        field: String,
        /// The value, as JSON.
        value: String,
        /// Why it is refused.
        reason: String,
    },
    /// The routing fields are inconsistent.
    #[error("{}: {source}", path.display())]
    Spec {
        /// The file.
        path: PathBuf,
        /// What the routing validation said.
        source: SpecError,
    },
}

/// What sluice reads from a checkpoint's `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    family: ModelFamily,
    model_type: String,
    nested_text_config: bool,
    hidden_size: usize,
    num_layers: usize,
    first_k_dense_replace: usize,
    moe_layer_freq: usize,
    /// Per layer, from `mlp_layer_types`; overrides the rule of the two fields above.
    listed: Option<Vec<MlpKind>>,
    /// DeepSeek-V4 without `mlp_layer_types`: how many leading MoE layers are hash-routed.
    leading_hash_layers: usize,
    /// DeepSeek-V4: the rows of the hash tables.
    vocab_size: Option<usize>,
    routing: RoutingSpec,
}

impl ModelConfig {
    /// Reads and parses a `config.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::from_json(&text, path)
    }

    /// Parses the text of a `config.json`; `path` is only used in error messages.
    pub fn from_json(text: &str, path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let root: Value = serde_json::from_str(text)
            .map_err(|e| ConfigError::Json { path: path.to_path_buf(), message: e.to_string() })?;
        let Value::Object(root) = root else {
            return Err(ConfigError::Json {
                path: path.to_path_buf(),
                message: format!("the top level is {}, expected an object", json_kind(&root)),
            });
        };
        let top = Fields { object: &root, prefix: "", path };
        let config = match top.get("text_config") {
            Some(Value::Object(text_config)) => {
                let mut config = Self::parse(
                    Fields { object: text_config, prefix: "text_config.", path },
                    true,
                )?;
                // transformers rewrites Kimi-K2.5's text `model_type` to `deepseek_v3`; the outer
                // one still says which model this is.
                if top.str("model_type")? == Some("kimi_k25") {
                    config.family = ModelFamily::KimiK2;
                }
                config
            }
            Some(other) => return Err(top.wrong_type("text_config", other, "an object")),
            None if top.str("model_type")? == Some("kimi_k25") => {
                return Err(top.missing("text_config", " (Kimi-K2.5 keeps its text model there)"));
            }
            None if top.str("model_type")? == Some("llama4") => {
                return Err(top.missing("text_config", " (Llama 4 keeps its text model there)"));
            }
            None => Self::parse(top, false)?,
        };
        tracing::debug!(
            file = %path.display(),
            family = %config.family,
            routing = %config.routing,
            "parsed model config"
        );
        Ok(config)
    }

    fn parse(fields: Fields<'_>, nested_text_config: bool) -> Result<Self, ConfigError> {
        let model_type = fields.required_str("model_type")?;
        let family = ModelFamily::from_model_type(model_type).ok_or_else(|| {
            fields.bad_value(
                "model_type",
                "not a model sluice knows (expected deepseek_v2, deepseek_v3, deepseek_v32, \
                 deepseek_v4, kimi_k2, qwen3_moe, mixtral, glm4_moe, gpt_oss, minimax_m2 or \
                 llama4_text)",
            )
        })?;
        match family {
            ModelFamily::Qwen3Moe | ModelFamily::Mixtral => {
                return Self::parse_softmax_top_k(fields, family, model_type, nested_text_config);
            }
            ModelFamily::Glm4Moe => {
                return Self::parse_glm4_moe(fields, model_type, nested_text_config);
            }
            ModelFamily::GptOss | ModelFamily::MinimaxM2 | ModelFamily::Llama4 => {
                return Self::parse_local_experts(fields, family, model_type, nested_text_config);
            }
            _ => {}
        }
        let (v2, v4) = (family.is_v2(), family.is_v4());

        let hidden_size = fields.required_usize("hidden_size")?;
        let num_layers = fields.required_usize("num_hidden_layers")?;
        let num_experts = fields.usize("n_routed_experts")?.ok_or_else(|| {
            fields.missing("n_routed_experts", "; a model without routed experts has no MoE gate")
        })?;
        let top_k = fields.required_usize("num_experts_per_tok")?;

        let scoring = match fields.str("scoring_func")? {
            None if v2 => ScoringFunc::Softmax,
            None if v4 => ScoringFunc::SqrtSoftplus,
            None => ScoringFunc::Sigmoid,
            Some("softmax") => ScoringFunc::Softmax,
            Some("sigmoid") => ScoringFunc::Sigmoid,
            Some("sqrtsoftplus") if v4 => ScoringFunc::SqrtSoftplus,
            Some(_) => {
                let expected = if v4 {
                    "expected \"sqrtsoftplus\", \"sigmoid\" or \"softmax\""
                } else {
                    "expected \"softmax\" or \"sigmoid\""
                };
                return Err(fields.bad_value("scoring_func", expected));
            }
        };
        if !v2 && !v4 && scoring != ScoringFunc::Sigmoid {
            return Err(fields.bad_value(
                "scoring_func",
                "the DeepSeek-V3 router (also V3.2 and Kimi-K2) scores with sigmoid only",
            ));
        }
        let n_group = fields.usize("n_group")?;
        let method = match fields.str("topk_method")? {
            None if !v2 => TopkMethod::NoauxTc,
            None if n_group.unwrap_or(1) == 1 => TopkMethod::Greedy,
            None => {
                return Err(fields.missing(
                    "topk_method",
                    " while `n_group` > 1: transformers would route greedily and ignore the \
                     groups, released grouped V2 checkpoints say \"group_limited_greedy\"; \
                     set it explicitly",
                ));
            }
            Some("noaux_tc") => TopkMethod::NoauxTc,
            Some(_) if v4 => {
                return Err(fields.bad_value("topk_method", "DeepSeek-V4 routes with noaux_tc"));
            }
            Some("greedy") => TopkMethod::Greedy,
            Some("group_limited_greedy") => TopkMethod::GroupLimitedGreedy,
            Some(_) => {
                return Err(fields.bad_value(
                    "topk_method",
                    "expected \"greedy\", \"group_limited_greedy\" or \"noaux_tc\"",
                ));
            }
        };
        let topk_group = fields.usize("topk_group")?;
        let (n_group, topk_group) = match (method, n_group, topk_group) {
            _ if v4 => match n_group.unwrap_or(1) {
                1 => (1, 1),
                _ => {
                    return Err(fields.bad_value(
                        "n_group",
                        "DeepSeek-V4 routers have no expert groups (transformers and DeepSeek's \
                         code ignore them); expected 1",
                    ));
                }
            },
            (_, Some(groups), Some(kept)) => (groups, kept),
            _ if !v2 => (n_group.unwrap_or(8), topk_group.unwrap_or(4)),
            (TopkMethod::Greedy, groups, kept) => {
                let groups = groups.unwrap_or(1);
                (groups, kept.unwrap_or(groups))
            }
            (_, None, _) => {
                return Err(fields.missing("n_group", " (required by a grouped `topk_method`)"));
            }
            (_, Some(_), None) => {
                return Err(fields.missing("topk_group", " (required by a grouped `topk_method`)"));
            }
        };
        let norm_topk_prob = fields.bool("norm_topk_prob")?.unwrap_or(!v2);
        if v4 && !norm_topk_prob {
            return Err(fields.bad_value(
                "norm_topk_prob",
                "DeepSeek-V4 routers always renormalise (transformers and DeepSeek's code ignore \
                 this field); expected true",
            ));
        }
        let default_scale = match family {
            ModelFamily::DeepseekV2 => 1.0,
            ModelFamily::DeepseekV4 => 1.5,
            _ => 2.5,
        };
        let routed_scaling_factor = fields.f32("routed_scaling_factor")?.unwrap_or(default_scale);
        let (mut first_k_dense_replace, mut moe_layer_freq) = (0, 1);
        if !v4 {
            first_k_dense_replace =
                fields.usize("first_k_dense_replace")?.unwrap_or(if v2 { 0 } else { 3 });
            moe_layer_freq = fields.usize("moe_layer_freq")?.unwrap_or(1);
        }
        if moe_layer_freq == 0 {
            return Err(fields.bad_value("moe_layer_freq", "must be at least 1"));
        }
        if hidden_size == 0 {
            return Err(fields.bad_value("hidden_size", "must be at least 1"));
        }
        let listed = match family {
            ModelFamily::DeepseekV32 | ModelFamily::DeepseekV4 => {
                fields.layer_kinds("mlp_layer_types", family.layer_type_names(), num_layers)?
            }
            _ => None,
        };
        if let Some(kinds) = &listed {
            // The leading dense layers, so that every MoE layer is at or past them.
            first_k_dense_replace = kinds.iter().take_while(|kind| !kind.is_moe()).count();
        }
        let (leading_hash_layers, vocab_size) = if v4 {
            let hash_layers = fields.usize("num_hash_layers")?.unwrap_or(3);
            let vocab_size = fields.usize("vocab_size")?.unwrap_or(129_280);
            if vocab_size == 0 {
                return Err(fields.bad_value("vocab_size", "must be at least 1"));
            }
            (hash_layers, Some(vocab_size))
        } else {
            (0, None)
        };

        let routing = RoutingSpec::builder(num_experts, top_k)
            .scoring(scoring)
            .method(method)
            .groups(n_group, topk_group)
            .norm_topk_prob(norm_topk_prob)
            .routed_scaling_factor(routed_scaling_factor)
            .build()
            .map_err(|source| ConfigError::Spec { path: fields.path.to_path_buf(), source })?;
        if v4 {
            hash_routing(&routing)
                .validate()
                .map_err(|source| ConfigError::Spec { path: fields.path.to_path_buf(), source })?;
        }

        Ok(ModelConfig {
            family,
            model_type: model_type.to_owned(),
            nested_text_config,
            hidden_size,
            num_layers,
            first_k_dense_replace,
            moe_layer_freq,
            listed,
            leading_hash_layers,
            vocab_size,
            routing,
        })
    }

    /// Qwen3-MoE and Mixtral: softmax over all experts, then a plain top-k of the probabilities
    /// (softmax + greedy); no groups, no correction bias, no scaling factor. They differ in the
    /// renormalisation (Qwen3-MoE: `norm_topk_prob`, false when absent; Mixtral: always) and in
    /// which layers are MoE (Qwen3-MoE: layer `L` unless listed in `mlp_only_layers`, when
    /// `(L + 1) % decoder_sparse_step == 0`; Mixtral: every layer).
    fn parse_softmax_top_k(
        fields: Fields<'_>,
        family: ModelFamily,
        model_type: &str,
        nested_text_config: bool,
    ) -> Result<Self, ConfigError> {
        let (hidden_size, num_layers) = required_sizes(fields)?;
        let experts_field =
            if family == ModelFamily::Qwen3Moe { "num_experts" } else { "num_local_experts" };
        let num_experts = fields.expert_count(experts_field)?;
        let top_k = fields.required_usize("num_experts_per_tok")?;
        let (norm_topk_prob, kinds) = if family == ModelFamily::Qwen3Moe {
            let norm_topk_prob = fields.bool("norm_topk_prob")?.unwrap_or(false);
            (norm_topk_prob, qwen3_moe_layer_kinds(fields, num_layers)?)
        } else {
            if fields.bool("norm_topk_prob")? == Some(false) {
                return Err(fields.bad_value(
                    "norm_topk_prob",
                    "Mixtral routers always renormalise (transformers ignores this field); \
                     expected true",
                ));
            }
            (true, vec![MlpKind::Moe; num_layers])
        };
        let routing = RoutingSpec::builder(num_experts, top_k)
            .scoring(ScoringFunc::Softmax)
            .method(TopkMethod::Greedy)
            .norm_topk_prob(norm_topk_prob);
        let sizes = (hidden_size, num_layers);
        Self::with_layer_kinds(
            fields,
            family,
            model_type,
            nested_text_config,
            sizes,
            kinds,
            routing,
        )
    }

    /// GLM-4.5 / 4.6: `Glm4MoeTopkRouter` is DeepSeek-V3's router (sigmoid, correction bias for
    /// selection, groups scored by their two best biased scores, renormalised with `1e-20`,
    /// scaled), under V3's field names with transformers' GLM defaults; layer `L` is MoE when
    /// `L >= first_k_dense_replace` (no `moe_layer_freq`).
    fn parse_glm4_moe(
        fields: Fields<'_>,
        model_type: &str,
        nested_text_config: bool,
    ) -> Result<Self, ConfigError> {
        let (hidden_size, num_layers) = required_sizes(fields)?;
        let num_experts = fields.required_usize("n_routed_experts")?;
        let top_k = fields.required_usize("num_experts_per_tok")?;
        if fields.str("scoring_func")?.is_some_and(|scoring| scoring != "sigmoid") {
            return Err(fields.bad_value(
                "scoring_func",
                "the GLM-4.5 router scores with sigmoid only (transformers ignores this field)",
            ));
        }
        if fields.str("topk_method")?.is_some_and(|method| method != "noaux_tc") {
            return Err(fields.bad_value(
                "topk_method",
                "the GLM-4.5 router is noaux_tc only (transformers ignores this field)",
            ));
        }
        let n_group = fields.usize("n_group")?.unwrap_or(1);
        let topk_group = fields.usize("topk_group")?.unwrap_or(1);
        let first_k_dense_replace = fields.usize("first_k_dense_replace")?.unwrap_or(1);
        let routing = RoutingSpec::builder(num_experts, top_k)
            .scoring(ScoringFunc::Sigmoid)
            .method(TopkMethod::NoauxTc)
            .groups(n_group, topk_group)
            .norm_topk_prob(fields.bool("norm_topk_prob")?.unwrap_or(true))
            .routed_scaling_factor(fields.f32("routed_scaling_factor")?.unwrap_or(1.0));
        let kinds =
            (0..num_layers).map(|layer| MlpKind::moe_if(layer >= first_k_dense_replace)).collect();
        let sizes = (hidden_size, num_layers);
        let family = ModelFamily::Glm4Moe;
        Self::with_layer_kinds(
            fields,
            family,
            model_type,
            nested_text_config,
            sizes,
            kinds,
            routing,
        )
    }

    /// gpt-oss, MiniMax-M2 and Llama 4, whose expert count is `num_local_experts`:
    ///
    /// - gpt-oss (`GptOssTopKRouter`): `l = x·Wᵀ + b` with the router's own bias, the top-k of
    ///   `l`, softmax over the selected logits; every layer;
    /// - MiniMax-M2 (`MiniMaxM2TopKRouter`): sigmoid, the block's `e_score_correction_bias` for
    ///   selection, always renormalised; every layer;
    /// - Llama 4 (`Llama4Router`): the top-k of the logits, the sigmoid of each selected logit; the
    ///   layers of `moe_layers`, or every `interleave_moe_layer_step`-th counting from 1.
    fn parse_local_experts(
        fields: Fields<'_>,
        family: ModelFamily,
        model_type: &str,
        nested_text_config: bool,
    ) -> Result<Self, ConfigError> {
        let (hidden_size, num_layers) = required_sizes(fields)?;
        let num_experts = fields.expert_count("num_local_experts")?;
        let top_k = fields.required_usize("num_experts_per_tok")?;
        let every_layer = || vec![MlpKind::Moe; num_layers];
        let (routing, kinds) = match family {
            ModelFamily::GptOss => {
                let routing = RoutingSpec::builder(num_experts, top_k)
                    .scoring(ScoringFunc::Softmax)
                    .scoring_order(ScoringOrder::AfterTopk)
                    .bias_role(BiasRole::Logits);
                (routing, every_layer())
            }
            ModelFamily::MinimaxM2 => {
                if fields.str("scoring_func")?.is_some_and(|scoring| scoring != "sigmoid") {
                    return Err(fields.bad_value(
                        "scoring_func",
                        "the MiniMax-M2 router scores with sigmoid only (transformers ignores \
                         this field)",
                    ));
                }
                if fields.bool("use_routing_bias")? == Some(false) {
                    return Err(fields.bad_value(
                        "use_routing_bias",
                        "transformers always selects with `e_score_correction_bias`; expected \
                         true",
                    ));
                }
                if fields.bool("norm_topk_prob")? == Some(false) {
                    return Err(fields.bad_value(
                        "norm_topk_prob",
                        "MiniMax-M2 routers always renormalise (transformers ignores this \
                         field); expected true",
                    ));
                }
                let routing = RoutingSpec::builder(num_experts, top_k)
                    .scoring(ScoringFunc::Sigmoid)
                    .method(TopkMethod::NoauxTc)
                    .norm_topk_prob(true);
                (routing, every_layer())
            }
            _ => {
                let routing = RoutingSpec::builder(num_experts, top_k)
                    .scoring(ScoringFunc::Sigmoid)
                    .scoring_order(ScoringOrder::AfterTopk);
                (routing, llama4_layer_kinds(fields, num_layers)?)
            }
        };
        let sizes = (hidden_size, num_layers);
        Self::with_layer_kinds(
            fields,
            family,
            model_type,
            nested_text_config,
            sizes,
            kinds,
            routing,
        )
    }

    /// A config whose layers are listed by kind, with its routing validated.
    fn with_layer_kinds(
        fields: Fields<'_>,
        family: ModelFamily,
        model_type: &str,
        nested_text_config: bool,
        (hidden_size, num_layers): (usize, usize),
        kinds: Vec<MlpKind>,
        routing: sluice_tensor::RoutingSpecBuilder,
    ) -> Result<Self, ConfigError> {
        let routing = routing
            .build()
            .map_err(|source| ConfigError::Spec { path: fields.path.to_path_buf(), source })?;
        Ok(ModelConfig {
            family,
            model_type: model_type.to_owned(),
            nested_text_config,
            hidden_size,
            num_layers,
            first_k_dense_replace: kinds.iter().take_while(|kind| !kind.is_moe()).count(),
            moe_layer_freq: 1,
            listed: Some(kinds),
            leading_hash_layers: 0,
            vocab_size: None,
            routing,
        })
    }

    /// The model family.
    pub fn family(&self) -> ModelFamily {
        self.family
    }

    /// The `model_type` of the text model, as written in the file.
    pub fn model_type(&self) -> &str {
        &self.model_type
    }

    /// Whether the routing fields came from a nested `text_config` (multimodal Kimi-K2.5 and
    /// Llama 4), whose checkpoints name the text model's tensors with an extra prefix.
    pub fn has_nested_text_config(&self) -> bool {
        self.nested_text_config
    }

    /// The hidden size `H`, the width of the gate weight `[E, H]`.
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    /// `num_hidden_layers`: the decoder layers, not counting multi-token-prediction layers.
    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// The number of leading dense layers (counted from `mlp_layer_types` where it is given).
    pub fn first_k_dense_replace(&self) -> usize {
        self.first_k_dense_replace
    }

    /// Every `moe_layer_freq`-th layer is an MoE layer (1 where `mlp_layer_types` lists them).
    pub fn moe_layer_freq(&self) -> usize {
        self.moe_layer_freq
    }

    /// Whether each layer's kind is listed, by `mlp_layer_types` or from the layer rules of the
    /// families that are not DeepSeek's (then the two rules above do not apply).
    pub fn lists_layer_types(&self) -> bool {
        self.listed.is_some()
    }

    /// The routing spec of the model's top-k MoE layers (scaling applied in the gate, non-finite
    /// logits an error). Hash-routed layers use [`layer_routing`](Self::layer_routing).
    pub fn routing(&self) -> &RoutingSpec {
        &self.routing
    }

    /// The routing spec of decoder layer `layer`: [`routing`](Self::routing), with the hash
    /// method for a hash-routed layer.
    pub fn layer_routing(&self, layer: usize) -> RoutingSpec {
        match self.mlp_kind(layer) {
            Some(MlpKind::HashMoe) => hash_routing(&self.routing),
            _ => self.routing,
        }
    }

    /// The rows of the hash tables (`vocab_size`), for a family with hash-routed layers.
    pub fn vocab_size(&self) -> Option<usize> {
        self.vocab_size
    }

    /// What decoder layer `layer`'s MLP is, or `None` past the last layer.
    pub fn mlp_kind(&self, layer: usize) -> Option<MlpKind> {
        if layer >= self.num_layers {
            return None;
        }
        if let Some(kinds) = &self.listed {
            return kinds.get(layer).copied();
        }
        let moe = layer >= self.first_k_dense_replace && layer.is_multiple_of(self.moe_layer_freq);
        Some(match moe {
            false => MlpKind::Dense,
            true if layer < self.leading_hash_layers => MlpKind::HashMoe,
            true => MlpKind::Moe,
        })
    }

    /// Whether decoder layer `layer` has an MoE block: it exists and its MLP is MoE (by
    /// `mlp_layer_types`, or past the dense layers and on the MoE frequency).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.mlp_kind(layer).is_some_and(MlpKind::is_moe)
    }

    /// Whether decoder layer `layer` is hash-routed (DeepSeek-V4's first MoE layers).
    pub fn is_hash_layer(&self, layer: usize) -> bool {
        self.mlp_kind(layer) == Some(MlpKind::HashMoe)
    }

    /// The MoE layers in increasing order.
    pub fn moe_layers(&self) -> impl Iterator<Item = usize> + '_ {
        // By rule: the first multiple of the frequency at or past the dense layers, then every
        // `moe_layer_freq`-th layer: as many steps as there are MoE layers, however large the
        // numbers in the file.
        let first = self.first_k_dense_replace.checked_next_multiple_of(self.moe_layer_freq);
        let by_rule = first
            .filter(|_| self.listed.is_none())
            .into_iter()
            .flat_map(|first| (first..self.num_layers).step_by(self.moe_layer_freq));
        let listed = self.listed.iter().flat_map(|kinds| kinds.iter().enumerate());
        let listed = listed.filter(|(_, kind)| kind.is_moe()).map(|(layer, _)| layer);
        by_rule.chain(listed).filter(|&layer| self.is_moe_layer(layer))
    }
}

/// Qwen3-MoE's layer kinds, as `Qwen3MoeDecoderLayer` decides them: MoE unless the layer is in
/// `mlp_only_layers` (empty when absent), and only every `decoder_sparse_step`-th layer (1 when
/// absent), counting from 1.
fn qwen3_moe_layer_kinds(
    fields: Fields<'_>,
    num_layers: usize,
) -> Result<Vec<MlpKind>, ConfigError> {
    let sparse_step = fields.usize("decoder_sparse_step")?.unwrap_or(1);
    if sparse_step == 0 {
        return Err(fields.bad_value("decoder_sparse_step", "must be at least 1"));
    }
    let dense_layers = fields.usize_list("mlp_only_layers")?.unwrap_or_default();
    if let Some(&layer) = dense_layers.iter().find(|&&layer| layer >= num_layers) {
        let reason = format!("names layer {layer}, `num_hidden_layers` is {num_layers}");
        return Err(fields.bad_value("mlp_only_layers", &reason));
    }
    Ok((0..num_layers)
        .map(|layer| {
            MlpKind::moe_if(
                (layer + 1).is_multiple_of(sparse_step) && !dense_layers.contains(&layer),
            )
        })
        .collect())
}

/// `hidden_size` (at least 1) and `num_hidden_layers`, which every family requires.
fn required_sizes(fields: Fields<'_>) -> Result<(usize, usize), ConfigError> {
    let hidden_size = fields.required_usize("hidden_size")?;
    if hidden_size == 0 {
        return Err(fields.bad_value("hidden_size", "must be at least 1"));
    }
    Ok((hidden_size, fields.required_usize("num_hidden_layers")?))
}

/// Llama 4's layer kinds, as `Llama4TextConfig` decides them: the layers of `moe_layers` when
/// given, else `interleave_moe_layer_step - 1, 2 * step - 1, ...` (step 1 when absent: every layer).
fn llama4_layer_kinds(fields: Fields<'_>, num_layers: usize) -> Result<Vec<MlpKind>, ConfigError> {
    let step = fields.usize("interleave_moe_layer_step")?.unwrap_or(1);
    if step == 0 {
        return Err(fields.bad_value("interleave_moe_layer_step", "must be at least 1"));
    }
    let Some(moe_layers) = fields.usize_list("moe_layers")? else {
        return Ok((0..num_layers)
            .map(|layer| MlpKind::moe_if((layer + 1).is_multiple_of(step)))
            .collect());
    };
    if let Some(&layer) = moe_layers.iter().find(|&&layer| layer >= num_layers) {
        let reason = format!("names layer {layer}, `num_hidden_layers` is {num_layers}");
        return Err(fields.bad_value("moe_layers", &reason));
    }
    Ok((0..num_layers).map(|layer| MlpKind::moe_if(moe_layers.contains(&layer))).collect())
}

/// The spec of a hash-routed layer: the model's top-k spec with the hash method.
fn hash_routing(top_k: &RoutingSpec) -> RoutingSpec {
    RoutingSpec { method: TopkMethod::Hash, ..*top_k }
}

/// The fields of one JSON object, with the prefix and file to name in errors.
#[derive(Clone, Copy)]
struct Fields<'a> {
    object: &'a Map<String, Value>,
    prefix: &'static str,
    path: &'a Path,
}

impl<'a> Fields<'a> {
    /// The value of a field; `null` counts as absent, as transformers saves `None` that way.
    fn get(&self, field: &str) -> Option<&'a Value> {
        self.object.get(field).filter(|v| !v.is_null())
    }

    fn name(&self, field: &str) -> String {
        format!("{}{field}", self.prefix)
    }

    fn missing(&self, field: &str, hint: &'static str) -> ConfigError {
        ConfigError::Missing { path: self.path.to_path_buf(), field: self.name(field), hint }
    }

    fn wrong_type(&self, field: &str, found: &Value, expected: &'static str) -> ConfigError {
        ConfigError::WrongType {
            path: self.path.to_path_buf(),
            field: self.name(field),
            found: found.to_string(),
            expected,
        }
    }

    fn bad_value(&self, field: &str, reason: &str) -> ConfigError {
        ConfigError::BadValue {
            path: self.path.to_path_buf(),
            field: self.name(field),
            value: self.get(field).map_or_else(|| "null".to_owned(), Value::to_string),
            reason: reason.to_owned(),
        }
    }

    fn str(&self, field: &str) -> Result<Option<&'a str>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.wrong_type(field, other, "a string")),
        }
    }

    fn required_str(&self, field: &str) -> Result<&'a str, ConfigError> {
        self.str(field)?.ok_or_else(|| self.missing(field, ""))
    }

    fn usize(&self, field: &str) -> Result<Option<usize>, ConfigError> {
        let Some(value) = self.get(field) else { return Ok(None) };
        value
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| self.wrong_type(field, value, "a non-negative integer"))
    }

    fn required_usize(&self, field: &str) -> Result<usize, ConfigError> {
        self.usize(field)?.ok_or_else(|| self.missing(field, ""))
    }

    /// A required expert count, at least 1. Checked here, under the family's own field name: the
    /// spec's error would name DeepSeek's `n_routed_experts`.
    fn expert_count(&self, field: &str) -> Result<usize, ConfigError> {
        let count = self.required_usize(field)?;
        if count == 0 {
            let reason = "must be at least 1; a model without routed experts has no MoE gate";
            return Err(self.bad_value(field, reason));
        }
        Ok(count)
    }

    /// A list of non-negative integers.
    fn usize_list(&self, field: &str) -> Result<Option<Vec<usize>>, ConfigError> {
        let Some(value) = self.get(field) else { return Ok(None) };
        let expected = "a list of non-negative integers";
        let Value::Array(entries) = value else {
            return Err(self.wrong_type(field, value, expected));
        };
        entries
            .iter()
            .map(|entry| entry.as_u64().and_then(|n| usize::try_from(n).ok()))
            .collect::<Option<Vec<_>>>()
            .map(Some)
            .ok_or_else(|| self.wrong_type(field, value, expected))
    }

    /// A per-layer list of kinds (`mlp_layer_types`): one known name per decoder layer.
    fn layer_kinds(
        &self,
        field: &str,
        names: &[(&str, MlpKind)],
        num_layers: usize,
    ) -> Result<Option<Vec<MlpKind>>, ConfigError> {
        let Some(value) = self.get(field) else { return Ok(None) };
        let Value::Array(entries) = value else {
            return Err(self.wrong_type(field, value, "a list of layer types"));
        };
        if entries.len() != num_layers {
            let reason =
                format!("lists {} layers, `num_hidden_layers` is {num_layers}", entries.len());
            return Err(self.bad_value(field, &reason));
        }
        let kind_of = |entry: &Value| {
            let name = entry.as_str()?;
            names.iter().find(|(known, _)| *known == name).map(|&(_, kind)| kind)
        };
        entries
            .iter()
            .map(|entry| {
                kind_of(entry).ok_or_else(|| {
                    let known: Vec<&str> = names.iter().map(|(name, _)| *name).collect();
                    let reason = format!("holds {entry}; expected one of {known:?} per layer");
                    self.bad_value(field, &reason)
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    fn bool(&self, field: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.wrong_type(field, other, "true or false")),
        }
    }

    fn f32(&self, field: &str) -> Result<Option<f32>, ConfigError> {
        let Some(value) = self.get(field) else { return Ok(None) };
        // Rounding to f32 is intended: the factor multiplies f32 weights.
        value
            .as_f64()
            .map(|x| Some(x as f32))
            .ok_or_else(|| self.wrong_type(field, value, "a number"))
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests;

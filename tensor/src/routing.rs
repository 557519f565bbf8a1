//! The routing op's description: what a backend must compute from router logits.
//!
//! The semantics are decided once, in the design document, and implemented once as the scalar
//! reference router in `sluice-models`; every backend is tested against it. In short:
//!
//! - scores are f32: `softmax(logits)`, `sigmoid(logits)` or `sqrt(softplus(logits))`;
//! - the f32 correction bias (`noaux_tc` only) is added to the sigmoid scores for *selection only*;
//!   weights are the unbiased scores, carried alongside;
//! - group scores: the largest softmax probability (`group_limited_greedy`) or the sum of the two
//!   largest biased scores (`noaux_tc`); the best `topk_group` groups are kept, the others masked
//!   with `-inf`;
//! - hash layers (`TopkMethod::Hash`) take their experts from a frozen per-token table instead of
//!   ranking scores (see [`check_hash_table`]); their weights are still the scores of those experts;
//! - a router bias of role [`BiasRole::Logits`] (gpt-oss) is added in f32 to every logit before
//!   anything else, so it changes the scores *and* the selection;
//! - [`ScoringOrder::AfterTopk`] (gpt-oss, Llama 4) selects the `top_k` largest logits and scores
//!   only those: softmax over the selected logits, or the element-wise sigmoid of each;
//! - ties: larger score first, then lower index (for experts and for groups alike);
//! - output rows hold `top_k` experts sorted by weight descending, then by expert id;
//! - `norm_topk_prob` divides by `sum + 1e-20` in f32; `routed_scaling_factor` is applied once,
//!   after that, unless [`RoutingSpec::apply_scaling`] is false;
//! - non-finite logits follow [`NonFinitePolicy`].

use std::fmt;

use thiserror::Error;

/// The epsilon added to the sum of the selected weights before renormalising.
pub const RENORM_EPSILON: f32 = 1e-20;

/// How logits become scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScoringFunc {
    /// `softmax` over all experts of a token (DeepSeek-V2, V2-Lite, V2.5, Qwen3-MoE, Mixtral).
    Softmax,
    /// Element-wise `sigmoid` (DeepSeek-V3, V3.2, R1, Kimi-K2).
    Sigmoid,
    /// Element-wise `sqrt(softplus(x))` with `softplus(x) = ln(1 + e^x)` (DeepSeek-V4).
    SqrtSoftplus,
}

impl ScoringFunc {
    /// The name used in Hugging Face configs.
    pub const fn name(self) -> &'static str {
        match self {
            ScoringFunc::Softmax => "softmax",
            ScoringFunc::Sigmoid => "sigmoid",
            ScoringFunc::SqrtSoftplus => "sqrtsoftplus",
        }
    }
}

/// How experts are selected from the scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopkMethod {
    /// Plain top-k over all experts (V2-Lite; Qwen3-MoE and Mixtral; gpt-oss and Llama 4, which
    /// score after the top-k: see [`ScoringOrder`]).
    ///
    /// Qwen3-MoE and Mixtral score before the top-k (softmax over all experts, then top-k of the
    /// probabilities) and renormalise (Mixtral always, Qwen3-MoE when `norm_topk_prob`): that is
    /// softmax scoring, this method and [`RoutingSpec::norm_topk_prob`]. gpt-oss scores after the
    /// top-k (softmax over the selected logits): mathematically the same weights, but rounded
    /// differently and without the renormalising epsilon, so it is its own decision,
    /// [`ScoringOrder::AfterTopk`].
    Greedy,
    /// Keep the `topk_group` groups with the largest maximum score, then top-k (V2, V2.5).
    GroupLimitedGreedy,
    /// Sigmoid (or sqrt-softplus, or softmax) scores plus the correction bias; keep the `topk_group`
    /// groups with the largest sum of their two best biased scores, then top-k on biased scores;
    /// weights from unbiased scores (V3, V3.2, R1, Kimi-K2; V4 without groups).
    NoauxTc,
    /// The experts come from a frozen table, row `token_id` of `tid2eid` `[vocab, top_k]`; the
    /// weights are the scores of those experts (DeepSeek-V4's first MoE layers). Needs the token
    /// ids of the hidden states; has no correction bias and no groups.
    Hash,
}

impl TopkMethod {
    /// The name used in Hugging Face configs.
    pub const fn name(self) -> &'static str {
        match self {
            TopkMethod::Greedy => "greedy",
            TopkMethod::GroupLimitedGreedy => "group_limited_greedy",
            TopkMethod::NoauxTc => "noaux_tc",
            TopkMethod::Hash => "hash",
        }
    }

    /// Whether the method restricts the choice to the best groups.
    pub const fn uses_groups(self) -> bool {
        matches!(self, TopkMethod::GroupLimitedGreedy | TopkMethod::NoauxTc)
    }

    /// The scoring functions the method is defined with: the grouped V2 method ranks softmax
    /// probabilities; plain top-k (Llama 4 ranks logits and takes their sigmoid), the
    /// bias-corrected and hashed selections take any of them.
    const fn accepts(self, scoring: ScoringFunc) -> bool {
        match self {
            TopkMethod::GroupLimitedGreedy => matches!(scoring, ScoringFunc::Softmax),
            TopkMethod::Greedy | TopkMethod::NoauxTc | TopkMethod::Hash => true,
        }
    }
}

/// Whether the scoring function is applied before or after the top-k.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ScoringOrder {
    /// Score every expert (`s = f(l)` over all `E`), select on the scores (plus the correction
    /// bias for `noaux_tc`), weigh with the scores of the selected experts (DeepSeek, Kimi, GLM,
    /// Qwen3-MoE, Mixtral, MiniMax-M2).
    #[default]
    BeforeTopk,
    /// Select the `top_k` largest logits (larger logit first, then lower index), then score only
    /// those: softmax over the `K` selected logits (gpt-oss), or the sigmoid of each (Llama 4).
    /// Only with [`TopkMethod::Greedy`]: no groups, no correction bias, no table.
    AfterTopk,
}

impl ScoringOrder {
    /// A short name for messages: `before_topk` or `after_topk`.
    pub const fn name(self) -> &'static str {
        match self {
            ScoringOrder::BeforeTopk => "before_topk",
            ScoringOrder::AfterTopk => "after_topk",
        }
    }
}

/// What the router's optional f32 bias `[E]` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum BiasRole {
    /// The correction bias of `noaux_tc` (`e_score_correction_bias`): added to the scores for
    /// selection only; the weights stay the unbiased scores. Other methods take no bias.
    #[default]
    Correction,
    /// The bias of the router's linear layer (gpt-oss's `router.bias`): added in f32 to every
    /// logit, `l = x·Wᵀ + b`, before scoring and selection, so it changes both. Not with
    /// `noaux_tc` (whose one bias is the correction) nor with hash routing.
    ///
    /// Logits given to routing (`route_logits`, the reference router, the `logits` output of a
    /// fused route, `router_gemm`) are the product `x·Wᵀ` alone: the routing step adds the bias,
    /// so routing the logits of `router_gemm` with the bias equals the fused route. transformers'
    /// `router_logits` are `x·Wᵀ + b`.
    Logits,
}

impl BiasRole {
    /// A short name for messages: `correction` or `logits`.
    pub const fn name(self) -> &'static str {
        match self {
            BiasRole::Correction => "correction",
            BiasRole::Logits => "logits",
        }
    }
}

/// What to do with a token whose logits (or hidden state) hold a NaN or an infinity.
///
/// Whatever the policy, a routing result never holds an out-of-range or a duplicate expert id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum NonFinitePolicy {
    /// Fail the whole call with an error that names the first bad row.
    #[default]
    Error,
    /// Mark the bad rows invalid (ids `-1`, weights `0.0`) and route the other rows normally.
    MarkInvalid,
}

/// Everything a backend needs to route router logits `[T, E]` to `top_k` experts per token.
///
/// Build it with [`RoutingSpec::builder`], whose `build` validates, or fill the fields and call
/// [`RoutingSpec::validate`]; backends validate again before they run.
///
/// ```
/// use sluice_tensor::{RoutingSpec, ScoringFunc, TopkMethod};
///
/// // DeepSeek-V3: sigmoid + correction bias, 8 groups keep 4, top-8, renormalised, scaled by 2.5.
/// let v3 = RoutingSpec::builder(256, 8)
///     .scoring(ScoringFunc::Sigmoid)
///     .method(TopkMethod::NoauxTc)
///     .groups(8, 4)
///     .norm_topk_prob(true)
///     .routed_scaling_factor(2.5)
///     .build()?;
/// assert_eq!(v3.experts_per_group(), 32);
/// # Ok::<(), sluice_tensor::SpecError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoutingSpec {
    /// Number of routed experts `E`.
    pub num_experts: usize,
    /// Scoring function.
    pub scoring: ScoringFunc,
    /// Selection method.
    pub method: TopkMethod,
    /// Whether scores are taken of every expert before the top-k or of the selected logits after.
    pub scoring_order: ScoringOrder,
    /// What the optional bias `[E]` is: the selection-only correction bias, or a bias added to
    /// the logits.
    pub bias_role: BiasRole,
    /// Number of expert groups `G`; experts `g*E/G .. (g+1)*E/G` form group `g`.
    pub n_group: usize,
    /// Number of groups kept per token.
    pub topk_group: usize,
    /// Experts per token `K`.
    pub top_k: usize,
    /// Divide the selected weights by their sum (plus [`RENORM_EPSILON`]).
    pub norm_topk_prob: bool,
    /// The factor the final weights are multiplied by.
    pub routed_scaling_factor: f32,
    /// Whether the gate applies `routed_scaling_factor` (true, the default) or leaves it to the
    /// caller, as engines that scale after the experts do.
    pub apply_scaling: bool,
    /// What to do with non-finite rows.
    pub non_finite: NonFinitePolicy,
}

/// A routing configuration that no real model has or that makes routing ill-defined.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum SpecError {
    /// A size that must be positive is zero.
    #[error("`{field}` must be at least 1, got 0")]
    Zero {
        /// The field's name.
        field: &'static str,
    },
    /// The experts do not split evenly into groups.
    #[error("`n_routed_experts` = {num_experts} is not divisible by `n_group` = {n_group}")]
    UnevenGroups {
        /// `E`.
        num_experts: usize,
        /// `G`.
        n_group: usize,
    },
    /// More groups kept than exist.
    #[error("`topk_group` = {topk_group} is larger than `n_group` = {n_group}")]
    TooManyGroups {
        /// Groups kept.
        topk_group: usize,
        /// Groups in all.
        n_group: usize,
    },
    /// Fewer experts survive the group mask than are selected.
    #[error(
        "`num_experts_per_tok` = {top_k} exceeds the {allowed} experts that the kept groups hold \
         (`topk_group` {topk_group} x {per_group} experts per group)"
    )]
    TooFewAllowedExperts {
        /// `K`.
        top_k: usize,
        /// `topk_group * E / G`.
        allowed: usize,
        /// Groups kept.
        topk_group: usize,
        /// Experts per group.
        per_group: usize,
    },
    /// The two-best group score needs two experts per group.
    #[error("`noaux_tc` needs at least 2 experts per group, got {per_group}")]
    GroupTooSmall {
        /// Experts per group.
        per_group: usize,
    },
    /// A scoring function the method is not defined for.
    #[error("`topk_method` = \"{}\" is not defined with `scoring_func` = \"{}\"", method.name(), scoring.name())]
    ScoringMismatch {
        /// The method.
        method: TopkMethod,
        /// The scoring function.
        scoring: ScoringFunc,
    },
    /// Hash routing takes its experts from a table; expert groups would be ignored.
    #[error("hash routing has no expert groups, got `n_group` = {n_group}")]
    HashWithGroups {
        /// Groups asked for.
        n_group: usize,
    },
    /// Scoring after the top-k is defined for plain top-k only.
    #[error(
        "scoring after the top-k ranks raw logits, so it needs `greedy` selection, got `{}`",
        .0.name()
    )]
    AfterTopkNeedsGreedy(TopkMethod),
    /// A bias added to the logits with a method whose bias means something else, or that has none.
    #[error(
        "a router bias added to the logits cannot be used with `{}` (noaux_tc's bias is the \
         selection-only correction; hash routing takes no bias)",
        .0.name()
    )]
    LogitBiasWithMethod(TopkMethod),
    /// The scaling factor is not a positive finite number.
    #[error("`routed_scaling_factor` must be positive and finite, got {0}")]
    BadScalingFactor(f32),
}

impl RoutingSpec {
    /// Starts a spec for `num_experts` routed experts and `top_k` experts per token.
    ///
    /// Until a builder method says otherwise: softmax scoring before greedy selection, a
    /// correction bias (if any), one group, no renormalisation, a scaling factor of 1 applied in the gate, and non-finite rows an error.
    pub const fn builder(num_experts: usize, top_k: usize) -> RoutingSpecBuilder {
        RoutingSpecBuilder {
            spec: RoutingSpec {
                num_experts,
                scoring: ScoringFunc::Softmax,
                method: TopkMethod::Greedy,
                scoring_order: ScoringOrder::BeforeTopk,
                bias_role: BiasRole::Correction,
                n_group: 1,
                topk_group: 1,
                top_k,
                norm_topk_prob: false,
                routed_scaling_factor: 1.0,
                apply_scaling: true,
                non_finite: NonFinitePolicy::Error,
            },
        }
    }

    /// Checks the spec against the rules in the design document.
    pub fn validate(&self) -> Result<(), SpecError> {
        for (field, value) in [
            ("n_routed_experts", self.num_experts),
            ("n_group", self.n_group),
            ("topk_group", self.topk_group),
            ("num_experts_per_tok", self.top_k),
        ] {
            if value == 0 {
                return Err(SpecError::Zero { field });
            }
        }
        if !self.method.accepts(self.scoring) {
            return Err(SpecError::ScoringMismatch { method: self.method, scoring: self.scoring });
        }
        if self.scoring_order == ScoringOrder::AfterTopk && self.method != TopkMethod::Greedy {
            return Err(SpecError::AfterTopkNeedsGreedy(self.method));
        }
        if self.bias_role == BiasRole::Logits
            && matches!(self.method, TopkMethod::NoauxTc | TopkMethod::Hash)
        {
            return Err(SpecError::LogitBiasWithMethod(self.method));
        }
        if self.method == TopkMethod::Hash && self.n_group != 1 {
            return Err(SpecError::HashWithGroups { n_group: self.n_group });
        }
        if !self.num_experts.is_multiple_of(self.n_group) {
            return Err(SpecError::UnevenGroups {
                num_experts: self.num_experts,
                n_group: self.n_group,
            });
        }
        if self.topk_group > self.n_group {
            return Err(SpecError::TooManyGroups {
                topk_group: self.topk_group,
                n_group: self.n_group,
            });
        }
        let per_group = self.experts_per_group();
        let allowed =
            if self.method.uses_groups() { self.topk_group * per_group } else { self.num_experts };
        if self.top_k > allowed {
            return Err(SpecError::TooFewAllowedExperts {
                top_k: self.top_k,
                allowed,
                topk_group: self.topk_group,
                per_group,
            });
        }
        if self.method == TopkMethod::NoauxTc && per_group < 2 {
            return Err(SpecError::GroupTooSmall { per_group });
        }
        if !(self.routed_scaling_factor.is_finite() && self.routed_scaling_factor > 0.0) {
            return Err(SpecError::BadScalingFactor(self.routed_scaling_factor));
        }
        Ok(())
    }

    /// Whether the spec gives a meaning to a bias `[E]`: the correction bias of `noaux_tc`, or a
    /// bias added to the logits ([`BiasRole::Logits`]). A bias given to any other spec is refused.
    pub const fn takes_bias(&self) -> bool {
        matches!(self.method, TopkMethod::NoauxTc) || matches!(self.bias_role, BiasRole::Logits)
    }

    /// Whether a bias, when given, is added to the logits (rather than being the correction bias).
    pub const fn bias_on_logits(&self) -> bool {
        matches!(self.bias_role, BiasRole::Logits)
    }

    /// Experts per group, `E / G`.
    pub const fn experts_per_group(&self) -> usize {
        self.num_experts / self.n_group
    }

    /// Whether grouping changes anything: the method uses groups and some group can be dropped.
    pub const fn groups_restrict(&self) -> bool {
        self.method.uses_groups() && self.topk_group < self.n_group
    }

    /// The factor applied to the final weights: `routed_scaling_factor`, or 1 when scaling is left
    /// to the caller.
    pub const fn output_scale(&self) -> f32 {
        if self.apply_scaling { self.routed_scaling_factor } else { 1.0 }
    }
}

/// Builds a [`RoutingSpec`] one explicit decision at a time; made by [`RoutingSpec::builder`].
#[derive(Debug, Clone, Copy, PartialEq)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct RoutingSpecBuilder {
    spec: RoutingSpec,
}

impl RoutingSpecBuilder {
    /// How logits become scores.
    pub const fn scoring(mut self, scoring: ScoringFunc) -> Self {
        self.spec.scoring = scoring;
        self
    }

    /// How experts are selected from the scores.
    pub const fn method(mut self, method: TopkMethod) -> Self {
        self.spec.method = method;
        self
    }

    /// Whether scores are taken before the top-k (the default) or of the selected logits after.
    pub const fn scoring_order(mut self, order: ScoringOrder) -> Self {
        self.spec.scoring_order = order;
        self
    }

    /// What the optional bias `[E]` is (the default: the correction bias of `noaux_tc`).
    pub const fn bias_role(mut self, role: BiasRole) -> Self {
        self.spec.bias_role = role;
        self
    }

    /// `n_group` expert groups, of which the best `topk_group` are kept per token.
    pub const fn groups(mut self, n_group: usize, topk_group: usize) -> Self {
        self.spec.n_group = n_group;
        self.spec.topk_group = topk_group;
        self
    }

    /// Whether the selected weights are divided by their sum (plus [`RENORM_EPSILON`]).
    pub const fn norm_topk_prob(mut self, norm_topk_prob: bool) -> Self {
        self.spec.norm_topk_prob = norm_topk_prob;
        self
    }

    /// The factor the final weights are multiplied by.
    pub const fn routed_scaling_factor(mut self, factor: f32) -> Self {
        self.spec.routed_scaling_factor = factor;
        self
    }

    /// Whether the gate applies the scaling factor (the default) or leaves it to the caller.
    pub const fn apply_scaling(mut self, apply_scaling: bool) -> Self {
        self.spec.apply_scaling = apply_scaling;
        self
    }

    /// What to do with rows holding a NaN or an infinity.
    pub const fn non_finite(mut self, policy: NonFinitePolicy) -> Self {
        self.spec.non_finite = policy;
        self
    }

    /// The spec, validated against the rules of [`RoutingSpec::validate`].
    pub fn build(self) -> Result<RoutingSpec, SpecError> {
        self.spec.validate()?;
        Ok(self.spec)
    }
}

impl fmt::Display for RoutingSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{} + {}{}, E={}, groups {}/{}, top-{}, renorm={}, scale={}{}",
            self.scoring.name(),
            match self.scoring_order {
                ScoringOrder::BeforeTopk => "",
                ScoringOrder::AfterTopk => " of the selected logits",
            },
            self.method.name(),
            if self.bias_on_logits() { ", bias on logits" } else { "" },
            self.num_experts,
            self.topk_group,
            self.n_group,
            self.top_k,
            self.norm_topk_prob,
            self.routed_scaling_factor,
            if self.apply_scaling { "" } else { " (left to the caller)" },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3() -> RoutingSpec {
        RoutingSpec::builder(256, 8)
            .scoring(ScoringFunc::Sigmoid)
            .method(TopkMethod::NoauxTc)
            .groups(8, 4)
            .norm_topk_prob(true)
            .routed_scaling_factor(2.5)
            .build()
            .unwrap()
    }

    #[test]
    fn real_model_shapes_are_valid() {
        v3();
        RoutingSpec::builder(384, 8)
            .scoring(ScoringFunc::Sigmoid)
            .method(TopkMethod::NoauxTc)
            .groups(1, 1)
            .norm_topk_prob(true)
            .routed_scaling_factor(2.827)
            .build()
            .unwrap();
        RoutingSpec::builder(160, 6)
            .scoring(ScoringFunc::Softmax)
            .method(TopkMethod::GroupLimitedGreedy)
            .groups(8, 3)
            .norm_topk_prob(false)
            .routed_scaling_factor(16.0)
            .build()
            .unwrap();
        RoutingSpec::builder(64, 6)
            .scoring(ScoringFunc::Softmax)
            .method(TopkMethod::Greedy)
            .groups(1, 1)
            .norm_topk_prob(false)
            .routed_scaling_factor(1.0)
            .build()
            .unwrap();
        // Qwen3-30B-A3B and Mixtral-8x7B: softmax + greedy, renormalised.
        for (experts, top_k) in [(128, 8), (8, 2)] {
            let spec = RoutingSpec::builder(experts, top_k).norm_topk_prob(true).build().unwrap();
            assert!(!spec.groups_restrict());
        }
    }

    #[test]
    fn invalid_specs_name_the_problem() {
        let mut s = v3();
        s.n_group = 7;
        assert_eq!(s.validate(), Err(SpecError::UnevenGroups { num_experts: 256, n_group: 7 }));
        let mut s = v3();
        s.topk_group = 9;
        assert_eq!(s.validate(), Err(SpecError::TooManyGroups { topk_group: 9, n_group: 8 }));
        let mut s = v3();
        s.topk_group = 1;
        s.top_k = 33;
        assert!(matches!(s.validate(), Err(SpecError::TooFewAllowedExperts { allowed: 32, .. })));
        let mut s = v3();
        s.top_k = 0;
        assert_eq!(s.validate(), Err(SpecError::Zero { field: "num_experts_per_tok" }));
        let mut s = v3();
        s.method = TopkMethod::GroupLimitedGreedy;
        assert!(matches!(s.validate(), Err(SpecError::ScoringMismatch { .. })));
        let mut s = v3();
        s.method = TopkMethod::Hash;
        assert_eq!(s.validate(), Err(SpecError::HashWithGroups { n_group: 8 }));
        let mut s = v3();
        s.routed_scaling_factor = f32::NAN;
        assert!(matches!(s.validate(), Err(SpecError::BadScalingFactor(_))));
        let mut s = v3();
        s.n_group = 256;
        s.topk_group = 8;
        assert_eq!(s.validate(), Err(SpecError::GroupTooSmall { per_group: 1 }));
    }

    #[test]
    fn v4_top_k_and_hash_layers_are_valid() {
        for method in [TopkMethod::NoauxTc, TopkMethod::Hash] {
            let spec = RoutingSpec::builder(256, 6)
                .scoring(ScoringFunc::SqrtSoftplus)
                .method(method)
                .norm_topk_prob(true)
                .routed_scaling_factor(1.5)
                .build()
                .unwrap();
            assert!(!spec.groups_restrict());
        }
    }

    #[test]
    fn error_messages_name_field_and_value() {
        let mut s = v3();
        s.n_group = 7;
        let message = s.validate().unwrap_err().to_string();
        assert!(message.contains("n_group") && message.contains('7'), "{message}");
    }

    #[test]
    fn gpt_oss_and_llama4_score_after_the_top_k() {
        // gpt-oss-20b: softmax over the 4 selected of 32 logits, which include the router's bias.
        let gpt_oss = RoutingSpec::builder(32, 4)
            .scoring_order(ScoringOrder::AfterTopk)
            .bias_role(BiasRole::Logits)
            .build()
            .unwrap();
        assert!(gpt_oss.takes_bias() && gpt_oss.bias_on_logits());
        assert!(gpt_oss.to_string().contains("selected logits"), "{gpt_oss}");
        // Llama 4 Maverick: the sigmoid of the one selected of 128 logits, no bias.
        let llama4 = RoutingSpec::builder(128, 1)
            .scoring(ScoringFunc::Sigmoid)
            .scoring_order(ScoringOrder::AfterTopk)
            .build()
            .unwrap();
        assert!(!llama4.takes_bias());
        // MiniMax-M2 (and GLM-4.5 with one group): the V3 router, correction bias only.
        let minimax = RoutingSpec::builder(256, 8)
            .scoring(ScoringFunc::Sigmoid)
            .method(TopkMethod::NoauxTc)
            .norm_topk_prob(true)
            .build()
            .unwrap();
        assert!(minimax.takes_bias() && !minimax.bias_on_logits());
    }

    #[test]
    fn new_decisions_refuse_what_they_cannot_mean() {
        let mut s = v3();
        s.scoring_order = ScoringOrder::AfterTopk;
        assert_eq!(s.validate(), Err(SpecError::AfterTopkNeedsGreedy(TopkMethod::NoauxTc)));
        let message = s.validate().unwrap_err().to_string();
        assert!(message.contains("noaux_tc") && message.contains("greedy"), "{message}");
        let mut s = v3();
        s.bias_role = BiasRole::Logits;
        assert_eq!(s.validate(), Err(SpecError::LogitBiasWithMethod(TopkMethod::NoauxTc)));
        let hashed = RoutingSpec::builder(64, 4)
            .method(TopkMethod::Hash)
            .scoring(ScoringFunc::SqrtSoftplus)
            .bias_role(BiasRole::Logits)
            .build();
        assert_eq!(hashed, Err(SpecError::LogitBiasWithMethod(TopkMethod::Hash)));
        let grouped_after = RoutingSpec::builder(160, 6)
            .method(TopkMethod::GroupLimitedGreedy)
            .groups(8, 3)
            .scoring_order(ScoringOrder::AfterTopk)
            .build();
        assert_eq!(
            grouped_after,
            Err(SpecError::AfterTopkNeedsGreedy(TopkMethod::GroupLimitedGreedy))
        );
        // The default spec takes no bias: a bias given to plain softmax top-k is refused upstream.
        assert!(!RoutingSpec::builder(8, 2).build().unwrap().takes_bias());
    }

    #[test]
    fn scaling_can_be_left_to_the_caller() {
        let mut s = v3();
        assert_eq!(s.output_scale(), 2.5);
        s.apply_scaling = false;
        assert_eq!(s.output_scale(), 1.0);
    }
}

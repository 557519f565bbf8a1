//! The routing config as compile-time defines of the routing kernel.

use sluice_tensor::{BiasRole, RoutingSpec, ScoringFunc, ScoringOrder, SpecError, TopkMethod};
use thiserror::Error;

/// The most experts the routing kernel takes: 32 per lane of a 32-wide warp.
pub const MAX_EXPERTS: usize = 1024;

/// The most experts per token: one per lane.
pub const MAX_TOP_K: usize = 32;

/// A routing config the kernels cannot run.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum KernelError {
    /// The spec itself is invalid.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// More experts than the routing kernel holds.
    #[error("the GPU routing kernel takes at most {MAX_EXPERTS} experts, got {0}")]
    TooManyExperts(usize),
    /// More experts per token than lanes in a warp.
    #[error("the GPU routing kernel takes at most {MAX_TOP_K} experts per token, got {0}")]
    TopKTooLarge(usize),
    /// A size does not fit the kernels' 32-bit arguments or the launch limits.
    #[error("{what} = {value} is larger than the GPU kernels take (at most {limit})")]
    TooLarge {
        /// What.
        what: &'static str,
        /// Its value.
        value: usize,
        /// The limit.
        limit: usize,
    },
}

/// A validated routing spec in the form the routing kernel is compiled for.
///
/// Everything that shapes the kernel's loops is a define; the scaling factor is an argument, so
/// configs that differ only in it share a compiled module.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RoutingConfig {
    experts: usize,
    groups: usize,
    kept_groups: usize,
    top_k: usize,
    scoring: ScoringFunc,
    method: TopkMethod,
    renormalise: bool,
    after_topk: bool,
    logit_bias: bool,
}

impl RoutingConfig {
    /// The kernel config for `spec`, or why the kernels cannot route it.
    pub fn new(spec: &RoutingSpec) -> Result<Self, KernelError> {
        spec.validate()?;
        if spec.num_experts > MAX_EXPERTS {
            return Err(KernelError::TooManyExperts(spec.num_experts));
        }
        if spec.top_k > MAX_TOP_K {
            return Err(KernelError::TopKTooLarge(spec.top_k));
        }
        // Greedy ignores the groups: compile it as one group so no group code is generated.
        let (groups, kept_groups) =
            if spec.method.uses_groups() { (spec.n_group, spec.topk_group) } else { (1, 1) };
        Ok(RoutingConfig {
            experts: spec.num_experts,
            groups,
            kept_groups,
            top_k: spec.top_k,
            scoring: spec.scoring,
            method: spec.method,
            renormalise: spec.norm_topk_prob,
            after_topk: spec.scoring_order == ScoringOrder::AfterTopk,
            logit_bias: spec.bias_role == BiasRole::Logits,
        })
    }

    /// Experts per token.
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// Number of experts.
    pub fn experts(&self) -> usize {
        self.experts
    }

    /// Whether the kernel takes its experts from a hash table (`SLUICE_METHOD = SLUICE_HASH`).
    pub fn is_hashed(&self) -> bool {
        self.method == TopkMethod::Hash
    }

    /// The preprocessor definitions, as `NAME=value` pairs.
    pub fn defines(&self) -> Vec<(&'static str, usize)> {
        let scoring = scoring_define(self.scoring);
        let method = method_define(self.method);
        vec![
            ("SLUICE_E", self.experts),
            ("SLUICE_G", self.groups),
            ("SLUICE_KG", self.kept_groups),
            ("SLUICE_K", self.top_k),
            ("SLUICE_SCORING", scoring),
            ("SLUICE_METHOD", method),
            ("SLUICE_NORM", usize::from(self.renormalise)),
            ("SLUICE_AFTER_TOPK", usize::from(self.after_topk)),
            ("SLUICE_LOGIT_BIAS", usize::from(self.logit_bias)),
        ]
    }

    /// The defines as compiler options (`-DNAME=value`).
    pub fn compiler_options(&self) -> Vec<String> {
        self.defines().into_iter().map(|(name, value)| format!("-D{name}={value}")).collect()
    }
}

/// Checks that a hash table of `rows` rows fits the routing kernel's `int` row count.
pub fn check_hash_table_rows(rows: usize) -> Result<(), KernelError> {
    const LIMIT: usize = i32::MAX as usize;
    if rows > LIMIT {
        return Err(KernelError::TooLarge { what: "hash table rows", value: rows, limit: LIMIT });
    }
    Ok(())
}

/// `SLUICE_SCORING`: the kernel computes every scoring function.
fn scoring_define(scoring: ScoringFunc) -> usize {
    match scoring {
        ScoringFunc::Softmax => 0,
        ScoringFunc::Sigmoid => 1,
        ScoringFunc::SqrtSoftplus => 2,
    }
}

/// `SLUICE_METHOD`: the kernel does every selection.
fn method_define(method: TopkMethod) -> usize {
    match method {
        TopkMethod::Greedy => 0,
        TopkMethod::GroupLimitedGreedy => 1,
        TopkMethod::NoauxTc => 2,
        TopkMethod::Hash => 3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(e: usize, g: usize, kg: usize, k: usize, method: TopkMethod) -> RoutingSpec {
        let scoring =
            if method == TopkMethod::NoauxTc { ScoringFunc::Sigmoid } else { ScoringFunc::Softmax };
        RoutingSpec::builder(e, k)
            .scoring(scoring)
            .method(method)
            .groups(g, kg)
            .norm_topk_prob(true)
            .routed_scaling_factor(2.5)
            .build()
            .unwrap()
    }

    #[test]
    fn v3_defines() {
        let config = RoutingConfig::new(&spec(256, 8, 4, 8, TopkMethod::NoauxTc)).unwrap();
        assert_eq!(
            config.compiler_options().join(" "),
            "-DSLUICE_E=256 -DSLUICE_G=8 -DSLUICE_KG=4 -DSLUICE_K=8 -DSLUICE_SCORING=1 \
             -DSLUICE_METHOD=2 -DSLUICE_NORM=1 -DSLUICE_AFTER_TOPK=0 -DSLUICE_LOGIT_BIAS=0"
        );
    }

    #[test]
    fn greedy_compiles_without_groups() {
        let config = RoutingConfig::new(&spec(64, 1, 1, 6, TopkMethod::Greedy)).unwrap();
        assert!(config.defines().contains(&("SLUICE_G", 1)));
        assert!(config.defines().contains(&("SLUICE_METHOD", 0)));
    }

    #[test]
    fn limits_are_typed_errors() {
        assert_eq!(
            RoutingConfig::new(&spec(2048, 1, 1, 8, TopkMethod::NoauxTc)),
            Err(KernelError::TooManyExperts(2048))
        );
        assert_eq!(
            RoutingConfig::new(&spec(1024, 1, 1, 33, TopkMethod::NoauxTc)),
            Err(KernelError::TopKTooLarge(33))
        );
        assert!(RoutingConfig::new(&spec(1024, 1, 1, 32, TopkMethod::NoauxTc)).is_ok());
        let mut bad = spec(256, 8, 4, 8, TopkMethod::NoauxTc);
        bad.n_group = 7;
        assert!(matches!(RoutingConfig::new(&bad), Err(KernelError::Spec(_))));
    }

    #[test]
    fn v4_scores_and_hash_routing_are_defines() {
        let mut v4 = RoutingSpec::builder(256, 6)
            .scoring(ScoringFunc::SqrtSoftplus)
            .method(TopkMethod::NoauxTc)
            .norm_topk_prob(true)
            .routed_scaling_factor(1.5)
            .build()
            .unwrap();
        let config = RoutingConfig::new(&v4).unwrap();
        assert!(config.compiler_options().contains(&"-DSLUICE_SCORING=2".to_owned()));
        assert!(!config.is_hashed());
        v4.method = TopkMethod::Hash;
        let hashed = RoutingConfig::new(&v4).unwrap();
        assert!(hashed.is_hashed());
        assert_eq!(
            hashed.compiler_options().join(" "),
            "-DSLUICE_E=256 -DSLUICE_G=1 -DSLUICE_KG=1 -DSLUICE_K=6 -DSLUICE_SCORING=2 \
             -DSLUICE_METHOD=3 -DSLUICE_NORM=1 -DSLUICE_AFTER_TOPK=0 -DSLUICE_LOGIT_BIAS=0"
        );
        assert_ne!(hashed, config, "the hash kernel is a module of its own");
    }

    #[test]
    fn hash_tables_past_an_int_of_rows_are_refused() {
        assert_eq!(check_hash_table_rows(129_280), Ok(()));
        let rows = i32::MAX as usize + 1;
        assert!(matches!(
            check_hash_table_rows(rows),
            Err(KernelError::TooLarge { what: "hash table rows", value, .. }) if value == rows
        ));
    }

    #[test]
    fn every_family_decision_becomes_a_define() {
        let has = |spec: &RoutingSpec, define: &str| {
            RoutingConfig::new(spec).unwrap().compiler_options().contains(&define.to_owned())
        };
        // gpt-oss: softmax of the selected logits, bias added to the logits.
        let gpt_oss = RoutingSpec::builder(32, 4)
            .scoring_order(ScoringOrder::AfterTopk)
            .bias_role(BiasRole::Logits)
            .build()
            .unwrap();
        assert!(has(&gpt_oss, "-DSLUICE_AFTER_TOPK=1") && has(&gpt_oss, "-DSLUICE_LOGIT_BIAS=1"));
        let bias_only = RoutingSpec { scoring_order: ScoringOrder::BeforeTopk, ..gpt_oss };
        assert!(
            has(&bias_only, "-DSLUICE_AFTER_TOPK=0") && has(&bias_only, "-DSLUICE_LOGIT_BIAS=1")
        );
        // Llama 4: the sigmoid of the selected logit.
        let llama4 = RoutingSpec::builder(128, 1)
            .scoring(ScoringFunc::Sigmoid)
            .scoring_order(ScoringOrder::AfterTopk)
            .build()
            .unwrap();
        assert!(has(&llama4, "-DSLUICE_AFTER_TOPK=1") && has(&llama4, "-DSLUICE_SCORING=1"));
        // GLM-4.5 and MiniMax-M2 are the V3 router.
        let glm = spec(160, 1, 1, 8, TopkMethod::NoauxTc);
        assert!(has(&glm, "-DSLUICE_AFTER_TOPK=0") && has(&glm, "-DSLUICE_LOGIT_BIAS=0"));
        assert_ne!(RoutingConfig::new(&gpt_oss).unwrap(), RoutingConfig::new(&bias_only).unwrap());
    }
}

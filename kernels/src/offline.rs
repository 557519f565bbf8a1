//! The routing configs whose kernels are compiled ahead of time, for vendors without a run-time
//! compiler (AMD). The list is `gpu/offline_configs.txt`, read by `backend-rocm`'s build script as
//! text and here as data, so what is built and what the tests expect cannot disagree.

use crate::RoutingConfig;

/// The list as the build script reads it.
const OFFLINE_CONFIGS_TEXT: &str = include_str!("../gpu/offline_configs.txt");

/// One routing config compiled ahead of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OfflineConfig {
    /// The model family it serves (`deepseek_v3`, ...); also the code objects' file stem.
    pub name: &'static str,
    /// The defines, separated by spaces, as [`crate::RoutingConfig::compiler_options`] writes them.
    pub defines: &'static str,
}

/// Every config of the list, in order.
pub fn offline_configs() -> impl Iterator<Item = OfflineConfig> {
    OFFLINE_CONFIGS_TEXT
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split_once(' '))
        .map(|(name, defines)| OfflineConfig { name, defines: defines.trim() })
}

/// The offline config whose kernels route `config`, if it is one of the list.
pub fn offline_config_for(config: &RoutingConfig) -> Option<OfflineConfig> {
    let defines = config.compiler_options().join(" ");
    offline_configs().find(|offline| offline.defines == defines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_tensor::{BiasRole, RoutingSpec, ScoringFunc, ScoringOrder, TopkMethod};

    fn spec(
        e: usize,
        scoring: ScoringFunc,
        method: TopkMethod,
        g: (usize, usize),
        k: usize,
        norm: bool,
    ) -> RoutingSpec {
        RoutingSpec::builder(e, k)
            .scoring(scoring)
            .method(method)
            .groups(g.0, g.1)
            .norm_topk_prob(norm)
            .build()
            .unwrap()
    }

    /// gpt-oss and Llama 4: scores of the selected logits, gpt-oss with its router's bias on them.
    fn after_top_k(spec: RoutingSpec, logit_bias: bool) -> RoutingSpec {
        let bias_role = if logit_bias { BiasRole::Logits } else { BiasRole::Correction };
        RoutingSpec { scoring_order: ScoringOrder::AfterTopk, bias_role, ..spec }
    }

    #[test]
    fn every_line_is_the_config_of_its_model() {
        use ScoringFunc::*;
        use TopkMethod::*;
        let models = [
            ("deepseek_v3", spec(256, Sigmoid, NoauxTc, (8, 4), 8, true)),
            ("kimi_k2", spec(384, Sigmoid, NoauxTc, (1, 1), 8, true)),
            ("deepseek_v2", spec(160, Softmax, GroupLimitedGreedy, (8, 3), 6, false)),
            ("deepseek_v2_lite", spec(64, Softmax, Greedy, (1, 1), 6, false)),
            ("deepseek_v4", spec(256, SqrtSoftplus, NoauxTc, (1, 1), 6, true)),
            ("deepseek_v4_hash", spec(256, SqrtSoftplus, Hash, (1, 1), 6, true)),
            ("glm_4_5", spec(160, Sigmoid, NoauxTc, (1, 1), 8, true)),
            ("minimax_m2", spec(256, Sigmoid, NoauxTc, (1, 1), 8, true)),
            ("qwen3_moe", spec(128, Softmax, Greedy, (1, 1), 8, true)),
            ("mixtral", spec(8, Softmax, Greedy, (1, 1), 2, true)),
            ("gpt_oss_120b", after_top_k(spec(128, Softmax, Greedy, (1, 1), 4, false), true)),
            ("gpt_oss_20b", after_top_k(spec(32, Softmax, Greedy, (1, 1), 4, false), true)),
            ("llama4_maverick", after_top_k(spec(128, Sigmoid, Greedy, (1, 1), 1, false), false)),
            ("llama4_scout", after_top_k(spec(16, Sigmoid, Greedy, (1, 1), 1, false), false)),
        ];
        let listed: Vec<_> = offline_configs().map(|c| c.name).collect();
        assert_eq!(listed, models.iter().map(|(name, _)| *name).collect::<Vec<_>>());
        for (offline, (_, spec)) in offline_configs().zip(models) {
            let defines = RoutingConfig::new(&spec).unwrap().compiler_options().join(" ");
            assert_eq!(offline.defines, defines, "{}", offline.name);
            let config = RoutingConfig::new(&spec).unwrap();
            assert_eq!(offline_config_for(&config).map(|c| c.name), Some(offline.name));
        }
        // A scaling factor is an argument, not a define: it does not change the config.
        let scaled = RoutingSpec {
            routed_scaling_factor: 2.5,
            ..spec(64, Softmax, Greedy, (1, 1), 6, false)
        };
        let config = RoutingConfig::new(&scaled).unwrap();
        assert_eq!(offline_config_for(&config).map(|c| c.name), Some("deepseek_v2_lite"));
        let other = RoutingConfig::new(&spec(128, Sigmoid, NoauxTc, (4, 2), 4, true)).unwrap();
        assert_eq!(offline_config_for(&other), None);
    }
}

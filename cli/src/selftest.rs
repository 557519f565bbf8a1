//! `sluice selftest`: routes random inputs of every model family and of generic configs on one
//! backend, compares each with the scalar reference, and prints a verdict and what to send back.
//! It is the one command to run on a machine whose GPU this project has not run on.

use clap::{Args, ValueEnum};
use sluice_backend_rocm::RocmError;
use sluice_tensor::{RoutingSpec, ScoringFunc, TopkMethod};

use crate::backend::{BackendArgs, BackendKind};
use crate::check;
use crate::error::CliError;
use crate::synthetic::{self, ModelShape};

/// Arguments of `sluice selftest`.
#[derive(Debug, Args)]
pub struct SelftestArgs {
    /// Tokens per config.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// Seed of the weights and inputs.
    #[arg(long, default_value_t = 11)]
    seed: u64,
    #[command(flatten)]
    backend: BackendArgs,
}

/// One config to route: a name, its spec and hidden size.
struct Case {
    name: String,
    spec: RoutingSpec,
    hidden_size: usize,
}

/// Every model family at its real shape, then generic configs at the kernels' edges (many
/// groups, the largest expert count and top-k, one expert per token).
fn cases() -> Vec<Case> {
    let mut cases: Vec<Case> = ModelShape::value_variants()
        .iter()
        .map(|shape| Case {
            name: shape.name().to_owned(),
            spec: shape.spec(),
            hidden_size: shape.hidden_size(),
        })
        .collect();
    let generic = [
        (128, ScoringFunc::Sigmoid, TopkMethod::NoauxTc, (4, 2), 4, 1024),
        (96, ScoringFunc::Sigmoid, TopkMethod::NoauxTc, (48, 10), 4, 512),
        (1024, ScoringFunc::Sigmoid, TopkMethod::NoauxTc, (1, 1), 32, 512),
        (32, ScoringFunc::Softmax, TopkMethod::Greedy, (1, 1), 1, 256),
    ];
    for (e, scoring, method, (g, kg), k, h) in generic {
        let spec = RoutingSpec::builder(e, k)
            .scoring(scoring)
            .method(method)
            .groups(g, kg)
            .norm_topk_prob(true)
            .routed_scaling_factor(2.5)
            .build()
            .expect("the generic configs are valid");
        cases.push(Case { name: format!("generic E={e} G={g}/{kg} K={k}"), spec, hidden_size: h });
    }
    cases
}

/// Routes every case and prints one line each, then the verdict.
pub fn run(args: &SelftestArgs) -> Result<(), CliError> {
    args.backend.check_tokens("selftest", args.tokens)?;
    let backend = match args.backend.build() {
        Ok(backend) => backend,
        Err(error) => {
            let name = args.backend.backend.to_possible_value().map(|v| v.get_name().to_owned());
            println!("selftest: FAIL, the {} backend did not start", name.unwrap_or_default());
            print_send_back();
            return Err(error);
        }
    };
    let (mut failed, mut skipped) = (0, 0);
    let cases = cases();
    for (index, case) in cases.iter().enumerate() {
        let seed = args.seed.wrapping_add(index as u64);
        if let Some(why) = not_built_for(args.backend.backend, &case.spec) {
            skipped += 1;
            println!("  skip  {:<28} {why}", case.name);
            continue;
        }
        match route_one(case, backend.as_ref(), args.tokens, seed) {
            Ok((compared, skipped)) => println!(
                "  ok    {:<28} {compared} tokens match the reference ({skipped} near ties skipped)",
                case.name
            ),
            Err(error) => {
                failed += 1;
                println!("  FAIL  {:<28} {}", case.name, error.one_line());
            }
        }
    }
    let routed = cases.len() - skipped;
    let skipped_note =
        if skipped > 0 { format!(" ({skipped} not built for it, skipped)") } else { String::new() };
    if failed == 0 && routed > 0 {
        println!(
            "selftest: PASS, {routed} configs on the {} backend match the reference{skipped_note}",
            backend.name()
        );
        return Ok(());
    }
    println!(
        "selftest: FAIL, {failed} of {routed} configs on the {} backend differ{skipped_note}",
        backend.name()
    );
    print_send_back();
    Err(CliError::SelfCheck(format!("{failed} of {routed} configs failed")))
}

/// Why `backend` has no kernels for `spec`, where that is a documented property of the build
/// rather than a failure: the ROCm backend routes only the configs compiled ahead of time.
fn not_built_for(backend: BackendKind, spec: &RoutingSpec) -> Option<String> {
    match backend {
        BackendKind::Rocm => match sluice_backend_rocm::embedded_config(spec) {
            Err(error @ RocmError::ConfigNotEmbedded { .. }) => Some(error.to_string()),
            // Specs the kernels cannot route fail as they do on the CUDA backend.
            _ => None,
        },
        BackendKind::Cpu | BackendKind::Cuda => None,
    }
}

fn route_one(
    case: &Case,
    backend: &dyn sluice_tensor::Backend,
    tokens: usize,
    seed: u64,
) -> Result<(usize, usize), CliError> {
    let gate = synthetic::gate(case.spec, case.hidden_size, seed)?;
    let hidden = synthetic::hidden_states(tokens, case.hidden_size, true, seed.wrapping_add(1))?
        .with_requires_grad(true);
    let token_ids = synthetic::token_ids(&gate, tokens, seed.wrapping_add(2))?;
    let token_ids = token_ids.as_ref();
    let routing = gate.prepare(backend)?.route_with_token_ids(&hidden, token_ids)?.to_routing()?;
    check::against_reference(&gate, &hidden, token_ids, &routing)
}

fn print_send_back() {
    println!(
        "send back: this output, the output of `sluice info --json`, and the GPU's name and \
         driver version (for AMD: `rocminfo`, for NVIDIA: `nvidia-smi`)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_rocm_only_the_configs_compiled_ahead_of_time_are_routed() {
        let cases = cases();
        let skipped: Vec<&str> = cases
            .iter()
            .filter(|case| not_built_for(BackendKind::Rocm, &case.spec).is_some())
            .map(|case| case.name.as_str())
            .collect();
        let skipped_on_cuda: Vec<&str> = cases
            .iter()
            .filter(|case| not_built_for(BackendKind::Cuda, &case.spec).is_some())
            .map(|case| case.name.as_str())
            .collect();
        assert!(
            skipped_on_cuda.is_empty(),
            "the CUDA backend routes every case: {skipped_on_cuda:?}"
        );
        assert!(cases.iter().all(|case| not_built_for(BackendKind::Cpu, &case.spec).is_none()));
        if !sluice_backend_rocm::built_with_kernels() {
            return;
        }
        let embedded =
            ["v3", "kimi-k2", "v2", "v2-lite", "v4", "v4-hash", "glm-4.5", "gpt-oss", "llama4"];
        for routed in embedded {
            assert!(!skipped.contains(&routed), "{routed} is embedded: {skipped:?}");
        }
        assert!(skipped.iter().any(|name| name.starts_with("generic E=128")), "{skipped:?}");
    }
}

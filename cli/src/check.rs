//! Checking a backend's routing against the scalar reference router, for `demo` and `selftest`.

use half::bf16;
use sluice_models::MoeGate;
use sluice_models::reference::{self, Routing, Tolerance};

use crate::error::CliError;

/// Where within relative distance this small two selections count as a near tie, which the check
/// skips (fast paths and the reference round differently).
const NEAR_TIE: f32 = 1e-5;

/// Routes the same bf16 input (and token ids, for a hash-routed gate) with the scalar reference and
/// compares; returns (rows compared,
/// near ties skipped).
pub fn against_reference(
    gate: &MoeGate,
    hidden: &sluice_tensor::Tensor,
    token_ids: Option<&sluice_tensor::Tensor>,
    actual: &Routing,
) -> Result<(usize, usize), CliError> {
    let spec = gate.spec();
    let tokens = hidden.shape()[0];
    let x = hidden.to_vec::<bf16>()?;
    let w = gate.weight().to_vec::<bf16>()?;
    let bias = gate.bias().map(|b| b.to_vec::<f32>()).transpose()?;
    let check = |e: reference::ReferenceError| CliError::SelfCheck(e.to_string());
    let logits = reference::router_logits(&x, &w, tokens, gate.hidden_size(), spec.num_experts)
        .map_err(check)?;
    let expected = match (gate.hash_table(), token_ids) {
        (Some(table), Some(ids)) => {
            let (table, ids) = (table.to_vec::<i32>()?, ids.to_vec::<i64>()?);
            reference::route_hashed(&logits, tokens, &table, &ids, spec)
        }
        _ => reference::route(&logits, tokens, bias.as_deref(), spec),
    }
    .map_err(check)?;
    let near = reference::near_tie_rows(&logits, tokens, bias.as_deref(), spec, NEAR_TIE)
        .map_err(check)?;
    let tolerance = Tolerance { abs: 1e-5, rel: 1e-4 };
    let summary =
        reference::compare_routings(&expected, actual, spec.num_experts, &near, tolerance)
            .map_err(|m| CliError::SelfCheck(m.to_string()))?;
    Ok((summary.rows_compared, summary.rows_skipped))
}

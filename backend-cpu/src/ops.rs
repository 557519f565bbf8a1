//! The ops shared by the backend and its prepared routers: checks, output allocation, the
//! non-finite policy, and the hand-over as DLPack tensors.

use sluice_tensor::{BackendError, NonFinitePolicy, RoutingOutput};

use crate::engine::{Engine, LogitRows};
use crate::gemm::{Gemm, Weights};
use crate::input::Hidden;
use crate::output::{export, filled, out_of_memory};
use crate::routing::RowRouter;

/// Refuses more tokens than the backend takes per call.
fn check_tokens(engine: &Engine, op: &'static str, tokens: usize) -> Result<(), BackendError> {
    if tokens > engine.max_tokens {
        return Err(BackendError::TooManyTokens { op, tokens, limit: engine.max_tokens });
    }
    Ok(())
}

/// Refuses hidden states whose `H` differs from the weight's.
pub(crate) fn check_hidden_size(
    op: &'static str,
    hidden: &Hidden<'_>,
    expected: usize,
) -> Result<(), BackendError> {
    let (tokens, actual) = hidden.dims();
    if actual != expected {
        return Err(BackendError::Shape {
            op,
            arg: "hidden",
            shape: vec![tokens as i64, actual as i64],
            expected: format!("[T, {expected}] (the router weight's hidden size)"),
        });
    }
    Ok(())
}

/// `len` elements of `[rows, columns]`, or an error if that overflows.
fn elements(op: &'static str, rows: usize, columns: usize) -> Result<usize, BackendError> {
    rows.checked_mul(columns).ok_or_else(|| out_of_memory(op, usize::MAX))
}

/// Router logits `[T, E]`.
pub(crate) fn logits<'a>(
    engine: &Engine,
    op: &'static str,
    hidden: Hidden<'a>,
    weights: Weights<'a>,
) -> Result<sluice_tensor::Dlpack, BackendError> {
    let (tokens, hidden_size) = hidden.dims();
    check_tokens(engine, op, tokens)?;
    let gemm = Gemm::new(engine.kernel, hidden, weights);
    let experts = gemm.experts();
    let kernel = engine.kernel;
    let _span = tracing::debug_span!("cpu_router_gemm", op, tokens, hidden_size, experts, %kernel)
        .entered();
    let mut out = filled::<f32>(op, elements(op, tokens, experts)?)?;
    engine.logits(&gemm, &mut out);
    export(out, &[tokens, experts])
}

/// The fused route: logits and routing.
pub(crate) fn route<'a>(
    engine: &Engine,
    op: &'static str,
    hidden: Hidden<'a>,
    weights: Weights<'a>,
    router: &RowRouter<'_>,
) -> Result<RoutingOutput, BackendError> {
    let (tokens, hidden_size) = hidden.dims();
    check_tokens(engine, op, tokens)?;
    let spec = router.spec();
    let _span =
        tracing::debug_span!("cpu_route", op, tokens, hidden_size, %spec, kernel = %engine.kernel)
            .entered();
    let gemm = Gemm::new(engine.kernel, hidden, weights);
    let len = elements(op, tokens, spec.top_k)?;
    let (mut ids, mut weights) = (filled::<i32>(op, len)?, filled::<f32>(op, len)?);
    let first_bad = engine.route(&gemm, router, &mut ids, &mut weights);
    finish(router, tokens, first_bad, ids, weights)
}

/// Routing of logits computed elsewhere.
pub(crate) fn route_logits(
    engine: &Engine,
    op: &'static str,
    logits: LogitRows<'_>,
    tokens: usize,
    router: &RowRouter<'_>,
) -> Result<RoutingOutput, BackendError> {
    check_tokens(engine, op, tokens)?;
    let spec = router.spec();
    let _span = tracing::debug_span!("cpu_route_logits", tokens, %spec).entered();
    let len = elements(op, tokens, spec.top_k)?;
    let (mut ids, mut weights) = (filled::<i32>(op, len)?, filled::<f32>(op, len)?);
    let first_bad =
        if tokens == 0 { None } else { engine.route_rows(router, logits, &mut ids, &mut weights) };
    finish(router, tokens, first_bad, ids, weights)
}

/// Applies the non-finite policy and hands the outputs over.
fn finish(
    router: &RowRouter<'_>,
    tokens: usize,
    first_bad: Option<usize>,
    ids: Vec<i32>,
    weights: Vec<f32>,
) -> Result<RoutingOutput, BackendError> {
    let spec = router.spec();
    if let Some(row) = first_bad {
        tracing::debug!(row, policy = ?spec.non_finite, "non-finite router logits");
        if spec.non_finite == NonFinitePolicy::Error {
            return Err(BackendError::NonFinite { row });
        }
    }
    let shape = [tokens, spec.top_k];
    Ok(RoutingOutput { topk_ids: export(ids, &shape)?, topk_weights: export(weights, &shape)? })
}

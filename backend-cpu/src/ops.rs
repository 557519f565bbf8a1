//! The ops shared by the backend and its prepared routers: checks, the route into the caller's
//! outputs, the non-finite policy, and the allocating forms built on them.

use ndarray::ArrayViewMut2;
use sluice_tensor::{
    BackendError, Dlpack, DlpackViewMut, Element, NonFiniteInput, NonFinitePolicy, RouteOutputs,
    RoutingOutput,
};

use crate::engine::{Engine, LogitRows, NonFiniteRows, OutRows, Routed};
use crate::gemm::{Gemm, Weights};
use crate::input::Hidden;
use crate::output::{export, filled};
use crate::routing::RowRouter;

/// Refuses more tokens than the backend takes per call.
pub(crate) fn check_tokens(
    engine: &Engine,
    op: &'static str,
    tokens: usize,
) -> Result<(), BackendError> {
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
            shape: vec![tokens, actual],
            expected: sluice_tensor::ExpectedShape(vec![None, Some(expected)]),
        });
    }
    Ok(())
}

/// A writable output as rows, after the contract's checks.
fn rows<'a, T: Element>(
    op: &'static str,
    arg: &'static str,
    view: &'a mut DlpackViewMut<'_>,
) -> Result<OutRows<'a, T>, BackendError> {
    let view: ArrayViewMut2<'a, T> =
        view.as_array2_mut().map_err(|source| BackendError::View { op, arg, source })?;
    Ok(OutRows::new(view))
}

/// Router logits `[T, E]` into the caller's output (checked).
pub(crate) fn logits_into<'a>(
    engine: &Engine,
    op: &'static str,
    hidden: Hidden<'a>,
    weights: Weights<'a>,
    logits: &mut DlpackViewMut<'_>,
) -> Result<(), BackendError> {
    let (tokens, hidden_size) = hidden.dims();
    check_tokens(engine, op, tokens)?;
    let gemm = Gemm::new(engine.kernel, hidden, weights);
    let experts = gemm.experts();
    let kernel = engine.kernel;
    let _span = tracing::debug_span!("cpu_router_gemm", op, tokens, hidden_size, experts, %kernel)
        .entered();
    engine.logits(&gemm, &rows(op, "logits", logits)?);
    Ok(())
}

/// The fused route into the caller's outputs (checked): logits, routing, status and policy.
pub(crate) fn route_into<'a>(
    engine: &Engine,
    op: &'static str,
    hidden: Hidden<'a>,
    weights: Weights<'a>,
    router: &RowRouter<'_>,
    outputs: &mut RouteOutputs<'_>,
) -> Result<(), BackendError> {
    let (tokens, hidden_size) = hidden.dims();
    check_tokens(engine, op, tokens)?;
    let spec = router.spec();
    let _span =
        tracing::debug_span!("cpu_route", op, tokens, hidden_size, %spec, kernel = %engine.kernel)
            .entered();
    let gemm = Gemm::new(engine.kernel, hidden, weights);
    let out = Routed {
        ids: rows(op, "topk_ids", &mut outputs.topk_ids)?,
        weights: rows(op, "topk_weights", &mut outputs.topk_weights)?,
    };
    let logits = outputs.logits.as_mut().map(|l| rows(op, "logits", l)).transpose()?;
    let bad = engine.route(&gemm, router, &out, logits.as_ref());
    finish(op, router, &bad, outputs.status.as_mut(), |row| {
        if hidden.row_is_finite(row) {
            NonFiniteInput::Logits
        } else {
            NonFiniteInput::HiddenStates
        }
    })
}

/// Routing of logits computed elsewhere, into new outputs.
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
    let mut outputs = HostOutputs::new(op, tokens, spec.top_k)?;
    let mut views = outputs.views(op)?;
    let out = Routed {
        ids: rows(op, "topk_ids", &mut views.topk_ids)?,
        weights: rows(op, "topk_weights", &mut views.topk_weights)?,
    };
    let bad = engine.route_rows(router, logits, &out);
    finish(op, router, &bad, None, |_| NonFiniteInput::Logits)?;
    outputs.export()
}

/// Writes the status and applies the non-finite policy.
fn finish(
    op: &'static str,
    router: &RowRouter<'_>,
    bad: &NonFiniteRows,
    status: Option<&mut DlpackViewMut<'_>>,
    input: impl FnOnce(usize) -> NonFiniteInput,
) -> Result<(), BackendError> {
    if let Some(status) = status {
        let mut status = status.as_array1_mut::<i32>().map_err(|source| BackendError::View {
            op,
            arg: "status",
            source,
        })?;
        status[0] = i32::try_from(bad.count()).unwrap_or(i32::MAX);
        status[1] = bad.first().and_then(|row| i32::try_from(row).ok()).unwrap_or(-1);
    }
    if let Some(row) = bad.first() {
        tracing::debug!(row, count = bad.count(), policy = ?router.spec().non_finite, "non-finite rows");
        if router.spec().non_finite == NonFinitePolicy::Error {
            return Err(BackendError::NonFinite { op, row, input: input(row) });
        }
    }
    Ok(())
}

/// Output buffers of the allocating ops: `[T, K]` ids and weights, handed over without a copy.
pub(crate) struct HostOutputs {
    tokens: usize,
    top_k: usize,
    ids: Vec<i32>,
    weights: Vec<f32>,
}

impl HostOutputs {
    pub(crate) fn new(op: &'static str, tokens: usize, top_k: usize) -> Result<Self, BackendError> {
        let len = elements(op, tokens, top_k)?;
        Ok(HostOutputs { tokens, top_k, ids: filled(op, len)?, weights: filled(op, len)? })
    }

    /// The buffers as the caller-owned outputs of `route_into`.
    pub(crate) fn views(&mut self, op: &'static str) -> Result<RouteOutputs<'_>, BackendError> {
        let shape = [self.tokens, self.top_k];
        let argument = |arg| move |source| BackendError::Argument { op, arg, source };
        Ok(RouteOutputs::new(
            DlpackViewMut::from_slice(&mut self.ids, &shape).map_err(argument("topk_ids"))?,
            DlpackViewMut::from_slice(&mut self.weights, &shape)
                .map_err(argument("topk_weights"))?,
        ))
    }

    /// Hands the buffers over as DLPack tensors.
    pub(crate) fn export(self) -> Result<RoutingOutput, BackendError> {
        let shape = [self.tokens, self.top_k];
        Ok(RoutingOutput {
            topk_ids: export("topk_ids", self.ids, &shape)?,
            topk_weights: export("topk_weights", self.weights, &shape)?,
        })
    }
}

/// A new `[T, E]` logits buffer, and its hand-over once written.
pub(crate) fn new_logits(
    op: &'static str,
    tokens: usize,
    experts: usize,
) -> Result<Vec<f32>, BackendError> {
    filled(op, elements(op, tokens, experts)?)
}

/// Hands a logits buffer over.
pub(crate) fn export_logits(
    logits: Vec<f32>,
    tokens: usize,
    experts: usize,
) -> Result<Dlpack, BackendError> {
    export("logits", logits, &[tokens, experts])
}

/// `rows × columns` elements, or an error if that overflows.
fn elements(op: &'static str, rows: usize, columns: usize) -> Result<usize, BackendError> {
    rows.checked_mul(columns).ok_or(BackendError::OutOfMemory { op, bytes: usize::MAX })
}

//! [`CpuPreparedRouter`]: a router weight packed once, with its bias and spec.

use std::fmt;
use std::sync::Arc;

use sluice_tensor::argument_view;
use sluice_tensor::{
    BackendError, DispatchInputs, DispatchOutputs, Dlpack, DlpackView, DlpackViewMut, Execution,
    PreparedRouter, RouteInputs, RouteOutputs, RoutingOutput, RoutingSpec, check_dispatch_into,
    check_logits_into, check_route_into,
};

use crate::dispatch;
use crate::engine::Engine;
use crate::gemm::Weights;
use crate::input;
use crate::ops::{self, HostOutputs};
use crate::pack::PackedWeight;
use crate::routing::{HashSelection, RowRouter};

/// What chooses a prepared router's experts besides the scores.
pub(crate) enum Selector {
    /// Top-k of the scores, plus an f32 correction bias for `noaux_tc`.
    TopK { bias: Option<Vec<f32>> },
    /// The hash table `tid2eid`, `[vocab, K]` row-major, checked against the spec.
    Hash { table: Vec<i32> },
}

/// A router prepared by a [`CpuBackend`](crate::CpuBackend): the weight packed into the kernels'
/// panel layout (the same size as a bf16 or f32 checkpoint tensor, at most one padding value per
/// expert for an odd hidden size), the bias as f32 or the hash table, and the spec.
///
/// `route_into` on the host allocates nothing in steady state: the per-thread buffers grow on the
/// first calls (or in [`warm_up`](PreparedRouter::warm_up)) and are reused, and no workspace is
/// needed.
pub struct CpuPreparedRouter {
    engine: Arc<Engine>,
    spec: RoutingSpec,
    weight: PackedWeight,
    selector: Selector,
}

/// Summaries of the buffers: the packed weight's shape and size, the bias's or table's length.
impl fmt::Debug for CpuPreparedRouter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CpuPreparedRouter")
            .field("engine", &self.engine)
            .field("spec", &self.spec)
            .field("weight", &self.weight)
            .field("selector", &self.selector)
            .finish()
    }
}

/// Lengths, not contents: a V4 table holds 775 680 ids.
impl fmt::Debug for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::TopK { bias } => {
                f.debug_struct("TopK").field("bias_len", &bias.as_ref().map(Vec::len)).finish()
            }
            Selector::Hash { table } => {
                f.debug_struct("Hash").field("table_len", &table.len()).finish()
            }
        }
    }
}

impl CpuPreparedRouter {
    pub(crate) fn new(
        engine: Arc<Engine>,
        spec: RoutingSpec,
        weight: PackedWeight,
        selector: Selector,
    ) -> Self {
        CpuPreparedRouter { engine, spec, weight, selector }
    }

    /// Bytes held by the packed weight.
    pub fn packed_bytes(&self) -> usize {
        self.weight.allocated_bytes()
    }

    /// The row router of one call with `tokens` rows and these token ids.
    fn router<'a>(
        &'a self,
        op: &'static str,
        tokens: usize,
        token_ids: Option<&DlpackView<'a>>,
    ) -> Result<RowRouter<'a>, BackendError> {
        let kernel = self.engine.kernel;
        match &self.selector {
            Selector::TopK { bias } => RowRouter::new(op, &self.spec, bias.as_deref(), kernel),
            Selector::Hash { table } => {
                let token_ids = token_ids.ok_or(BackendError::MissingTokenIds { op })?;
                let token_ids = input::token_ids(op, token_ids)?;
                let hash = HashSelection::new(op, table, self.spec.top_k, token_ids, tokens)?;
                RowRouter::hashed(op, &self.spec, hash, kernel)
            }
        }
    }
}

impl PreparedRouter for CpuPreparedRouter {
    fn spec(&self) -> &RoutingSpec {
        &self.spec
    }

    fn hidden_size(&self) -> usize {
        self.weight.dims().1
    }

    fn router_gemm(&self, hidden: &Dlpack) -> Result<Dlpack, BackendError> {
        const OP: &str = "router_gemm";
        let view = argument_view(OP, "hidden", hidden)?;
        let tokens = input::hidden(OP, &view)?.dims().0;
        ops::check_tokens(&self.engine, OP, tokens)?;
        let experts = self.spec.num_experts;
        let mut logits = ops::new_logits(OP, tokens, experts)?;
        let mut out = DlpackViewMut::from_slice(&mut logits, &[tokens, experts])
            .map_err(|source| BackendError::Argument { op: OP, arg: "logits", source })?;
        self.router_gemm_into(&view, &mut out, Execution::Host)?;
        ops::export_logits(logits, tokens, experts)
    }

    fn route(&self, hidden: &Dlpack) -> Result<RoutingOutput, BackendError> {
        const OP: &str = "route";
        let view = argument_view(OP, "hidden", hidden)?;
        let tokens = input::hidden(OP, &view)?.dims().0;
        ops::check_tokens(&self.engine, OP, tokens)?;
        let mut outputs = HostOutputs::new(OP, tokens, self.spec.top_k)?;
        self.route_into(&RouteInputs::new(view), &mut outputs.views(OP)?, Execution::Host)?;
        outputs.export()
    }

    fn warm_up(&self, tokens: usize) -> Result<(), BackendError> {
        const OP: &str = "warm_up";
        ops::check_tokens(&self.engine, OP, tokens)?;
        let hidden = vec![0.0f32; tokens * self.hidden_size()];
        let view = DlpackView::from_slice(&hidden, &[tokens, self.hidden_size()])
            .map_err(|source| BackendError::Argument { op: OP, arg: "hidden", source })?;
        let mut outputs = HostOutputs::new(OP, tokens, self.spec.top_k)?;
        // A hash-routed layer warms up on token id 0, which every table has.
        let token_ids = vec![0i32; tokens];
        let mut inputs = RouteInputs::new(view);
        if matches!(self.selector, Selector::Hash { .. }) {
            let ids = DlpackView::from_slice(&token_ids, &[tokens])
                .map_err(|source| BackendError::Argument { op: OP, arg: "token_ids", source })?;
            inputs = inputs.with_token_ids(ids);
        }
        self.route_into(&inputs, &mut outputs.views(OP)?, Execution::Host)
    }

    fn route_into(
        &self,
        inputs: &RouteInputs<'_>,
        outputs: &mut RouteOutputs<'_>,
        execution: Execution,
    ) -> Result<(), BackendError> {
        const OP: &str = "route_into";
        check_route_into(OP, self, inputs, outputs, execution, 0)?;
        let hidden = input::hidden(OP, &inputs.hidden)?;
        let router = self.router(OP, hidden.dims().0, inputs.token_ids.as_ref())?;
        let weights = Weights::Packed(&self.weight);
        ops::route_into(&self.engine, OP, hidden, weights, &router, outputs)
    }

    fn dispatch_into(
        &self,
        inputs: &DispatchInputs<'_>,
        outputs: &mut DispatchOutputs<'_>,
        execution: Execution,
    ) -> Result<(), BackendError> {
        const OP: &str = "dispatch_into";
        let (shape, ranks) = check_dispatch_into(OP, self, inputs, outputs, execution)?;
        ops::check_tokens(&self.engine, OP, shape.tokens)?;
        let _span = tracing::debug_span!("cpu_dispatch", tokens = shape.tokens, ranks).entered();
        dispatch::dispatch_into(OP, inputs, outputs, shape, ranks)
    }

    fn router_gemm_into(
        &self,
        hidden: &DlpackView<'_>,
        logits: &mut DlpackViewMut<'_>,
        execution: Execution,
    ) -> Result<(), BackendError> {
        const OP: &str = "router_gemm_into";
        check_logits_into(OP, self, hidden, logits, execution)?;
        let hidden = input::hidden(OP, hidden)?;
        ops::logits_into(&self.engine, OP, hidden, Weights::Packed(&self.weight), logits)
    }
}

//! [`PreparedGate`]: a gate whose weight a backend has taken, ready to route hidden states; and
//! [`GateRouting`], what routing returns.

use std::fmt;

use sluice_tensor::reexports::ndarray::ArrayView2;
use sluice_tensor::{
    DType, DispatchOutputs, Dlpack, DlpackView, DlpackViewMut, Execution, NonFinitePolicy,
    PreparedRouter, RouteInputs, RouteOutputs, RoutingSpec, Tensor, TopkMethod,
};

use crate::error::{ModelError, RoutingProblem};
use crate::hash_table::check_token_ids;
use crate::reference::Routing;

/// A gate prepared by a backend (weight packed, uploaded or kept), for repeated routing.
///
/// Created by [`MoeGate::prepare`](crate::MoeGate::prepare), or by
/// [`PreparedGate::from_router`] around a router an engine prepared itself.
///
/// Whatever the backend, what it returns is checked at this boundary: on the host, every id is in
/// `[0, E)` and distinct within its row, every weight is finite, and `-1` marks only whole rows
/// under the mark-invalid policy. A backend that breaks this is a typed error naming it and the
/// row, never an index an engine would follow out of bounds. (Outputs enqueued on a device stream
/// are not ready when the call returns, so they are the backend's own responsibility.)
///
/// README.md shows the engine-style call: prepare once, then `route_into` preallocated buffers.
pub struct PreparedGate {
    layer: usize,
    hidden_size: usize,
    /// The rows of the hash table of a hash-routed layer, where the gate knows its table.
    hash_vocab: Option<usize>,
    backend: String,
    router: Box<dyn PreparedRouter>,
}

impl fmt::Debug for PreparedGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreparedGate")
            .field("layer", &self.layer)
            .field("backend", &self.backend)
            .field("router", &self.router)
            .finish()
    }
}

impl PreparedGate {
    pub(crate) fn new(
        layer: usize,
        hidden_size: usize,
        hash_vocab: Option<usize>,
        backend: &str,
        router: Box<dyn PreparedRouter>,
    ) -> Self {
        PreparedGate { layer, hidden_size, hash_vocab, backend: backend.to_owned(), router }
    }

    /// A gate around a router that an engine prepared itself, through any [`PreparedRouter`]
    /// implementation (one written outside this workspace too). `backend` names it in messages.
    pub fn from_router(
        layer: usize,
        backend: impl Into<String>,
        router: Box<dyn PreparedRouter>,
    ) -> Self {
        let hidden_size = router.hidden_size();
        // The table stays with the router: its token ids are checked by the backend alone.
        PreparedGate { layer, hidden_size, hash_vocab: None, backend: backend.into(), router }
    }

    /// The decoder layer.
    pub fn layer(&self) -> usize {
        self.layer
    }

    /// The prepared router, for calls this type does not wrap.
    pub fn router(&self) -> &dyn PreparedRouter {
        &*self.router
    }

    /// The hidden size `H` the gate takes.
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    /// The routing spec the backend prepared for.
    pub fn spec(&self) -> &RoutingSpec {
        self.router.spec()
    }

    /// Whether the layer is hash-routed: it needs the token ids of the hidden states.
    pub fn is_hashed(&self) -> bool {
        self.spec().method == TopkMethod::Hash
    }

    /// Routes hidden states `[T, H]` (f32, bf16 or f16, as the backend supports) to `top_k` experts
    /// per token.
    ///
    /// The hidden states are detached before they cross the bridge (O(1), same storage), so
    /// activations that require grad route fine; the caller's tensor is left as it was. A
    /// hash-routed layer refuses this call with [`ModelError::MissingTokenIds`]; route it with
    /// [`route_with_token_ids`](PreparedGate::route_with_token_ids) or
    /// [`route_into`](PreparedGate::route_into) with the token ids in its inputs.
    pub fn route(&self, hidden: &Tensor) -> Result<GateRouting, ModelError> {
        self.route_with_token_ids(hidden, None)
    }

    /// Routes hidden states `[T, H]` whose token ids (i32 or i64 `[T]`) are `token_ids`. A
    /// hash-routed layer chooses its experts by them and refuses a call without them or with an
    /// id outside its table; other layers ignore them.
    pub fn route_with_token_ids(
        &self,
        hidden: &Tensor,
        token_ids: Option<&Tensor>,
    ) -> Result<GateRouting, ModelError> {
        let tokens = check_hidden(self.layer, self.hidden_size, hidden)?;
        let _span =
            tracing::debug_span!("gate_route", layer = self.layer, tokens, backend = %self.backend)
                .entered();
        let shape = [tokens, self.spec().top_k];
        let output = match (self.is_hashed(), token_ids) {
            (false, _) => self.router.route(&export_detached(hidden)?)?,
            (true, None) => return Err(ModelError::MissingTokenIds { layer: self.layer }),
            (true, Some(token_ids)) => {
                check_token_ids(self.layer, tokens, self.hash_vocab, token_ids)?;
                let token_ids = export_detached(token_ids)?;
                self.router.route_with_token_ids(&export_detached(hidden)?, &token_ids)?
            }
        };
        let ids = import_checked(&self.backend, "topk_ids", output.topk_ids, DType::I32, &shape)?;
        let weights =
            import_checked(&self.backend, "topk_weights", output.topk_weights, DType::F32, &shape)?;
        let (ids_view, weights_view) =
            (DlpackView::from_tensor(&ids)?, DlpackView::from_tensor(&weights)?);
        check_routing(&self.backend, self.spec(), &ids_view, &weights_view)?;
        Ok(GateRouting { ids, weights })
    }

    /// Routes into caller-owned outputs, on the host or the caller's stream: the engine's call
    /// (see the [`PreparedRouter`] contract). Nothing is allocated on the way; on the host the
    /// backend's results are checked before this returns.
    ///
    /// The hidden states arrive as a view, so they have crossed the bridge already: a view of a
    /// tensor that requires grad cannot be made (detach it first, O(1)).
    pub fn route_into(
        &self,
        inputs: &RouteInputs<'_>,
        outputs: &mut RouteOutputs<'_>,
        execution: Execution,
    ) -> Result<(), ModelError> {
        self.check_route_inputs(inputs)?;
        self.router.route_into(inputs, outputs, execution)?;
        self.check_host_routing(outputs, execution)
    }

    /// Routes into caller-owned outputs and lays the call's ids out for dispatch into `layout`
    /// (with `expert_ranks` for rank outputs), on the host or the caller's stream, allocating
    /// nothing: [`route_into`](PreparedGate::route_into) and the layout in one call, which a
    /// backend may run as one kernel (see [`PreparedRouter::route_and_dispatch_into`]).
    pub fn route_and_dispatch_into(
        &self,
        inputs: &RouteInputs<'_>,
        outputs: &mut RouteOutputs<'_>,
        layout: &mut DispatchOutputs<'_>,
        expert_ranks: Option<DlpackView<'_>>,
        execution: Execution,
    ) -> Result<(), ModelError> {
        self.check_route_inputs(inputs)?;
        self.router.route_and_dispatch_into(inputs, outputs, layout, expert_ranks, execution)?;
        self.check_host_routing(outputs, execution)
    }

    /// Refuses hidden states that are not `[T, H]`, and a hash-routed call without token ids.
    fn check_route_inputs(&self, inputs: &RouteInputs<'_>) -> Result<(), ModelError> {
        self.check_hidden_view(&inputs.hidden)?;
        if self.is_hashed() && inputs.token_ids.is_none() {
            return Err(ModelError::MissingTokenIds { layer: self.layer });
        }
        Ok(())
    }

    /// On the host, checks the backend's routing in `outputs` before the call returns.
    fn check_host_routing(
        &self,
        outputs: &RouteOutputs<'_>,
        execution: Execution,
    ) -> Result<(), ModelError> {
        if execution == Execution::Host {
            let (ids, weights) = (outputs.topk_ids.as_view(), outputs.topk_weights.as_view());
            check_routing(&self.backend, self.spec(), &ids, &weights)?;
        }
        Ok(())
    }

    /// Router logits into a caller-owned f32 `[T, E]` output, on the host or the caller's stream,
    /// allocating nothing (see [`route_into`](PreparedGate::route_into)).
    pub fn router_gemm_into(
        &self,
        hidden: &DlpackView<'_>,
        logits: &mut DlpackViewMut<'_>,
        execution: Execution,
    ) -> Result<(), ModelError> {
        self.check_hidden_view(hidden)?;
        Ok(self.router.router_gemm_into(hidden, logits, execution)?)
    }

    /// Refuses hidden states that are not `[T, H]`, naming the layer.
    fn check_hidden_view(&self, hidden: &DlpackView<'_>) -> Result<(), ModelError> {
        match *hidden.shape() {
            [_, h] if h == self.hidden_size => Ok(()),
            _ => Err(ModelError::HiddenShape {
                layer: self.layer,
                shape: hidden.shape().to_vec(),
                hidden_size: self.hidden_size,
            }),
        }
    }

    /// Router logits `x · Wᵀ`, f32 `[T, E]`, from the prepared weight.
    pub fn router_gemm(&self, hidden: &Tensor) -> Result<Tensor, ModelError> {
        let tokens = check_hidden(self.layer, self.hidden_size, hidden)?;
        let logits = self.router.router_gemm(&export_detached(hidden)?)?;
        let shape = [tokens, self.spec().num_experts];
        import_checked(&self.backend, "logits", logits, DType::F32, &shape)
    }
}

/// The result of routing: expert ids and weights, zero-copy imports of the backend's outputs.
#[derive(Debug, Clone)]
pub struct GateRouting {
    ids: Tensor,
    weights: Tensor,
}

impl GateRouting {
    /// Expert ids, i32 `[T, K]`, each row sorted by weight descending then by id; `-1` marks a row
    /// with non-finite logits under the mark-invalid policy.
    pub fn ids(&self) -> &Tensor {
        &self.ids
    }

    /// Expert weights, f32 `[T, K]`, aligned with [`ids`](GateRouting::ids).
    pub fn weights(&self) -> &Tensor {
        &self.weights
    }

    /// The number of tokens `T`.
    pub fn tokens(&self) -> usize {
        self.ids.shape().first().copied().unwrap_or(0)
    }

    /// Experts per token `K`.
    pub fn top_k(&self) -> usize {
        self.ids.shape().get(1).copied().unwrap_or(0)
    }

    /// Copies host outputs into a [`Routing`], to compare with the reference router.
    pub fn to_routing(&self) -> Result<Routing, ModelError> {
        let ids = self.ids.to_vec::<i32>()?;
        let weights = self.weights.to_vec::<f32>()?;
        Ok(Routing::new(self.tokens(), self.top_k(), ids, weights)?)
    }

    /// The two tensors: `(ids, weights)`.
    pub fn into_parts(self) -> (Tensor, Tensor) {
        (self.ids, self.weights)
    }
}

/// Checks a backend's host outputs against the contract (see [`PreparedGate`]).
fn check_routing(
    backend: &str,
    spec: &RoutingSpec,
    ids: &DlpackView<'_>,
    weights: &DlpackView<'_>,
) -> Result<(), ModelError> {
    let ids: ArrayView2<'_, i32> = ids.as_array2().map_err(|source| backend_view(source, "ids"))?;
    let weights: ArrayView2<'_, f32> =
        weights.as_array2().map_err(|source| backend_view(source, "weights"))?;
    let invalid =
        |row, problem| ModelError::InvalidRouting { backend: backend.to_owned(), row, problem };
    for (row, (ids, weights)) in ids.outer_iter().zip(weights.outer_iter()).enumerate() {
        if ids.iter().any(|&id| id == -1) {
            let whole_row = ids.iter().all(|&id| id == -1) && weights.iter().all(|&w| w == 0.0);
            if !whole_row || spec.non_finite != NonFinitePolicy::MarkInvalid {
                return Err(invalid(row, RoutingProblem::UnexpectedInvalidMark));
            }
            continue;
        }
        for (slot, (&id, &weight)) in ids.iter().zip(weights.iter()).enumerate() {
            if usize::try_from(id).map_or(true, |id| id >= spec.num_experts) {
                let problem = RoutingProblem::IdOutOfRange { id, experts: spec.num_experts };
                return Err(invalid(row, problem));
            }
            if !weight.is_finite() {
                return Err(invalid(row, RoutingProblem::NonFiniteWeight { id, value: weight }));
            }
            if ids.iter().take(slot).any(|&earlier| earlier == id) {
                return Err(invalid(row, RoutingProblem::RepeatedId { id }));
            }
        }
    }
    Ok(())
}

fn backend_view(source: sluice_tensor::ViewError, arg: &'static str) -> ModelError {
    ModelError::Backend(sluice_tensor::BackendError::View { op: "route", arg, source })
}

/// Checks that hidden states are `[T, H]`, returning `T`.
pub(crate) fn check_hidden(
    layer: usize,
    hidden_size: usize,
    hidden: &Tensor,
) -> Result<usize, ModelError> {
    match *hidden.shape() {
        [tokens, h] if h == hidden_size => Ok(tokens),
        _ => Err(ModelError::HiddenShape { layer, shape: hidden.shape().to_vec(), hidden_size }),
    }
}

/// Exports a tensor through the bridge after detaching it: the one place where the gate's
/// parameters and the caller's activations lose their `requires_grad` flag, without a copy.
pub(crate) fn export_detached(tensor: &Tensor) -> Result<Dlpack, ModelError> {
    Ok(tensor.detach().to_dlpack()?)
}

/// Imports a backend output and checks it against the backend contract.
pub(crate) fn import_checked(
    backend: &str,
    output: &'static str,
    tensor: Dlpack,
    dtype: DType,
    shape: &[usize],
) -> Result<Tensor, ModelError> {
    let tensor = Tensor::from_dlpack(tensor)?;
    if tensor.dtype() != dtype || tensor.shape() != shape {
        return Err(ModelError::BackendOutput {
            backend: backend.to_owned(),
            output,
            dtype: tensor.dtype(),
            shape: tensor.shape().to_vec(),
            expected_dtype: dtype,
            expected_shape: shape.to_vec(),
        });
    }
    Ok(tensor)
}

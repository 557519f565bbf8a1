//! [`PreparedGate`]: a gate whose weight a backend has taken, ready to route hidden states; and
//! [`GateRouting`], what routing returns.

use std::fmt;

use sluice_tensor::{DType, Dlpack, PreparedRouter, RoutingSpec, Tensor};

use crate::error::ModelError;
use crate::reference::Routing;

/// A gate prepared by a backend (weight packed, uploaded or kept), for repeated routing.
///
/// Created by [`MoeGate::prepare`](crate::MoeGate::prepare).
pub struct PreparedGate {
    layer: usize,
    hidden_size: usize,
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
        backend: &str,
        router: Box<dyn PreparedRouter>,
    ) -> Self {
        PreparedGate { layer, hidden_size, backend: backend.to_owned(), router }
    }

    /// The decoder layer.
    pub fn layer(&self) -> usize {
        self.layer
    }

    /// The hidden size `H` the gate takes.
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    /// The routing spec the backend prepared for.
    pub fn spec(&self) -> &RoutingSpec {
        self.router.spec()
    }

    /// Routes hidden states `[T, H]` (f32, bf16 or f16, as the backend supports) to `top_k` experts
    /// per token.
    ///
    /// The hidden states are detached before they cross the bridge (O(1), same storage), so
    /// activations that require grad route fine; the caller's tensor is left as it was.
    pub fn route(&self, hidden: &Tensor) -> Result<GateRouting, ModelError> {
        let tokens = check_hidden(self.layer, self.hidden_size, hidden)?;
        let _span =
            tracing::debug_span!("gate_route", layer = self.layer, tokens, backend = %self.backend)
                .entered();
        let output = self.router.route(&export_detached(hidden)?)?;
        let shape = [tokens, self.spec().top_k];
        let ids = import_checked(&self.backend, "topk_ids", output.topk_ids, DType::I32, &shape)?;
        let weights =
            import_checked(&self.backend, "topk_weights", output.topk_weights, DType::F32, &shape)?;
        Ok(GateRouting { ids, weights })
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

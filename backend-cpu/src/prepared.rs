//! [`CpuPreparedRouter`]: a router weight packed once, with its bias and spec.

use std::sync::Arc;

use sluice_tensor::{BackendError, Dlpack, PreparedRouter, RoutingOutput, RoutingSpec};

use crate::engine::Engine;
use crate::gemm::Weights;
use crate::input;
use crate::ops;
use crate::pack::PackedWeight;
use crate::routing::RowRouter;

/// A router prepared by a [`CpuBackend`](crate::CpuBackend): the weight packed into the kernels'
/// panel layout (the same size as a bf16 or f32 checkpoint tensor, at most one padding value per
/// expert for an odd hidden size), the bias as f32, and the spec.
#[derive(Debug)]
pub struct CpuPreparedRouter {
    engine: Arc<Engine>,
    spec: RoutingSpec,
    weight: PackedWeight,
    bias: Option<Vec<f32>>,
}

impl CpuPreparedRouter {
    pub(crate) fn new(
        engine: Arc<Engine>,
        spec: RoutingSpec,
        weight: PackedWeight,
        bias: Option<Vec<f32>>,
    ) -> Self {
        CpuPreparedRouter { engine, spec, weight, bias }
    }

    /// Bytes held by the packed weight.
    pub fn packed_bytes(&self) -> usize {
        self.weight.allocated_bytes()
    }

    fn router(&self) -> Result<RowRouter<'_>, BackendError> {
        RowRouter::new("route", &self.spec, self.bias.as_deref(), self.engine.kernel)
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
        let hidden = input::hidden(OP, hidden)?;
        ops::check_hidden_size(OP, &hidden, self.hidden_size())?;
        ops::logits(&self.engine, OP, hidden, Weights::Packed(&self.weight))
    }

    fn route(&self, hidden: &Dlpack) -> Result<RoutingOutput, BackendError> {
        const OP: &str = "route";
        let hidden = input::hidden(OP, hidden)?;
        ops::check_hidden_size(OP, &hidden, self.hidden_size())?;
        ops::route(&self.engine, OP, hidden, Weights::Packed(&self.weight), &self.router()?)
    }
}

//! `sluice bench --dispatch`: what the dispatch layout adds to the gate, timed the way an engine
//! calls it (`dispatch_into` on the gate's fresh ids, into buffers allocated and viewed once).

use sluice_models::PreparedGate;
use sluice_models::reference::DispatchLayout;
use sluice_tensor::{BackendError, DispatchInputs, DispatchShape, DlpackView, Execution, Tensor};

use crate::error::CliError;
use crate::timing::{self, Budget, Samples};

/// The layout alone, and the gate followed by the layout.
pub struct LayoutTimes {
    /// `dispatch_into` on one routing's ids.
    pub alone: Samples,
    /// `route` then `dispatch_into` on its ids: the gate with the layout.
    pub with_gate: Samples,
}

/// Times the layout of `hidden`'s routing, padded to `block_size` when given.
pub fn time_layout(
    prepared: &PreparedGate,
    hidden: &Tensor,
    block_size: Option<usize>,
    budget: Budget,
) -> Result<LayoutTimes, CliError> {
    let spec = prepared.spec();
    let tokens = hidden.shape()[0];
    let shape = DispatchShape { tokens, top_k: spec.top_k, experts: spec.num_experts };
    let mut layout = DispatchLayout::zeroed(shape, block_size, None).ok_or_else(|| {
        CliError::Input(format!("--block-size {block_size:?} is too large for {tokens} tokens"))
    })?;
    // Made once, as an engine makes the views of its buffers once (and captures them in a graph).
    let mut outputs = layout.outputs(spec.top_k).map_err(tensor_view)?;
    let mut lay_out = |ids: &Tensor| -> Result<(), CliError> {
        let inputs = DispatchInputs::new(DlpackView::from_tensor(ids).map_err(tensor_view)?);
        prepared.router().dispatch_into(&inputs, &mut outputs, Execution::Host)?;
        Ok(())
    };
    let routed = prepared.route(hidden)?;
    let alone = timing::measure(budget, || lay_out(routed.ids()))?;
    let with_gate = timing::measure(budget, || lay_out(prepared.route(hidden)?.ids()))?;
    Ok(LayoutTimes { alone, with_gate })
}

fn tensor_view(source: sluice_tensor::DlpackError) -> CliError {
    CliError::Backend(BackendError::Argument { op: "bench", arg: "dispatch", source })
}

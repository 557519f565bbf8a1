//! A dispatch layout in host memory: buffers of the right sizes for `dispatch_into`, and the
//! allocating [`PreparedGate::dispatch`] built on them.

use sluice_tensor::{
    BackendError, DispatchInputs, DispatchOutputs, DispatchShape, DlpackError, DlpackView,
    DlpackViewMut, PaddedOutputs, RankOutputs,
};

use crate::error::ModelError;
use crate::reference::{DispatchLayout, PaddedLayout, RankLayout, RankMap};
use crate::{GateRouting, PreparedGate};

impl DispatchLayout {
    /// Zeroed buffers for the layout of `shape`, padded to `block_size` and split over `ranks`
    /// ranks when given. `None` if the padded capacity overflows (block size 0 included).
    pub fn zeroed(
        shape: DispatchShape,
        block_size: Option<usize>,
        ranks: Option<usize>,
    ) -> Option<Self> {
        let (experts, pairs) = (shape.experts, shape.pairs());
        let padded = match block_size {
            Some(block) => {
                let capacity = shape.padded_capacity(block)?;
                Some(PaddedLayout {
                    block_size: block,
                    padded_pairs: vec![0; capacity],
                    block_experts: vec![0; capacity / block],
                    padded_total: 0,
                })
            }
            None => None,
        };
        Some(DispatchLayout {
            expert_counts: vec![0; experts],
            expert_offsets: vec![0; experts + 1],
            sorted_pairs: vec![0; pairs],
            inverse: vec![0; pairs],
            invalid: [0; 2],
            padded,
            ranks: ranks.map(|ranks| RankLayout {
                rank_counts: vec![0; ranks],
                rank_offsets: vec![0; ranks + 1],
                rank_pairs: vec![0; pairs],
                rank_tokens: vec![0; ranks],
            }),
        })
    }

    /// The buffers as the caller-owned outputs of `dispatch_into`, for `top_k` picks per token.
    /// Built in one go: the outputs hold a dozen views, which are worth not moving twice.
    pub fn outputs(&mut self, top_k: usize) -> Result<DispatchOutputs<'_>, DlpackError> {
        let tokens = self.inverse.len().checked_div(top_k).unwrap_or(0);
        let padded = match &mut self.padded {
            Some(padded) => Some(PaddedOutputs {
                block_size: padded.block_size,
                padded_pairs: one_dim(&mut padded.padded_pairs)?,
                block_experts: one_dim(&mut padded.block_experts)?,
                padded_total: one_dim(std::slice::from_mut(&mut padded.padded_total))?,
            }),
            None => None,
        };
        let ranks = match &mut self.ranks {
            Some(ranks) => Some(RankOutputs {
                rank_counts: one_dim(&mut ranks.rank_counts)?,
                rank_offsets: one_dim(&mut ranks.rank_offsets)?,
                rank_pairs: one_dim(&mut ranks.rank_pairs)?,
                rank_tokens: one_dim(&mut ranks.rank_tokens)?,
            }),
            None => None,
        };
        Ok(DispatchOutputs {
            expert_counts: one_dim(&mut self.expert_counts)?,
            expert_offsets: one_dim(&mut self.expert_offsets)?,
            sorted_pairs: one_dim(&mut self.sorted_pairs)?,
            inverse: DlpackViewMut::from_slice(&mut self.inverse, &[tokens, top_k])?,
            invalid: Some(one_dim(&mut self.invalid)?),
            padded,
            ranks,
            workspace: None,
        })
    }
}

fn one_dim(values: &mut [i32]) -> Result<DlpackViewMut<'_>, DlpackError> {
    let len = values.len();
    DlpackViewMut::from_slice(values, &[len])
}

impl PreparedGate {
    /// The dispatch layout of a routing on the host, in new buffers: what an engine's expert
    /// kernels and all-to-all consume next (see [`sluice_tensor::dispatch`]). Engines that own
    /// their buffers call [`PreparedRouter::dispatch_into`](sluice_tensor::PreparedRouter) on
    /// [`router`](PreparedGate::router) instead.
    ///
    /// A router on a device computes the layout there: its
    /// [`dispatch`](sluice_tensor::PreparedRouter::dispatch) copies the ids up and the layout back.
    pub fn dispatch(
        &self,
        routing: &GateRouting,
        block_size: Option<usize>,
        rank_map: Option<RankMap<'_>>,
    ) -> Result<DispatchLayout, ModelError> {
        let spec = self.spec();
        let shape = DispatchShape {
            tokens: routing.tokens(),
            top_k: spec.top_k,
            experts: spec.num_experts,
        };
        const OP: &str = "dispatch";
        if block_size == Some(0) {
            return Err(BackendError::ZeroBlockSize { op: OP }.into());
        }
        let ranks = rank_map.map(|map| map.ranks);
        let mut layout = DispatchLayout::zeroed(shape, block_size, ranks).ok_or(
            BackendError::IndexOverflow { op: OP, arg: "padded_pairs", entries: usize::MAX },
        )?;
        let mut inputs = DispatchInputs::new(DlpackView::from_tensor(routing.ids())?);
        if let Some(map) = rank_map {
            inputs = inputs.with_expert_ranks(DlpackView::from_slice(
                map.expert_ranks,
                &[map.expert_ranks.len()],
            )?);
        }
        self.router().dispatch(&inputs, &mut layout.outputs(spec.top_k)?)?;
        Ok(layout)
    }
}

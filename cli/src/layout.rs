//! The dispatch layout of a routing, for `route --dispatch`, `route --load-plot` and `demo`.

use sluice_models::reference::{DispatchLayout, RankMap};
use sluice_models::{GateRouting, PreparedGate};
use sluice_tensor::{Tensor, contiguous_ranks};

use crate::error::CliError;

/// The experts spread over ranks in contiguous ranges, as engines place them.
pub struct ContiguousRanks {
    table: Vec<i32>,
    ranks: usize,
}

impl ContiguousRanks {
    /// `experts` experts over `ranks` ranks.
    pub fn new(experts: usize, ranks: usize) -> Self {
        let mut table = vec![0; experts];
        contiguous_ranks(&mut table, ranks);
        ContiguousRanks { table, ranks }
    }

    /// The table as the reference and `PreparedGate::dispatch` take it.
    pub fn map(&self) -> RankMap<'_> {
        RankMap { expert_ranks: &self.table, ranks: self.ranks }
    }
}

/// The layout of `routing` through `prepared`'s backend.
pub fn dispatch(
    prepared: &PreparedGate,
    routing: &GateRouting,
    block_size: Option<usize>,
    ranks: Option<&ContiguousRanks>,
) -> Result<DispatchLayout, CliError> {
    let layer = prepared.layer();
    prepared
        .dispatch(routing, block_size, ranks.map(ContiguousRanks::map))
        .map_err(|error| CliError::in_layer(layer, error))
}

/// Every output of a layout as a named i32 tensor, in the order the README lists them.
pub fn named_tensors(
    layout: &DispatchLayout,
    top_k: usize,
) -> Result<Vec<(&'static str, Tensor)>, CliError> {
    let tokens = layout.inverse.len().checked_div(top_k).unwrap_or(0);
    let flat = |name, values: &[i32]| -> Result<(&'static str, Tensor), CliError> {
        Ok((name, Tensor::from_vec(values.to_vec(), &[values.len()])?))
    };
    let mut tensors: Vec<(&'static str, Tensor)> = vec![
        flat("expert_counts", &layout.expert_counts)?,
        flat("expert_offsets", &layout.expert_offsets)?,
        flat("sorted_pairs", &layout.sorted_pairs)?,
        ("inverse", Tensor::from_vec(layout.inverse.clone(), &[tokens, top_k])?),
        flat("invalid", &layout.invalid)?,
    ];
    if let Some(padded) = &layout.padded {
        tensors.push(flat("padded_pairs", &padded.padded_pairs)?);
        tensors.push(flat("block_experts", &padded.block_experts)?);
        tensors.push(flat("padded_total", &[padded.padded_total])?);
    }
    if let Some(ranks) = &layout.ranks {
        tensors.push(flat("rank_counts", &ranks.rank_counts)?);
        tensors.push(flat("rank_offsets", &ranks.rank_offsets)?);
        tensors.push(flat("rank_pairs", &ranks.rank_pairs)?);
        tensors.push(flat("rank_tokens", &ranks.rank_tokens)?);
    }
    Ok(tensors)
}

//! The device side of a GPU backend's synchronous `dispatch` (and of its timing): one device
//! buffer per output of a layout, viewed as `dispatch_into`'s outputs and copied back into the
//! caller's host outputs. Generic over the backend's buffer ([`DispatchBuffer`]), so that what is
//! allocated, viewed and copied is the same on every GPU.

use sluice_tensor::{
    BackendError, DType, Device, DispatchInputs, DispatchOutputs, DispatchShape, DlpackView,
    DlpackViewMut, PaddedOutputs, RankOutputs, RoutingSpec, check_dispatch_values,
};

use crate::operands::check_device;

/// What a synchronous `dispatch` of `spec`'s router looks at before it copies anything, as every
/// host dispatch does: the ids are on the host, and their values (and the rank table's) are
/// checked. A table without rank outputs, or the reverse, is left to `dispatch_into`'s checks.
/// Returns the shape of the call.
pub fn check_host_dispatch(
    op: &'static str,
    spec: &RoutingSpec,
    inputs: &DispatchInputs<'_>,
    outputs: &DispatchOutputs<'_>,
) -> Result<DispatchShape, BackendError> {
    let tokens = inputs.topk_ids.shape().first().copied().unwrap_or(0);
    let shape = DispatchShape { tokens, top_k: spec.top_k, experts: spec.num_experts };
    let ranks = outputs.ranks.as_ref().map_or(0, |r| r.rank_counts.shape().iter().product());
    check_device(op, "topk_ids", &inputs.topk_ids, Device::Cpu)?;
    if inputs.expert_ranks.is_some() == outputs.ranks.is_some() {
        check_dispatch_values(op, inputs, shape, ranks)?;
    }
    Ok(shape)
}

/// The values of a host i32 argument of one or two axes (ids or a rank table), row-major,
/// whatever its strides: what a synchronous call copies to its device.
pub fn host_i32_values(
    op: &'static str,
    arg: &'static str,
    view: &DlpackView<'_>,
) -> Result<Vec<i32>, BackendError> {
    check_device(op, arg, view, Device::Cpu)?;
    let view_error = |source| BackendError::View { op, arg, source };
    Ok(match view.rank() {
        1 => view.as_array1::<i32>().map_err(view_error)?.iter().copied().collect(),
        _ => view.as_array2::<i32>().map_err(view_error)?.iter().copied().collect(),
    })
}

/// A contiguous device buffer of a backend, zeroed when made, that a dispatch writes.
pub trait DispatchBuffer {
    /// The buffer as an output of `dispatch_into` (`op` names the call in errors).
    fn view_mut(&mut self, op: &'static str) -> Result<DlpackViewMut<'_>, BackendError>;
    /// Its i32 values, in row-major order, after the work queued before this call.
    fn read_i32(&self) -> Result<Vec<i32>, BackendError>;
}

/// Device buffers for the outputs of a dispatch: of the shapes and dtypes of a call's host outputs
/// (so that `dispatch_into` checks them as it would check the host ones), or of a shape.
#[derive(Debug)]
pub struct DispatchBuffers<B> {
    expert_counts: B,
    expert_offsets: B,
    sorted_pairs: B,
    inverse: B,
    invalid: Option<B>,
    padded: Option<(usize, [B; 3])>,
    ranks: Option<[B; 4]>,
}

impl<B: DispatchBuffer> DispatchBuffers<B> {
    /// Zeroed i32 outputs of `shape`, padded to `block_size` when given (no rank outputs), made by
    /// `zeroed(dtype, dims)`.
    pub fn of_shape(
        shape: DispatchShape,
        block_size: Option<usize>,
        mut zeroed: impl FnMut(DType, &[usize]) -> Result<B, BackendError>,
    ) -> Result<Self, BackendError> {
        let (t, k, e) = (shape.tokens, shape.top_k, shape.experts);
        let mut buffer = |dims: &[usize]| zeroed(DType::I32, dims);
        let padded = match block_size {
            Some(block) => {
                let capacity = shape.padded_capacity(block).ok_or(BackendError::IndexOverflow {
                    op: "dispatch",
                    arg: "padded_pairs",
                    entries: usize::MAX,
                })?;
                Some((block, [buffer(&[capacity])?, buffer(&[capacity / block])?, buffer(&[1])?]))
            }
            None => None,
        };
        Ok(DispatchBuffers {
            expert_counts: buffer(&[e])?,
            expert_offsets: buffer(&[e + 1])?,
            sorted_pairs: buffer(&[t * k])?,
            inverse: buffer(&[t, k])?,
            invalid: Some(buffer(&[2])?),
            padded,
            ranks: None,
        })
    }

    /// Zeroed buffers of the dtypes and shapes of `host`'s outputs, which must be on the host,
    /// made by `zeroed(dtype, dims)`.
    pub fn like(
        op: &'static str,
        host: &DispatchOutputs<'_>,
        mut zeroed: impl FnMut(DType, &[usize]) -> Result<B, BackendError>,
    ) -> Result<Self, BackendError> {
        let mut like = |view: &DlpackViewMut<'_>| -> Result<B, BackendError> {
            check_device(op, "outputs", &view.as_view(), Device::Cpu)?;
            zeroed(view.dtype(), view.shape())
        };
        Ok(DispatchBuffers {
            expert_counts: like(&host.expert_counts)?,
            expert_offsets: like(&host.expert_offsets)?,
            sorted_pairs: like(&host.sorted_pairs)?,
            inverse: like(&host.inverse)?,
            invalid: host.invalid.as_ref().map(&mut like).transpose()?,
            padded: match &host.padded {
                Some(p) => Some((
                    p.block_size,
                    [like(&p.padded_pairs)?, like(&p.block_experts)?, like(&p.padded_total)?],
                )),
                None => None,
            },
            ranks: match &host.ranks {
                Some(r) => Some([
                    like(&r.rank_counts)?,
                    like(&r.rank_offsets)?,
                    like(&r.rank_pairs)?,
                    like(&r.rank_tokens)?,
                ]),
                None => None,
            },
        })
    }

    /// The buffers as the outputs of `dispatch_into` (no workspace: the caller adds its own).
    pub fn views(&mut self, op: &'static str) -> Result<DispatchOutputs<'_>, BackendError> {
        let mut outputs = DispatchOutputs::new(
            self.expert_counts.view_mut(op)?,
            self.expert_offsets.view_mut(op)?,
            self.sorted_pairs.view_mut(op)?,
            self.inverse.view_mut(op)?,
        );
        outputs.invalid = self.invalid.as_mut().map(|b| b.view_mut(op)).transpose()?;
        if let Some((block_size, [pairs, blocks, total])) = &mut self.padded {
            outputs.padded = Some(PaddedOutputs {
                block_size: *block_size,
                padded_pairs: pairs.view_mut(op)?,
                block_experts: blocks.view_mut(op)?,
                padded_total: total.view_mut(op)?,
            });
        }
        if let Some([counts, offsets, pairs, tokens]) = &mut self.ranks {
            outputs.ranks = Some(RankOutputs {
                rank_counts: counts.view_mut(op)?,
                rank_offsets: offsets.view_mut(op)?,
                rank_pairs: pairs.view_mut(op)?,
                rank_tokens: tokens.view_mut(op)?,
            });
        }
        Ok(outputs)
    }

    /// Copies every device output into its host output (after the stream's work).
    pub fn copy_back(
        &self,
        op: &'static str,
        host: &mut DispatchOutputs<'_>,
    ) -> Result<(), BackendError> {
        copy_back(op, "expert_counts", &self.expert_counts, &mut host.expert_counts)?;
        copy_back(op, "expert_offsets", &self.expert_offsets, &mut host.expert_offsets)?;
        copy_back(op, "sorted_pairs", &self.sorted_pairs, &mut host.sorted_pairs)?;
        copy_back(op, "inverse", &self.inverse, &mut host.inverse)?;
        if let (Some(device), Some(host)) = (&self.invalid, host.invalid.as_mut()) {
            copy_back(op, "invalid", device, host)?;
        }
        if let (Some((_, [pairs, blocks, total])), Some(host)) =
            (&self.padded, host.padded.as_mut())
        {
            copy_back(op, "padded_pairs", pairs, &mut host.padded_pairs)?;
            copy_back(op, "block_experts", blocks, &mut host.block_experts)?;
            copy_back(op, "padded_total", total, &mut host.padded_total)?;
        }
        if let (Some([counts, offsets, pairs, tokens]), Some(host)) =
            (&self.ranks, host.ranks.as_mut())
        {
            copy_back(op, "rank_counts", counts, &mut host.rank_counts)?;
            copy_back(op, "rank_offsets", offsets, &mut host.rank_offsets)?;
            copy_back(op, "rank_pairs", pairs, &mut host.rank_pairs)?;
            copy_back(op, "rank_tokens", tokens, &mut host.rank_tokens)?;
        }
        Ok(())
    }
}

/// Copies a device i32 output into the host output of the same shape (any strides).
fn copy_back(
    op: &'static str,
    arg: &'static str,
    device: &impl DispatchBuffer,
    host: &mut DlpackViewMut<'_>,
) -> Result<(), BackendError> {
    let values = device.read_i32()?;
    let view_error = |source| BackendError::View { op, arg, source };
    match host.shape().len() {
        1 => host
            .as_array1_mut::<i32>()
            .map_err(view_error)?
            .iter_mut()
            .zip(values)
            .for_each(|(to, from)| *to = from),
        _ => host
            .as_array2_mut::<i32>()
            .map_err(view_error)?
            .iter_mut()
            .zip(values)
            .for_each(|(to, from)| *to = from),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_tensor::DlpackError;

    /// Host memory standing in for a device buffer: the logic above does not look at the device.
    struct HostBuffer {
        values: Vec<i32>,
        shape: Vec<usize>,
    }

    impl DispatchBuffer for HostBuffer {
        fn view_mut(&mut self, op: &'static str) -> Result<DlpackViewMut<'_>, BackendError> {
            DlpackViewMut::from_slice(&mut self.values, &self.shape).map_err(
                |source: DlpackError| BackendError::Argument { op, arg: "outputs", source },
            )
        }

        fn read_i32(&self) -> Result<Vec<i32>, BackendError> {
            Ok(self.values.clone())
        }
    }

    fn zeroed(dtype: DType, dims: &[usize]) -> Result<HostBuffer, BackendError> {
        assert_eq!(dtype, DType::I32);
        Ok(HostBuffer { values: vec![0; dims.iter().product()], shape: dims.to_vec() })
    }

    #[test]
    fn a_synchronous_dispatch_reads_and_checks_host_ids_first() {
        // A window of rows 3 wide: the third column is not the argument's.
        let ids = [0, 1, 99, 2, -1, 99];
        let view = DlpackView::from_slice_strided(&ids, &[2, 2], &[3, 1]).unwrap();
        assert_eq!(host_i32_values("dispatch", "topk_ids", &view).unwrap(), [0, 1, 2, -1]);
        let spec = RoutingSpec::builder(4, 2).build().unwrap();
        let shape = DispatchShape { tokens: 2, top_k: 2, experts: 4 };
        let mut layout = DispatchBuffers::of_shape(shape, None, zeroed).unwrap();
        let outputs = layout.views("dispatch").unwrap();
        let inputs = DispatchInputs::new(view);
        assert_eq!(check_host_dispatch("dispatch", &spec, &inputs, &outputs).unwrap(), shape);
        // An id outside [-1, E) is refused on the host, before anything is copied.
        let stray = [0, 4];
        let inputs = DispatchInputs::new(DlpackView::from_slice(&stray, &[1, 2]).unwrap());
        let refused = check_host_dispatch("dispatch", &spec, &inputs, &outputs);
        assert!(matches!(refused, Err(BackendError::ExpertIdOutOfRange { .. })), "{refused:?}");
    }

    #[test]
    fn buffers_of_a_shape_have_every_output_at_its_size() {
        let shape = DispatchShape { tokens: 5, top_k: 3, experts: 4 };
        let mut buffers = DispatchBuffers::of_shape(shape, Some(4), zeroed).unwrap();
        let outputs = buffers.views("dispatch").unwrap();
        assert_eq!(outputs.expert_counts.shape(), [4]);
        assert_eq!(outputs.expert_offsets.shape(), [5]);
        assert_eq!(outputs.sorted_pairs.shape(), [15]);
        assert_eq!(outputs.inverse.shape(), [5, 3]);
        assert_eq!(outputs.invalid.as_ref().map(|v| v.shape().to_vec()), Some(vec![2]));
        let padded = outputs.padded.as_ref().unwrap();
        let capacity = shape.padded_capacity(4).unwrap();
        assert_eq!(padded.padded_pairs.shape(), [capacity]);
        assert_eq!(padded.block_experts.shape(), [capacity / 4]);
        assert!(outputs.ranks.is_none());
    }

    #[test]
    fn what_the_device_wrote_lands_in_strided_host_outputs() {
        let (t, k, e, r) = (3, 2, 4, 2);
        let mut counts = vec![-1; e];
        let mut offsets = vec![-1; e + 1];
        let mut pairs = vec![-1; t * k];
        // The inverse is a window of rows 3 wide: the third column must stay untouched.
        let mut inverse = vec![-7; t * 3];
        let mut rank_counts = vec![-1; r];
        let mut rank_offsets = vec![-1; r + 1];
        let mut rank_pairs = vec![-1; t * k];
        let mut rank_tokens = vec![-1; r];
        let mut host = DispatchOutputs::new(
            DlpackViewMut::from_slice(&mut counts, &[e]).unwrap(),
            DlpackViewMut::from_slice(&mut offsets, &[e + 1]).unwrap(),
            DlpackViewMut::from_slice(&mut pairs, &[t * k]).unwrap(),
            DlpackViewMut::from_slice_strided(&mut inverse, &[t, k], &[3, 1]).unwrap(),
        );
        host.ranks = Some(RankOutputs {
            rank_counts: DlpackViewMut::from_slice(&mut rank_counts, &[r]).unwrap(),
            rank_offsets: DlpackViewMut::from_slice(&mut rank_offsets, &[r + 1]).unwrap(),
            rank_pairs: DlpackViewMut::from_slice(&mut rank_pairs, &[t * k]).unwrap(),
            rank_tokens: DlpackViewMut::from_slice(&mut rank_tokens, &[r]).unwrap(),
        });
        let mut device = DispatchBuffers::like("dispatch", &host, zeroed).unwrap();
        assert!(device.invalid.is_none() && device.padded.is_none(), "only what was asked for");
        // What a dispatch would write: each output counts up from its own base.
        let mut outputs = device.views("dispatch").unwrap();
        let fill = |view: &mut DlpackViewMut<'_>, base: i32| match view.shape().len() {
            1 => view
                .as_array1_mut::<i32>()
                .unwrap()
                .iter_mut()
                .zip(base..)
                .for_each(|(v, x)| *v = x),
            _ => view
                .as_array2_mut::<i32>()
                .unwrap()
                .iter_mut()
                .zip(base..)
                .for_each(|(v, x)| *v = x),
        };
        fill(&mut outputs.expert_counts, 100);
        fill(&mut outputs.inverse, 200);
        let ranks = outputs.ranks.as_mut().unwrap();
        fill(&mut ranks.rank_tokens, 300);
        device.copy_back("dispatch", &mut host).unwrap();
        assert_eq!(counts, [100, 101, 102, 103]);
        assert_eq!(inverse, [200, 201, -7, 202, 203, -7, 204, 205, -7]);
        assert_eq!(rank_tokens, [300, 301]);
        assert_eq!(offsets, [0; 5], "zeroed buffers are copied back as zeros");
    }
}

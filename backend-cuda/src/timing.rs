//! Timing the gate the way an engine runs it: `route_into` on a stream, eagerly and replayed from
//! a CUDA graph, cycling through enough distinct weights and inputs that nothing stays in L2.
//!
//! The method mirrors the PyTorch anchor's (`torch_gate_gpu.py`), so the two compare side by
//! side: `S` sets of (hidden states, weight, bias) totalling at least three times the L2 (at least
//! 2, at most [`MAX_SETS`]), one pass calls the gate once per set, the graph captures one pass,
//! and each measurement is the median over repetitions of a pass, timed with device events,
//! divided by `S`. Each router is warmed up for `T` first, as an engine does, so the cuBLASLt path
//! runs the algorithm `warm_up` timed fastest.
//!
//! With [`GateBench::layout`], every gate call also lays out its ids for dispatch, as one
//! `route_and_dispatch_into` call or as `route_into` then `dispatch_into`
//! ([`LayoutBench::one_call`]), and, where asked ([`LayoutBench::alone`]), the layout alone is
//! timed too: a graph of [`LAYOUT_CALLS`] `dispatch_into` calls on one routing's ids, replayed.

use std::sync::Arc;

use cudarc::driver::sys::{
    CUdevice_attribute, CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode,
};
use cudarc::driver::{CudaEvent, CudaStream};
use half::bf16;
use sluice_tensor::{
    BackendError, DType, Device, DeviceStream, DispatchInputs, DispatchShape, Dlpack, Execution,
    NonFinitePolicy, PreparedRouter, RouteInputs, RouteOutputs, RoutingSpec, TopkMethod,
};

use crate::CudaBackend;
use crate::buffer::DeviceBuffer;
use crate::dispatch::{DeviceOutputs, zeroed};
use crate::error::CudaError;
use crate::prepared::CudaPreparedRouter;

/// The most input sets one measurement cycles through (the anchor's limit).
pub const MAX_SETS: usize = 64;

/// `dispatch_into` calls per replay when the layout is timed alone (the sort-based anchor's
/// count, `torch_dispatch_gpu.py`).
pub const LAYOUT_CALLS: usize = 20;

/// The dispatch layout timed with the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayoutBench {
    /// Pad each expert's rows to a multiple of this block size.
    pub block_size: Option<usize>,
    /// Gate and layout as one `route_and_dispatch_into` call (the layout inside routing where the
    /// backend fuses it), rather than `route_into` then `dispatch_into`.
    pub one_call: bool,
    /// Also time `dispatch_into` alone on one routing's ids ([`GateTimes::layout`]).
    pub alone: bool,
}

/// What to time.
#[derive(Debug, Clone, Copy)]
pub struct GateBench {
    /// The routing (its non-finite policy is set to mark-invalid: a stream call needs it).
    pub spec: RoutingSpec,
    /// Hidden size `H`.
    pub hidden_size: usize,
    /// Tokens `T` (at least 1).
    pub tokens: usize,
    /// Hidden-state dtype: bf16 or f32 (the weight is bf16).
    pub hidden_dtype: DType,
    /// About how many seconds of device time each measurement takes.
    pub target_seconds: f64,
    /// Also lay out each routing for dispatch (`None`: the gate alone).
    pub layout: Option<LayoutBench>,
}

/// Microseconds per gate call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Times {
    /// Median over the repetitions.
    pub median_us: f64,
    /// Fastest repetition.
    pub min_us: f64,
    /// Repetitions (each a pass over every set).
    pub repetitions: usize,
}

/// The result of [`CudaBackend::time_gate`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GateTimes {
    /// Distinct (hidden, weight, bias) sets cycled through.
    pub sets: usize,
    /// `route_into` calls enqueued one after another from the host.
    pub eager: Times,
    /// The same calls captured once in a CUDA graph and replayed: what an engine sees.
    pub graph: Times,
    /// With a [`GateBench::layout`] that asks for it ([`LayoutBench::alone`]): `dispatch_into`
    /// alone, replayed from a graph of [`LAYOUT_CALLS`] calls.
    pub layout: Option<Times>,
}

impl CudaBackend {
    /// Device-to-device copy bandwidth in bytes per second (bytes read plus bytes written), over
    /// a 1 GiB copy: the memory ceiling of the gate's floor.
    pub fn copy_bandwidth(&self) -> Result<f64, BackendError> {
        let gpu = &self.gpu;
        let bytes = 1usize << 30;
        let src = crate::memory::zeroed(gpu, bytes)?;
        let mut dst = crate::memory::zeroed(gpu, bytes)?;
        let stream = &gpu.stream;
        let mut copy = || {
            stream.memcpy_dtod(&src, &mut dst).map_err(CudaError::driver("copying on the device"))
        };
        let (median, _) = time_repetitions(stream, 3, 10, &mut copy)?;
        Ok(2.0 * bytes as f64 / (median * 1e-6))
    }

    /// Times the gate of `bench` on synthetic bf16 weights (see the [module](self) docs).
    pub fn time_gate(&self, bench: &GateBench) -> Result<GateTimes, BackendError> {
        let gpu = &self.gpu;
        let (t, h) = (bench.tokens.max(1), bench.hidden_size);
        let mut spec = bench.spec;
        spec.non_finite = NonFinitePolicy::MarkInvalid;
        let (e, k) = (spec.num_experts, spec.top_k);
        let l2 = gpu
            .ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
            .map_err(CudaError::driver("reading the L2 size"))? as usize;
        let per_set = t * h * 2 + e * h * 2 + e * 4;
        let sets = (3 * l2).div_ceil(per_set).clamp(2, MAX_SETS);

        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut normal = |scale: f32| {
            let mut sum = 0.0f32;
            for _ in 0..4 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                sum += (rng >> 40) as f32 / (1u64 << 24) as f32;
            }
            (sum - 2.0) * 1.7 * scale
        };
        let weight: Vec<bf16> =
            (0..e * h).map(|_| bf16::from_f32(normal(2.0 / (h as f32).sqrt()))).collect();
        let bias: Vec<f32> = (0..e).map(|_| normal(0.1)).collect();
        let hidden_values: Vec<f32> = (0..t * h).map(|_| normal(1.0)).collect();
        let weight_dl = host(weight, &[e, h])?;
        let bias_dl = (spec.method == TopkMethod::NoauxTc).then(|| host(bias, &[e])).transpose()?;

        // Distinct memory per set (equal values do not matter: caches key on addresses).
        let mut routers: Vec<CudaPreparedRouter> = Vec::with_capacity(sets);
        let mut hiddens = Vec::with_capacity(sets);
        for _ in 0..sets {
            let router = self.prepare(&weight_dl, bias_dl.as_ref(), &spec)?;
            router.warm_up(t)?;
            routers.push(router);
            let mut buffer =
                DeviceBuffer::zeroed(Arc::clone(gpu), bench.hidden_dtype, &[t, h], None)?;
            match bench.hidden_dtype {
                DType::BF16 => {
                    let values: Vec<bf16> =
                        hidden_values.iter().map(|&v| bf16::from_f32(v)).collect();
                    buffer.write(&values)?;
                }
                _ => buffer.write(&hidden_values)?,
            }
            hiddens.push(buffer);
        }
        let mut ids = DeviceBuffer::zeroed(Arc::clone(gpu), DType::I32, &[t, k], None)?;
        let mut weights = DeviceBuffer::zeroed(Arc::clone(gpu), DType::F32, &[t, k], None)?;
        let mut status = DeviceBuffer::zeroed(Arc::clone(gpu), DType::I32, &[2], None)?;
        let workspace_bytes = routers[0].workspace_bytes(t).max(1);
        let mut workspace =
            DeviceBuffer::zeroed(Arc::clone(gpu), DType::U8, &[workspace_bytes], None)?;

        let shape = DispatchShape { tokens: t, top_k: k, experts: e };
        let mut layout = match bench.layout {
            Some(layout) => {
                let outputs = DeviceOutputs::of_shape(shape, layout.block_size, zeroed(gpu))?;
                let bytes = routers[0].dispatch_workspace_bytes(t).max(1);
                let workspace = DeviceBuffer::zeroed(Arc::clone(gpu), DType::U8, &[bytes], None)?;
                Some((outputs, workspace))
            }
            None => None,
        };
        let stream = gpu.ctx.new_stream().map_err(CudaError::driver("creating a stream"))?;
        // SAFETY: the stream lives until this function returns, after its last synchronisation;
        // every buffer handed to the calls outlives it and is only read after synchronising.
        let execution = Execution::Stream(
            unsafe { DeviceStream::new(Device::Cuda(gpu.ordinal), stream.cu_stream() as usize) }
                .map_err(CudaError::from)?,
        );
        let mut pass = || -> Result<(), BackendError> {
            for (router, hidden) in routers.iter().zip(&hiddens) {
                let inputs = RouteInputs::new(hidden.view().map_err(argument("hidden"))?);
                let mut outputs = RouteOutputs::new(
                    ids.view_mut().map_err(argument("topk_ids"))?,
                    weights.view_mut().map_err(argument("topk_weights"))?,
                )
                .with_status(status.view_mut().map_err(argument("status"))?)
                .with_workspace(workspace.view_mut().map_err(argument("workspace"))?);
                match (layout.as_mut(), bench.layout) {
                    (
                        Some((layout, layout_workspace)),
                        Some(LayoutBench { one_call: true, .. }),
                    ) => {
                        let mut layout = layout.views("time_gate")?;
                        layout.workspace = Some(
                            layout_workspace.view_mut().map_err(argument("layout workspace"))?,
                        );
                        router.route_and_dispatch_into(
                            &inputs,
                            &mut outputs,
                            &mut layout,
                            None,
                            execution,
                        )?;
                    }
                    (Some((layout, layout_workspace)), _) => {
                        router.route_into(&inputs, &mut outputs, execution)?;
                        lay_out(router, &ids, layout, layout_workspace, execution)?;
                    }
                    (None, _) => router.route_into(&inputs, &mut outputs, execution)?,
                }
            }
            Ok(())
        };

        pass()?;
        pass()?;
        stream.synchronize().map_err(CudaError::driver("waiting for the warm-up"))?;
        let started = std::time::Instant::now();
        pass()?;
        stream.synchronize().map_err(CudaError::driver("waiting for the warm-up"))?;
        let estimate = started.elapsed().as_secs_f64();
        let repetitions = ((bench.target_seconds / estimate.max(1e-7)) as usize).clamp(5, 100);

        let (median, min) = time_repetitions(&stream, 2, repetitions, &mut pass)?;
        let eager =
            Times { median_us: median / sets as f64, min_us: min / sets as f64, repetitions };

        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(CudaError::driver("starting a capture"))?;
        let captured = pass();
        let graph = stream
            .end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH)
            .map_err(CudaError::driver("ending a capture"))?;
        captured?;
        let graph = graph.ok_or(CudaError::EmptyCapture)?;
        graph.upload().map_err(CudaError::driver("uploading the graph"))?;
        let mut replay = || graph.launch().map_err(CudaError::driver("replaying the graph"));
        let (median, min) = time_repetitions(&stream, 3, repetitions, &mut replay)?;
        let graph =
            Times { median_us: median / sets as f64, min_us: min / sets as f64, repetitions };
        let layout = match (layout.as_mut(), bench.layout) {
            (Some((outputs, workspace)), Some(LayoutBench { alone: true, .. })) => {
                let router = &routers[0];
                let mut calls = || -> Result<(), BackendError> {
                    for _ in 0..LAYOUT_CALLS {
                        lay_out(router, &ids, outputs, workspace, execution)?;
                    }
                    Ok(())
                };
                stream
                    .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                    .map_err(CudaError::driver("starting a capture"))?;
                let captured = calls();
                let graph = stream
                    .end_capture(
                        CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
                    )
                    .map_err(CudaError::driver("ending a capture"))?;
                captured?;
                let graph = graph.ok_or(CudaError::EmptyCapture)?;
                graph.upload().map_err(CudaError::driver("uploading the graph"))?;
                let mut replay =
                    || graph.launch().map_err(CudaError::driver("replaying the graph"));
                let (median, min) = time_repetitions(&stream, 3, repetitions, &mut replay)?;
                let per_call = LAYOUT_CALLS as f64;
                Some(Times { median_us: median / per_call, min_us: min / per_call, repetitions })
            }
            _ => None,
        };
        Ok(GateTimes { sets, eager, graph, layout })
    }
}

/// `dispatch_into` of the routing in `ids` into `outputs`.
fn lay_out(
    router: &CudaPreparedRouter,
    ids: &DeviceBuffer,
    outputs: &mut DeviceOutputs,
    workspace: &mut DeviceBuffer,
    execution: Execution,
) -> Result<(), BackendError> {
    let inputs = DispatchInputs::new(ids.view().map_err(argument("topk_ids"))?);
    let mut outputs = outputs.views("time_gate")?;
    outputs.workspace = Some(workspace.view_mut().map_err(argument("workspace"))?);
    router.dispatch_into(&inputs, &mut outputs, execution)
}

fn host<T: sluice_tensor::Element>(
    values: Vec<T>,
    shape: &[usize],
) -> Result<Dlpack, BackendError> {
    sluice_tensor::export_vec(values, shape).map_err(|source| BackendError::Argument {
        op: "time_gate",
        arg: "synthetic input",
        source,
    })
}

fn argument(arg: &'static str) -> impl Fn(sluice_tensor::DlpackError) -> BackendError {
    move |source| BackendError::Argument { op: "time_gate", arg, source }
}

/// Runs `work` `warmup` times, then `repetitions` times between device events on `stream`;
/// returns the median and the minimum in microseconds.
fn time_repetitions<E>(
    stream: &Arc<CudaStream>,
    warmup: usize,
    repetitions: usize,
    work: &mut impl FnMut() -> Result<(), E>,
) -> Result<(f64, f64), BackendError>
where
    BackendError: From<E>,
{
    for _ in 0..warmup {
        work()?;
    }
    let event = || -> Result<CudaEvent, CudaError> {
        stream
            .context()
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(CudaError::driver("creating an event"))
    };
    let events = (0..=repetitions).map(|_| event()).collect::<Result<Vec<_>, _>>()?;
    events[0].record(stream).map_err(CudaError::driver("recording an event"))?;
    for event in &events[1..] {
        work()?;
        event.record(stream).map_err(CudaError::driver("recording an event"))?;
    }
    stream.synchronize().map_err(CudaError::driver("waiting for the timed work"))?;
    let mut micros = events
        .windows(2)
        .map(|w| w[0].elapsed_ms(&w[1]).map(|ms| f64::from(ms) * 1e3))
        .collect::<Result<Vec<_>, _>>()
        .map_err(CudaError::driver("reading an event"))?;
    micros.sort_by(f64::total_cmp);
    Ok((micros[micros.len() / 2], micros[0]))
}

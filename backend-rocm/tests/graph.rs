//! The engine's call on a real HIP stream, and the original bug on the hardware it happened on: a
//! gate whose weight and hidden states require grad, `route_into` into caller-owned device buffers
//! (windows of larger buffers) captured in a HIP graph on a non-default stream and replayed, equal
//! to the reference each time; a raw export of a parameter during the capture is refused and the
//! capture stays valid. Then the dispatch layout: `route_into` followed by `dispatch_into` of its
//! ids (padded, over ranks, the many-block path) in one graph, replayed, equal to the reference
//! layout of the ids each replay wrote; and the synchronous `dispatch` through the gate.
//!
//! This mirrors backend-cuda's graph test. It compiles everywhere; without an AMD GPU (or without
//! embedded kernels, or without a HIP runtime) it says why and passes, unless `SLUICE_REQUIRE_ROCM`
//! is set, which makes any of those a failure.

use std::ffi::c_void;
use std::io::Write;
use std::sync::Arc;

use dlpark::ffi::{DLDataType, DLDevice, DLDeviceType, DLTensor};
use half::bf16;
use sluice_backend_rocm::{CaptureStatus, HipStream, RocmBackend, RocmDevice};
use sluice_models::PreparedGate;
use sluice_models::reference::{
    self, DispatchLayout, PaddedLayout, RankLayout, RankMap, Routing, Tolerance,
};
use sluice_tensor::{
    BackendError, Device, DeviceStream, DispatchInputs, DispatchOutputs, DispatchShape,
    DlpackError, DlpackView, DlpackViewMut, Execution, NonFinitePolicy, PaddedOutputs,
    PreparedRouter, RankOutputs, RouteInputs, RouteOutputs, RoutingSpec, ScoringFunc, Tensor,
    TopkMethod, contiguous_ranks,
};

const T: usize = 24;
const H: usize = 512;
const E: usize = 256;
const K: usize = 8;
/// Row stride of the output windows: an engine's buffers are often wider than `K`.
const ROW: usize = K + 3;

fn backend(test: &str) -> Option<RocmBackend> {
    match RocmBackend::new(0) {
        Ok(backend) => Some(backend),
        Err(error) if std::env::var_os("SLUICE_REQUIRE_ROCM").is_some() => {
            panic!("{test}: SLUICE_REQUIRE_ROCM is set but the ROCm backend failed: {error}")
        }
        Err(error) => {
            // Written past the test harness's capture, so the skip is visible in every run.
            let _ = writeln!(std::io::stderr(), "SKIPPED {test}: no AMD GPU ({error})");
            None
        }
    }
}

/// The call's execution on `stream` (of device 0, where these tests run).
///
/// # Safety
///
/// The stream must outlive every call made with the execution, and the buffers those calls
/// touch must stay alive until the stream has been synchronised.
unsafe fn on_stream(stream: &HipStream) -> Execution {
    // SAFETY: the stream belongs to device 0; the caller keeps the rest.
    Execution::Stream(unsafe { DeviceStream::new(Device::Rocm(0), stream.raw() as usize) }.unwrap())
}

fn values(seed: u32, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let v = (i as u32).wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(0x9e37_79b9);
            let v = v.wrapping_mul(0x85eb_ca6b) ^ (v >> 13);
            ((v >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * scale
        })
        .collect()
}

/// A device buffer of the test (the engine's memory in real life) and DLPack descriptors of it.
struct Buffer {
    device: Arc<RocmDevice>,
    ptr: *mut c_void,
    bytes: usize,
    shape: Vec<i64>,
    strides: Vec<i64>,
    dtype: DLDataType,
}

impl Buffer {
    fn new(
        stream: &HipStream,
        bytes: usize,
        shape: &[usize],
        strides: &[usize],
        dtype: DLDataType,
    ) -> Self {
        let device = Arc::clone(stream.device());
        let (runtime, mut ptr) = (device.runtime(), std::ptr::null_mut());
        // SAFETY: writes one device address into `ptr`; freed on drop.
        let status = unsafe { (runtime.api().hipMalloc)(&mut ptr, bytes) };
        runtime.check("hipMalloc", status).unwrap();
        // SAFETY: `ptr` addresses the `bytes` just allocated.
        let status = unsafe { (runtime.api().hipMemsetAsync)(ptr, 0, bytes, stream.raw()) };
        runtime.check("hipMemsetAsync", status).unwrap();
        stream.synchronize().unwrap();
        Buffer {
            device,
            ptr,
            bytes,
            shape: shape.iter().map(|&d| d as i64).collect(),
            strides: strides.iter().map(|&s| s as i64).collect(),
            dtype,
        }
    }

    fn descriptor(&mut self) -> DLTensor {
        DLTensor {
            data: self.ptr,
            device: DLDevice { device_type: DLDeviceType::ROCM, device_id: 0 },
            ndim: self.shape.len() as i32,
            dtype: self.dtype,
            shape: self.shape.as_mut_ptr(),
            strides: self.strides.as_mut_ptr(),
            byte_offset: 0,
        }
    }

    /// Copies `bytes` (at most the buffer's size) into it on `stream`, and waits.
    fn write(&self, stream: &HipStream, bytes: &[u8]) {
        assert!(bytes.len() <= self.bytes);
        let runtime = self.device.runtime();
        // SAFETY: the buffer holds at least `bytes.len()` bytes; the stream is synchronised
        // before `bytes` can go away.
        let status = unsafe {
            (runtime.api().hipMemcpyHtoDAsync)(
                self.ptr,
                bytes.as_ptr().cast(),
                bytes.len(),
                stream.raw(),
            )
        };
        runtime.check("hipMemcpyHtoDAsync", status).unwrap();
        stream.synchronize().unwrap();
    }

    /// The buffer's 4-byte values (i32 or f32 bits), after the stream's work.
    fn read(&self, stream: &HipStream) -> Vec<[u8; 4]> {
        let mut bytes = vec![0u8; self.bytes];
        let runtime = self.device.runtime();
        // SAFETY: the buffer holds `bytes.len()` bytes; the stream is synchronised before they
        // are read.
        let status = unsafe {
            (runtime.api().hipMemcpyDtoHAsync)(
                bytes.as_mut_ptr().cast(),
                self.ptr,
                bytes.len(),
                stream.raw(),
            )
        };
        runtime.check("hipMemcpyDtoHAsync", status).unwrap();
        stream.synchronize().unwrap();
        bytes.chunks_exact(4).map(|b| [b[0], b[1], b[2], b[3]]).collect()
    }

    fn read_i32(&self, stream: &HipStream) -> Vec<i32> {
        self.read(stream).into_iter().map(i32::from_le_bytes).collect()
    }

    fn read_f32(&self, stream: &HipStream) -> Vec<f32> {
        self.read(stream).into_iter().map(f32::from_le_bytes).collect()
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `hipMalloc` and is freed once; every stream that used it was
        // synchronised before the test let go of it.
        let _ = unsafe { (self.device.runtime().api().hipFree)(self.ptr) };
    }
}

fn spec() -> RoutingSpec {
    // DeepSeek-V3's routing, one of the configs embedded for AMD.
    RoutingSpec::builder(E, K)
        .scoring(ScoringFunc::Sigmoid)
        .method(TopkMethod::NoauxTc)
        .groups(8, 4)
        .norm_topk_prob(true)
        .routed_scaling_factor(2.5)
        .non_finite(NonFinitePolicy::MarkInvalid)
        .build()
        .unwrap()
}

#[test]
fn a_gate_that_requires_grad_is_captured_in_a_hip_graph_and_replayed() {
    let test = "a_gate_that_requires_grad_is_captured_in_a_hip_graph_and_replayed";
    let Some(backend) = backend(test) else {
        return;
    };
    let spec = spec();
    // Parameters as a training framework holds them: requiring grad.
    let w: Vec<bf16> = values(1, E * H, 0.2).into_iter().map(bf16::from_f32).collect();
    let weight = Tensor::from_vec(w.clone(), &[E, H]).unwrap().with_requires_grad(true);
    let bias_values = values(2, E, 0.1);
    let bias = Tensor::from_vec(bias_values.clone(), &[E]).unwrap();
    // The gate detaches at the backend boundary (a storage-sharing O(1) view).
    let prepared = backend
        .prepare(&weight.detach().to_dlpack().unwrap(), Some(&bias.to_dlpack().unwrap()), &spec)
        .unwrap();
    prepared.warm_up(T).unwrap();

    let stream = HipStream::new(Arc::clone(backend.rocm_device())).unwrap();
    let mut hidden = Buffer::new(&stream, T * H * 2, &[T, H], &[H, 1], DLDataType::BF16);
    let mut ids = Buffer::new(&stream, T * ROW * 4, &[T, K], &[ROW, 1], DLDataType::I32);
    let mut weights = Buffer::new(&stream, T * ROW * 4, &[T, K], &[ROW, 1], DLDataType::F32);
    let mut status = Buffer::new(&stream, 8, &[2], &[1], DLDataType::I32);
    let bytes = prepared.workspace_bytes(T);
    assert!(bytes > 0);
    let mut workspace = Buffer::new(&stream, bytes, &[bytes], &[1], DLDataType::U8);

    let (hidden_dl, mut ids_dl, mut weights_dl, mut status_dl, mut workspace_dl) = (
        hidden.descriptor(),
        ids.descriptor(),
        weights.descriptor(),
        status.descriptor(),
        workspace.descriptor(),
    );
    // SAFETY: every descriptor points at a live device buffer of the test with its shape and
    // strides, and nothing else touches those buffers while the views are alive.
    let (inputs, mut outputs) = unsafe {
        (
            RouteInputs::new(DlpackView::from_raw(&hidden_dl).unwrap()),
            RouteOutputs::new(
                DlpackViewMut::from_raw(&mut ids_dl).unwrap(),
                DlpackViewMut::from_raw(&mut weights_dl).unwrap(),
            )
            .with_status(DlpackViewMut::from_raw(&mut status_dl).unwrap())
            .with_workspace(DlpackViewMut::from_raw(&mut workspace_dl).unwrap()),
        )
    };
    // SAFETY: the stream lives to the end of the test; the buffers outlive every use of it, and
    // are read back after synchronising.
    let execution = unsafe { on_stream(&stream) };

    // The same gate with the error policy, which needs the host and so is refused on a stream.
    let mut strict_spec = spec;
    strict_spec.non_finite = NonFinitePolicy::Error;
    let strict = backend
        .prepare(
            &weight.detach().to_dlpack().unwrap(),
            Some(&bias.to_dlpack().unwrap()),
            &strict_spec,
        )
        .unwrap();

    stream.begin_capture().unwrap();
    prepared.route_into(&inputs, &mut outputs, execution).unwrap();
    // The original bug: a raw export of a parameter in the middle of a capture. The bridge refuses
    // it with its error, nothing is enqueued, and the capture is still alive.
    assert_eq!(weight.to_dlpack().err(), Some(DlpackError::RequiresGrad));
    let activations =
        Tensor::from_vec(vec![bf16::ONE; 4], &[2, 2]).unwrap().with_requires_grad(true);
    assert_eq!(activations.to_dlpack().err(), Some(DlpackError::RequiresGrad));
    // A refused call inside the capture leaves it intact too.
    assert!(matches!(
        strict.route_into(&inputs, &mut outputs, execution),
        Err(BackendError::PolicyNeedsHost { .. })
    ));
    assert_eq!(stream.capture_status().unwrap(), CaptureStatus::Active);
    let graph = stream.end_capture().unwrap();
    assert_eq!(stream.capture_status().unwrap(), CaptureStatus::None);

    let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
    for round in 0..3u32 {
        // New activations in the same buffer, as the engine's next step would have; one NaN row
        // in the last round, which mark-invalid routes to -1 / 0.
        let mut x: Vec<bf16> =
            values(10 + round, T * H, 2.0).into_iter().map(bf16::from_f32).collect();
        if round == 2 {
            x[5 * H + 7] = bf16::NAN;
        }
        let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        hidden.write(&stream, &bytes);
        graph.launch(&stream).unwrap();
        let got_ids = ids.read_i32(&stream);
        let got_weights = weights.read_f32(&stream);
        let got_status = status.read_i32(&stream);
        let window = |v: &[i32]| v.chunks(ROW).flat_map(|r| r[..K].to_vec()).collect::<Vec<_>>();
        let ours_weights: Vec<f32> =
            got_weights.chunks(ROW).flat_map(|r| r[..K].to_vec()).collect();
        let ours = Routing::new(T, K, window(&got_ids), ours_weights).unwrap();
        // The columns past K of each row are not the call's to write.
        assert!(got_ids.chunks(ROW).all(|r| r[K..].iter().all(|&v| v == 0)), "round {round}");

        let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        let logits = reference::router_logits(&xf, &wf, T, H, E).unwrap();
        let expected = reference::route(&logits, T, Some(&bias_values), &spec).unwrap();
        let ties = reference::near_tie_rows(&logits, T, Some(&bias_values), &spec, 1e-4).unwrap();
        reference::compare_routings(&expected, &ours, E, &ties, Tolerance { abs: 1e-5, rel: 1e-5 })
            .unwrap_or_else(|err| panic!("replay {round}: {err}"));
        let expected_status = if round == 2 { [1, 5] } else { [0, -1] };
        assert_eq!(got_status, expected_status, "replay {round}");
    }
}

#[test]
fn a_config_that_was_not_compiled_ahead_of_time_is_refused_by_name() {
    let Some(backend) = backend("a_config_that_was_not_compiled_ahead_of_time_is_refused_by_name")
    else {
        return;
    };
    let spec = RoutingSpec::builder(128, 4)
        .scoring(ScoringFunc::Sigmoid)
        .method(TopkMethod::NoauxTc)
        .groups(4, 2)
        .norm_topk_prob(true)
        .build()
        .unwrap();
    let weight = Tensor::from_vec(vec![0f32; 128 * 64], &[128, 64]).unwrap();
    let error = backend.prepare(&weight.to_dlpack().unwrap(), None, &spec).unwrap_err();
    let message = error.to_string();
    assert!(message.contains("deepseek_v3") && message.contains("kimi_k2"), "{message}");
}

/// The buffers of one dispatch layout on the device, contiguous, padded to `BLOCK` and split over
/// `RANKS` ranks, in the order `DispatchLayout` lists them.
struct DeviceLayout {
    /// counts, offsets, sorted pairs, inverse `[T, K]`, invalid.
    main: [Buffer; 5],
    /// padded pairs, block experts, padded total.
    padded: [Buffer; 3],
    /// rank counts, offsets, pairs, tokens.
    ranks: [Buffer; 4],
    workspace: Buffer,
}

const BLOCK: usize = 64;
const RANKS: usize = 8;

impl DeviceLayout {
    fn new(stream: &HipStream, shape: DispatchShape, workspace_bytes: usize) -> Self {
        let i32s = |dims: &[usize]| {
            let strides: Vec<usize> = if dims.len() == 2 { vec![dims[1], 1] } else { vec![1] };
            let bytes = dims.iter().product::<usize>() * 4;
            Buffer::new(stream, bytes.max(4), dims, &strides, DLDataType::I32)
        };
        let (t, k, e) = (shape.tokens, shape.top_k, shape.experts);
        let capacity = shape.padded_capacity(BLOCK).unwrap();
        let bytes = workspace_bytes.max(1);
        DeviceLayout {
            main: [i32s(&[e]), i32s(&[e + 1]), i32s(&[t * k]), i32s(&[t, k]), i32s(&[2])],
            padded: [i32s(&[capacity]), i32s(&[capacity / BLOCK]), i32s(&[1])],
            ranks: [i32s(&[RANKS]), i32s(&[RANKS + 1]), i32s(&[t * k]), i32s(&[RANKS])],
            workspace: Buffer::new(stream, bytes, &[bytes], &[1], DLDataType::U8),
        }
    }

    /// Enqueues `dispatch_into` of `ids` with rank table `table` into these buffers.
    fn enqueue(
        &mut self,
        router: &dyn PreparedRouter,
        ids: &mut Buffer,
        table: &mut Buffer,
        execution: Execution,
    ) -> Result<(), BackendError> {
        let (ids_dl, table_dl) = (ids.descriptor(), table.descriptor());
        let mut main = self.main.each_mut().map(|b| b.descriptor());
        let mut padded = self.padded.each_mut().map(|b| b.descriptor());
        let mut ranks = self.ranks.each_mut().map(|b| b.descriptor());
        let mut workspace = self.workspace.descriptor();
        // SAFETY: every descriptor points at a live device buffer of the test with its shape and
        // strides; the views end with this call, and nothing else touches the buffers meanwhile.
        unsafe {
            let view_mut = |d: &mut DLTensor| DlpackViewMut::from_raw(d).unwrap();
            let inputs = DispatchInputs::new(DlpackView::from_raw(&ids_dl).unwrap())
                .with_expert_ranks(DlpackView::from_raw(&table_dl).unwrap());
            let [counts, offsets, sorted, inverse, invalid] = &mut main;
            let [pairs, blocks, total] = &mut padded;
            let [rank_counts, rank_offsets, rank_pairs, rank_tokens] = &mut ranks;
            let mut outputs = DispatchOutputs::new(
                view_mut(counts),
                view_mut(offsets),
                view_mut(sorted),
                view_mut(inverse),
            )
            .with_invalid(view_mut(invalid))
            .with_workspace(view_mut(&mut workspace))
            .with_padding(PaddedOutputs {
                block_size: BLOCK,
                padded_pairs: view_mut(pairs),
                block_experts: view_mut(blocks),
                padded_total: view_mut(total),
            })
            .with_ranks(RankOutputs {
                rank_counts: view_mut(rank_counts),
                rank_offsets: view_mut(rank_offsets),
                rank_pairs: view_mut(rank_pairs),
                rank_tokens: view_mut(rank_tokens),
            });
            router.dispatch_into(&inputs, &mut outputs, execution)
        }
    }

    /// Every output, read back after the stream's work.
    fn read(&self, stream: &HipStream) -> DispatchLayout {
        let [counts, offsets, sorted, inverse, invalid] =
            self.main.each_ref().map(|b| b.read_i32(stream));
        let [pairs, blocks, total] = self.padded.each_ref().map(|b| b.read_i32(stream));
        let [rank_counts, rank_offsets, rank_pairs, rank_tokens] =
            self.ranks.each_ref().map(|b| b.read_i32(stream));
        DispatchLayout {
            expert_counts: counts,
            expert_offsets: offsets,
            sorted_pairs: sorted,
            inverse,
            invalid: [invalid[0], invalid[1]],
            padded: Some(PaddedLayout {
                block_size: BLOCK,
                padded_pairs: pairs,
                block_experts: blocks,
                padded_total: total[0],
            }),
            ranks: Some(RankLayout { rank_counts, rank_offsets, rank_pairs, rank_tokens }),
        }
    }
}

#[test]
fn route_into_and_dispatch_into_are_captured_in_a_hip_graph_and_replayed() {
    let test = "route_into_and_dispatch_into_are_captured_in_a_hip_graph_and_replayed";
    let Some(backend) = backend(test) else {
        return;
    };
    // 2048 tokens of 8 picks: the many-block path, both layout kernels and the rank tokens in the
    // graph, after the gate that writes the ids they read.
    let tokens = 2048;
    let spec = spec();
    let w: Vec<bf16> = values(3, E * H, 0.2).into_iter().map(bf16::from_f32).collect();
    let weight = Tensor::from_vec(w, &[E, H]).unwrap();
    let prepared = backend.prepare(&weight.to_dlpack().unwrap(), None, &spec).unwrap();
    let shape = DispatchShape { tokens, top_k: K, experts: E };
    assert!(prepared.dispatch_workspace_bytes(tokens) > 0, "the many-block path");

    let stream = HipStream::new(Arc::clone(backend.rocm_device())).unwrap();
    let mut hidden = Buffer::new(&stream, tokens * H * 2, &[tokens, H], &[H, 1], DLDataType::BF16);
    let mut ids = Buffer::new(&stream, tokens * K * 4, &[tokens, K], &[K, 1], DLDataType::I32);
    let mut weights = Buffer::new(&stream, tokens * K * 4, &[tokens, K], &[K, 1], DLDataType::F32);
    let bytes = prepared.workspace_bytes(tokens);
    let mut route_workspace = Buffer::new(&stream, bytes, &[bytes], &[1], DLDataType::U8);
    let mut table = Buffer::new(&stream, E * 4, &[E], &[1], DLDataType::I32);
    let mut expert_ranks = vec![0i32; E];
    contiguous_ranks(&mut expert_ranks, RANKS);
    let table_bytes: Vec<u8> = expert_ranks.iter().flat_map(|r| r.to_le_bytes()).collect();
    table.write(&stream, &table_bytes);
    let mut layout = DeviceLayout::new(&stream, shape, prepared.dispatch_workspace_bytes(tokens));
    // SAFETY: the stream lives to the end of the test; the buffers outlive every use of it, and
    // are read back after synchronising.
    let execution = unsafe { on_stream(&stream) };

    stream.begin_capture().unwrap();
    let (hidden_dl, mut ids_dl, mut weights_dl, mut workspace_dl) =
        (hidden.descriptor(), ids.descriptor(), weights.descriptor(), route_workspace.descriptor());
    // SAFETY: as in `DeviceLayout::enqueue`, for the gate's buffers.
    let routed = unsafe {
        let inputs = RouteInputs::new(DlpackView::from_raw(&hidden_dl).unwrap());
        let mut outputs = RouteOutputs::new(
            DlpackViewMut::from_raw(&mut ids_dl).unwrap(),
            DlpackViewMut::from_raw(&mut weights_dl).unwrap(),
        )
        .with_workspace(DlpackViewMut::from_raw(&mut workspace_dl).unwrap());
        prepared.route_into(&inputs, &mut outputs, execution)
    };
    let laid_out = layout.enqueue(&prepared, &mut ids, &mut table, execution);
    let graph = stream.end_capture().unwrap();
    routed.unwrap();
    laid_out.unwrap();

    let map = RankMap { expert_ranks: &expert_ranks, ranks: RANKS };
    for round in 0..3u32 {
        // New hidden states in the same buffer; one NaN row in the last round, which mark-invalid
        // routes to -1 and the layout skips and counts.
        let mut x: Vec<bf16> =
            values(20 + round, tokens * H, 2.0).into_iter().map(bf16::from_f32).collect();
        if round == 2 {
            x[9 * H] = bf16::NAN;
        }
        let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        hidden.write(&stream, &bytes);
        graph.launch(&stream).unwrap();
        let got_ids = ids.read_i32(&stream);
        let got = layout.read(&stream);
        let expected = reference::dispatch(&got_ids, shape, Some(BLOCK), Some(map)).unwrap();
        assert_eq!(got, expected, "replay {round}");
        let invalid_rows = if round == 2 { [1, 9] } else { [0, -1] };
        assert_eq!(got.invalid, invalid_rows, "replay {round}");
    }
}

#[test]
fn the_gate_dispatches_host_routings_on_the_device() {
    let Some(backend) = backend("the_gate_dispatches_host_routings_on_the_device") else {
        return;
    };
    let spec = spec();
    let w: Vec<bf16> = values(4, E * H, 0.2).into_iter().map(bf16::from_f32).collect();
    let weight = Tensor::from_vec(w, &[E, H]).unwrap();
    let router = backend.prepare(&weight.to_dlpack().unwrap(), None, &spec).unwrap();
    let gate = PreparedGate::from_router(0, "rocm", Box::new(router));
    let mut table = vec![0i32; E];
    contiguous_ranks(&mut table, 4);
    let map = RankMap { expert_ranks: &table, ranks: 4 };
    // 3000 tokens of 8 picks take the many-block path, with the workspace `dispatch` makes.
    for tokens in [1, 5, 3000] {
        let hidden = Tensor::from_vec(values(30 + tokens as u32, tokens * H, 2.0), &[tokens, H]);
        let routing = gate.route(&hidden.unwrap()).unwrap();
        let ids = routing.ids().to_vec::<i32>().unwrap();
        let shape = DispatchShape { tokens, top_k: K, experts: E };
        let got = gate.dispatch(&routing, Some(16), Some(map)).unwrap();
        let expected = reference::dispatch(&ids, shape, Some(16), Some(map)).unwrap();
        assert_eq!(got, expected, "T={tokens}");
    }
}

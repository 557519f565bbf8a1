//! The engine's call on a real stream: `route_into` into caller-owned device buffers (windows of
//! larger buffers), captured in a CUDA graph on a non-default stream and replayed; and the
//! original bug on this backend: a gate whose weight and hidden states require grad.
//!
//! Skips with a message where no CUDA device is found, unless `SLUICE_REQUIRE_GPU` is set.

use std::io::Write;
use std::sync::Arc;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode, CUstreamCaptureStatus};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use dlpark::ffi::{DLDataType, DLDevice, DLDeviceType, DLTensor};
use half::bf16;
use sluice_backend_cuda::CudaBackend;
use sluice_models::reference::{self, Routing, Tolerance};
use sluice_tensor::{
    BackendError, Device, DeviceStream, DlpackError, DlpackView, DlpackViewMut, Execution,
    NonFinitePolicy, PreparedRouter, RouteInputs, RouteOutputs, RoutingSpec, ScoringFunc, Tensor,
    TopkMethod,
};

const T: usize = 24;
const H: usize = 512;
const E: usize = 256;
const K: usize = 8;
/// Row stride of the output windows: an engine's buffers are often wider than `K`.
const ROW: usize = K + 3;

fn backend(test: &str) -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(backend) => Some(backend),
        Err(error) if std::env::var_os("SLUICE_REQUIRE_GPU").is_some() => {
            panic!("{test}: SLUICE_REQUIRE_GPU is set but the CUDA backend failed: {error}")
        }
        Err(error) => {
            // Written past the test harness's capture, so the skip is visible in every run.
            let _ = writeln!(std::io::stderr(), "SKIPPED {test}: no CUDA device ({error})");
            None
        }
    }
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
    memory: CudaSlice<u8>,
    shape: Vec<i64>,
    strides: Vec<i64>,
    dtype: DLDataType,
}

impl Buffer {
    fn new(
        stream: &Arc<CudaStream>,
        bytes: usize,
        shape: &[usize],
        strides: &[usize],
        dtype: DLDataType,
    ) -> Self {
        Buffer {
            memory: stream.alloc_zeros::<u8>(bytes).unwrap(),
            shape: shape.iter().map(|&d| d as i64).collect(),
            strides: strides.iter().map(|&s| s as i64).collect(),
            dtype,
        }
    }

    fn address(&self, stream: &CudaStream) -> u64 {
        self.memory.device_ptr(stream).0
    }

    fn descriptor(&mut self, stream: &CudaStream) -> DLTensor {
        DLTensor {
            data: self.address(stream) as *mut std::ffi::c_void,
            device: DLDevice { device_type: DLDeviceType::CUDA, device_id: 0 },
            ndim: self.shape.len() as i32,
            dtype: self.dtype,
            shape: self.shape.as_mut_ptr(),
            strides: self.strides.as_mut_ptr(),
            byte_offset: 0,
        }
    }
}

fn spec() -> RoutingSpec {
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
fn a_gate_that_requires_grad_is_captured_in_a_graph_and_replayed() {
    let Some(backend) = backend("a_gate_that_requires_grad_is_captured_in_a_graph_and_replayed")
    else {
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

    let ctx = CudaContext::new(0).unwrap();
    // SAFETY: before this test allocates anything on the context; the test orders its work by
    // stream order and synchronisation.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream().unwrap();
    let mut hidden = Buffer::new(&stream, T * H * 2, &[T, H], &[H, 1], DLDataType::BF16);
    let mut ids = Buffer::new(&stream, T * ROW * 4, &[T, K], &[ROW, 1], DLDataType::I32);
    let mut weights = Buffer::new(&stream, T * ROW * 4, &[T, K], &[ROW, 1], DLDataType::F32);
    let mut status = Buffer::new(&stream, 8, &[2], &[1], DLDataType::I32);
    let bytes = prepared.workspace_bytes(T);
    assert!(bytes > 0);
    let mut workspace = Buffer::new(&stream, bytes, &[bytes], &[1], DLDataType::U8);

    let (hidden_dl, mut ids_dl, mut weights_dl, mut status_dl, mut workspace_dl) = (
        hidden.descriptor(&stream),
        ids.descriptor(&stream),
        weights.descriptor(&stream),
        status.descriptor(&stream),
        workspace.descriptor(&stream),
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
    // SAFETY: the stream lives to the end of the test and belongs to device 0's primary context;
    // the buffers outlive every use of the stream, and are read back after synchronising.
    let execution = Execution::Stream(
        unsafe { DeviceStream::new(Device::Cuda(0), stream.cu_stream() as usize) }.unwrap(),
    );

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

    stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
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
    assert_eq!(
        stream.capture_status().unwrap(),
        CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE
    );
    let graph = stream
        .end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH)
        .unwrap()
        .expect("a captured graph");

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
        stream.memcpy_htod(&bytes, &mut hidden.memory).unwrap();
        graph.launch().unwrap();
        let got_ids = read_i32(&stream, &ids.memory);
        let got_weights = read_f32(&stream, &weights.memory);
        let got_status = read_i32(&stream, &status.memory);
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

/// The buffer's 4-byte values (i32 or f32 bits), after the stream's work.
fn read(stream: &Arc<CudaStream>, memory: &CudaSlice<u8>) -> Vec<[u8; 4]> {
    let bytes = stream.clone_dtoh(memory).unwrap();
    stream.synchronize().unwrap();
    bytes.chunks_exact(4).map(|b| [b[0], b[1], b[2], b[3]]).collect()
}

fn read_i32(stream: &Arc<CudaStream>, memory: &CudaSlice<u8>) -> Vec<i32> {
    read(stream, memory).into_iter().map(i32::from_le_bytes).collect()
}

fn read_f32(stream: &Arc<CudaStream>, memory: &CudaSlice<u8>) -> Vec<f32> {
    read(stream, memory).into_iter().map(f32::from_le_bytes).collect()
}

/// A hash-routed gate (DeepSeek-V4's first layers) on the engine's stream: the token ids are a
/// device input the graph reads at every replay. A row whose token id names no row of the table,
/// or whose logits are not finite, gets ids -1 and weights 0 and is counted in the status; the
/// other rows route like the reference. Both token id widths.
#[test]
fn a_hash_routed_gate_is_captured_with_its_token_ids_and_replayed() {
    let Some(backend) = backend("a_hash_routed_gate_is_captured_with_its_token_ids_and_replayed")
    else {
        return;
    };
    const HASH_K: usize = 6;
    const VOCAB: usize = 40;
    let spec = RoutingSpec::builder(E, HASH_K)
        .scoring(ScoringFunc::SqrtSoftplus)
        .method(TopkMethod::Hash)
        .norm_topk_prob(true)
        .routed_scaling_factor(1.5)
        .non_finite(NonFinitePolicy::MarkInvalid)
        .build()
        .unwrap();
    // Row r of the table: experts r, r + 7, r + 14, ... (mod E), distinct for K * 7 < E.
    let table: Vec<i32> =
        (0..VOCAB).flat_map(|r| (0..HASH_K).map(move |i| ((r + 7 * i) % E) as i32)).collect();
    let w: Vec<bf16> = values(3, E * H, 0.2).into_iter().map(bf16::from_f32).collect();
    let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
    let weight = Tensor::from_vec(w, &[E, H]).unwrap().to_dlpack().unwrap();
    let table_dl = Tensor::from_vec(table.clone(), &[VOCAB, HASH_K]).unwrap().to_dlpack().unwrap();
    let prepared = backend.prepare_hashed(&weight, &table_dl, &spec).unwrap();
    prepared.warm_up(T).unwrap();

    let ctx = CudaContext::new(0).unwrap();
    // SAFETY: before this test allocates anything on the context; the test orders its work by
    // stream order and synchronisation.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream().unwrap();
    for (id_bytes, id_dtype) in [(4, DLDataType::I32), (8, DLDataType::I64)] {
        let mut hidden = Buffer::new(&stream, T * H * 2, &[T, H], &[H, 1], DLDataType::BF16);
        let mut token_ids = Buffer::new(&stream, T * id_bytes, &[T], &[1], id_dtype);
        let mut ids = Buffer::new(&stream, T * ROW * 4, &[T, HASH_K], &[ROW, 1], DLDataType::I32);
        let mut weights =
            Buffer::new(&stream, T * ROW * 4, &[T, HASH_K], &[ROW, 1], DLDataType::F32);
        let mut status = Buffer::new(&stream, 8, &[2], &[1], DLDataType::I32);
        let bytes = prepared.workspace_bytes(T);
        let mut workspace = Buffer::new(&stream, bytes, &[bytes], &[1], DLDataType::U8);
        let (hidden_dl, token_ids_dl) = (hidden.descriptor(&stream), token_ids.descriptor(&stream));
        let (mut ids_dl, mut weights_dl, mut status_dl, mut workspace_dl) = (
            ids.descriptor(&stream),
            weights.descriptor(&stream),
            status.descriptor(&stream),
            workspace.descriptor(&stream),
        );
        // SAFETY: every descriptor points at a live device buffer of the test with its shape and
        // strides, and nothing else touches those buffers while the views are alive.
        let (without_ids, mut outputs) = unsafe {
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
        // SAFETY: as above, for the token ids.
        let inputs =
            without_ids.with_token_ids(unsafe { DlpackView::from_raw(&token_ids_dl) }.unwrap());
        // SAFETY: the stream lives to the end of the test and belongs to device 0's primary
        // context; the buffers outlive every use of the stream, and are read after synchronising.
        let execution = Execution::Stream(
            unsafe { DeviceStream::new(Device::Cuda(0), stream.cu_stream() as usize) }.unwrap(),
        );

        stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
        // Without its token ids the call is refused before anything is enqueued.
        assert!(matches!(
            prepared.route_into(&without_ids, &mut outputs, execution),
            Err(BackendError::MissingTokenIds { .. })
        ));
        prepared.route_into(&inputs, &mut outputs, execution).unwrap();
        let graph = stream
            .end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH)
            .unwrap()
            .expect("a captured graph");

        for round in 0..3u32 {
            let mut x: Vec<bf16> =
                values(20 + round, T * H, 2.0).into_iter().map(bf16::from_f32).collect();
            let mut tokens: Vec<i64> = values(30 + round, T, 1.0)
                .iter()
                .map(|v| ((v + 0.5) * VOCAB as f32) as i64)
                .collect();
            tokens.iter_mut().for_each(|t| *t = (*t).clamp(0, VOCAB as i64 - 1));
            // Round 1: token 7 past the table; round 2: a NaN in row 3 and token 9 negative.
            let outside: Vec<usize> = match round {
                1 => vec![7],
                2 => vec![9],
                _ => vec![],
            };
            if round == 1 {
                tokens[7] = VOCAB as i64;
            }
            if round == 2 {
                x[3 * H + 11] = bf16::NAN;
                tokens[9] = -1;
            }
            let x_bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
            stream.memcpy_htod(&x_bytes, &mut hidden.memory).unwrap();
            let id_bytes: Vec<u8> = if id_bytes == 4 {
                tokens.iter().flat_map(|&t| (t as i32).to_le_bytes()).collect()
            } else {
                tokens.iter().flat_map(|t| t.to_le_bytes()).collect()
            };
            stream.memcpy_htod(&id_bytes, &mut token_ids.memory).unwrap();
            graph.launch().unwrap();
            let got_ids = read_i32(&stream, &ids.memory);
            let got_weights = read_f32(&stream, &weights.memory);
            let got_status = read_i32(&stream, &status.memory);
            let context = format!("{id_dtype:?} ids, replay {round}");
            let window_ids: Vec<i32> =
                got_ids.chunks(ROW).flat_map(|r| r[..HASH_K].to_vec()).collect();
            let window_weights: Vec<f32> =
                got_weights.chunks(ROW).flat_map(|r| r[..HASH_K].to_vec()).collect();
            let ours = Routing::new(T, HASH_K, window_ids, window_weights).unwrap();
            // The reference refuses ids outside the table: its rows are routed with a valid id
            // in their place, then marked as the kernel marks them.
            let mut in_table = tokens.clone();
            outside.iter().for_each(|&row| in_table[row] = 0);
            let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
            let logits = reference::router_logits(&xf, &wf, T, H, E).unwrap();
            let (mut want_ids, mut want_weights) =
                reference::route_hashed(&logits, T, &table, &in_table, &spec).unwrap().into_parts();
            for &row in &outside {
                want_ids[row * HASH_K..(row + 1) * HASH_K].fill(-1);
                want_weights[row * HASH_K..(row + 1) * HASH_K].fill(0.0);
            }
            let expected = Routing::new(T, HASH_K, want_ids, want_weights).unwrap();
            let summary = reference::compare_routings(
                &expected,
                &ours,
                E,
                &[],
                Tolerance { abs: 1e-5, rel: 1e-5 },
            )
            .unwrap_or_else(|err| panic!("{context}: {err}"));
            // Round 2 also has the NaN row, which the reference marks itself.
            let invalid = outside.len() + usize::from(round == 2);
            assert_eq!(summary.rows_invalid, invalid, "{context}");
            assert_eq!(summary.rows_compared, T - invalid, "{context}");
            let expected_status = match round {
                0 => [0, -1],
                1 => [1, 7],
                _ => [2, 3],
            };
            assert_eq!(got_status, expected_status, "{context}");
        }
    }
}

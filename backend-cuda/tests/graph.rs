//! The engine's call on a real stream: `route_into` into caller-owned device buffers (windows of
//! larger buffers), captured in a CUDA graph on a non-default stream and replayed; and the
//! original bug on this backend: a gate whose weight and hidden states require grad.
//!
//! Skips with a message where no CUDA device is found, unless `SLUICE_REQUIRE_GPU` is set.

mod common;

use std::ops::Range;
use std::sync::Arc;

use common::{Buffer, RouteBuffers, backend, deepseek_v3_spec, on_stream, test_stream, values};
use cudarc::driver::CudaStream;
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode, CUstreamCaptureStatus};
use dlpark::ffi::DLDataType;
use half::bf16;
use sluice_models::reference::{self, Routing, Tolerance};
use sluice_tensor::{
    BackendError, DlpackError, DlpackView, NonFinitePolicy, PreparedRouter, RouteInputs,
    RoutingSpec, ScoringFunc, Tensor, TopkMethod,
};

const T: usize = 24;
const H: usize = 512;
const E: usize = 256;
const K: usize = 8;
/// Row stride of the output windows: an engine's buffers are often wider than `K`.
const ROW: usize = K + 3;

#[test]
fn a_gate_that_requires_grad_is_captured_in_a_graph_and_replayed() {
    let Some(backend) = backend("a_gate_that_requires_grad_is_captured_in_a_graph_and_replayed")
    else {
        return;
    };
    let spec = deepseek_v3_spec(E, K);
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

    let stream = test_stream(0);
    let mut hidden = Buffer::zeroed(&stream, T * H * 2, &[T, H], &[H, 1], DLDataType::BF16);
    let bytes = prepared.workspace_bytes(T);
    assert!(bytes > 0);
    let mut outputs = zeroed_outputs(&stream, K, bytes);
    let hidden_dl = hidden.descriptor(&stream);
    // SAFETY: the descriptor points at the test's live buffer of hidden states with its shape and
    // strides; the test writes it only between replays, on the same stream.
    let inputs = RouteInputs::new(unsafe { DlpackView::from_raw(&hidden_dl) }.unwrap());
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

    stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
    prepared.route_into(&inputs, &mut outputs.views(), execution).unwrap();
    // The original bug: a raw export of a parameter in the middle of a capture. The bridge refuses
    // it with its error, nothing is enqueued, and the capture is still alive.
    assert_eq!(weight.to_dlpack().err(), Some(DlpackError::RequiresGrad));
    let activations =
        Tensor::from_vec(vec![bf16::ONE; 4], &[2, 2]).unwrap().with_requires_grad(true);
    assert_eq!(activations.to_dlpack().err(), Some(DlpackError::RequiresGrad));
    // A refused call inside the capture leaves it intact too.
    assert!(matches!(
        strict.route_into(&inputs, &mut outputs.views(), execution),
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
        let got_ids = outputs.ids.read(&stream);
        let got_weights = f32s(outputs.weights.read(&stream));
        let got_status = outputs.status.read(&stream);
        let ours =
            Routing::new(T, K, columns(&got_ids, ROW, 0..K), columns(&got_weights, ROW, 0..K))
                .unwrap();
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

/// `route_into`'s outputs on `stream`'s device, all zero: ids and weights `[T, top_k]` in rows
/// [`ROW`] wide, a status and a workspace of `workspace_bytes`.
fn zeroed_outputs(stream: &Arc<CudaStream>, top_k: usize, workspace_bytes: usize) -> RouteBuffers {
    let window = |dtype| Buffer::zeroed(stream, T * ROW * 4, &[T, top_k], &[ROW, 1], dtype);
    RouteBuffers::new(
        stream,
        window(DLDataType::I32),
        window(DLDataType::F32),
        Buffer::zeroed(stream, 8, &[2], &[1], DLDataType::I32),
        Buffer::zeroed(stream, workspace_bytes, &[workspace_bytes], &[1], DLDataType::U8),
    )
}

/// The `columns` of each `row_stride` values of `values`, row after row.
fn columns<T: Copy>(values: &[T], row_stride: usize, columns: Range<usize>) -> Vec<T> {
    values.chunks(row_stride).flat_map(|row| row[columns.clone()].iter().copied()).collect()
}

/// The f32 values of the bits a buffer read back.
fn f32s(bits: Vec<i32>) -> Vec<f32> {
    bits.into_iter().map(|b| f32::from_bits(b as u32)).collect()
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

    let stream = test_stream(0);
    for (id_bytes, id_dtype) in [(4, DLDataType::I32), (8, DLDataType::I64)] {
        let mut hidden = Buffer::zeroed(&stream, T * H * 2, &[T, H], &[H, 1], DLDataType::BF16);
        let mut token_ids = Buffer::zeroed(&stream, T * id_bytes, &[T], &[1], id_dtype);
        let mut outputs = zeroed_outputs(&stream, HASH_K, prepared.workspace_bytes(T));
        let (hidden_dl, token_ids_dl) = (hidden.descriptor(&stream), token_ids.descriptor(&stream));
        // SAFETY: the descriptor points at the test's live buffer of hidden states with its shape
        // and strides; the test writes it only between replays, on the same stream.
        let without_ids = RouteInputs::new(unsafe { DlpackView::from_raw(&hidden_dl) }.unwrap());
        // SAFETY: as above, for the token ids.
        let token_ids_view = unsafe { DlpackView::from_raw(&token_ids_dl) }.unwrap();
        let inputs = without_ids.with_token_ids(token_ids_view);
        // SAFETY: the stream lives to the end of the test; the buffers outlive every use of it,
        // and are read after synchronising.
        let execution = unsafe { on_stream(&stream) };

        stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
        // Without its token ids the call is refused before anything is enqueued.
        assert!(matches!(
            prepared.route_into(&without_ids, &mut outputs.views(), execution),
            Err(BackendError::MissingTokenIds { .. })
        ));
        prepared.route_into(&inputs, &mut outputs.views(), execution).unwrap();
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
            let got_ids = outputs.ids.read(&stream);
            let got_weights = f32s(outputs.weights.read(&stream));
            let got_status = outputs.status.read(&stream);
            let context = format!("{id_dtype:?} ids, replay {round}");
            let window_ids = columns(&got_ids, ROW, 0..HASH_K);
            let window_weights = columns(&got_weights, ROW, 0..HASH_K);
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

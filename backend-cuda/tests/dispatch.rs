//! The dispatch layout on the GPU against the scalar reference: `dispatch_into` on a stream into
//! device windows, on random configs, every T of the issue and beyond (one-block and many-block
//! paths), invalid rows and stray ids, block sizes 1 to 128, contiguous and explicit rank maps;
//! every output checked entry for entry and against the layout's invariants. Then the host
//! convenience through `PreparedGate::dispatch`; `route_and_dispatch_into` (the layout inside
//! routing for decode batches) against `route_into` then `dispatch_into`, on model configs with a
//! row of NaN; and CUDA graphs of both forms, replayed, against the same calls made eagerly.
//!
//! Skips with a message where no CUDA device is found, unless `SLUICE_REQUIRE_GPU` is set.

mod common;

use std::sync::Arc;

use common::{Buffer, MARKER, backend, deepseek_v3_spec, marker_bytes, on_stream, test_stream};
use cudarc::driver::CudaStream;
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use dlpark::ffi::{DLDataType, DLTensor};
use half::bf16;
use sluice_backend_cuda::{CudaBackend, CudaPreparedRouter};
use sluice_models::PreparedGate;
use sluice_models::reference::{self, DispatchLayout, PaddedLayout, RankLayout, RankMap};
use sluice_tensor::{
    BackendError, DispatchInputs, DispatchOutputs, DispatchShape, DlpackView, DlpackViewMut,
    NonFinitePolicy, PaddedOutputs, PreparedRouter, RankOutputs, RouteInputs, RouteOutputs,
    RoutingSpec, ScoringFunc, Tensor, TopkMethod, contiguous_ranks,
};

/// xorshift64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn greedy_spec(experts: usize, top_k: usize) -> RoutingSpec {
    RoutingSpec::builder(experts, top_k)
        .scoring(ScoringFunc::Softmax)
        .method(TopkMethod::Greedy)
        .groups(1, 1)
        .norm_topk_prob(false)
        .routed_scaling_factor(1.0)
        .non_finite(NonFinitePolicy::MarkInvalid)
        .build()
        .unwrap()
}

/// A router of `spec` (the weight does not matter to the layout).
fn router(backend: &CudaBackend, spec: &RoutingSpec) -> CudaPreparedRouter {
    let h = 64;
    let weight =
        Tensor::from_vec(vec![bf16::ZERO; spec.num_experts * h], &[spec.num_experts, h]).unwrap();
    backend.prepare(&weight.to_dlpack().unwrap(), None, spec).unwrap()
}

/// The buffers of the dispatch tests: i32 outputs and inputs filled with the marker, and zeroed
/// workspaces.
impl Buffer {
    /// An i32 buffer `[rows, cols]` with rows `row_stride` apart, or one-dimensional, filled with
    /// the marker so that a position the call fails to write shows.
    fn i32(stream: &Arc<CudaStream>, shape: &[usize], row_stride: usize) -> Self {
        let (elements, strides) = match shape {
            [rows, _] => (rows * row_stride, vec![row_stride, 1]),
            _ => (shape.iter().product(), vec![1]),
        };
        Buffer::new(stream, &marker_bytes(elements.max(1)), shape, &strides, DLDataType::I32)
    }

    /// A zeroed workspace of `bytes`, at least 16.
    fn workspace(stream: &Arc<CudaStream>, bytes: usize) -> Self {
        let bytes = bytes.max(16);
        Buffer::zeroed(stream, bytes, &[bytes], &[1], DLDataType::U8)
    }

    fn write(&mut self, stream: &Arc<CudaStream>, values: &[i32]) {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        stream.memcpy_htod(&bytes, &mut self.memory.slice_mut(..bytes.len())).unwrap();
    }

    /// The logical elements (rows without their padding), after the stream's work.
    fn elements(&self, stream: &Arc<CudaStream>) -> Vec<i32> {
        let all = self.read(stream);
        match self.shape[..] {
            [rows, cols] => (0..rows as usize)
                .flat_map(|r| {
                    let start = r * self.strides[0] as usize;
                    all[start..start + cols as usize].to_vec()
                })
                .collect(),
            [len] => all[..len as usize].to_vec(),
            _ => unreachable!(),
        }
    }
}

/// The device buffers of one dispatch and its descriptors.
struct DeviceLayout {
    ids: Buffer,
    table: Option<Buffer>,
    counts: Buffer,
    offsets: Buffer,
    sorted: Buffer,
    inverse: Buffer,
    invalid: Buffer,
    padded: Option<(usize, [Buffer; 3])>,
    ranks: Option<[Buffer; 4]>,
    workspace: Buffer,
}

/// Extra columns of the `[T, K]` windows: an engine's buffers are often wider than `K`.
const EXTRA_COLUMNS: usize = 3;

impl DeviceLayout {
    fn new(
        stream: &Arc<CudaStream>,
        router: &CudaPreparedRouter,
        shape: DispatchShape,
        block_size: Option<usize>,
        ranks: Option<usize>,
    ) -> Self {
        let (t, k, e) = (shape.tokens, shape.top_k, shape.experts);
        let row = k + EXTRA_COLUMNS;
        DeviceLayout {
            ids: Buffer::i32(stream, &[t, k], row),
            table: ranks.map(|_| Buffer::i32(stream, &[e], 1)),
            counts: Buffer::i32(stream, &[e], 1),
            offsets: Buffer::i32(stream, &[e + 1], 1),
            sorted: Buffer::i32(stream, &[t * k], 1),
            inverse: Buffer::i32(stream, &[t, k], row),
            invalid: Buffer::i32(stream, &[2], 1),
            padded: block_size.map(|block| {
                let capacity = shape.padded_capacity(block).unwrap();
                (
                    block,
                    [
                        Buffer::i32(stream, &[capacity], 1),
                        Buffer::i32(stream, &[capacity / block], 1),
                        Buffer::i32(stream, &[1], 1),
                    ],
                )
            }),
            ranks: ranks.map(|r| {
                [
                    Buffer::i32(stream, &[r], 1),
                    Buffer::i32(stream, &[r + 1], 1),
                    Buffer::i32(stream, &[t * k], 1),
                    Buffer::i32(stream, &[r], 1),
                ]
            }),
            workspace: Buffer::workspace(stream, router.dispatch_workspace_bytes(t)),
        }
    }

    /// Enqueues `dispatch_into` of the ids buffer on `stream`.
    fn enqueue(
        &mut self,
        stream: &Arc<CudaStream>,
        router: &CudaPreparedRouter,
    ) -> Result<(), BackendError> {
        // SAFETY: the test's stream lives to the end of the test; the buffers outlive its use and
        // are read after synchronising.
        let execution = unsafe { on_stream(stream) };
        self.with_views(stream, |inputs, outputs| router.dispatch_into(&inputs, outputs, execution))
    }

    /// Calls `call` with the ids (and rank table) and every output, as views of the buffers.
    fn with_views<R>(
        &mut self,
        stream: &Arc<CudaStream>,
        call: impl FnOnce(DispatchInputs<'_>, &mut DispatchOutputs<'_>) -> R,
    ) -> R {
        let ids = self.ids.descriptor(stream);
        let table = self.table.as_mut().map(|t| t.descriptor(stream));
        let mut mine = [
            self.counts.descriptor(stream),
            self.offsets.descriptor(stream),
            self.sorted.descriptor(stream),
            self.inverse.descriptor(stream),
            self.invalid.descriptor(stream),
            self.workspace.descriptor(stream),
        ];
        let mut padded = self.padded.as_mut().map(|(block, b)| {
            (*block, [b[0].descriptor(stream), b[1].descriptor(stream), b[2].descriptor(stream)])
        });
        let mut ranks = self.ranks.as_mut().map(|b| {
            [
                b[0].descriptor(stream),
                b[1].descriptor(stream),
                b[2].descriptor(stream),
                b[3].descriptor(stream),
            ]
        });
        // SAFETY: every descriptor points at a live device buffer of this test with its shape
        // and strides; the views end with this call, and only the call's kernels touch the
        // buffers until the test synchronises.
        unsafe {
            let view = |d: &DLTensor| DlpackView::from_raw(d).unwrap();
            let view_mut = |d: &mut DLTensor| DlpackViewMut::from_raw(d).unwrap();
            let mut inputs = DispatchInputs::new(view(&ids));
            if let Some(table) = &table {
                inputs = inputs.with_expert_ranks(view(table));
            }
            let [counts, offsets, sorted, inverse, invalid, workspace] = &mut mine;
            let mut outputs = DispatchOutputs::new(
                view_mut(counts),
                view_mut(offsets),
                view_mut(sorted),
                view_mut(inverse),
            )
            .with_invalid(view_mut(invalid))
            .with_workspace(view_mut(workspace));
            if let Some((block_size, [pairs, blocks, total])) = &mut padded {
                outputs = outputs.with_padding(PaddedOutputs {
                    block_size: *block_size,
                    padded_pairs: view_mut(pairs),
                    block_experts: view_mut(blocks),
                    padded_total: view_mut(total),
                });
            }
            if let Some([counts, offsets, pairs, tokens]) = &mut ranks {
                outputs = outputs.with_ranks(RankOutputs {
                    rank_counts: view_mut(counts),
                    rank_offsets: view_mut(offsets),
                    rank_pairs: view_mut(pairs),
                    rank_tokens: view_mut(tokens),
                });
            }
            call(inputs, &mut outputs)
        }
    }

    /// Every output, read back.
    fn read(&self, stream: &Arc<CudaStream>) -> DispatchLayout {
        let invalid = self.invalid.elements(stream);
        DispatchLayout {
            expert_counts: self.counts.elements(stream),
            expert_offsets: self.offsets.elements(stream),
            sorted_pairs: self.sorted.elements(stream),
            inverse: self.inverse.elements(stream),
            invalid: [invalid[0], invalid[1]],
            padded: self.padded.as_ref().map(|(block, [pairs, blocks, total])| PaddedLayout {
                block_size: *block,
                padded_pairs: pairs.elements(stream),
                block_experts: blocks.elements(stream),
                padded_total: total.elements(stream)[0],
            }),
            ranks: self.ranks.as_ref().map(|[counts, offsets, pairs, tokens]| RankLayout {
                rank_counts: counts.elements(stream),
                rank_offsets: offsets.elements(stream),
                rank_pairs: pairs.elements(stream),
                rank_tokens: tokens.elements(stream),
            }),
        }
    }
}

/// Rows of `K` distinct experts as routing writes them, some rows marked invalid (`-1`) and a
/// few stray ids outside `[-1, E)` in others.
fn random_ids(rng: &mut Rng, shape: DispatchShape, stray: bool) -> Vec<i32> {
    let (t, k, e) = (shape.tokens, shape.top_k, shape.experts);
    let mut ids = Vec::with_capacity(t * k);
    for _ in 0..t {
        let mut row: Vec<i32> = Vec::with_capacity(k);
        // Skewed: half the picks come from the first eighth of the experts, as real loads are.
        while row.len() < k {
            let pool = if rng.below(2) == 0 { e.div_ceil(8).max(k) } else { e };
            let id = rng.below(pool.min(e)) as i32;
            if !row.contains(&id) {
                row.push(id);
            }
        }
        match rng.below(40) {
            0 => row.fill(-1),
            1 if stray => row[rng.below(k)] = if rng.below(2) == 0 { e as i32 + 5 } else { -9 },
            _ => {}
        }
        ids.extend(row);
    }
    ids
}

/// What the device computes for ids with stray values: the reference of the same ids with every
/// skipped pair as `-1`, and the table with the entries of skipped experts made valid.
fn device_meaning(
    ids: &[i32],
    table: Option<&[i32]>,
    shape: DispatchShape,
    ranks: usize,
) -> Vec<i32> {
    ids.iter()
        .map(|&id| {
            let usable = usize::try_from(id).is_ok_and(|e| {
                e < shape.experts
                    && table.is_none_or(|t| usize::try_from(t[e]).is_ok_and(|r| r < ranks))
            });
            if usable { id } else { -1 }
        })
        .collect()
}

#[test]
fn dispatch_into_equals_the_reference_on_random_configs() {
    let Some(backend) = backend("dispatch_into_equals_the_reference_on_random_configs") else {
        return;
    };
    let stream = test_stream(0);
    let mut rng = Rng(0x5eed_d15a_7c11_0001);
    // (E, K): DeepSeek-V3, Kimi-K2, Mixtral, Qwen3-MoE, V2-Lite, odd and extreme ones.
    let configs = [(256, 8), (384, 8), (8, 2), (128, 8), (64, 6), (7, 3), (1024, 32), (1, 1)];
    for (case, &(experts, top_k)) in configs.iter().enumerate() {
        let spec = greedy_spec(experts, top_k);
        let router = router(&backend, &spec);
        for tokens in [0, 1, 7, 64, 300, 4096, 20_000] {
            let shape = DispatchShape { tokens, top_k, experts };
            let block_size = [None, Some(1), Some(16), Some(64), Some(128)][rng.below(5)];
            let ranks = match rng.below(3) {
                0 => None,
                _ => Some(1 + rng.below(8)),
            };
            let mut table = vec![0i32; experts];
            if let Some(r) = ranks {
                if rng.below(2) == 0 {
                    contiguous_ranks(&mut table, r);
                } else {
                    table.iter_mut().for_each(|rank| *rank = rng.below(r) as i32);
                    // A stray entry: its expert's pairs are skipped on the device.
                    if experts > 1 && rng.below(3) == 0 {
                        table[rng.below(experts)] = r as i32 + 2;
                    }
                }
            }
            let ids = random_ids(&mut rng, shape, true);
            let context = format!(
                "case {case}: E={experts} K={top_k} T={tokens} block={block_size:?} ranks={ranks:?}"
            );

            let mut device = DeviceLayout::new(&stream, &router, shape, block_size, ranks);
            let row = top_k + EXTRA_COLUMNS;
            let windowed: Vec<i32> = ids
                .chunks(top_k.max(1))
                .flat_map(|r| r.iter().copied().chain(std::iter::repeat_n(77, EXTRA_COLUMNS)))
                .collect();
            if tokens > 0 {
                device.ids.write(&stream, &windowed);
            }
            if let (Some(buffer), Some(_)) = (device.table.as_mut(), ranks) {
                buffer.write(&stream, &table);
            }
            device.enqueue(&stream, &router).unwrap_or_else(|e| panic!("{context}: {e}"));
            stream.synchronize().unwrap();
            let got = device.read(&stream);

            let r = ranks.unwrap_or(0);
            let meaning = device_meaning(&ids, ranks.map(|_| &table[..]), shape, r);
            let valid_table: Vec<i32> = table
                .iter()
                .map(|&rank| if (0..r as i32).contains(&rank) { rank } else { 0 })
                .collect();
            let map = ranks.map(|ranks| RankMap { expert_ranks: &valid_table, ranks });
            let expected = reference::dispatch(&meaning, shape, block_size, map).unwrap();
            assert_eq!(got, expected, "{context}");
            got.check_invariants(&meaning, shape, map).unwrap_or_else(|e| panic!("{context}: {e}"));
            // The columns past K of each window row are not the call's to write.
            for (position, value) in device.inverse.read(&stream).into_iter().enumerate() {
                if position % row >= top_k && position / row < tokens {
                    assert_eq!(value, MARKER, "{context}");
                }
            }
        }
    }
}

#[test]
fn a_refused_dispatch_writes_nothing() {
    let Some(backend) = backend("a_refused_dispatch_writes_nothing") else { return };
    let stream = test_stream(0);
    let spec = greedy_spec(256, 8);
    let router = router(&backend, &spec);
    let shape = DispatchShape { tokens: 2048, top_k: 8, experts: 256 };
    assert!(router.dispatch_workspace_bytes(2048) > 0, "the many-block path needs a workspace");
    let mut device = DeviceLayout::new(&stream, &router, shape, None, None);
    device.workspace = Buffer::workspace(&stream, 16);
    let refused = device.enqueue(&stream, &router);
    assert!(matches!(refused, Err(BackendError::WorkspaceTooSmall { .. })), "{refused:?}");
    stream.synchronize().unwrap();
    assert!(device.counts.elements(&stream).iter().all(|&v| v == MARKER));
}

#[test]
fn the_gate_dispatches_host_routings_on_the_device() {
    let Some(backend) = backend("the_gate_dispatches_host_routings_on_the_device") else {
        return;
    };
    let (h, e, k) = (64, 64, 6);
    let spec = greedy_spec(e, k);
    let mut rng = Rng(42);
    let weight: Vec<bf16> =
        (0..e * h).map(|_| bf16::from_f32(rng.below(1000) as f32 / 500.0 - 1.0)).collect();
    let weight = Tensor::from_vec(weight, &[e, h]).unwrap();
    let router = backend.prepare(&weight.to_dlpack().unwrap(), None, &spec).unwrap();
    let gate = PreparedGate::from_router(0, "cuda", Box::new(router));
    let mut table = vec![0i32; e];
    contiguous_ranks(&mut table, 4);
    let map = RankMap { expert_ranks: &table, ranks: 4 };
    // 3000 tokens of 6 picks take the many-block path, with the workspace `dispatch` makes.
    for tokens in [1, 5, 3000] {
        let hidden: Vec<f32> =
            (0..tokens * h).map(|_| rng.below(1000) as f32 / 250.0 - 2.0).collect();
        let routing = gate.route(&Tensor::from_vec(hidden, &[tokens, h]).unwrap()).unwrap();
        let ids = routing.ids().to_vec::<i32>().unwrap();
        let shape = DispatchShape { tokens, top_k: k, experts: e };
        let got = gate.dispatch(&routing, Some(16), Some(map)).unwrap();
        let expected = reference::dispatch(&ids, shape, Some(16), Some(map)).unwrap();
        assert_eq!(got, expected, "T={tokens}");

        // On the host, a stray id is refused before anything runs, as on every backend.
        let mut stray = ids.clone();
        stray[tokens * k - 1] = e as i32;
        let mut layout = DispatchLayout::zeroed(shape, None, None).unwrap();
        let inputs = DispatchInputs::new(DlpackView::from_slice(&stray, &[tokens, k]).unwrap());
        let refused = gate.router().dispatch(&inputs, &mut layout.outputs(k).unwrap());
        assert!(matches!(refused, Err(BackendError::ExpertIdOutOfRange { .. })), "{refused:?}");
    }
}

/// How a test calls the gate and the layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Calls {
    /// `route_into`, then `dispatch_into` of its ids.
    Two,
    /// `route_and_dispatch_into`.
    One,
}

/// The gate's buffers besides the layout's (whose ids window routing writes).
struct GateBuffers {
    hidden: Buffer,
    weights: Buffer,
    status: Buffer,
    workspace: Buffer,
}

impl GateBuffers {
    /// Hidden states `[T, H]` (bf16, filled with the marker until written), weights and status
    /// (the marker) and a zeroed route workspace.
    fn new(stream: &Arc<CudaStream>, router: &CudaPreparedRouter, t: usize, k: usize) -> Self {
        let h = router.hidden_size();
        let mut hidden = Buffer::i32(stream, &[t, h.div_ceil(2)], h.div_ceil(2));
        hidden.shape = vec![t as i64, h as i64];
        hidden.strides = vec![h as i64, 1];
        hidden.dtype = DLDataType::BF16;
        let mut weights = Buffer::i32(stream, &[t, k], k);
        weights.dtype = DLDataType::F32;
        GateBuffers {
            hidden,
            weights,
            status: Buffer::i32(stream, &[2], 1),
            workspace: Buffer::workspace(stream, router.workspace_bytes(t)),
        }
    }
}

/// Enqueues the gate (routing into the layout's ids window, counting invalid rows in the status)
/// and the layout of its ids, in `calls`.
fn enqueue_gate(
    router: &CudaPreparedRouter,
    stream: &Arc<CudaStream>,
    gate: &mut GateBuffers,
    layout: &mut DeviceLayout,
    calls: Calls,
) -> Result<(), BackendError> {
    let (hidden_dl, mut ids_dl, mut weights_dl, mut status_dl, mut workspace_dl) = (
        gate.hidden.descriptor(stream),
        layout.ids.descriptor(stream),
        gate.weights.descriptor(stream),
        gate.status.descriptor(stream),
        gate.workspace.descriptor(stream),
    );
    // SAFETY: the descriptors point at live device buffers of this test with their shapes and
    // strides; the views end with the call.
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
    // SAFETY: the test's stream lives to the end of the test; the buffers outlive its use and
    // are read after synchronising.
    let execution = unsafe { on_stream(stream) };
    match calls {
        Calls::Two => {
            router.route_into(&inputs, &mut outputs, execution)?;
            layout.enqueue(stream, router)
        }
        Calls::One => layout.with_views(stream, |ids, layout| {
            router.route_and_dispatch_into(
                &inputs,
                &mut outputs,
                layout,
                ids.expert_ranks,
                execution,
            )
        }),
    }
}

/// Random bf16 values in [-2, 2].
fn bf16_values(rng: &mut Rng, n: usize) -> Vec<bf16> {
    (0..n).map(|_| bf16::from_f32((rng.below(2001) as f32 - 1000.0) / 500.0)).collect()
}

fn bf16_bytes(values: &[bf16]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A router of `spec` on a random bf16 weight of hidden size `h`.
fn random_router(
    backend: &CudaBackend,
    spec: &RoutingSpec,
    h: usize,
    rng: &mut Rng,
) -> CudaPreparedRouter {
    let e = spec.num_experts;
    let weight = Tensor::from_vec(bf16_values(rng, e * h), &[e, h]).unwrap();
    backend.prepare(&weight.to_dlpack().unwrap(), None, spec).unwrap()
}

/// Captures one gate call of `t` tokens with its layout (padded to `block_size`, over `ranks`
/// contiguous ranks) in `calls` into a CUDA graph; then, three times, routes new hidden states
/// eagerly, spoils the layout and replays the graph, which must write the same layout again, and
/// the reference's.
fn check_graph_replays(
    backend: &CudaBackend,
    spec: &RoutingSpec,
    t: usize,
    calls: Calls,
    block_size: Option<usize>,
    ranks: Option<usize>,
) {
    let (h, e, k) = (256, spec.num_experts, spec.top_k);
    let context = format!("E={e} K={k} T={t} {calls:?} block={block_size:?} ranks={ranks:?}");
    let mut rng = Rng(7 + t as u64);
    let router = random_router(backend, spec, h, &mut rng);
    let stream = test_stream(0);
    let shape = DispatchShape { tokens: t, top_k: k, experts: e };
    let mut gate = GateBuffers::new(&stream, &router, t, k);
    let mut layout = DeviceLayout::new(&stream, &router, shape, block_size, ranks);
    let mut table = vec![0i32; e];
    if let Some(ranks) = ranks {
        contiguous_ranks(&mut table, ranks);
        layout.table.as_mut().unwrap().write(&stream, &table);
    }

    stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
    let captured = enqueue_gate(&router, &stream, &mut gate, &mut layout, calls);
    let graph = stream
        .end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH)
        .unwrap()
        .expect("a captured graph");
    captured.unwrap();
    let map = ranks.map(|ranks| RankMap { expert_ranks: &table, ranks });
    for replay in 0..3 {
        // New hidden states in the same buffer, through the eager calls and then the graph.
        let bytes = bf16_bytes(&bf16_values(&mut rng, t * h));
        stream.memcpy_htod(&bytes, &mut gate.hidden.memory).unwrap();
        enqueue_gate(&router, &stream, &mut gate, &mut layout, calls).unwrap();
        stream.synchronize().unwrap();
        let eager = layout.read(&stream);
        let ids = layout.ids.elements(&stream);
        // Spoil the outputs, then replay: the graph must write them all again.
        let spoiled = DeviceLayout::new(&stream, &router, shape, block_size, ranks);
        stream.memcpy_dtod(&spoiled.counts.memory, &mut layout.counts.memory).unwrap();
        stream.memcpy_dtod(&spoiled.sorted.memory, &mut layout.sorted.memory).unwrap();
        stream.memcpy_dtod(&spoiled.inverse.memory, &mut layout.inverse.memory).unwrap();
        graph.launch().unwrap();
        stream.synchronize().unwrap();
        let replayed = layout.read(&stream);
        assert_eq!(replayed, eager, "{context}: replay {replay}");
        let expected = reference::dispatch(&ids, shape, block_size, map).unwrap();
        assert_eq!(replayed, expected, "{context}: replay {replay}");
    }
}

#[test]
fn a_graph_of_route_into_and_dispatch_into_replays_like_eager_calls() {
    let Some(backend) = backend("a_graph_of_route_into_and_dispatch_into_replays_like_eager_calls")
    else {
        return;
    };
    // 2048 tokens of 8 picks: the many-block path, both dispatch kernels in the graph.
    check_graph_replays(&backend, &deepseek_v3_spec(256, 8), 2048, Calls::Two, Some(64), Some(8));
}

#[test]
fn a_graph_of_route_and_dispatch_into_replays_like_eager_calls() {
    let Some(backend) = backend("a_graph_of_route_and_dispatch_into_replays_like_eager_calls")
    else {
        return;
    };
    // The layout inside routing: every replay must find its last block afresh (the GEMM resets
    // the ticket) and, past 64 rows, counts with none of the last replay (the GEMM resets them
    // too, or the status reset kernel before cuBLASLt), at one token, a decode batch, Kimi-K2's
    // 384 experts with padding, and batches past 64 rows, up to 16 words of them.
    let v3 = deepseek_v3_spec(256, 8);
    check_graph_replays(&backend, &v3, 1, Calls::One, None, None);
    check_graph_replays(&backend, &v3, 64, Calls::One, Some(16), None);
    check_graph_replays(&backend, &deepseek_v3_spec(384, 8), 37, Calls::One, Some(64), None);
    check_graph_replays(&backend, &v3, 100, Calls::One, None, None);
    check_graph_replays(&backend, &v3, 500, Calls::One, Some(64), None);
    check_graph_replays(&backend, &deepseek_v3_spec(384, 8), 500, Calls::One, None, None);
    check_graph_replays(&backend, &v3, 1024, Calls::One, Some(64), None);
    // With rank outputs the call makes the layout's own launches, captured the same way.
    check_graph_replays(&backend, &v3, 5, Calls::One, Some(64), Some(4));
}

#[test]
fn route_and_dispatch_into_equals_route_into_then_dispatch_into() {
    let Some(backend) = backend("route_and_dispatch_into_equals_route_into_then_dispatch_into")
    else {
        return;
    };
    let stream = test_stream(0);
    let mut rng = Rng(0x0f05_ed1a_7e55_0002);
    let h = 512;
    // Fused where routing is a block per token (V3 up to 1056 rows on an H200, Kimi-K2 up to
    // 704, V2's 160 in 8 groups, 512 experts up to 528; K = 32 for one token only, up to 1024
    // experts: a block of 1024 threads) and no rank outputs are asked for: laid out by the last
    // routing block up to 64 rows, by a block per word of 64 rows after routing past them (65
    // rows on the backend's GEMM, 129 on cuBLASLt's; 1024 rows in 16 words); the two launches
    // elsewhere (64 experts route a warp per token, K = 32 past one token, and rows past the
    // wave).
    let specs = [
        deepseek_v3_spec(256, 8),
        deepseek_v3_spec(384, 8),
        RoutingSpec::builder(160, 6)
            .scoring(ScoringFunc::Softmax)
            .method(TopkMethod::GroupLimitedGreedy)
            .groups(8, 3)
            .non_finite(NonFinitePolicy::MarkInvalid)
            .build()
            .unwrap(),
        greedy_spec(64, 6),
        greedy_spec(512, 8),
        deepseek_v3_spec(256, 32),
        greedy_spec(1024, 32),
    ];
    for spec in &specs {
        let (e, k) = (spec.num_experts, spec.top_k);
        let router = random_router(&backend, spec, h, &mut rng);
        for t in [1, 2, 3, 17, 64, 65, 129, 300, 512, 513, 700, 1024] {
            let shape = DispatchShape { tokens: t, top_k: k, experts: e };
            let block_size = [None, Some(1), Some(16), Some(64)][rng.below(4)];
            let ranks = (rng.below(4) == 0).then(|| 1 + rng.below(6));
            let context = format!("E={e} K={k} T={t} block={block_size:?} ranks={ranks:?}");
            let mut hidden = bf16_values(&mut rng, t * h);
            // Up to two rows of NaN (in any word of 64 rows): marked invalid, counted in the
            // status, skipped by the layout.
            let nan_rows: Vec<usize> =
                if t >= 3 { (0..rng.below(3)).map(|_| rng.below(t)).collect() } else { vec![] };
            for &row in &nan_rows {
                hidden[row * h..(row + 1) * h].fill(bf16::NAN);
            }
            let mut table = vec![0i32; e];
            if let Some(ranks) = ranks {
                contiguous_ranks(&mut table, ranks);
            }
            let mut results = Vec::new();
            for calls in [Calls::Two, Calls::One] {
                let mut gate = GateBuffers::new(&stream, &router, t, k);
                stream.memcpy_htod(&bf16_bytes(&hidden), &mut gate.hidden.memory).unwrap();
                let mut layout = DeviceLayout::new(&stream, &router, shape, block_size, ranks);
                if ranks.is_some() {
                    layout.table.as_mut().unwrap().write(&stream, &table);
                }
                enqueue_gate(&router, &stream, &mut gate, &mut layout, calls)
                    .unwrap_or_else(|error| panic!("{context} {calls:?}: {error}"));
                stream.synchronize().unwrap();
                let ids = layout.ids.elements(&stream);
                let weights = gate.weights.read(&stream);
                let status = gate.status.read(&stream);
                results.push((ids, weights, status, layout.read(&stream)));
            }
            let (one, two) = (results.pop().unwrap(), results.pop().unwrap());
            assert_eq!(one, two, "{context}: one call against two");
            let (ids, _, status, got) = one;
            let first_nan = nan_rows.iter().min().map_or(-1, |&row| row as i32);
            let distinct_nan = nan_rows.iter().collect::<std::collections::BTreeSet<_>>().len();
            let expected_status = [distinct_nan as i32, first_nan];
            assert_eq!(status[..2], expected_status, "{context}");
            let map = ranks.map(|ranks| RankMap { expert_ranks: &table, ranks });
            let expected = reference::dispatch(&ids, shape, block_size, map).unwrap();
            assert_eq!(got, expected, "{context}");
            got.check_invariants(&ids, shape, map).unwrap_or_else(|e| panic!("{context}: {e}"));
        }
    }
}

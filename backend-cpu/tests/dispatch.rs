//! `dispatch_into` on the CPU backend: equal to the reference layout entry for entry on random
//! configs, every invariant held, every refusal made before any output byte changes.

mod common;

use common::Rng;
use proptest::prelude::*;
use sluice_backend_cpu::CpuBackend;
use sluice_models::reference::{self, DispatchLayout, RankMap};
use sluice_models::{MoeGate, PreparedGate};
use sluice_tensor::{
    BackendError, DType, Device, DeviceStream, DispatchInputs, DispatchShape, DlpackView,
    DlpackViewMut, Execution, PreparedRouter, RouteInputs, RouteOutputs, RoutingSpec, Tensor,
    contiguous_ranks,
};

/// What the outputs hold before a call: a call must overwrite every position it owns.
const STALE: i32 = -7;

/// A prepared router for `experts` experts, `top_k` per token (dispatch only reads the spec).
fn prepared(experts: usize, top_k: usize) -> PreparedGate {
    let spec = RoutingSpec::builder(experts, top_k).build().unwrap();
    let weight = Tensor::from_vec(vec![0.5f32; experts * 2], &[experts, 2]).unwrap();
    let gate = MoeGate::new(1, spec, weight, None).unwrap();
    gate.prepare(&CpuBackend::builder().threads(1).build().unwrap()).unwrap()
}

/// Random ids: rows of distinct experts (as a gate writes them) or, with `repeats`, any experts;
/// about one row in `invalid_every` marked invalid with `-1`s.
fn random_ids(shape: DispatchShape, invalid_every: usize, repeats: bool, seed: u64) -> Vec<i32> {
    let mut rng = Rng::new(seed);
    let mut draw = |n: usize| ((rng.unit() * n as f32) as usize).min(n - 1);
    let mut ids = Vec::with_capacity(shape.pairs());
    for _ in 0..shape.tokens {
        if invalid_every > 0 && draw(invalid_every) == 0 {
            ids.extend(std::iter::repeat_n(-1, shape.top_k));
            continue;
        }
        let start = ids.len();
        while ids.len() - start < shape.top_k {
            let expert = draw(shape.experts) as i32;
            if repeats || !ids[start..].contains(&expert) {
                ids.push(expert);
            }
        }
    }
    ids
}

/// Buffers of the layout's sizes, every entry stale.
fn stale_buffers(
    shape: DispatchShape,
    block: Option<usize>,
    ranks: Option<usize>,
) -> DispatchLayout {
    let mut layout = DispatchLayout::zeroed(shape, block, ranks).unwrap();
    let fill = |values: &mut Vec<i32>| values.fill(STALE);
    fill(&mut layout.expert_counts);
    fill(&mut layout.expert_offsets);
    fill(&mut layout.sorted_pairs);
    fill(&mut layout.inverse);
    layout.invalid = [STALE; 2];
    if let Some(padded) = &mut layout.padded {
        fill(&mut padded.padded_pairs);
        fill(&mut padded.block_experts);
        padded.padded_total = STALE;
    }
    if let Some(ranks) = &mut layout.ranks {
        fill(&mut ranks.rank_counts);
        fill(&mut ranks.rank_offsets);
        fill(&mut ranks.rank_pairs);
        fill(&mut ranks.rank_tokens);
    }
    layout
}

/// The CPU backend's layout of `ids` in stale buffers.
fn cpu_layout(
    gate: &PreparedGate,
    ids: &[i32],
    shape: DispatchShape,
    block: Option<usize>,
    rank_map: Option<RankMap<'_>>,
) -> Result<DispatchLayout, BackendError> {
    let mut layout = stale_buffers(shape, block, rank_map.map(|map| map.ranks));
    let mut inputs =
        DispatchInputs::new(DlpackView::from_slice(ids, &[shape.tokens, shape.top_k]).unwrap());
    if let Some(map) = rank_map {
        let table = DlpackView::from_slice(map.expert_ranks, &[shape.experts]).unwrap();
        inputs = inputs.with_expert_ranks(table);
    }
    gate.router().dispatch_into(
        &inputs,
        &mut layout.outputs(shape.top_k).unwrap(),
        Execution::Host,
    )?;
    Ok(layout)
}

#[derive(Debug, Clone)]
struct Case {
    shape: DispatchShape,
    block: Option<usize>,
    /// `None`, or a rank count and whether the table is contiguous or random.
    ranks: Option<(usize, bool)>,
    invalid_every: usize,
    repeats: bool,
    seed: u64,
}

fn arb_case() -> impl Strategy<Value = Case> {
    let tokens = prop::sample::select(vec![0usize, 1, 7, 64, 300, 4096]);
    let experts = prop::sample::select(vec![1usize, 8, 64, 160, 256, 384]);
    let block = prop::option::of(prop::sample::select(vec![1usize, 16, 64, 128]));
    let ranks = prop::option::of((1usize..=16, any::<bool>()));
    (tokens, experts, 1usize..=9, block, ranks, 0usize..5, any::<bool>(), any::<u64>()).prop_map(
        |(tokens, experts, top_k, block, ranks, invalid_every, repeats, seed)| Case {
            shape: DispatchShape { tokens, top_k: top_k.min(experts), experts },
            block,
            ranks,
            invalid_every,
            repeats,
            seed,
        },
    )
}

fn rank_table(case: &Case) -> Option<(Vec<i32>, usize)> {
    let (ranks, contiguous) = case.ranks?;
    let mut table = vec![0i32; case.shape.experts];
    if contiguous {
        contiguous_ranks(&mut table, ranks);
    } else {
        let mut rng = Rng::new(case.seed ^ 0x5eed);
        for rank in &mut table {
            *rank = ((rng.unit() * ranks as f32) as i32).min(ranks as i32 - 1);
        }
    }
    Some((table, ranks))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_cpu_layout_is_the_reference_layout(case in arb_case()) {
        let gate = prepared(case.shape.experts, case.shape.top_k);
        let ids = random_ids(case.shape, case.invalid_every, case.repeats, case.seed);
        let table = rank_table(&case);
        let rank_map =
            table.as_ref().map(|(table, ranks)| RankMap { expert_ranks: table, ranks: *ranks });
        let expected = reference::dispatch(&ids, case.shape, case.block, rank_map).unwrap();
        expected.check_invariants(&ids, case.shape, rank_map).unwrap();
        let actual = cpu_layout(&gate, &ids, case.shape, case.block, rank_map).unwrap();
        prop_assert_eq!(&actual, &expected, "{:?}", case);
        actual.check_invariants(&ids, case.shape, rank_map).unwrap();
    }
}

#[test]
fn invalid_rows_are_counted_and_never_dispatched() {
    let shape = DispatchShape { tokens: 64, top_k: 8, experts: 256 };
    let gate = prepared(shape.experts, shape.top_k);
    let mut ids = random_ids(shape, 0, false, 3);
    for row in [5, 6, 40] {
        ids[row * 8..(row + 1) * 8].fill(-1);
    }
    let layout = cpu_layout(&gate, &ids, shape, Some(16), None).unwrap();
    assert_eq!(layout.invalid, [3, 5]);
    assert_eq!(layout.expert_offsets[256], 61 * 8);
    let skipped = |pair: &i32| (40..48).contains(pair) || (320..328).contains(pair);
    assert!(!layout.sorted_pairs[..61 * 8].iter().any(skipped));
    assert!(!layout.padded.as_ref().unwrap().padded_pairs.iter().any(skipped));
    assert!(layout.inverse[40..56].iter().all(|&p| p == -1));
}

#[test]
fn windows_of_larger_buffers_are_read_and_written_in_place() {
    let shape = DispatchShape { tokens: 7, top_k: 3, experts: 16 };
    let gate = prepared(shape.experts, shape.top_k);
    let ids = random_ids(shape, 3, false, 9);
    let expected = reference::dispatch(&ids, shape, None, None).unwrap();
    // Rows 5 apart in both the ids and the inverse, as in an engine's max-batch buffers.
    let mut wide_ids = vec![STALE; 7 * 5];
    for row in 0..7 {
        wide_ids[row * 5..row * 5 + 3].copy_from_slice(&ids[row * 3..row * 3 + 3]);
    }
    let mut wide_inverse = vec![STALE; 7 * 5];
    let mut layout = stale_buffers(shape, None, None);
    {
        let inputs = DispatchInputs::new(
            DlpackView::from_slice_strided(&wide_ids, &[7, 3], &[5, 1]).unwrap(),
        );
        let mut outputs = layout.outputs(3).unwrap();
        outputs.inverse =
            DlpackViewMut::from_slice_strided(&mut wide_inverse, &[7, 3], &[5, 1]).unwrap();
        gate.router().dispatch_into(&inputs, &mut outputs, Execution::Host).unwrap();
    }
    assert_eq!(layout.sorted_pairs, expected.sorted_pairs);
    for row in 0..7 {
        assert_eq!(wide_inverse[row * 5..row * 5 + 3], expected.inverse[row * 3..row * 3 + 3]);
        assert_eq!(wide_inverse[row * 5 + 3..row * 5 + 5], [STALE; 2], "outside the window");
    }
}

/// Runs a `dispatch_into` call that must be refused with `$pattern`, and checks that no output of
/// `$layout` changed.
macro_rules! refused {
    ($what:expr, $layout:ident, $call:expr, $pattern:pat) => {{
        let before = $layout.clone();
        let result: Result<(), BackendError> = $call;
        assert!(matches!(result, Err($pattern)), "{}: {:?}", $what, result);
        assert_eq!($layout, before, "{}: an output changed", $what);
    }};
}

fn inputs<'a>(
    ids: &'a [i32],
    shape: DispatchShape,
    table: Option<&'a [i32]>,
) -> DispatchInputs<'a> {
    let inputs =
        DispatchInputs::new(DlpackView::from_slice(ids, &[shape.tokens, shape.top_k]).unwrap());
    match table {
        Some(table) => {
            inputs.with_expert_ranks(DlpackView::from_slice(table, &[table.len()]).unwrap())
        }
        None => inputs,
    }
}

/// A writable i32 `[len]` view of memory that something else already borrows, to be refused.
///
/// # Safety
///
/// `data` holds `len` live i32 values; the view is never used to read or write them.
unsafe fn aliasing_view<'a>(data: *mut i32, len: &'a i64) -> DlpackViewMut<'a> {
    let mut tensor = sluice_tensor::reexports::dlpark::ffi::DLTensor {
        data: data.cast(),
        device: sluice_tensor::reexports::dlpark::ffi::DLDevice::CPU,
        ndim: 1,
        dtype: sluice_tensor::reexports::dlpark::ffi::DLDataType::I32,
        shape: std::ptr::from_ref(len).cast_mut(),
        strides: std::ptr::null_mut(),
        byte_offset: 0,
    };
    // SAFETY: the descriptor describes `len` live values (this function's contract); the view
    // copies its metadata, so the local descriptor may go.
    unsafe { DlpackViewMut::from_raw(&mut tensor) }.unwrap()
}

#[test]
fn every_refused_argument_is_refused_before_any_output_byte_changes() {
    let shape = DispatchShape { tokens: 5, top_k: 2, experts: 8 };
    let gate = prepared(shape.experts, shape.top_k);
    let router = gate.router();
    let host = Execution::Host;
    let mut ids = random_ids(shape, 0, false, 1);
    let table = [0, 0, 0, 0, 1, 1, 1, 1];
    let mut floats = vec![0f32; 8];
    let mut short = vec![0i32; 7];
    let mut layout = stale_buffers(shape, Some(4), Some(2));

    let mut bad = ids.clone();
    bad[7] = 8;
    refused!(
        "id 8 of 8 experts",
        layout,
        {
            let mut outputs = layout.outputs(2).unwrap();
            router.dispatch_into(&inputs(&bad, shape, Some(&table)), &mut outputs, host)
        },
        BackendError::ExpertIdOutOfRange { row: 3, slot: 1, id: 8, experts: 8, .. }
    );
    bad[7] = -2;
    refused!(
        "id -2",
        layout,
        {
            let mut outputs = layout.outputs(2).unwrap();
            router.dispatch_into(&inputs(&bad, shape, Some(&table)), &mut outputs, host)
        },
        BackendError::ExpertIdOutOfRange { id: -2, .. }
    );
    refused!(
        "rank 2 of 2",
        layout,
        {
            let mut outputs = layout.outputs(2).unwrap();
            let table = [0, 0, 0, 0, 1, 1, 1, 2];
            router.dispatch_into(&inputs(&ids, shape, Some(&table)), &mut outputs, host)
        },
        BackendError::RankOutOfRange { expert: 7, rank: 2, ranks: 2, .. }
    );
    refused!(
        "ids of another top_k",
        layout,
        {
            let mut outputs = layout.outputs(2).unwrap();
            let inputs = DispatchInputs::new(DlpackView::from_slice(&ids, &[2, 5]).unwrap());
            router.dispatch_into(&inputs, &mut outputs, host)
        },
        BackendError::Shape { arg: "topk_ids", .. }
    );
    refused!(
        "rank outputs without a table",
        layout,
        {
            let mut outputs = layout.outputs(2).unwrap();
            router.dispatch_into(&inputs(&ids, shape, None), &mut outputs, host)
        },
        BackendError::MissingArgument { arg: "expert_ranks", .. }
    );
    refused!(
        "f32 counts",
        layout,
        {
            let mut outputs = layout.outputs(2).unwrap();
            outputs.expert_counts = DlpackViewMut::from_slice(&mut floats, &[8]).unwrap();
            router.dispatch_into(&inputs(&ids, shape, Some(&table)), &mut outputs, host)
        },
        BackendError::UnsupportedDType { arg: "expert_counts", dtype: DType::F32, .. }
    );
    refused!(
        "short offsets",
        layout,
        {
            let mut outputs = layout.outputs(2).unwrap();
            outputs.expert_offsets = DlpackViewMut::from_slice(&mut short, &[7]).unwrap();
            router.dispatch_into(&inputs(&ids, shape, Some(&table)), &mut outputs, host)
        },
        BackendError::Shape { arg: "expert_offsets", .. }
    );
    refused!(
        "block size 0",
        layout,
        {
            let mut outputs = layout.outputs(2).unwrap();
            outputs.padded.as_mut().unwrap().block_size = 0;
            router.dispatch_into(&inputs(&ids, shape, Some(&table)), &mut outputs, host)
        },
        BackendError::ZeroBlockSize { .. }
    );
    refused!(
        "padded buffers of another block size",
        layout,
        {
            let mut outputs = layout.outputs(2).unwrap();
            outputs.padded.as_mut().unwrap().block_size = 8;
            router.dispatch_into(&inputs(&ids, shape, Some(&table)), &mut outputs, host)
        },
        BackendError::Shape { arg: "padded_pairs", .. }
    );
    refused!(
        "a device stream",
        layout,
        {
            let mut outputs = layout.outputs(2).unwrap();
            // SAFETY: the call is refused before anything is enqueued on this stream.
            let stream = unsafe { DeviceStream::new(Device::Cuda(0), 7) }.unwrap();
            router.dispatch_into(
                &inputs(&ids, shape, Some(&table)),
                &mut outputs,
                Execution::Stream(stream),
            )
        },
        BackendError::UnsupportedExecution { .. }
    );
    let counts_len = 8i64;
    let counts = layout.expert_counts.as_mut_ptr();
    refused!(
        "two outputs on one buffer",
        layout,
        {
            let mut outputs = layout.outputs(2).unwrap();
            // SAFETY: `counts` holds 8 live values; the call refuses the overlap before any access.
            outputs.padded.as_mut().unwrap().block_experts =
                unsafe { aliasing_view(counts, &counts_len) };
            router.dispatch_into(&inputs(&ids, shape, Some(&table)), &mut outputs, host)
        },
        BackendError::Overlap { first: "expert_counts", second: "block_experts", .. }
    );
    let ids_ptr = ids.as_mut_ptr();
    let before = ids.clone();
    refused!(
        "counts that alias the ids",
        layout,
        {
            let mut outputs = layout.outputs(2).unwrap();
            // SAFETY: `ids` holds 10 live values; the call refuses the overlap before any access.
            outputs.expert_counts = unsafe { aliasing_view(ids_ptr, &counts_len) };
            // SAFETY: as above: the ids are only read, and only if the call were accepted.
            let ids = unsafe { std::slice::from_raw_parts(ids_ptr, 10) };
            router.dispatch_into(&inputs(ids, shape, Some(&table)), &mut outputs, host)
        },
        BackendError::Overlap { first: "topk_ids", second: "expert_counts", .. }
    );
    assert_eq!(ids, before);

    let mut without_ranks = stale_buffers(shape, None, None);
    refused!(
        "a table without rank outputs",
        without_ranks,
        {
            let mut outputs = without_ranks.outputs(2).unwrap();
            router.dispatch_into(&inputs(&ids, shape, Some(&table)), &mut outputs, host)
        },
        BackendError::MissingArgument { arg: "rank outputs", .. }
    );
}

#[test]
fn a_router_without_a_layout_refuses_it_after_the_same_checks() {
    /// Routing only, as a backend written before the dispatch layout.
    #[derive(Debug)]
    struct RoutingOnly(RoutingSpec);
    impl sluice_tensor::PreparedRouter for RoutingOnly {
        fn spec(&self) -> &RoutingSpec {
            &self.0
        }
        fn hidden_size(&self) -> usize {
            2
        }
        fn router_gemm(
            &self,
            _: &sluice_tensor::Dlpack,
        ) -> Result<sluice_tensor::Dlpack, BackendError> {
            Err(BackendError::NotSupported { op: "router_gemm" })
        }
        fn route(
            &self,
            _: &sluice_tensor::Dlpack,
        ) -> Result<sluice_tensor::RoutingOutput, BackendError> {
            Err(BackendError::NotSupported { op: "route" })
        }
    }
    let shape = DispatchShape { tokens: 3, top_k: 2, experts: 4 };
    let router = RoutingOnly(RoutingSpec::builder(4, 2).build().unwrap());
    let ids = [0, 1, 2, 3, -1, -1];
    let mut layout = stale_buffers(shape, None, None);
    let table = [0, 0, 1, 1];
    refused!(
        "the checks come first",
        layout,
        {
            let mut outputs = layout.outputs(2).unwrap();
            router.dispatch_into(&inputs(&ids, shape, Some(&table)), &mut outputs, Execution::Host)
        },
        BackendError::MissingArgument { .. }
    );
    refused!(
        "then the refusal",
        layout,
        {
            let mut outputs = layout.outputs(2).unwrap();
            router.dispatch_into(&inputs(&ids, shape, None), &mut outputs, Execution::Host)
        },
        BackendError::NotSupported { op: "dispatch_into" }
    );
}

#[test]
fn a_router_that_needs_a_workspace_gets_one_that_fits_or_refuses_first() {
    /// A router whose layout needs scratch, as a GPU's does at large T; it checks and returns.
    #[derive(Debug)]
    struct NeedsScratch(RoutingSpec);
    const NEEDED: usize = 64;
    impl sluice_tensor::PreparedRouter for NeedsScratch {
        fn spec(&self) -> &RoutingSpec {
            &self.0
        }
        fn hidden_size(&self) -> usize {
            2
        }
        fn router_gemm(
            &self,
            _: &sluice_tensor::Dlpack,
        ) -> Result<sluice_tensor::Dlpack, BackendError> {
            Err(BackendError::NotSupported { op: "router_gemm" })
        }
        fn route(
            &self,
            _: &sluice_tensor::Dlpack,
        ) -> Result<sluice_tensor::RoutingOutput, BackendError> {
            Err(BackendError::NotSupported { op: "route" })
        }
        fn dispatch_workspace_bytes(&self, _: usize) -> usize {
            NEEDED
        }
        fn dispatch_into(
            &self,
            inputs: &DispatchInputs<'_>,
            outputs: &mut sluice_tensor::DispatchOutputs<'_>,
            execution: Execution,
        ) -> Result<(), BackendError> {
            sluice_tensor::check_dispatch_into("dispatch_into", self, inputs, outputs, execution)
                .map(drop)
        }
    }
    #[repr(align(16))]
    struct Aligned([u8; 2 * NEEDED]);
    let shape = DispatchShape { tokens: 3, top_k: 2, experts: 4 };
    let router = NeedsScratch(RoutingSpec::builder(4, 2).build().unwrap());
    let ids = [0, 1, 2, 3, -1, -1];
    let mut layout = stale_buffers(shape, None, None);
    let mut scratch = Aligned([0; 2 * NEEDED]);
    let call = |layout: &mut DispatchLayout, workspace: Option<DlpackViewMut<'_>>| {
        let mut outputs = layout.outputs(2).unwrap();
        outputs.workspace = workspace;
        router.dispatch_into(&inputs(&ids, shape, None), &mut outputs, Execution::Host)
    };
    refused!(
        "no workspace",
        layout,
        call(&mut layout, None),
        BackendError::WorkspaceTooSmall { bytes: 0, needed: NEEDED, .. }
    );
    refused!(
        "a small workspace",
        layout,
        call(&mut layout, Some(DlpackViewMut::from_slice(&mut scratch.0[..16], &[16]).unwrap())),
        BackendError::WorkspaceTooSmall { bytes: 16, needed: NEEDED, .. }
    );
    refused!(
        "a misaligned workspace",
        layout,
        call(
            &mut layout,
            Some(DlpackViewMut::from_slice(&mut scratch.0[1..=NEEDED], &[NEEDED]).unwrap())
        ),
        BackendError::Layout { arg: "workspace", .. }
    );
    let mut words = [0i32; NEEDED];
    refused!(
        "a workspace of i32",
        layout,
        call(&mut layout, Some(DlpackViewMut::from_slice(&mut words, &[NEEDED]).unwrap())),
        BackendError::UnsupportedDType { arg: "workspace", .. }
    );
    call(&mut layout, Some(DlpackViewMut::from_slice(&mut scratch.0, &[2 * NEEDED]).unwrap()))
        .unwrap();
}

#[test]
fn route_and_dispatch_into_is_route_into_then_dispatch_into_and_refuses_first() {
    let (t, h, k, e) = (37, 16, 8, 64);
    let gate = common::noaux_gate(e, h, (8, 4, k), 0.5, 5)
        .prepare(&CpuBackend::builder().threads(2).build().unwrap())
        .unwrap();
    let hidden = Rng::new(9).normals(t * h, 1.0);
    let hidden_view = || DlpackView::from_slice(&hidden, &[t, h]).unwrap();
    let shape = DispatchShape { tokens: t, top_k: k, experts: e };
    let mut table = vec![0i32; e];
    contiguous_ranks(&mut table, 4);
    let map = RankMap { expert_ranks: &table, ranks: 4 };

    // Two calls.
    let (mut ids, mut weights) = (vec![STALE; t * k], vec![f32::NAN; t * k]);
    let mut outputs = RouteOutputs::new(
        DlpackViewMut::from_slice(&mut ids, &[t, k]).unwrap(),
        DlpackViewMut::from_slice(&mut weights, &[t, k]).unwrap(),
    );
    let routed = gate.route_into(&RouteInputs::new(hidden_view()), &mut outputs, Execution::Host);
    routed.unwrap();
    let two = cpu_layout(&gate, &ids, shape, Some(16), Some(map)).unwrap();

    // One call, into stale buffers.
    let (mut one_ids, mut one_weights) = (vec![STALE; t * k], vec![f32::NAN; t * k]);
    let mut one = stale_buffers(shape, Some(16), Some(4));
    {
        let mut outputs = RouteOutputs::new(
            DlpackViewMut::from_slice(&mut one_ids, &[t, k]).unwrap(),
            DlpackViewMut::from_slice(&mut one_weights, &[t, k]).unwrap(),
        );
        let table_view = DlpackView::from_slice(&table, &[e]).unwrap();
        gate.route_and_dispatch_into(
            &RouteInputs::new(hidden_view()),
            &mut outputs,
            &mut one.outputs(k).unwrap(),
            Some(table_view),
            Execution::Host,
        )
        .unwrap();
    }
    assert_eq!(one_ids, ids);
    let bits = |v: &[f32]| v.iter().map(|w| w.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&one_weights), bits(&weights));
    assert_eq!(one, two);
    assert_eq!(one, reference::dispatch(&ids, shape, Some(16), Some(map)).unwrap());

    // A layout the checks refuse (rank outputs without a table): nothing is written, the
    // routing outputs included.
    let (mut refused_ids, mut refused_weights) = (vec![STALE; t * k], vec![0.0f32; t * k]);
    let mut layout = stale_buffers(shape, None, Some(4));
    let before = layout.clone();
    let result = {
        let mut outputs = RouteOutputs::new(
            DlpackViewMut::from_slice(&mut refused_ids, &[t, k]).unwrap(),
            DlpackViewMut::from_slice(&mut refused_weights, &[t, k]).unwrap(),
        );
        gate.router().route_and_dispatch_into(
            &RouteInputs::new(hidden_view()),
            &mut outputs,
            &mut layout.outputs(k).unwrap(),
            None,
            Execution::Host,
        )
    };
    assert!(matches!(result, Err(BackendError::MissingArgument { .. })), "{result:?}");
    assert_eq!(layout, before, "a layout output changed");
    assert!(refused_ids.iter().all(|&id| id == STALE), "an id was written");
    assert!(refused_weights.iter().all(|&w| w == 0.0), "a weight was written");
}

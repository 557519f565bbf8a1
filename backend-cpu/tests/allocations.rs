//! A steady-state `route_into` allocates nothing, through the router and through the gate, and
//! neither does `dispatch_into`.
//!
//! One test in its own binary: the counting allocator sees every thread of the process (the
//! backend's workers included), so no other test may run beside it.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{Rng, family_gates};
use half::bf16;
use sluice_backend_cpu::CpuBackend;
use sluice_models::reference::DispatchLayout;
use sluice_tensor::{
    DispatchInputs, DispatchShape, DlpackView, DlpackViewMut, Execution, RouteInputs, RouteOutputs,
    contiguous_ranks,
};

/// The system allocator, counting allocations.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to the system allocator unchanged; counting has no effect on the
// memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const HIDDEN: usize = 64;

#[test]
fn steady_state_route_into_allocates_nothing() {
    for threads in [1, 2] {
        let backend = CpuBackend::builder().threads(threads).build().unwrap();
        for (family, gate) in family_gates(HIDDEN, 3) {
            let prepared = gate.prepare(&backend).unwrap();
            let (k, e) = (gate.spec().top_k, gate.num_experts());
            for tokens in [1, 64, 300] {
                let hidden: Vec<bf16> = Rng::new(tokens as u64)
                    .normals(tokens * HIDDEN, 1.0)
                    .into_iter()
                    .map(bf16::from_f32)
                    .collect();
                let mut ids = vec![0i32; tokens * k];
                let mut weights = vec![0f32; tokens * k];
                let mut logits = vec![0f32; tokens * e];
                let mut status = [0i32; 2];
                let mut count = |through_gate: bool, with_logits: bool| {
                    let before = ALLOCATIONS.load(Ordering::SeqCst);
                    for _ in 0..5 {
                        let hidden = DlpackView::from_slice(&hidden, &[tokens, HIDDEN]).unwrap();
                        let mut outputs = RouteOutputs::new(
                            DlpackViewMut::from_slice(&mut ids, &[tokens, k]).unwrap(),
                            DlpackViewMut::from_slice(&mut weights, &[tokens, k]).unwrap(),
                        )
                        .with_status(DlpackViewMut::from_slice(&mut status, &[2]).unwrap());
                        if with_logits {
                            outputs = outputs.with_logits(
                                DlpackViewMut::from_slice(&mut logits, &[tokens, e]).unwrap(),
                            );
                        }
                        let inputs = RouteInputs::new(hidden);
                        if through_gate {
                            prepared.route_into(&inputs, &mut outputs, Execution::Host).unwrap();
                        } else {
                            let router = prepared.router();
                            router.route_into(&inputs, &mut outputs, Execution::Host).unwrap();
                        }
                    }
                    ALLOCATIONS.load(Ordering::SeqCst) - before
                };
                prepared.router().warm_up(tokens).unwrap();
                for through_gate in [false, true] {
                    for with_logits in [false, true] {
                        // The first calls may grow the per-thread buffers; later ones must not.
                        count(through_gate, with_logits);
                        let allocations = count(through_gate, with_logits);
                        assert_eq!(
                            allocations, 0,
                            "{family} T={tokens} threads={threads} gate={through_gate} \
                             logits={with_logits}: {allocations} allocations in 5 calls"
                        );
                    }
                }
                // The routed ids, laid out per expert, padded and split over four ranks.
                let shape = DispatchShape { tokens, top_k: k, experts: e };
                let mut layout = DispatchLayout::zeroed(shape, Some(16), Some(4)).unwrap();
                let mut table = vec![0i32; e];
                contiguous_ranks(&mut table, 4);
                let before = ALLOCATIONS.load(Ordering::SeqCst);
                for _ in 0..5 {
                    let inputs =
                        DispatchInputs::new(DlpackView::from_slice(&ids, &[tokens, k]).unwrap())
                            .with_expert_ranks(DlpackView::from_slice(&table, &[e]).unwrap());
                    let mut outputs = layout.outputs(k).unwrap();
                    prepared
                        .router()
                        .dispatch_into(&inputs, &mut outputs, Execution::Host)
                        .unwrap();
                }
                let allocations = ALLOCATIONS.load(Ordering::SeqCst) - before;
                assert_eq!(allocations, 0, "{family} T={tokens}: dispatch_into allocated");
                assert_eq!(layout.expert_offsets[e] as usize, tokens * k, "every pair dispatched");
            }
        }
    }
}

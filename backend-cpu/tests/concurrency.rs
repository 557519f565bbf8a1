//! One prepared gate shared by many threads: every call gives exactly what a single thread gets.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::Rng;
use half::bf16;
use sluice_backend_cpu::CpuBackend;
use sluice_models::{MoeGate, PreparedGate};
use sluice_tensor::{Backend, Tensor};

/// The types an engine shares between threads, checked when this file compiles.
const fn assert_send_sync<T: Send + Sync + ?Sized>() {}
const _: () = {
    assert_send_sync::<Tensor>();
    assert_send_sync::<MoeGate>();
    assert_send_sync::<PreparedGate>();
    assert_send_sync::<CpuBackend>();
    assert_send_sync::<dyn Backend>();
};

const THREADS: usize = 8;
const MIN_RUN: Duration = Duration::from_secs(10);
const EXPERTS: usize = 256;
const HIDDEN: usize = 32;

/// DeepSeek-V3's routing (256 experts, 8 groups keep 4, top-8, sigmoid + bias, scale 2.5) with a
/// small hidden size, so that debug builds make thousands of calls in the time.
fn v3_like_gate() -> MoeGate {
    common::noaux_gate(EXPERTS, HIDDEN, (8, 4, 8), 0.35, 77)
}

/// Batches of different sizes (T = 0 included), f32 and bf16, each with its own values.
fn batches() -> Vec<Tensor> {
    let mut rng = Rng::new(3);
    let mut out = Vec::new();
    for tokens in [0, 1, 2, 5, 8, 13, 24] {
        let values = rng.normals(tokens * HIDDEN, 1.0);
        out.push(Tensor::from_vec(values.clone(), &[tokens, HIDDEN]).unwrap());
        let rounded: Vec<bf16> =
            rng.normals(tokens * HIDDEN, 1.0).into_iter().map(bf16::from_f32).collect();
        out.push(Tensor::from_vec(rounded, &[tokens, HIDDEN]).unwrap().with_requires_grad(true));
    }
    out
}

/// Ids and the bit patterns of the weights: equal only if bit-identical.
fn route(prepared: &PreparedGate, hidden: &Tensor) -> (Vec<usize>, Vec<i32>, Vec<u32>) {
    let routing = prepared.route(hidden).unwrap();
    let weights = routing.weights().to_vec::<f32>().unwrap();
    (
        routing.ids().shape().to_vec(),
        routing.ids().to_vec::<i32>().unwrap(),
        weights.into_iter().map(f32::to_bits).collect(),
    )
}

#[test]
fn one_prepared_gate_shared_by_eight_threads_routes_bit_identically() {
    let backend = CpuBackend::new().unwrap();
    let prepared = v3_like_gate().prepare(&backend).unwrap();
    let batches = batches();
    let expected: Vec<_> = batches.iter().map(|batch| route(&prepared, batch)).collect();
    for ((shape, ids, _), batch) in expected.iter().zip(&batches) {
        assert_eq!(shape, &[batch.shape()[0], 8]);
        assert!(ids.iter().all(|&id| (0..EXPERTS as i32).contains(&id)));
    }

    let calls = AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            let (prepared, batches, expected, calls) = (&prepared, &batches, &expected, &calls);
            scope.spawn(move || {
                // Each thread walks the batches in its own order, so different threads route
                // different batches at the same time.
                let mut next = thread;
                while started.elapsed() < MIN_RUN {
                    let i = next % batches.len();
                    let got = route(prepared, &batches[i]);
                    assert_eq!(got, expected[i], "thread {thread}, batch {i}");
                    calls.fetch_add(1, Ordering::Relaxed);
                    next += 2 * thread + 1;
                }
            });
        }
    });
    let calls = calls.into_inner();
    eprintln!("{calls} calls from {THREADS} threads in {:.1} s", started.elapsed().as_secs_f64());
    // Under valgrind (`cargo xtask valgrind`) every call is ~50x slower; the soak still runs its
    // full time but cannot reach the same count.
    let min_calls = if std::env::var_os("SLUICE_UNDER_VALGRIND").is_some() { 40 } else { 2_000 };
    assert!(calls >= min_calls, "only {calls} calls: too few to mean anything");
}

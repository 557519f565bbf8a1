//! Hostile hidden states through `MoeGate` and the CPU backend: more tokens than the configured
//! bound, and views that are not contiguous.

mod common;

use std::sync::Arc;

use common::Rng;
use half::bf16;
use sluice_backend_cpu::CpuBackend;
use sluice_models::{ModelError, MoeGate};
use sluice_tensor::{BackendError, Layout, Tensor};

const EXPERTS: usize = 32;
const HIDDEN: usize = 24;

/// A V3-like gate (sigmoid, noaux_tc, 4 groups keep 2, top-4) with a small hidden size.
fn gate() -> MoeGate {
    common::noaux_gate(EXPERTS, HIDDEN, (4, 2, 4), 0.3, 21)
}

fn too_many(err: ModelError) -> (usize, usize) {
    match err {
        ModelError::Backend(BackendError::TooManyTokens { tokens, limit, .. }) => (tokens, limit),
        other => panic!("expected TooManyTokens, got {other:?}"),
    }
}

#[test]
fn more_tokens_than_the_bound_are_refused_before_anything_is_allocated() {
    let backend = CpuBackend::builder().max_tokens(4).build().unwrap();
    let gate = gate();
    let prepared = gate.prepare(&backend).unwrap();
    let hidden = |tokens: usize| Tensor::from_vec(vec![0.5f32; tokens * HIDDEN], &[tokens, HIDDEN]);

    assert_eq!(prepared.route(&hidden(4).unwrap()).unwrap().tokens(), 4, "the bound itself routes");
    let err = prepared.route(&hidden(5).unwrap()).unwrap_err();
    assert!(err.to_string().contains("5 tokens exceed the limit of 4"), "{err}");
    assert_eq!(too_many(err), (5, 4));
    assert_eq!(too_many(prepared.router_gemm(&hidden(5).unwrap()).unwrap_err()), (5, 4));
    assert_eq!(too_many(gate.route(&backend, &hidden(5).unwrap()).unwrap_err()), (5, 4));

    // 2^40 tokens, every row the same row of memory: the outputs alone would need 32 TiB, so an
    // implementation that allocated before checking would abort here instead of returning.
    let row = Tensor::from_vec(vec![0.5f32; HIDDEN], &[1, HIDDEN]).unwrap();
    let huge = 1usize << 40;
    let layout = Layout::strided(&[huge, HIDDEN], &[0, 1], 0).unwrap();
    let broadcast = Tensor::from_storage(Arc::clone(row.storage()), layout, row.dtype()).unwrap();
    assert_eq!(too_many(prepared.route(&broadcast).unwrap_err()), (huge, 4));
    assert_eq!(too_many(prepared.router_gemm(&broadcast).unwrap_err()), (huge, 4));
}

/// Routing of contiguous hidden states `[tokens, HIDDEN]`, as (ids, weights).
fn route(prepared: &sluice_models::PreparedGate, hidden: &Tensor) -> (Vec<i32>, Vec<f32>) {
    let routing = prepared.route(hidden).unwrap();
    (routing.ids().to_vec().unwrap(), routing.weights().to_vec().unwrap())
}

#[test]
fn non_contiguous_hidden_states_route_like_their_contiguous_copy() {
    let tokens = 11;
    let gate = gate();
    let prepared = gate.prepare(&CpuBackend::new().unwrap()).unwrap();
    let values = Rng::new(5).normals(tokens * HIDDEN, 1.0);
    let as_bf16: Vec<bf16> = values.iter().copied().map(bf16::from_f32).collect();

    for bf16_input in [false, true] {
        let contiguous = if bf16_input {
            Tensor::from_vec(as_bf16.clone(), &[tokens, HIDDEN]).unwrap()
        } else {
            Tensor::from_vec(values.clone(), &[tokens, HIDDEN]).unwrap()
        };
        let expected = route(&prepared, &contiguous);
        let (ids, _) = &expected;
        assert!(ids.iter().all(|&id| (0..EXPERTS as i32).contains(&id)));

        // Stored transposed ([H, T] contiguous), viewed as [T, H]: column stride T.
        let transposed_storage = |t: &Tensor| -> Tensor {
            if bf16_input {
                let v = t.to_vec::<bf16>().unwrap();
                let columns: Vec<bf16> =
                    (0..HIDDEN * tokens).map(|i| v[(i % tokens) * HIDDEN + i / tokens]).collect();
                Tensor::from_vec(columns, &[HIDDEN, tokens]).unwrap()
            } else {
                let v = t.to_vec::<f32>().unwrap();
                let columns: Vec<f32> =
                    (0..HIDDEN * tokens).map(|i| v[(i % tokens) * HIDDEN + i / tokens]).collect();
                Tensor::from_vec(columns, &[HIDDEN, tokens]).unwrap()
            }
        };
        let transposed = transposed_storage(&contiguous).transpose(0, 1).unwrap();
        // The right half of a [T, 2H] tensor: row stride 2H, starting mid-row.
        let wide_rows = |t: &Tensor| -> Tensor {
            if bf16_input {
                let v = t.to_vec::<bf16>().unwrap();
                let wide: Vec<bf16> = v
                    .chunks(HIDDEN)
                    .flat_map(|r| [vec![bf16::NAN; HIDDEN], r.to_vec()].concat())
                    .collect();
                Tensor::from_vec(wide, &[tokens, 2 * HIDDEN]).unwrap()
            } else {
                let v = t.to_vec::<f32>().unwrap();
                let wide: Vec<f32> = v
                    .chunks(HIDDEN)
                    .flat_map(|r| [vec![f32::NAN; HIDDEN], r.to_vec()].concat())
                    .collect();
                Tensor::from_vec(wide, &[tokens, 2 * HIDDEN]).unwrap()
            }
        };
        let narrowed = wide_rows(&contiguous).narrow(1, HIDDEN, HIDDEN).unwrap();
        for (what, view) in [("transposed", &transposed), ("narrowed", &narrowed)] {
            assert!(!view.is_contiguous(), "{what}");
            assert_eq!(route(&prepared, view), expected, "{what}, bf16 {bf16_input}");
        }
        // A window of rows starts at an element offset; its routing is those rows' routing.
        let rows = contiguous.narrow(0, 3, 5).unwrap();
        let (ids, weights) = route(&prepared, &rows);
        assert_eq!(ids, expected.0[3 * 4..8 * 4], "row window, bf16 {bf16_input}");
        assert_eq!(weights, expected.1[3 * 4..8 * 4], "row window, bf16 {bf16_input}");
    }
}

//! `route_into`, the engine's call: the same results as `route`, written only into the caller's
//! windows, every refusal made before any output byte changes.

mod common;

use common::{Rng, backends, dl, family_gates, label, noaux_gate, read, read_routing};
use half::bf16;
use sluice_backend_cpu::CpuBackend;
use sluice_models::{ModelError, PreparedGate};
use sluice_tensor::{
    BackendError, DType, Device, DeviceStream, DlpackView, DlpackViewMut, Element, Execution,
    NonFiniteInput, NonFinitePolicy, PreparedRouter, RouteInputs, RouteOutputs,
};

const HIDDEN: usize = 48;

/// Hidden states `[T, H]` as f32 values and as the bf16 the same values round to.
fn hidden(tokens: usize, seed: u64) -> (Vec<f32>, Vec<bf16>) {
    let values = Rng::new(seed).normals(tokens * HIDDEN, 1.0);
    let rounded = values.iter().copied().map(bf16::from_f32).collect();
    (values, rounded)
}

/// Routes `hidden` with `route` and with `route_into` (plus logits and status) and checks that
/// they agree bit for bit, and that the logits are `router_gemm`'s.
fn check_same<T: Element>(router: &dyn PreparedRouter, hidden: &[T], tokens: usize, what: &str) {
    let spec = router.spec();
    let (k, e) = (spec.top_k, spec.num_experts);
    let (shape, ids, weights) =
        read_routing(router.route(&dl(hidden.to_vec(), &[tokens, HIDDEN])).unwrap());
    assert_eq!(shape, [tokens, k], "{what}");
    let (_, logits) =
        read::<f32>(router.router_gemm(&dl(hidden.to_vec(), &[tokens, HIDDEN])).unwrap());

    let (mut ids_into, mut weights_into) = (vec![-7i32; tokens * k], vec![-7.0f32; tokens * k]);
    let (mut logits_into, mut status) = (vec![-7.0f32; tokens * e], [-7i32; 2]);
    let inputs = RouteInputs::new(DlpackView::from_slice(hidden, &[tokens, HIDDEN]).unwrap());
    let mut outputs = RouteOutputs::new(
        DlpackViewMut::from_slice(&mut ids_into, &[tokens, k]).unwrap(),
        DlpackViewMut::from_slice(&mut weights_into, &[tokens, k]).unwrap(),
    )
    .with_logits(DlpackViewMut::from_slice(&mut logits_into, &[tokens, e]).unwrap())
    .with_status(DlpackViewMut::from_slice(&mut status, &[2]).unwrap());
    router.route_into(&inputs, &mut outputs, Execution::Host).unwrap();

    assert_eq!(ids_into, ids, "{what}: ids");
    let bits = |v: &[f32]| v.iter().map(|w| w.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&weights_into), bits(&weights), "{what}: weights");
    assert_eq!(bits(&logits_into), bits(&logits), "{what}: logits");
    assert_eq!(status, [0, -1], "{what}: status");
}

#[test]
fn route_into_equals_route_bit_for_bit_for_every_family() {
    for backend in backends() {
        for (family, gate) in family_gates(HIDDEN, 11) {
            let prepared = gate.prepare(&backend).unwrap();
            let router = prepared.router();
            for tokens in [0, 1, 7, 64, 300] {
                let (f32s, bf16s) = hidden(tokens, tokens as u64 + 1);
                let what = format!("{} {family} T={tokens}", label(&backend));
                check_same(router, &f32s, tokens, &format!("{what} f32"));
                check_same(router, &bf16s, tokens, &format!("{what} bf16"));
            }
        }
    }
}

/// A `rows x columns` buffer of `poison`, with a `[tokens, width]` window at `(1, 2)`.
struct Poisoned<T> {
    data: Vec<T>,
    columns: usize,
    poison: T,
}

impl<T: Element + PartialEq> Poisoned<T> {
    const ROW: usize = 1;
    const COLUMN: usize = 2;

    fn new(tokens: usize, width: usize, poison: T) -> Self {
        let columns = width + 3;
        Poisoned { data: vec![poison; (tokens + 2) * columns], columns, poison }
    }

    fn window(&mut self, tokens: usize, width: usize) -> DlpackViewMut<'_> {
        let start = Self::ROW * self.columns + Self::COLUMN;
        DlpackViewMut::from_slice_strided(
            &mut self.data[start..],
            &[tokens, width],
            &[self.columns, 1],
        )
        .unwrap()
    }

    /// The window's values, after checking that nothing outside it changed.
    fn written(&self, tokens: usize, width: usize) -> Vec<T> {
        let mut inside = Vec::new();
        for (index, value) in self.data.iter().enumerate() {
            let (row, column) = (index / self.columns, index % self.columns);
            let in_window = (Self::ROW..Self::ROW + tokens).contains(&row)
                && (Self::COLUMN..Self::COLUMN + width).contains(&column);
            if in_window {
                inside.push(*value);
            } else {
                assert!(*value == self.poison, "guard element ({row}, {column}) was written");
            }
        }
        inside
    }
}

#[test]
fn only_the_window_of_a_strided_offset_output_is_written() {
    let backend = CpuBackend::builder().threads(2).build().unwrap();
    for (family, gate) in family_gates(HIDDEN, 5) {
        let prepared = gate.prepare(&backend).unwrap();
        let (k, e) = (gate.spec().top_k, gate.num_experts());
        for tokens in [1, 7, 300] {
            let (values, _) = hidden(tokens, 3);
            let (_, ids, weights) = read_routing(
                prepared.router().route(&dl(values.clone(), &[tokens, HIDDEN])).unwrap(),
            );
            let mut ids_buffer = Poisoned::new(tokens, k, i32::MIN + 7);
            let mut weights_buffer = Poisoned::new(tokens, k, 1234.5f32);
            let mut logits_buffer = Poisoned::new(tokens, e, -4321.5f32);
            let inputs =
                RouteInputs::new(DlpackView::from_slice(&values, &[tokens, HIDDEN]).unwrap());
            let mut outputs =
                RouteOutputs::new(ids_buffer.window(tokens, k), weights_buffer.window(tokens, k))
                    .with_logits(logits_buffer.window(tokens, e));
            prepared.route_into(&inputs, &mut outputs, Execution::Host).unwrap();
            assert_eq!(ids_buffer.written(tokens, k), ids, "{family} T={tokens}");
            assert_eq!(weights_buffer.written(tokens, k), weights, "{family} T={tokens}");
            logits_buffer.written(tokens, e);
        }
    }
}

/// Calls `route_into` with one argument broken by `case` and checks the refusal and that no
/// output byte changed.
#[test]
fn every_refused_argument_is_refused_before_any_output_byte_changes() {
    let backend = CpuBackend::builder().threads(2).max_tokens(64).build().unwrap();
    let gate = noaux_gate(32, HIDDEN, (4, 2, 4), 0.3, 9);
    let router = backend
        .prepare(
            &dl(gate.weight().detach().to_vec::<bf16>().unwrap(), &[32, HIDDEN]),
            Some(&dl(gate.bias().unwrap().to_vec::<f32>().unwrap(), &[32])),
            gate.spec(),
        )
        .unwrap();
    let (tokens, k, e) = (5, 4, 32);
    let (values, _) = hidden(65, 1);
    let wrong_h = vec![0.0f32; tokens * (HIDDEN + 1)];
    let mut ids = vec![-9i32; tokens * k];
    let mut weights = vec![-9.0f32; tokens * k];
    let mut logits = vec![-9.0f32; tokens * e];
    let mut status = [-9i32; 3];
    let mut wide_ids = vec![-9i64; tokens * k];
    let mut workspace = vec![-9.0f32; 16];
    // SAFETY: the CUDA stream is never used: the CPU backend refuses it before doing anything.
    let stream = unsafe { DeviceStream::new(Device::Cuda(0), 2) }.unwrap();

    let cases = [
        "hidden size",
        "ids dtype",
        "ids shape",
        "weights column stride",
        "logits width",
        "status shape",
        "workspace dtype",
        "device stream",
    ];
    for case in cases {
        let hidden_view = match case {
            "hidden size" => DlpackView::from_slice(&wrong_h, &[tokens, HIDDEN + 1]).unwrap(),
            _ => DlpackView::from_slice(&values[..tokens * HIDDEN], &[tokens, HIDDEN]).unwrap(),
        };
        let inputs = RouteInputs::new(hidden_view);
        let ids_view = match case {
            "ids shape" => {
                DlpackViewMut::from_slice(&mut ids[..(k - 1) * tokens], &[tokens, k - 1])
            }
            _ => DlpackViewMut::from_slice(&mut ids, &[tokens, k]),
        }
        .unwrap();
        let weights_view = match case {
            "weights column stride" => {
                DlpackViewMut::from_slice_strided(&mut weights, &[tokens, k], &[1, tokens])
            }
            _ => DlpackViewMut::from_slice(&mut weights, &[tokens, k]),
        }
        .unwrap();
        let mut outputs = RouteOutputs::new(ids_view, weights_view);
        if case == "ids dtype" {
            outputs.topk_ids = DlpackViewMut::from_slice(&mut wide_ids, &[tokens, k]).unwrap();
        }
        let logits_width = if case == "logits width" { e - 1 } else { e };
        outputs = outputs.with_logits(
            DlpackViewMut::from_slice(
                &mut logits[..tokens * logits_width],
                &[tokens, logits_width],
            )
            .unwrap(),
        );
        let status_len = if case == "status shape" { 3 } else { 2 };
        outputs = outputs.with_status(
            DlpackViewMut::from_slice(&mut status[..status_len], &[status_len]).unwrap(),
        );
        if case == "workspace dtype" {
            outputs =
                outputs.with_workspace(DlpackViewMut::from_slice(&mut workspace, &[16]).unwrap());
        }
        let execution =
            if case == "device stream" { Execution::Stream(stream) } else { Execution::Host };
        let err = router.route_into(&inputs, &mut outputs, execution).unwrap_err();
        let expected = match case {
            "hidden size" => matches!(err, BackendError::Shape { arg: "hidden", .. }),
            "ids dtype" => {
                matches!(
                    err,
                    BackendError::UnsupportedDType { arg: "topk_ids", dtype: DType::I64, .. }
                )
            }
            "ids shape" => matches!(err, BackendError::Shape { arg: "topk_ids", .. }),
            "weights column stride" => {
                matches!(err, BackendError::Layout { arg: "topk_weights", .. })
            }
            "logits width" => matches!(err, BackendError::Shape { arg: "logits", .. }),
            "status shape" => matches!(err, BackendError::Shape { arg: "status", .. }),
            "workspace dtype" => {
                matches!(err, BackendError::UnsupportedDType { arg: "workspace", .. })
            }
            _ => matches!(err, BackendError::UnsupportedExecution { .. }),
        };
        assert!(expected, "{case}: {err}");
        assert!(ids.iter().all(|&v| v == -9), "{case}: ids written");
        assert!(weights.iter().all(|&v| v == -9.0), "{case}: weights written");
        assert!(logits.iter().all(|&v| v == -9.0), "{case}: logits written");
        assert!(status.iter().all(|&v| v == -9), "{case}: status written");
        assert!(wide_ids.iter().all(|&v| v == -9), "{case}: ids written");
    }

    // Too many tokens, with outputs that hold them.
    let mut ids = vec![-9i32; 65 * k];
    let mut weights = vec![-9.0f32; 65 * k];
    let inputs = RouteInputs::new(DlpackView::from_slice(&values, &[65, HIDDEN]).unwrap());
    let mut outputs = RouteOutputs::new(
        DlpackViewMut::from_slice(&mut ids, &[65, k]).unwrap(),
        DlpackViewMut::from_slice(&mut weights, &[65, k]).unwrap(),
    );
    let err = router.route_into(&inputs, &mut outputs, Execution::Host).unwrap_err();
    assert!(matches!(err, BackendError::TooManyTokens { tokens: 65, limit: 64, .. }), "{err}");
    assert!(ids.iter().all(|&v| v == -9) && weights.iter().all(|&v| v == -9.0));
}

#[test]
fn outputs_that_alias_an_input_or_each_other_are_refused() {
    let backend = CpuBackend::new().unwrap();
    let gate = noaux_gate(32, HIDDEN, (4, 2, 4), 0.3, 9);
    let prepared = gate.prepare(&backend).unwrap();
    let (tokens, k) = (2, 4);
    let mut buffer = vec![0.0f32; tokens * HIDDEN];
    let mut ids = vec![0i32; tokens * k];
    let pointer = buffer.as_mut_ptr();
    let shape = [tokens as i64, k as i64];
    // A DLTensor over the first weights-sized piece of the hidden states' buffer.
    let mut aliasing = sluice_tensor::reexports::dlpark::ffi::DLTensor {
        data: pointer.cast(),
        device: sluice_tensor::reexports::dlpark::ffi::DLDevice::CPU,
        ndim: 2,
        dtype: sluice_tensor::reexports::dlpark::ffi::DLDataType::F32,
        shape: shape.as_ptr().cast_mut(),
        strides: std::ptr::null_mut(),
        byte_offset: 0,
    };
    // SAFETY: the descriptor describes live memory of `buffer`; the call below refuses the aliasing
    // before it reads or writes anything, and nothing else touches `buffer` meanwhile.
    let weights_view = unsafe { DlpackViewMut::from_raw(&mut aliasing) }.unwrap();
    // SAFETY: as above; the read-only view and the writable one are never used to access memory.
    let hidden_view = unsafe {
        DlpackView::from_slice(
            std::slice::from_raw_parts(pointer, tokens * HIDDEN),
            &[tokens, HIDDEN],
        )
    }
    .unwrap();
    let mut outputs =
        RouteOutputs::new(DlpackViewMut::from_slice(&mut ids, &[tokens, k]).unwrap(), weights_view);
    let err =
        prepared.router().route_into(&RouteInputs::new(hidden_view), &mut outputs, Execution::Host);
    assert!(
        matches!(err, Err(BackendError::Overlap { first: "hidden", second: "topk_weights", .. })),
        "{err:?}"
    );
}

#[test]
fn non_finite_rows_fill_the_status_or_fail_naming_the_input() {
    let backend = CpuBackend::builder().threads(2).build().unwrap();
    for tokens in [7, 300] {
        let gate = noaux_gate(64, HIDDEN, (8, 4, 8), 0.3, 2);
        let (mut values, _) = hidden(tokens, 8);
        values[3 * HIDDEN + 5] = f32::NAN;
        values[(tokens - 1) * HIDDEN] = f32::INFINITY;
        let k = 8;
        let run = |prepared: &PreparedGate, ids: &mut [i32], status: &mut [i32; 2]| {
            let mut weights = vec![0.0f32; tokens * k];
            let inputs =
                RouteInputs::new(DlpackView::from_slice(&values, &[tokens, HIDDEN]).unwrap());
            let mut outputs = RouteOutputs::new(
                DlpackViewMut::from_slice(ids, &[tokens, k]).unwrap(),
                DlpackViewMut::from_slice(&mut weights, &[tokens, k]).unwrap(),
            )
            .with_status(DlpackViewMut::from_slice(status, &[2]).unwrap());
            prepared.route_into(&inputs, &mut outputs, Execution::Host)
        };
        let mut ids = vec![0i32; tokens * k];
        let mut status = [0i32; 2];
        let marking =
            gate.clone().with_non_finite(NonFinitePolicy::MarkInvalid).prepare(&backend).unwrap();
        run(&marking, &mut ids, &mut status).unwrap();
        assert_eq!(status, [2, 3], "T={tokens}");
        assert!(ids[3 * k..4 * k].iter().all(|&id| id == -1));
        assert!(ids[..3 * k].iter().all(|&id| (0..64).contains(&id)));

        let failing = gate.prepare(&backend).unwrap();
        let err = run(&failing, &mut ids, &mut status).unwrap_err();
        assert!(
            matches!(
                err,
                ModelError::Backend(BackendError::NonFinite {
                    row: 3,
                    input: NonFiniteInput::HiddenStates,
                    ..
                })
            ),
            "{err}"
        );
        assert_eq!(status, [2, 3], "the status is written before the policy fails the call");
    }
}

#[test]
fn router_gemm_into_writes_the_logits_window() {
    let backend = CpuBackend::builder().threads(2).build().unwrap();
    let gate = noaux_gate(64, HIDDEN, (8, 4, 8), 0.3, 4);
    let prepared = gate.prepare(&backend).unwrap();
    for tokens in [1, 300] {
        let (values, _) = hidden(tokens, 6);
        let expected = prepared
            .router_gemm(&sluice_tensor::Tensor::from_slice(&values, &[tokens, HIDDEN]).unwrap())
            .unwrap();
        let mut logits = Poisoned::new(tokens, 64, 77.0f32);
        let view = DlpackView::from_slice(&values, &[tokens, HIDDEN]).unwrap();
        prepared.router_gemm_into(&view, &mut logits.window(tokens, 64), Execution::Host).unwrap();
        assert_eq!(logits.written(tokens, 64), expected.to_vec::<f32>().unwrap(), "T={tokens}");
        let wrong = DlpackView::from_slice(&values[..HIDDEN - 1], &[1, HIDDEN - 1]).unwrap();
        let err =
            prepared.router_gemm_into(&wrong, &mut logits.window(tokens, 64), Execution::Host);
        assert!(matches!(err, Err(ModelError::HiddenShape { layer: 3, .. })), "{err:?}");
    }
}

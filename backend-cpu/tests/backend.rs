//! The `Backend` contract of the CPU backend: argument checks, layouts, limits, empty inputs,
//! copies, and the builder.

mod common;

use common::{Rng, backends, dl, label, read, read_routing};
use dlpark::ffi::{DLDataType, DLDevice};
use dlpark::metadata::Dynamic;
use half::bf16;
use sluice_backend_cpu::{CpuBackend, CpuBuildError, CpuKernel};
use sluice_tensor::{
    Backend, BackendError, DType, Device, Dlpack, DlpackError, RoutingSpec, ScoringFunc, Tensor,
    TopkMethod,
};

fn v3_like(e: usize) -> RoutingSpec {
    RoutingSpec::builder(e, 8)
        .scoring(ScoringFunc::Sigmoid)
        .method(TopkMethod::NoauxTc)
        .groups(8, 4)
        .norm_topk_prob(true)
        .routed_scaling_factor(2.5)
        .build()
        .unwrap()
}

/// The error of a call that must fail.
fn err<T>(result: Result<T, BackendError>) -> BackendError {
    match result {
        Ok(_) => panic!("the call succeeded but must fail"),
        Err(e) => e,
    }
}

fn backend() -> CpuBackend {
    CpuBackend::new().unwrap()
}

/// A DLPack descriptor over `data` with arbitrary metadata (device, strides), as a foreign
/// producer could hand over.
fn foreign(data: Vec<f32>, shape: &[i64], strides: &[i64], device: DLDevice) -> Dlpack {
    let ptr = data.as_ptr();
    let mut init =
        Dynamic::new(shape.to_vec(), strides.to_vec()).initialize(Box::new(data)).unwrap();
    init.set_data(ptr.cast_mut().cast()).set_dtype(DLDataType::F32).set_device(device);
    // SAFETY: the box owning `data` is the context and lives as long as the descriptor; the
    // metadata describes it (the tests only check that the backend refuses what it must).
    unsafe { init.finish() }
}

#[test]
fn names_itself_and_its_device() {
    let b = backend();
    assert_eq!(b.name(), "cpu");
    assert_eq!(b.device(), Device::Cpu);
    assert_ne!(b.kernel(), CpuKernel::Auto);
    assert!(b.threads() >= 1);
}

#[test]
fn builder_refuses_what_it_cannot_do() {
    for kernel in CpuKernel::CONCRETE {
        match CpuBackend::builder().kernel(kernel).build() {
            Ok(b) => assert_eq!(b.kernel(), kernel),
            Err(CpuBuildError::KernelUnavailable { kernel: k, missing }) => {
                assert_eq!(k, kernel);
                assert!(!kernel.is_supported() && !missing.is_empty());
            }
            Err(other) => panic!("{other}"),
        }
    }
    assert!(matches!(
        CpuBackend::builder().threads(0).build(),
        Err(CpuBuildError::Zero { field: "threads" })
    ));
    assert!(matches!(
        CpuBackend::builder().max_tokens(0).build(),
        Err(CpuBuildError::Zero { field: "max_tokens" })
    ));
}

#[test]
fn workers_that_park_at_once_route_like_workers_that_spin() {
    use std::time::Duration;
    let (tokens, experts, hidden) = (24, 64, 96);
    let mut rng = Rng::new(11);
    let x = rng.normals(tokens * hidden, 1.0);
    let w: Vec<bf16> = rng.normals(experts * hidden, 0.1).into_iter().map(bf16::from_f32).collect();
    let bias = rng.normals(experts, 0.01);
    let spec = v3_like(experts);
    let route = |idle_spin: Duration| {
        let b = CpuBackend::builder().threads(2).idle_spin(idle_spin).build().unwrap();
        assert_eq!(b.idle_spin(), idle_spin);
        let router = b
            .prepare_router(
                dl(w.clone(), &[experts, hidden]),
                Some(dl(bias.clone(), &[experts])),
                &spec,
            )
            .unwrap();
        // Calls far enough apart that a worker which parks at once has parked before each one.
        (0..3)
            .map(|_| {
                std::thread::sleep(Duration::from_millis(3));
                read_routing(router.route(&dl(x.clone(), &[tokens, hidden])).unwrap())
            })
            .collect::<Vec<_>>()
    };
    let parked = route(Duration::ZERO);
    assert_eq!(parked, route(Duration::from_millis(20)));
    assert!(parked.iter().all(|(shape, _, _)| shape == &[tokens, 8]));
}

#[test]
fn wrong_dtypes_name_op_argument_and_dtype() {
    let b = backend();
    let w = dl(vec![bf16::ZERO; 16 * 4], &[16, 4]);
    let x_i32 = dl(vec![0i32; 8], &[2, 4]);
    match err(b.router_gemm(&x_i32, &w)) {
        e @ BackendError::UnsupportedDType {
            op: "router_gemm",
            arg: "hidden",
            dtype: DType::I32,
            ..
        } => {
            assert!(e.to_string().contains("f32, bf16, f16"), "{e}");
        }
        other => panic!("{other}"),
    }
    let x = dl(vec![0.0f32; 8], &[2, 4]);
    let w_f64 = dl(vec![0.0f64; 64], &[16, 4]);
    assert!(matches!(
        b.router_gemm(&x, &w_f64),
        Err(BackendError::UnsupportedDType { arg: "weight", dtype: DType::F64, .. })
    ));
    let logits_bf16 = dl(vec![bf16::ZERO; 32], &[2, 16]);
    assert!(matches!(
        b.route_logits(&logits_bf16, None, &v3_like(16)),
        Err(BackendError::UnsupportedDType {
            op: "route_logits",
            arg: "logits",
            dtype: DType::BF16,
            ..
        })
    ));
    let bias_bf16 = dl(vec![bf16::ZERO; 16], &[16]);
    let w = dl(vec![bf16::ZERO; 64], &[16, 4]);
    assert!(matches!(
        b.prepare_router(w, Some(bias_bf16), &v3_like(16)),
        Err(BackendError::UnsupportedDType { arg: "bias", dtype: DType::BF16, .. })
    ));
}

#[test]
fn wrong_shapes_are_refused() {
    let b = backend();
    let w = || dl(vec![bf16::ZERO; 16 * 4], &[16, 4]);
    let x3 = dl(vec![0.0f32; 8], &[2, 2, 2]);
    assert!(matches!(b.router_gemm(&x3, &w()), Err(BackendError::Shape { arg: "hidden", .. })));
    let x_wrong_h = dl(vec![0.0f32; 10], &[2, 5]);
    let e = err(b.router_gemm(&x_wrong_h, &w()));
    assert!(
        matches!(e, BackendError::Shape { arg: "hidden", .. })
            && e.to_string().contains("[any, 4]"),
        "{e}"
    );
    // Weight rows must match the spec's experts.
    let err = b.prepare_router(w(), None, &v3_like(32)).unwrap_err();
    assert!(matches!(err, BackendError::Shape { arg: "weight", .. }), "{err}");
    // Bias length and presence.
    let err = b.prepare_router(w(), Some(dl(vec![0.0f32; 15], &[15])), &v3_like(16)).unwrap_err();
    assert!(matches!(err, BackendError::Shape { arg: "bias", .. }), "{err}");
    let greedy = RoutingSpec::builder(16, 2)
        .scoring(ScoringFunc::Softmax)
        .method(TopkMethod::Greedy)
        .groups(1, 1)
        .norm_topk_prob(false)
        .routed_scaling_factor(1.0)
        .build()
        .unwrap();
    let err = b.prepare_router(w(), Some(dl(vec![0.0f32; 16], &[16])), &greedy).unwrap_err();
    assert!(
        matches!(err, BackendError::UnexpectedBias { method: TopkMethod::Greedy, .. }),
        "{err}"
    );
    // A prepared router checks H too.
    let prepared = b.prepare_router(w(), None, &v3_like(16)).unwrap();
    assert_eq!(prepared.hidden_size(), 4);
    assert!(matches!(prepared.route(&x_wrong_h), Err(BackendError::Shape { arg: "hidden", .. })));
    // Logits of the wrong width.
    let logits = dl(vec![0.0f32; 2 * 15], &[2, 15]);
    assert!(matches!(
        b.route_logits(&logits, None, &v3_like(16)),
        Err(BackendError::Shape { arg: "logits", .. })
    ));
}

#[test]
fn invalid_specs_and_biases_are_refused() {
    let b = backend();
    let mut spec = v3_like(16);
    spec.top_k = 0;
    let logits = dl(vec![0.0f32; 16], &[1, 16]);
    assert!(matches!(b.route_logits(&logits, None, &spec), Err(BackendError::Spec(_))));
    let mut bias = vec![0.0f32; 16];
    bias[5] = f32::NAN;
    let err = b.route_logits(&logits, Some(&dl(bias, &[16])), &v3_like(16)).unwrap_err();
    assert!(matches!(err, BackendError::NonFiniteBias { expert: 5, .. }), "{err}");
    assert!(err.to_string().contains("expert 5"), "{err}");
}

#[test]
fn tensors_on_other_devices_are_refused() {
    let b = backend();
    let x = foreign(vec![0.0; 8], &[2, 4], &[4, 1], DLDevice::cuda(0));
    let w = dl(vec![0.0f32; 64], &[16, 4]);
    match err(b.router_gemm(&x, &w)) {
        BackendError::WrongDevice {
            op: "router_gemm",
            arg: "hidden",
            actual,
            expected: Device::Cpu,
        } => {
            assert_eq!(actual, Device::Cuda(0));
        }
        other => panic!("{other}"),
    }
    assert!(matches!(b.download(&x), Err(BackendError::WrongDevice { .. })));
}

#[test]
fn negative_strides_are_refused_with_the_layout() {
    let b = backend();
    // Rows reversed through a negative row stride: data pointer at the last row.
    let x = foreign(vec![0.0; 8], &[2, 4], &[-4, 1], DLDevice::CPU);
    let w = dl(vec![0.0f32; 64], &[16, 4]);
    match err(b.router_gemm(&x, &w)) {
        e @ BackendError::Argument {
            op: "router_gemm",
            arg: "hidden",
            source: DlpackError::NegativeStride { axis: 0, value: -4 },
        } => {
            assert!(e.to_string().contains("-4"), "{e}");
        }
        other => panic!("{other}"),
    }
}

#[test]
fn misaligned_data_is_refused() {
    let b = backend();
    let data = vec![0.0f32; 9];
    let ptr = data.as_ptr().cast::<u8>().wrapping_add(2);
    let mut init = Dynamic::new(vec![2i64, 4], vec![4i64, 1]).initialize(Box::new(data)).unwrap();
    init.set_data(ptr.cast_mut().cast()).set_dtype(DLDataType::F32).set_device(DLDevice::CPU);
    // SAFETY: the descriptor is only validated, never read through (it is misaligned on purpose).
    let x = unsafe { init.finish() };
    let w = dl(vec![0.0f32; 64], &[16, 4]);
    assert!(matches!(
        b.router_gemm(&x, &w),
        Err(BackendError::Argument {
            arg: "hidden",
            source: DlpackError::Misaligned { align: 4, dtype: DType::F32, .. },
            ..
        })
    ));
}

#[test]
fn strided_views_compute_the_same_as_contiguous_tensors() {
    let (t, e, h) = (9, 40, 24);
    let mut rng = Rng::new(4);
    let x = rng.normals(t * h, 1.0);
    let w: Vec<bf16> = rng.normals(e * h, 0.3).into_iter().map(bf16::from_f32).collect();
    let bias = rng.normals(e, 0.1);
    let spec = RoutingSpec::builder(e, 4)
        .scoring(ScoringFunc::Sigmoid)
        .method(TopkMethod::NoauxTc)
        .groups(4, 2)
        .norm_topk_prob(true)
        .routed_scaling_factor(2.5)
        .build()
        .unwrap();
    // x stored column-major ([H, T] contiguous, transposed): unit row stride, column stride T.
    let x_t: Vec<f32> = (0..h * t).map(|i| x[(i % t) * h + i / t]).collect();
    let x_view = Tensor::from_vec(x_t, &[h, t]).unwrap().transpose(0, 1).unwrap();
    assert!(!x_view.is_contiguous());
    // W as every other row of a [2E, H] tensor, bias as every other value.
    let w_wide: Vec<bf16> =
        w.chunks(h).flat_map(|row| row.iter().chain(row.iter()).copied()).collect();
    let w_view = Tensor::from_vec(w_wide, &[e, 2 * h]).unwrap().narrow(1, h, h).unwrap();
    let bias_wide: Vec<f32> = bias.iter().flat_map(|&v| [v, 99.0]).collect();
    let bias_view =
        Tensor::from_vec(bias_wide, &[e, 2]).unwrap().narrow(1, 0, 1).unwrap().reshape(&[e]);
    for backend in backends() {
        let plain = backend
            .prepare_router(dl(w.clone(), &[e, h]), Some(dl(bias.clone(), &[e])), &spec)
            .unwrap();
        let expected = read_routing(plain.route(&dl(x.clone(), &[t, h])).unwrap());
        let expected_logits = read::<f32>(plain.router_gemm(&dl(x.clone(), &[t, h])).unwrap());
        let bias_dl = match &bias_view {
            Ok(view) => view.to_dlpack().unwrap(),
            // A strided [E, 1] view may not reshape without a copy; pass it as a column then.
            Err(_) => dl(bias.clone(), &[e]),
        };
        let strided =
            backend.prepare_router(w_view.to_dlpack().unwrap(), Some(bias_dl), &spec).unwrap();
        let x_dl = x_view.to_dlpack().unwrap();
        assert_eq!(read_routing(strided.route(&x_dl).unwrap()), expected, "{}", label(&backend));
        assert_eq!(read::<f32>(strided.router_gemm(&x_dl).unwrap()), expected_logits);
        assert_eq!(
            read::<f32>(backend.router_gemm(&x_dl, &w_view.to_dlpack().unwrap()).unwrap()),
            expected_logits
        );
        // Logits with a non-unit column stride route like contiguous ones.
        let (_, logits) = expected_logits.clone();
        let logits_t: Vec<f32> = (0..e * t).map(|i| logits[(i % t) * e + i / t]).collect();
        let logits_view = Tensor::from_vec(logits_t, &[e, t]).unwrap().transpose(0, 1).unwrap();
        let routed = backend
            .route_logits(&logits_view.to_dlpack().unwrap(), Some(&dl(bias.clone(), &[e])), &spec)
            .unwrap();
        let contiguous = backend
            .route_logits(&dl(logits, &[t, e]), Some(&dl(bias.clone(), &[e])), &spec)
            .unwrap();
        assert_eq!(read_routing(routed), read_routing(contiguous));
    }
}

#[test]
fn zero_tokens_give_empty_outputs() {
    let spec = v3_like(16);
    for backend in backends() {
        let w = dl(vec![bf16::ONE; 16 * 8], &[16, 8]);
        let x = dl(Vec::<bf16>::new(), &[0, 8]);
        let (shape, logits) = read::<f32>(backend.router_gemm(&x, &w).unwrap());
        assert_eq!((shape, logits.len()), (vec![0, 16], 0));
        let prepared = backend.prepare_router(w, None, &spec).unwrap();
        let (shape, ids, weights) = read_routing(prepared.route(&x).unwrap());
        assert_eq!((shape, ids.len(), weights.len()), (vec![0, 8], 0, 0));
        let logits = dl(Vec::<f32>::new(), &[0, 16]);
        let (shape, ..) = read_routing(backend.route_logits(&logits, None, &spec).unwrap());
        assert_eq!(shape, vec![0, 8]);
    }
}

#[test]
fn too_many_tokens_fail_before_allocating() {
    let b = CpuBackend::builder().max_tokens(4).build().unwrap();
    assert_eq!(b.max_tokens(), 4);
    let w = dl(vec![bf16::ZERO; 16 * 2], &[16, 2]);
    let x = dl(vec![0.0f32; 10], &[5, 2]);
    assert!(matches!(
        b.router_gemm(&x, &w),
        Err(BackendError::TooManyTokens { op: "router_gemm", tokens: 5, limit: 4 })
    ));
    let prepared = b.prepare_router(w, None, &v3_like(16)).unwrap();
    assert!(matches!(prepared.route(&x), Err(BackendError::TooManyTokens { tokens: 5, .. })));
    let ok = dl(vec![0.0f32; 8], &[4, 2]);
    assert!(prepared.route(&ok).is_ok());
}

#[test]
fn upload_and_download_copy_into_contiguous_host_tensors() {
    let b = backend();
    let source = Tensor::from_vec((0..12).map(|i| i as f32).collect(), &[3, 4]).unwrap();
    let view = source.transpose(0, 1).unwrap();
    let uploaded = b.upload(&view.to_dlpack().unwrap()).unwrap();
    let copy = Tensor::from_dlpack(uploaded).unwrap();
    assert_eq!(copy.shape(), &[4, 3]);
    assert!(copy.is_contiguous());
    assert_ne!(copy.data_ptr(), source.data_ptr());
    assert_eq!(copy.to_vec::<f32>().unwrap(), view.to_vec::<f32>().unwrap());
    let ids = Tensor::from_vec(vec![1i32, -1, 7], &[3]).unwrap();
    let back = Tensor::from_dlpack(b.download(&ids.to_dlpack().unwrap()).unwrap()).unwrap();
    assert_eq!(back.to_vec::<i32>().unwrap(), vec![1, -1, 7]);
}

#[test]
fn the_prepared_weight_is_no_larger_than_the_checkpoint_tensor() {
    let (e, h) = (256, 7168);
    let b = backend();
    let w = dl(vec![bf16::ONE; e * h], &[e, h]);
    let prepared = b.prepare(&w, None, &v3_like(e)).unwrap();
    assert!(prepared.packed_bytes() <= 2 * e * h + 64, "{} bytes", prepared.packed_bytes());
}

#[test]
fn debug_output_of_a_prepared_gate_summarises_its_buffers() {
    // One DeepSeek-V3 layer: 256 experts x 7168, bf16, with a correction bias. Its packed weight
    // alone is 917,504 words.
    let (e, h) = (256, 7168);
    let prepared = common::noaux_gate(e, h, (8, 4, 8), 0.02, 5).prepare(&backend()).unwrap();
    let debug = format!("{prepared:?}");
    let head = &debug[..debug.len().min(2000)];
    assert!(debug.len() < 1000, "{} characters, starting {head}", debug.len());
    assert!(debug.contains("shape: [256, 7168], dtype: bf16"), "{debug}");
    assert!(debug.contains(&format!("bytes: {}", 2 * e * h)), "{debug}");
    assert!(debug.contains("bias_len: Some(256)"), "{debug}");
}

#[test]
fn routers_can_be_shared_between_threads() {
    let (t, e, h) = (130, 64, 32);
    let mut rng = Rng::new(11);
    let x = rng.normals(t * h, 1.0);
    let w: Vec<bf16> = rng.normals(e * h, 0.2).into_iter().map(bf16::from_f32).collect();
    let b = backend();
    let prepared = b.prepare_router(dl(w, &[e, h]), None, &v3_like(e)).unwrap();
    let expected = read_routing(prepared.route(&dl(x.clone(), &[t, h])).unwrap());
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| read_routing(prepared.route(&dl(x.clone(), &[t, h])).unwrap())))
            .collect();
        for handle in handles {
            assert_eq!(handle.join().unwrap(), expected);
        }
    });
}

#[test]
fn a_router_weight_of_hidden_size_zero_is_refused_like_a_gate_of_one() {
    let spec = v3_like(16);
    let err = backend().prepare_router(dl(Vec::<f32>::new(), &[16, 0]), None, &spec).unwrap_err();
    assert!(matches!(err, BackendError::ZeroHiddenSize { arg: "weight", .. }), "{err}");
    let weight = sluice_tensor::Tensor::from_vec(Vec::<f32>::new(), &[16, 0]).unwrap();
    let bias = sluice_tensor::Tensor::from_vec(vec![0.0f32; 16], &[16]).unwrap();
    let refused = sluice_models::MoeGate::new(0, spec, weight, Some(bias)).unwrap_err();
    assert!(refused.to_string().contains("hidden size 0"), "{refused}");
}

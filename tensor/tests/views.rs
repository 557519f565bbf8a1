//! Borrowed views: the same validation as the owning import, the requires_grad gate, writable
//! views that never alias, typed host access, and the checks of the engine's call.

use sluice_tensor::reexports::dlpark::Managed;
use sluice_tensor::reexports::dlpark::ffi::{DLDataType, DLDevice, DLDeviceType, DLTensor};
use sluice_tensor::{
    BackendError, DType, Device, DeviceStream, Dlpack, DlpackError, DlpackView, DlpackViewMut,
    Execution, ExpectedShape, MAX_VIEW_RANK, NonFinitePolicy, PreparedRouter, RouteInputs,
    RouteOutputs, RoutingOutput, RoutingSpec, Tensor, ViewError, check_route_into, export_vec,
};

fn matrix() -> Tensor {
    Tensor::from_vec((0..12).map(|i| i as f32).collect(), &[3, 4]).unwrap()
}

/// A writable `[2, 3]` f32 host tensor, corrupted by `corrupt`.
fn corrupted(corrupt: impl FnOnce(&mut DLTensor)) -> Dlpack {
    let raw = export_vec(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]).unwrap().into_raw();
    // SAFETY: `raw` is the live managed tensor just produced, owned here.
    corrupt(unsafe { &mut (*raw).dl_tensor });
    // SAFETY: ownership returns to a `Managed`; only fields were edited in place.
    unsafe { Managed::from_raw(raw) }.unwrap()
}

#[test]
fn views_refuse_exactly_what_the_import_refuses() {
    type Corruption = (&'static str, fn(&mut DLTensor));
    let corruptions: [Corruption; 7] = [
        ("null data", |t| t.data = std::ptr::null_mut()),
        ("negative ndim", |t| t.ndim = -1),
        // SAFETY: the shape array has two entries.
        ("negative extent", |t| unsafe { *t.shape.add(1) = -3 }),
        // SAFETY: the strides array has two entries.
        ("negative stride", |t| unsafe { *t.strides = -3 }),
        ("lanes", |t| t.dtype.lanes = 4),
        ("misaligned", |t| t.byte_offset = 2),
        ("device", |t| t.device = DLDevice { device_type: DLDeviceType::METAL, device_id: 0 }),
    ];
    for (what, corrupt) in corruptions {
        let owned = corrupted(corrupt);
        let from_view = DlpackView::from_dlpack(&owned).map(|_| ()).unwrap_err();
        let from_import = Tensor::from_dlpack(owned).map(|_| ()).unwrap_err();
        assert_eq!(from_view, from_import, "{what}");
    }
}

#[test]
fn a_view_of_a_tensor_that_requires_grad_is_refused_like_its_export() {
    let weight = matrix().with_requires_grad(true);
    assert_eq!(DlpackView::from_tensor(&weight).unwrap_err(), DlpackError::RequiresGrad);
    let detached = weight.detach();
    let view = DlpackView::from_tensor(&detached).unwrap();
    assert_eq!(view.data_ptr(), weight.data_ptr(), "a view copies nothing");
    assert_eq!(view.as_array2::<f32>().unwrap()[[2, 3]], 11.0);
    let transposed = detached.transpose(0, 1).unwrap();
    let view = DlpackView::from_tensor(&transposed).unwrap();
    assert_eq!((view.shape(), view.strides()), (&[4, 3][..], &[1, 4][..]));
    assert_eq!(view.as_array2::<f32>().unwrap()[[3, 1]], 7.0);
}

#[test]
fn writable_views_refuse_read_only_and_self_overlapping_memory() {
    let mut exported = matrix().to_dlpack().unwrap();
    assert_eq!(DlpackViewMut::from_dlpack(&mut exported).unwrap_err(), DlpackError::ReadOnly);
    let mut owned = export_vec(vec![0i32; 6], &[2, 3]).unwrap();
    let mut view = DlpackViewMut::from_dlpack(&mut owned).unwrap();
    view.as_array2_mut::<i32>().unwrap()[[1, 2]] = 7;
    assert_eq!(Tensor::from_dlpack(owned).unwrap().to_vec::<i32>().unwrap()[5], 7);

    let mut data = vec![0.0f32; 8];
    // Rows of a broadcast: readable, but a write would reach one element through two indices.
    assert!(DlpackView::from_slice_strided(&data, &[3, 4], &[0, 1]).is_ok());
    assert!(matches!(
        DlpackViewMut::from_slice_strided(&mut data, &[3, 4], &[0, 1]),
        Err(DlpackError::SelfOverlapping { .. })
    ));
    assert!(matches!(
        DlpackViewMut::from_slice_strided(&mut data, &[2, 4], &[2, 1]),
        Err(DlpackError::SelfOverlapping { .. })
    ));
    assert!(DlpackViewMut::from_slice_strided(&mut data, &[2, 2], &[4, 1]).is_ok());
}

#[test]
fn slices_must_hold_the_view() {
    let data = vec![0u8; 10];
    assert_eq!(
        DlpackView::from_slice(&data, &[3, 4]).unwrap_err(),
        DlpackError::LengthMismatch { len: 10, needed: 12 }
    );
    assert!(DlpackView::from_slice_strided(&data, &[2, 4], &[6, 1]).is_ok());
    assert_eq!(
        DlpackView::from_slice_strided(&data, &[2, 4], &[7, 1]).unwrap_err(),
        DlpackError::SliceTooShort { len: 10, needed: 11 }
    );
    let deep = [1usize; MAX_VIEW_RANK + 1];
    assert_eq!(
        DlpackView::from_slice(&data[..1], &deep).unwrap_err(),
        DlpackError::RankTooLarge { ndim: MAX_VIEW_RANK + 1, max: MAX_VIEW_RANK }
    );
}

#[test]
fn typed_access_checks_dtype_rank_and_device() {
    let data: Vec<f32> = (0..12).map(|i| i as f32).collect();
    let view = DlpackView::from_slice_strided(&data, &[3, 2], &[4, 2]).unwrap();
    assert_eq!(view.as_array2::<f32>().unwrap().row(2).to_vec(), vec![8.0, 10.0]);
    assert_eq!(
        view.as_array2::<i32>().unwrap_err(),
        ViewError::DType { expected: DType::I32, actual: DType::F32 }
    );
    assert_eq!(view.as_array1::<f32>().unwrap_err(), ViewError::Rank { expected: 1, actual: 2 });

    let shape = [3i64, 4];
    let on_gpu = DLTensor {
        data: data.as_ptr().cast_mut().cast(),
        device: DLDevice { device_type: DLDeviceType::CUDA, device_id: 1 },
        ndim: 2,
        dtype: DLDataType::F32,
        shape: shape.as_ptr().cast_mut(),
        strides: std::ptr::null_mut(),
        byte_offset: 0,
    };
    // SAFETY: the descriptor and its shape outlive the view, which never reads the data: host
    // access to device memory is refused.
    let view = unsafe { DlpackView::from_raw(&on_gpu) }.unwrap();
    assert_eq!(view.device(), Device::Cuda(1));
    assert_eq!(view.strides(), &[4, 1], "null strides are row-major");
    assert_eq!(view.as_array2::<f32>().unwrap_err(), ViewError::NotHost(Device::Cuda(1)));
    assert_eq!(
        // SAFETY: null is refused before anything is read.
        unsafe { DlpackView::from_raw(std::ptr::null()) }.unwrap_err(),
        DlpackError::NullTensor
    );
}

/// A router that only implements the allocating `route`, as an older backend would: it returns
/// id `t % E` and weight `t` for token `t`, and marks token 1 invalid.
#[derive(Debug)]
struct OnlyRoute {
    spec: RoutingSpec,
    device: Device,
}

impl PreparedRouter for OnlyRoute {
    fn spec(&self) -> &RoutingSpec {
        &self.spec
    }

    fn hidden_size(&self) -> usize {
        2
    }

    fn device(&self) -> Device {
        self.device
    }

    fn router_gemm(&self, hidden: &Dlpack) -> Result<Dlpack, BackendError> {
        let tokens = DlpackView::from_dlpack(hidden).unwrap().shape()[0];
        Ok(export_vec(vec![0.5f32; tokens * 4], &[tokens, 4]).unwrap())
    }

    fn route(&self, hidden: &Dlpack) -> Result<RoutingOutput, BackendError> {
        let tokens = DlpackView::from_dlpack(hidden).unwrap().shape()[0];
        let ids = (0..tokens).map(|t| if t == 1 { -1 } else { (t % 4) as i32 }).collect();
        let weights = (0..tokens).map(|t| if t == 1 { 0.0 } else { t as f32 }).collect();
        Ok(RoutingOutput::from_host_vecs(tokens, 1, ids, weights).unwrap())
    }
}

fn only_route(device: Device, policy: NonFinitePolicy) -> OnlyRoute {
    OnlyRoute { spec: RoutingSpec::builder(4, 1).non_finite(policy).build().unwrap(), device }
}

#[test]
fn the_default_route_into_copies_route_into_the_window() {
    let router = only_route(Device::Cpu, NonFinitePolicy::MarkInvalid);
    let hidden = [0.0f32; 6];
    let (mut ids, mut weights, mut logits, mut status) =
        ([9i32; 8], [9.0f32; 8], [9.0f32; 12], [9; 2]);
    let inputs = RouteInputs::new(DlpackView::from_slice(&hidden, &[3, 2]).unwrap());
    let mut outputs = RouteOutputs::new(
        DlpackViewMut::from_slice_strided(&mut ids, &[3, 1], &[2, 1]).unwrap(),
        DlpackViewMut::from_slice_strided(&mut weights, &[3, 1], &[2, 1]).unwrap(),
    )
    .with_logits(DlpackViewMut::from_slice(&mut logits, &[3, 4]).unwrap())
    .with_status(DlpackViewMut::from_slice(&mut status, &[2]).unwrap());
    router.route_into(&inputs, &mut outputs, Execution::Host).unwrap();
    assert_eq!(ids, [0, 9, -1, 9, 2, 9, 9, 9]);
    assert_eq!(weights, [0.0, 9.0, 0.0, 9.0, 2.0, 9.0, 9.0, 9.0]);
    assert_eq!(logits, [0.5; 12]);
    assert_eq!(status, [1, 1]);
}

#[test]
fn the_contract_checks_where_the_work_runs() {
    let hidden = [0.0f32; 4];
    let (mut ids, mut weights) = ([0i32; 2], [0.0f32; 2]);
    let inputs = RouteInputs::new(DlpackView::from_slice(&hidden, &[2, 2]).unwrap());
    let mut outputs = RouteOutputs::new(
        DlpackViewMut::from_slice(&mut ids, &[2, 1]).unwrap(),
        DlpackViewMut::from_slice(&mut weights, &[2, 1]).unwrap(),
    );
    // SAFETY: nothing is enqueued: every call below is refused by the checks.
    let stream = unsafe { DeviceStream::new(Device::Cuda(0), 7) }.unwrap();
    let host_router = only_route(Device::Cpu, NonFinitePolicy::Error);
    let err =
        check_route_into("test", &host_router, &inputs, &outputs, Execution::Stream(stream), 0);
    assert!(matches!(err, Err(BackendError::UnsupportedExecution { .. })), "{err:?}");
    let err = host_router.route_into(&inputs, &mut outputs, Execution::Stream(stream));
    assert!(matches!(err, Err(BackendError::UnsupportedExecution { .. })), "{err:?}");

    let gpu_router = only_route(Device::Cuda(0), NonFinitePolicy::Error);
    let err =
        check_route_into("test", &gpu_router, &inputs, &outputs, Execution::Stream(stream), 0);
    assert!(matches!(err, Err(BackendError::PolicyNeedsHost { .. })), "{err:?}");
    let marking = only_route(Device::Cuda(0), NonFinitePolicy::MarkInvalid);
    let err = check_route_into("test", &marking, &inputs, &outputs, Execution::Stream(stream), 0);
    assert!(
        matches!(err, Err(BackendError::WrongDevice { arg: "hidden", actual: Device::Cpu, .. })),
        "{err:?}"
    );
    let err = check_route_into("test", &host_router, &inputs, &outputs, Execution::Host, 64);
    assert!(
        matches!(err, Err(BackendError::WorkspaceTooSmall { bytes: 0, needed: 64, .. })),
        "{err:?}"
    );
    let shape = BackendError::Shape {
        op: "test",
        arg: "hidden",
        shape: vec![2, 3],
        expected: ExpectedShape(vec![None, Some(2)]),
    };
    assert_eq!(shape.to_string(), "test: `hidden` has shape [2, 3], expected [any, 2]");
}

#[test]
fn a_bias_is_read_only_for_specs_that_take_one_and_only_as_finite_f32_of_the_expert_count() {
    use sluice_tensor::{BiasRole, TopkMethod, host_bias_values};
    let noaux = RoutingSpec::builder(3, 1)
        .scoring(sluice_tensor::ScoringFunc::Sigmoid)
        .method(TopkMethod::NoauxTc)
        .build()
        .unwrap();
    let logits_bias = RoutingSpec::builder(3, 1).bias_role(BiasRole::Logits).build().unwrap();
    let plain = RoutingSpec::builder(3, 1).build().unwrap();
    let values = [0.5f32, -1.0, 2.0];
    let view = DlpackView::from_slice(&values, &[3]).unwrap();
    for spec in [&noaux, &logits_bias] {
        assert_eq!(host_bias_values("prepare", &view, spec).unwrap(), values);
    }
    let refused = |view: &DlpackView<'_>, spec: &RoutingSpec| {
        host_bias_values("prepare", view, spec).unwrap_err().to_string()
    };
    assert!(refused(&view, &plain).contains("bias"), "a spec that takes no bias");
    let long = [0.0f32; 4];
    assert!(refused(&DlpackView::from_slice(&long, &[4]).unwrap(), &noaux).contains("[3]"));
    let halves = [half::f16::ZERO; 3];
    assert!(refused(&DlpackView::from_slice(&halves, &[3]).unwrap(), &noaux).contains("f32"));
    let nan = [0.0f32, f32::NAN, 1.0];
    let message = refused(&DlpackView::from_slice(&nan, &[3]).unwrap(), &noaux);
    assert!(message.contains("expert 1") || message.contains('1'), "{message}");
}

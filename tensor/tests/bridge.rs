//! The DLPack bridge: the requires_grad gate, zero-copy round trips, deleters, and every invalid
//! import as its own typed error.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use half::{bf16, f16};
use sluice_tensor::dlpack::export_vec;
use sluice_tensor::reexports::dlpark::ffi::{
    DLDataType, DLDataTypeCode, DLDevice, DLDeviceType, DLManagedTensor, DLManagedTensorVersioned,
    DLTensor,
};
use sluice_tensor::reexports::dlpark::metadata::Dynamic;
use sluice_tensor::reexports::dlpark::{DlpackFlags, Managed, ManagedTensorBase};
use sluice_tensor::{
    DType, Device, DeviceAllocation, DlpackError, Layout, LegacyDlpack, Storage, Tensor,
};

fn matrix() -> Tensor {
    Tensor::from_vec((0..12).map(|i| i as f32).collect(), &[3, 4]).unwrap()
}

/// Counts how often the producer's context is dropped, i.e. how often the deleter ran.
struct DropCounter {
    drops: Arc<AtomicUsize>,
    _data: Vec<f32>,
}

impl Drop for DropCounter {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::SeqCst);
    }
}

/// A foreign producer's `[2, 3]` f32 tensor, versioned or legacy (`M`), whose deleter is counted.
fn counted_producer<M: ManagedTensorBase>(drops: &Arc<AtomicUsize>) -> Managed<M> {
    let data: Vec<f32> = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let ptr = data.as_ptr();
    let ctx = Box::new(DropCounter { drops: Arc::clone(drops), _data: data });
    let mut init = Dynamic::new(vec![2i64, 3], vec![3i64, 1]).initialize_as::<M>(ctx).unwrap();
    init.set_data(ptr.cast_mut().cast())
        .set_dtype(DType::F32.to_dlpack())
        .set_device(DLDevice::CPU);
    // SAFETY: `ptr` points into the vector owned by the context, which lives until the deleter.
    unsafe { init.finish() }
}

/// Applies `corrupt` to a counted producer's descriptor, imports it, and checks that the import
/// fails and that the deleter ran exactly once.
fn import_corrupted(corrupt: impl FnOnce(&mut DLManagedTensorVersioned)) -> DlpackError {
    let drops = Arc::new(AtomicUsize::new(0));
    let raw = counted_producer::<DLManagedTensorVersioned>(&drops).into_raw();
    // SAFETY: `raw` is the live, exclusively owned managed tensor just produced.
    corrupt(unsafe { &mut *raw });
    // SAFETY: ownership of `raw` moves to the import; shape/strides arrays were only edited in place.
    let result = unsafe { Tensor::from_raw_dlpack(raw) };
    let error = result.expect_err("corrupted descriptor must be refused");
    assert_eq!(drops.load(Ordering::SeqCst), 1, "deleter must run exactly once for {error}");
    error
}

#[test]
fn exporting_a_tensor_that_requires_grad_is_refused_with_a_helpful_message() {
    let parameter = matrix().with_requires_grad(true);
    let error = parameter.to_dlpack().err().expect("must be refused");
    assert_eq!(error, DlpackError::RequiresGrad);
    let message = error.to_string();
    assert!(message.contains("requires grad"), "{message}");
    assert!(message.contains(".detach()"), "{message}");
    assert!(message.contains("no copy"), "{message}");
    assert_eq!(parameter.to_dlpack_legacy().err(), Some(DlpackError::RequiresGrad));
    // Views of a parameter require grad too, as in PyTorch.
    let row = parameter.narrow(0, 1, 1).unwrap();
    assert_eq!(row.to_dlpack().err(), Some(DlpackError::RequiresGrad));
    let transposed = parameter.transpose(0, 1).unwrap();
    assert_eq!(transposed.to_dlpack().err(), Some(DlpackError::RequiresGrad));
    // The detached tensor exports, sharing the same memory.
    let exported = parameter.detach().to_dlpack().unwrap();
    assert_eq!(exported.validate().unwrap().data_ptr(), parameter.data_ptr().cast());
}

#[test]
fn round_trip_keeps_pointer_shape_strides_dtype_device() {
    let t = matrix();
    let back = Tensor::from_dlpack(t.to_dlpack().unwrap()).unwrap();
    assert_eq!(back.data_ptr(), t.data_ptr());
    assert_eq!(back.shape(), t.shape());
    assert_eq!(back.strides(), t.strides());
    assert_eq!(back.dtype(), DType::F32);
    assert_eq!(back.device(), Device::Cpu);
    assert!(!back.requires_grad());
    assert!(back.is_read_only(), "exports are read-only");
    assert_eq!(back.to_vec::<f32>().unwrap(), t.to_vec::<f32>().unwrap());
}

#[test]
fn the_consumer_may_outlive_the_tensor() {
    let t = matrix();
    let storage = Arc::clone(t.storage());
    let exported = t.to_dlpack().unwrap();
    drop(t);
    let back = Tensor::from_dlpack(exported).unwrap();
    assert_eq!(back.to_vec::<f32>().unwrap()[11], 11.0);
    assert_eq!(Arc::strong_count(&storage), 2, "the import keeps the storage alive");
    drop(back);
    assert_eq!(Arc::strong_count(&storage), 1, "the deleter released it");
}

#[test]
fn the_deleter_runs_exactly_once_when_the_last_view_drops() {
    let drops = Arc::new(AtomicUsize::new(0));
    let imported = Tensor::from_dlpack(counted_producer(&drops)).unwrap();
    let view = imported.narrow(1, 1, 2).unwrap();
    let detached = view.detach();
    drop(imported);
    drop(view);
    assert_eq!(drops.load(Ordering::SeqCst), 0);
    assert_eq!(detached.to_vec::<f32>().unwrap(), vec![2.0, 3.0, 5.0, 6.0]);
    // Re-exporting an import hands the same memory on and keeps the producer alive.
    let reexported = detached.to_dlpack().unwrap();
    drop(detached);
    assert_eq!(drops.load(Ordering::SeqCst), 0);
    drop(reexported);
    assert_eq!(drops.load(Ordering::SeqCst), 1);
}

#[test]
fn non_contiguous_tensors_export_with_their_strides_and_byte_offset() {
    let t = matrix();
    let narrowed = t.narrow(1, 1, 2).unwrap().narrow(0, 1, 2).unwrap();
    let dl = narrowed.to_dlpack().unwrap();
    let v = dl.validate().unwrap();
    assert_eq!(v.shape(), &[2, 2]);
    assert_eq!(v.strides(), Some(&[4i64, 1][..]));
    assert_eq!(v.byte_offset(), (4 + 1) * 4);
    assert_eq!(v.data_ptr(), t.data_ptr().cast());
    let back = Tensor::from_dlpack(dl).unwrap();
    assert_eq!(back.to_vec::<f32>().unwrap(), vec![5.0, 6.0, 9.0, 10.0]);

    let transposed = t.transpose(0, 1).unwrap();
    let dl = transposed.to_dlpack().unwrap();
    let v = dl.validate().unwrap();
    assert_eq!((v.shape(), v.strides()), (&[4i64, 3][..], Some(&[1i64, 4][..])));
    let back = Tensor::from_dlpack(dl).unwrap();
    assert_eq!(back.to_vec::<f32>().unwrap(), transposed.to_vec::<f32>().unwrap());
    assert!(!back.is_contiguous());
}

#[test]
fn legacy_export_and_import() {
    let t = matrix().narrow(0, 1, 2).unwrap();
    let legacy = t.to_dlpack_legacy().unwrap();
    let back = Tensor::from_dlpack_legacy(legacy).unwrap();
    assert_eq!(back.to_vec::<f32>().unwrap(), (4..12).map(|i| i as f32).collect::<Vec<_>>());
}

#[test]
fn legacy_and_pre_1_2_imports_may_omit_strides() {
    let raw =
        counted_producer::<DLManagedTensorVersioned>(&Arc::new(AtomicUsize::new(0))).into_raw();
    // SAFETY: exclusively owned live tensor; DLPack 1.1 allows null strides (compact).
    unsafe {
        (*raw).version.minor = 1;
        (*raw).dl_tensor.strides = std::ptr::null_mut();
    }
    // SAFETY: ownership moves to the import.
    let t = unsafe { Tensor::from_raw_dlpack(raw) }.unwrap();
    assert_eq!(t.strides(), &[3, 1]);
    assert_eq!(t.to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);

    let drops = Arc::new(AtomicUsize::new(0));
    let raw = counted_producer::<DLManagedTensor>(&drops).into_raw();
    // SAFETY: exclusively owned live tensor; legacy DLPack allows null strides (compact).
    unsafe { (*raw).dl_tensor.strides = std::ptr::null_mut() };
    // SAFETY: `raw` came from `into_raw` and is handed back once; a legacy header has no version
    // that could be refused.
    let legacy = unsafe { LegacyDlpack::from_raw(raw) }.unwrap();
    let t = Tensor::from_dlpack_legacy(legacy).unwrap();
    assert_eq!(t.strides(), &[3, 1]);
    assert_eq!(t.to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert_eq!(drops.load(Ordering::SeqCst), 0, "the import keeps the producer's memory");
    drop(t);
    assert_eq!(drops.load(Ordering::SeqCst), 1);
}

#[test]
fn every_invalid_import_is_its_own_typed_error() {
    assert_eq!(
        import_corrupted(|m| m.dl_tensor.data = std::ptr::null_mut()),
        DlpackError::NullData(6)
    );
    assert_eq!(import_corrupted(|m| m.dl_tensor.ndim = -1), DlpackError::NegativeNdim(-1));
    assert_eq!(
        import_corrupted(|m| m.dl_tensor.shape = std::ptr::null_mut()),
        DlpackError::NullShape(2)
    );
    assert_eq!(
        // SAFETY: the shape array has two entries.
        import_corrupted(|m| unsafe { *m.dl_tensor.shape.add(1) = -3 }),
        DlpackError::NegativeDimension { axis: 1, value: -3 }
    );
    assert_eq!(
        // SAFETY: the strides array has two entries.
        import_corrupted(|m| unsafe { *m.dl_tensor.strides = -3 }),
        DlpackError::NegativeStride { axis: 0, value: -3 }
    );
    assert_eq!(import_corrupted(|m| m.dl_tensor.dtype.lanes = 4), DlpackError::Lanes(4));
    assert_eq!(
        import_corrupted(|m| m.dl_tensor.dtype = DLDataType::new(DLDataTypeCode::COMPLEX, 64, 1)),
        DlpackError::UnsupportedDType { code: 5, bits: 64 }
    );
    assert_eq!(
        import_corrupted(
            |m| m.dl_tensor.device = DLDevice { device_type: DLDeviceType::METAL, device_id: 0 }
        ),
        DlpackError::UnsupportedDevice { device_type: 8, device_id: 0 }
    );
    assert_eq!(
        import_corrupted(
            |m| m.dl_tensor.device = DLDevice { device_type: DLDeviceType::CUDA, device_id: -2 }
        ),
        DlpackError::UnsupportedDevice { device_type: 2, device_id: -2 }
    );
    assert!(matches!(
        import_corrupted(|m| m.dl_tensor.byte_offset = 2),
        DlpackError::Misaligned { align: 4, dtype: DType::F32, .. }
    ));
    assert_eq!(
        // SAFETY: the shape array has two entries.
        import_corrupted(|m| unsafe { *m.dl_tensor.shape = i64::MAX }),
        DlpackError::ExtentOverflow("element count")
    );
    assert!(matches!(
        // SAFETY: the strides array has two entries.
        import_corrupted(|m| unsafe { *m.dl_tensor.strides = i64::MAX }),
        DlpackError::ExtentOverflow(_)
    ));
    assert_eq!(
        import_corrupted(|m| m.dl_tensor.byte_offset = u64::MAX - 3),
        DlpackError::ExtentOverflow("byte offset")
    );
    assert_eq!(
        import_corrupted(|m| m.dl_tensor.strides = std::ptr::null_mut()),
        DlpackError::MissingStrides { major: 1, minor: 3, ndim: 2 }
    );
    assert_eq!(
        import_corrupted(|m| m.dl_tensor.data = std::ptr::without_provenance_mut(usize::MAX - 7)),
        DlpackError::ExtentOverflow("address space")
    );
    assert_eq!(
        import_corrupted(|m| m.version.major = 2),
        DlpackError::IncompatibleVersion { major: 2, minor: 3 }
    );
    assert_eq!(
        // SAFETY: null is explicitly allowed by the contract.
        unsafe { Tensor::from_raw_dlpack(std::ptr::null_mut()) }.err(),
        Some(DlpackError::NullManagedTensor)
    );
}

/// Applies `corrupt` to a counted legacy producer's descriptor, imports it with
/// `from_dlpack_legacy`, and checks that the import fails and that the deleter ran exactly once.
fn import_corrupted_legacy(corrupt: impl FnOnce(&mut DLTensor)) -> DlpackError {
    let drops = Arc::new(AtomicUsize::new(0));
    let raw = counted_producer::<DLManagedTensor>(&drops).into_raw();
    // SAFETY: `raw` is the live, exclusively owned managed tensor just produced.
    corrupt(unsafe { &mut (*raw).dl_tensor });
    // SAFETY: `raw` came from `into_raw` and is handed back once; shape/strides arrays were only
    // edited in place.
    let legacy = unsafe { LegacyDlpack::from_raw(raw) }.expect("a legacy header has no version");
    let error =
        Tensor::from_dlpack_legacy(legacy).expect_err("corrupted descriptor must be refused");
    assert_eq!(drops.load(Ordering::SeqCst), 1, "deleter must run exactly once for {error}");
    error
}

/// Every fault a legacy descriptor can carry: those of the versioned test above except the ones
/// tied to a version (a legacy tensor has none, and null strides are compact there).
const DESCRIPTOR_FAULTS: [fn(&mut DLTensor); 14] = [
    |t| t.data = std::ptr::null_mut(),
    |t| t.ndim = -1,
    |t| t.shape = std::ptr::null_mut(),
    // SAFETY: the shape array has two entries.
    |t| unsafe { *t.shape.add(1) = -3 },
    // SAFETY: the strides array has two entries.
    |t| unsafe { *t.strides = -3 },
    |t| t.dtype.lanes = 4,
    |t| t.dtype = DLDataType::new(DLDataTypeCode::COMPLEX, 64, 1),
    |t| t.device = DLDevice { device_type: DLDeviceType::METAL, device_id: 0 },
    |t| t.device = DLDevice { device_type: DLDeviceType::CUDA, device_id: -2 },
    |t| t.byte_offset = 2,
    // SAFETY: the shape array has two entries.
    |t| unsafe { *t.shape = i64::MAX },
    // SAFETY: the strides array has two entries.
    |t| unsafe { *t.strides = i64::MAX },
    |t| t.byte_offset = u64::MAX - 3,
    |t| t.data = std::ptr::without_provenance_mut(usize::MAX - 7),
];

/// The error with the address of misaligned data zeroed: each producer has its own buffer.
fn without_address(error: DlpackError) -> DlpackError {
    match error {
        DlpackError::Misaligned { align, dtype, .. } => {
            DlpackError::Misaligned { address: 0, align, dtype }
        }
        other => other,
    }
}

#[test]
fn every_refused_legacy_import_releases_the_producer_once() {
    for (fault, corrupt) in DESCRIPTOR_FAULTS.into_iter().enumerate() {
        let legacy = import_corrupted_legacy(corrupt);
        // One validation serves both ABIs: the versioned import, whose errors the test above
        // checks one by one, refuses the same descriptor with the same error.
        let versioned = import_corrupted(|m| corrupt(&mut m.dl_tensor));
        assert_eq!(without_address(legacy), without_address(versioned), "fault {fault}");
    }
}

#[test]
fn empty_tensors_may_have_a_null_data_pointer() {
    let drops = Arc::new(AtomicUsize::new(0));
    let mut init = Dynamic::new(vec![0i64, 8], vec![8i64, 1])
        .initialize(Box::new(DropCounter { drops: Arc::clone(&drops), _data: vec![] }))
        .unwrap();
    init.set_dtype(DType::I32.to_dlpack()).set_device(DLDevice::CPU);
    // SAFETY: an empty tensor never dereferences its (null) data pointer.
    let dl = unsafe { init.finish() };
    let t = Tensor::from_dlpack(dl).unwrap();
    assert_eq!(t.shape(), &[0, 8]);
    assert_eq!(t.to_vec::<i32>().unwrap(), Vec::<i32>::new());
    drop(t);
    assert_eq!(drops.load(Ordering::SeqCst), 1);
}

#[test]
fn bf16_and_f16_round_trip() {
    let values = [0.0f32, 1.0, -2.5, 3.140625, 65504.0, 1e-3];
    let b: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
    let h: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
    let tb = Tensor::from_slice(&b, &[2, 3]).unwrap();
    let th = Tensor::from_slice(&h, &[3, 2]).unwrap();
    let back_b = Tensor::from_dlpack(tb.to_dlpack().unwrap()).unwrap();
    let back_h = Tensor::from_dlpack(th.to_dlpack().unwrap()).unwrap();
    assert_eq!(back_b.dtype(), DType::BF16);
    assert_eq!(back_h.dtype(), DType::F16);
    assert_eq!(back_b.to_vec::<bf16>().unwrap(), b);
    assert_eq!(back_h.to_vec::<f16>().unwrap(), h);
    assert_eq!(tb.to_dlpack().unwrap().validate().unwrap().dtype().code.0, 4);
}

#[test]
fn every_dtype_exports_with_its_dlpack_code() {
    for dtype in DType::ALL {
        let t = Tensor::zeros(dtype, &[2, 2]).unwrap();
        let dl = t.to_dlpack().unwrap();
        let v = dl.validate().unwrap();
        assert_eq!(v.dtype(), dtype.to_dlpack());
        let back = Tensor::from_dlpack(dl).unwrap();
        assert_eq!(back.dtype(), dtype);
    }
}

#[test]
fn host_vectors_are_handed_over_without_a_copy() {
    let data: Vec<i32> = vec![7, 8, 9, 10];
    let ptr = data.as_ptr();
    let dl = export_vec(data, &[2, 2]).unwrap();
    assert!(!dl.flags().contains(DlpackFlags::READ_ONLY), "the consumer owns it alone");
    let t = Tensor::from_dlpack(dl).unwrap();
    assert_eq!(t.data_ptr(), ptr.cast());
    assert_eq!(t.to_vec::<i32>().unwrap(), vec![7, 8, 9, 10]);
    assert!(export_vec(vec![1.0f32; 3], &[2, 2]).is_err());
}

#[test]
fn device_memory_exports_with_its_device_and_releases_once() {
    let released = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&released);
    // SAFETY: the fake device address is never dereferenced; the release only counts.
    let allocation = unsafe {
        DeviceAllocation::new(
            0x10_0000,
            64,
            Device::Cuda(1),
            Box::new(move || {
                counter.fetch_add(1, Ordering::SeqCst);
            }),
        )
    };
    let storage = Arc::new(Storage::device_memory(allocation));
    let t =
        Tensor::from_storage(storage, Layout::contiguous(&[4, 4]).unwrap(), DType::F32).unwrap();
    assert_eq!(t.device(), Device::Cuda(1));
    assert!(t.to_vec::<f32>().is_err(), "no host access to device memory");
    let dl = t.to_dlpack().unwrap();
    let v = dl.validate().unwrap();
    assert_eq!((v.device().device_type.0, v.device().device_id), (2, 1));
    drop(t);
    let back = Tensor::from_dlpack(dl).unwrap();
    assert_eq!(back.device(), Device::Cuda(1));
    assert_eq!(released.load(Ordering::SeqCst), 0);
    drop(back);
    assert_eq!(released.load(Ordering::SeqCst), 1);
}

#[test]
fn raw_handoff_through_a_c_pointer() {
    let t = matrix();
    let raw = t.detach().to_dlpack().unwrap().into_raw();
    // SAFETY: `raw` came from `into_raw` and is adopted exactly once.
    let back = unsafe { Tensor::from_raw_dlpack(raw) }.unwrap();
    assert_eq!(back.data_ptr(), t.data_ptr());
    // Reading the descriptor as a C consumer would.
    let dl = back.to_dlpack().unwrap();
    let raw: *mut DLManagedTensorVersioned = dl.into_raw();
    // SAFETY: live managed tensor; adopted back right after.
    assert_eq!(unsafe { (*raw).dl_tensor.ndim }, 2);
    // SAFETY: `raw` came from `into_raw`.
    drop(unsafe { Managed::from_raw(raw) }.unwrap());
}

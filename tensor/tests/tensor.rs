//! Tensors: construction, detach, views, host access.

use half::bf16;
use sluice_tensor::{DType, Device, HOST_ALIGN, SharedBytes, Tensor, TensorError};
use std::sync::Arc;

fn parameter() -> Tensor {
    Tensor::from_vec((0..24).map(|i| i as f32).collect(), &[4, 6]).unwrap().with_requires_grad(true)
}

#[test]
fn detach_shares_the_data_and_flips_only_the_flag() {
    let p = parameter();
    let d = p.detach();
    assert_eq!(d.data_ptr(), p.data_ptr());
    assert!(Arc::ptr_eq(d.storage(), p.storage()));
    assert_eq!(
        (d.shape(), d.strides(), d.dtype(), d.device()),
        (p.shape(), p.strides(), p.dtype(), p.device())
    );
    assert!(!d.requires_grad());
    assert!(p.requires_grad(), "the original is untouched");
}

#[test]
fn views_keep_the_flag_of_their_source() {
    let p = parameter();
    for view in
        [p.narrow(0, 1, 2).unwrap(), p.transpose(0, 1).unwrap(), p.reshape(&[2, 12]).unwrap()]
    {
        assert!(view.requires_grad());
    }
    let d = p.detach();
    for view in [d.narrow(1, 2, 3).unwrap(), d.permute(&[1, 0]).unwrap(), d.reshape(&[24]).unwrap()]
    {
        assert!(!view.requires_grad(), "views of a detached tensor are detached");
        assert!(Arc::ptr_eq(view.storage(), p.storage()));
    }
}

#[test]
fn owned_storage_is_64_byte_aligned() {
    for n in [1usize, 3, 17, 1000] {
        let t = Tensor::from_vec(vec![1u8; n], &[n]).unwrap();
        assert_eq!(t.data_ptr() as usize % HOST_ALIGN, 0);
        let z = Tensor::zeros(DType::BF16, &[n, 3]).unwrap();
        assert_eq!(z.data_ptr() as usize % HOST_ALIGN, 0);
    }
}

#[test]
fn host_access_checks_dtype_and_contiguity() {
    let t = parameter().detach();
    assert_eq!(t.as_slice::<f32>().unwrap().len(), 24);
    assert_eq!(
        t.as_slice::<i32>().unwrap_err(),
        TensorError::DTypeMismatch { expected: DType::I32, actual: DType::F32 }
    );
    let tr = t.transpose(0, 1).unwrap();
    assert!(matches!(tr.as_slice::<f32>(), Err(TensorError::NotContiguous { .. })));
    let v = tr.to_vec::<f32>().unwrap();
    assert_eq!(&v[..4], &[0.0, 6.0, 12.0, 18.0]);
    let n = t.narrow(1, 4, 2).unwrap();
    assert_eq!(n.to_vec::<f32>().unwrap(), vec![4.0, 5.0, 10.0, 11.0, 16.0, 17.0, 22.0, 23.0]);
    let row = t.narrow(0, 2, 1).unwrap();
    assert!(row.is_contiguous());
    assert_eq!(row.as_slice::<f32>().unwrap(), &[12.0, 13.0, 14.0, 15.0, 16.0, 17.0]);
}

#[test]
fn ndarray_views_share_the_data() {
    let t = parameter().detach().transpose(0, 1).unwrap();
    let view = t.to_ndarray_view::<f32>().unwrap();
    assert_eq!(view.shape(), &[6, 4]);
    assert_eq!(view[[5, 3]], 23.0);
    assert_eq!(view.as_ptr(), t.data_ptr().cast());
}

#[test]
fn constructors_check_sizes() {
    assert!(matches!(
        Tensor::from_vec(vec![1.0f32; 5], &[2, 3]),
        Err(TensorError::SizeMismatch { needed: 6, given: 5, .. })
    ));
    assert!(matches!(
        Tensor::from_bytes(&[0u8; 7], DType::BF16, &[2, 2]),
        Err(TensorError::SizeMismatch { needed: 8, given: 7, .. })
    ));
    assert!(matches!(Tensor::zeros(DType::F64, &[usize::MAX, 2]), Err(TensorError::Overflow(_))));
    let b = Tensor::from_bytes(&1.5f32.to_ne_bytes(), DType::F32, &[]).unwrap();
    assert_eq!((b.rank(), b.elem_count(), b.to_vec::<f32>().unwrap()), (0, 1, vec![1.5]));
}

#[test]
fn mapped_regions_are_zero_copy_read_only_and_checked() {
    let values: Vec<bf16> = (0..8).map(|i| bf16::from_f32(i as f32)).collect();
    let mut bytes = vec![0u8; 4];
    for v in &values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    let region: SharedBytes = Arc::new(bytes);
    let t = Tensor::from_mapped(Arc::clone(&region), 4, DType::BF16, &[2, 4]).unwrap();
    assert!(t.is_read_only());
    assert_eq!(t.device(), Device::Cpu);
    assert_eq!(t.data_ptr(), (*region).as_ref()[4..].as_ptr());
    assert_eq!(t.to_vec::<bf16>().unwrap(), values);
    assert!(matches!(
        Tensor::from_mapped(Arc::clone(&region), 6, DType::BF16, &[2, 4]),
        Err(TensorError::OutOfBounds { .. })
    ));
    assert!(matches!(
        Tensor::from_mapped(region, 3, DType::BF16, &[1]),
        Err(TensorError::Misaligned { dtype: DType::BF16, .. })
    ));
}

#[test]
fn view_errors_are_typed() {
    let t = parameter();
    assert_eq!(t.narrow(2, 0, 1).unwrap_err(), TensorError::DimOutOfRange { dim: 2, rank: 2 });
    assert!(matches!(t.narrow(1, 5, 2), Err(TensorError::NarrowOutOfRange { .. })));
    assert!(matches!(t.permute(&[0, 0]), Err(TensorError::InvalidPermutation { .. })));
    assert!(matches!(
        t.transpose(0, 1).unwrap().reshape(&[24]),
        Err(TensorError::ReshapeNeedsCopy { .. })
    ));
}

#[test]
fn copies_of_huge_aliasing_views_fail_cleanly() {
    use sluice_tensor::{Layout, Storage};
    let base = Tensor::from_vec(vec![1.0f32; 4], &[4]).unwrap();
    let storage: Arc<Storage> = Arc::clone(base.storage());
    // A zero stride repeats one element 2^61 times: valid as a view, impossible as a copy.
    let layout = Layout::strided(&[1 << 61], &[0], 0).unwrap();
    let huge = Tensor::from_storage(storage, layout, DType::F32).unwrap();
    assert!(matches!(huge.to_vec::<f32>(), Err(TensorError::Allocation { .. })));
}

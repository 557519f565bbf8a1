//! The sluice tensor core.
//!
//! A [`Tensor`] is shared [`Storage`] plus a strided [`Layout`], a [`DType`], a [`Device`] and an
//! explicit `requires_grad` flag. There is no autograd: the flag mirrors what an engine gets from its
//! training framework, where a model's parameters require grad by default. [`Tensor::detach`] clears
//! the flag in O(1) and shares the storage.
//!
//! The [`dlpack`] bridge is the only way data reaches a compute [`Backend`]. It refuses to export a
//! tensor that requires grad, so no backend can ever be handed one:
//!
//! ```
//! use sluice_tensor::{DlpackError, Tensor};
//!
//! // A router weight, loaded the way a training framework holds parameters.
//! let weight = Tensor::from_vec(vec![0.5f32; 6], &[2, 3])?.with_requires_grad(true);
//! assert_eq!(weight.to_dlpack().err(), Some(DlpackError::RequiresGrad));
//!
//! // `detach` shares the storage: same data pointer, no copy.
//! let detached = weight.detach();
//! assert_eq!(detached.data_ptr(), weight.data_ptr());
//! let exported = detached.to_dlpack()?;
//!
//! // The import is zero-copy too, and may outlive the original tensor.
//! drop((weight, detached));
//! let back = Tensor::from_dlpack(exported)?;
//! assert_eq!(back.to_vec::<f32>()?, vec![0.5; 6]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(unsafe_op_in_unsafe_fn)]

mod backend;
mod device;
pub mod dlpack;
mod dtype;
mod error;
mod layout;
mod routing;
mod storage;
mod tensor;

pub use backend::{Backend, BackendError, PreparedRouter, RoutingOutput};
pub use device::Device;
pub use dlpack::{Dlpack, DlpackError, LegacyDlpack};
pub use dtype::{DType, Element};
pub use error::TensorError;
pub use layout::Layout;
pub use routing::{
    NonFinitePolicy, RENORM_EPSILON, RoutingSpec, ScoringFunc, SpecError, TopkMethod,
};
pub use storage::{DeviceAllocation, HOST_ALIGN, SharedBytes, Storage};
pub use tensor::Tensor;

/// Re-exports of the crates whose types appear in this crate's API.
pub mod reexports {
    pub use dlpark;
    pub use half;
    pub use ndarray;
}


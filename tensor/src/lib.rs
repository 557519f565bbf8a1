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
//!
//! # Threads
//!
//! [`Tensor`] and [`Storage`] are `Send + Sync`. A storage never changes after it is built: there is
//! no mutable access to its bytes, only constructors, views and reads, so any number of threads may
//! read one tensor, or views of it, at the same time, and clones may move to other threads freely.
//! What a tensor owns is released when its last view is dropped, on whichever thread that happens:
//! for a DLPack import that means the producer's deleter runs exactly once, possibly on another
//! thread than the one that imported it, which the DLPack contract allows. The [`Backend`] and
//! [`PreparedRouter`] traits require `Send + Sync`, so one backend or prepared router serves many
//! threads at once.
#![deny(unsafe_op_in_unsafe_fn)]

mod backend;
mod contract;
mod device;
pub mod dispatch;
pub mod dlpack;
mod dtype;
mod error;
mod execution;
mod hash_table;
mod layout;
mod routing;
mod storage;
mod tensor;
mod view;

pub use backend::{Backend, BackendError, NonFiniteInput, PreparedRouter, RoutingOutput};
pub use contract::{
    ExpectedShape, RouteInputs, RouteOutputs, WORKSPACE_ALIGN, argument_view, check_logits_into,
    check_route_into, check_router_weight, host_bias_values,
};
pub use device::Device;
pub use dispatch::{
    DispatchInputs, DispatchOutputs, DispatchShape, PaddedOutputs, RankOutputs,
    check_dispatch_into, check_dispatch_values, check_route_and_dispatch_into, contiguous_ranks,
};
pub use dlpack::export_vec;
pub use dlpack::{Dlpack, DlpackError, LegacyDlpack};
pub use dtype::{DType, Element};
pub use error::TensorError;
pub use execution::{DeviceStream, Execution, StreamError};
pub use hash_table::{HashTableError, check_hash_table, first_token_outside_table};
pub use layout::Layout;
pub use routing::{
    BiasRole, NonFinitePolicy, RENORM_EPSILON, RoutingSpec, RoutingSpecBuilder, ScoringFunc,
    ScoringOrder, SpecError, TopkMethod,
};
pub use storage::{DeviceAllocation, HOST_ALIGN, SharedBytes, Storage};
pub use tensor::Tensor;
pub use view::{DlpackView, DlpackViewMut, MAX_VIEW_RANK, ViewError};

/// The thread-safety promised in the crate docs, checked at compile time.
const fn assert_send_sync<T: Send + Sync + ?Sized>() {}
const _: () = {
    assert_send_sync::<Tensor>();
    assert_send_sync::<Storage>();
    assert_send_sync::<dyn Backend>();
    assert_send_sync::<dyn PreparedRouter>();
};

/// Re-exports of the crates whose types appear in this crate's API.
pub mod reexports {
    pub use dlpark;
    pub use half;
    pub use ndarray;
}

//! The sluice tensor core.
//!
//! A [`Tensor`] is shared storage plus a strided [`Layout`], a [`DType`], a [`Device`] and an
//! explicit `requires_grad` flag. There is no autograd: the flag mirrors what an engine gets from its
//! training framework, where a model's parameters require grad by default. [`Tensor::detach`] clears
//! the flag in O(1) and shares the storage.
//!
//! The [`dlpack`] bridge is the only way data reaches a compute [`Backend`]. It refuses to export a
//! tensor that requires grad, so no backend can ever be handed one.
#![deny(unsafe_op_in_unsafe_fn)]

mod backend;
mod device;
pub mod dlpack;
mod dtype;
mod routing;

pub use backend::{Backend, BackendError, PreparedRouter, RoutingOutput};
pub use device::Device;
pub use dlpack::{Dlpack, DlpackError, LegacyDlpack};
pub use dtype::{DType, Element};
pub use routing::{
    NonFinitePolicy, RENORM_EPSILON, RoutingSpec, ScoringFunc, SpecError, TopkMethod,
};

/// Re-exports of the crates whose types appear in this crate's API.
pub mod reexports {
    pub use dlpark;
    pub use half;
}

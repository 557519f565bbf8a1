//! DeepSeek V2 / V2-Lite / V2.5 / V3 / R1 / V3.2 / V4 and Kimi-K2 / K2.5 MoE gates from Hugging
//! Face checkpoints, and the scalar reference router every backend is tested against.
//!
//! - [`Checkpoint`] opens a checkpoint folder: [`ModelConfig`] from `config.json` (as the model
//!   authors or transformers' `save_pretrained` wrote it), and safetensors weights, single-file or
//!   sharded, memory-mapped lazily and read zero-copy.
//! - [`MoeGate`] is one MoE layer's router: weight, correction bias (or hash table) and validated
//!   [`RoutingSpec`](sluice_tensor::RoutingSpec). It programs against any
//!   [`Backend`](sluice_tensor::Backend) and hands it only detached DLPack tensors, so parameters
//!   and activations that require grad route fine.
//! - [`reference`](mod@reference) is the one source of truth for routing semantics, with the
//!   comparison helpers every fast path is tested with; [`golden`] reads the fixtures that pin it
//!   to transformers' own routers.
//!
//! ```no_run
//! use sluice_models::{Checkpoint, MoeGate};
//! use sluice_tensor::{Backend, Tensor};
//!
//! fn route_layer(backend: &dyn Backend) -> Result<(), Box<dyn std::error::Error>> {
//!     let checkpoint = Checkpoint::open("DeepSeek-V3")?;
//!     // Maps only the shard(s) holding layer 3's gate.
//!     let gate = MoeGate::load(&checkpoint, 3)?;
//!     assert!(gate.weight().requires_grad(), "held as a parameter");
//!
//!     let prepared = gate.prepare(backend)?;
//!     let h = gate.hidden_size();
//!     // Activations that require grad are fine: the gate detaches them (no copy).
//!     let hidden = Tensor::from_vec(vec![0.1f32; 4 * h], &[4, h])?.with_requires_grad(true);
//!     let routing = prepared.route(&hidden)?;
//!     println!("{:?}", routing.ids().to_vec::<i32>()?); // [4, 8] expert ids
//!     Ok(())
//! }
//! ```
//!
//! # Threads
//!
//! [`Checkpoint`], [`MoeGate`], [`PreparedGate`] and [`GateRouting`] are `Send + Sync`. A gate is
//! immutable once built (its tensors never change, see `sluice_tensor`'s thread notes), and a
//! [`PreparedGate`] only reads the backend's prepared weight, so the way to route from many threads
//! is to prepare a gate once and share that one [`PreparedGate`] (by reference in scoped threads, or
//! in an `Arc`): every call is independent and gives exactly the result a single thread would. A
//! [`Checkpoint`] may be shared too: the first thread that asks for a tensor in a shard maps it,
//! under a lock, and every other thread reuses that mapping.

mod checkpoint;
mod config;
mod dispatch;
mod error;
mod gate;
pub mod golden;
mod hash_table;
mod prepared;
pub mod reference;
mod safetensors_bytes;
mod safetensors_file;

pub use checkpoint::{CONFIG_FILE, Checkpoint, CheckpointError, SHARD_INDEX, SINGLE_FILE};
pub use config::{ConfigError, MlpKind, ModelConfig, ModelFamily};
pub use error::{ModelError, RoutingProblem};
pub use gate::{GateTensorNames, MoeGate};
pub use prepared::{GateRouting, PreparedGate};
pub use safetensors_bytes::SafetensorsBytes;
pub use safetensors_file::{MappedBytes, TensorLocation};

/// The thread-safety promised in the crate docs, checked at compile time.
const fn assert_send_sync<T: Send + Sync>() {}
const _: () = {
    assert_send_sync::<Checkpoint>();
    assert_send_sync::<MoeGate>();
    assert_send_sync::<PreparedGate>();
    assert_send_sync::<GateRouting>();
    assert_send_sync::<SafetensorsBytes>();
};

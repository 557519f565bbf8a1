//! The contract between sluice and a compute backend.
//!
//! A backend never sees a [`Tensor`](crate::Tensor): every data argument is a DLPack tensor made by
//! the [bridge](crate::dlpack) or a borrowed [view](crate::DlpackView) validated by it, and every
//! result comes back as a DLPack tensor that the bridge imports without a copy, or is written into
//! the caller's own buffers. Because the bridge refuses tensors that require grad, no backend can
//! be handed one, whatever it does with its inputs. A backend could be a C library on the other
//! side of an FFI call and this trait would read the same.
//!
//! Shapes, with `T` tokens, `H` the hidden size, `E` routed experts and `K = spec.top_k`:
//!
//! | argument | shape | dtypes |
//! | --- | --- | --- |
//! | hidden states `x` | `[T, H]` | f32, bf16, f16 |
//! | router weight `W` | `[E, H]` | bf16, f32 |
//! | correction bias | `[E]` | f32 |
//! | hash table `tid2eid` (hash layers) | `[vocab, K]` | i32 |
//! | token ids (hash layers) | `[T]` | i32, i64 |
//! | logits | `[T, E]` | f32 |
//! | `topk_ids` | `[T, K]` | i32 (`-1` marks an invalid row) |
//! | `topk_weights` | `[T, K]` | f32 |
//! | status | `[2]` | i32: rows marked invalid (non-finite values; on a device stream also a hash-routed token id outside the table), and the first of them or `-1` |
//!
use std::fmt;

use thiserror::Error;

use crate::contract::{ExpectedShape, argument_view, with_borrowed_dlpack, write_status};
use crate::dispatch::{
    DispatchInputs, DispatchOutputs, check_dispatch_into, check_route_and_dispatch_into,
};
use crate::dlpack::{Dlpack, DlpackError, export_vec};
use crate::{
    DType, Device, DlpackView, DlpackViewMut, Element, Execution, HashTableError, RouteInputs,
    RouteOutputs, RoutingSpec, SpecError, TopkMethod, ViewError, check_logits_into,
    check_route_into,
};

/// The two outputs of routing, as DLPack tensors owned by the backend until imported.
pub struct RoutingOutput {
    /// Selected expert ids, i32 `[T, K]`, each row sorted by weight descending then by id.
    pub topk_ids: Dlpack,
    /// The weights of those experts, f32 `[T, K]`.
    pub topk_weights: Dlpack,
}

impl RoutingOutput {
    /// Hands host vectors of `tokens` rows of `top_k` over as the two outputs, without a copy:
    /// how a backend written outside this workspace returns its results with no `unsafe` code.
    pub fn from_host_vecs(
        tokens: usize,
        top_k: usize,
        ids: Vec<i32>,
        weights: Vec<f32>,
    ) -> Result<Self, DlpackError> {
        let shape = [tokens, top_k];
        Ok(RoutingOutput {
            topk_ids: export_vec(ids, &shape)?,
            topk_weights: export_vec(weights, &shape)?,
        })
    }
}

impl fmt::Debug for RoutingOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shape = |t: &Dlpack| DlpackView::from_dlpack(t).map(|v| v.shape().to_vec());
        f.debug_struct("RoutingOutput")
            .field("topk_ids", &shape(&self.topk_ids))
            .field("topk_weights", &shape(&self.topk_weights))
            .finish()
    }
}

/// A router weight (and bias) turned once into whatever form the backend computes fastest with:
/// packed on the host, uploaded to a device, or simply kept.
///
/// Created by [`Backend::prepare_router`]; it owns what it needs, so the caller's tensors may be
/// dropped.
///
/// # The engine's contract: `route_into`
///
/// Engines call a gate the way they call every kernel: once per layer per decode step, on their
/// own stream, into buffers they allocated once, usually inside a graph they capture and replay.
/// [`PreparedRouter::route_into`] is that call. Its rules, which every backend keeps:
///
/// 1. **Everything costly happens before.** Packing or uploading the weight, compiling and loading
///    kernels, choosing GEMM algorithms and allocating what the router keeps happen in
///    [`Backend::prepare_router`] and [`PreparedRouter::warm_up`]. `route_into` allocates nothing,
///    compiles nothing, loads nothing.
/// 2. **Every check comes first.** All arguments are checked ([`check_route_into`] does the shared
///    part) before any work starts or is enqueued, so a refused call changes no output byte and
///    leaves a caller's graph capture intact.
/// 3. **On a device stream, only enqueue.** With [`Execution::Stream`] the call enqueues kernels
///    and memsets on the caller's stream and returns: no host synchronisation, no stream of its
///    own, no event the caller did not ask for. The stream's safety contract is stated once, on
///    [`DeviceStream::new`](crate::DeviceStream::new).
/// 4. **Mutable scratch comes from the caller.** A prepared router is shared by every thread and
///    stream that routes through it, so what one call writes (beyond its outputs) lives in the
///    caller's workspace of at least [`PreparedRouter::workspace_bytes`] bytes, never in the
///    router.
/// 5. **Outputs are windows.** Output views may be windows of larger buffers (an engine's
///    max-batch buffer): only the `[T, K]` (or `[T, E]`) window is written. Rows may be further
///    apart than `K`; within a row, elements are contiguous.
/// 6. **Non-finite rows.** Under [`NonFinitePolicy::MarkInvalid`](crate::NonFinitePolicy) a row
///    whose hidden state or logits hold a NaN or an infinity gets ids `-1` and weights `0`, and the
///    status output (when given) counts such rows and names the first. The default
///    [`NonFinitePolicy::Error`](crate::NonFinitePolicy) fails the call, which needs the host to
///    look at the result: it is refused on a device stream with
///    [`BackendError::PolicyNeedsHost`]. On the host a failed call may have written the outputs.
///    A hash-routed layer's token id that names no row of its table is refused on the host with
///    [`BackendError::TokenIdOutsideTable`] before anything is written; a call enqueued on a
///    device stream cannot look at the ids first, so there that row is marked like a non-finite
///    one (ids `-1`, weights `0`, counted in the status), whatever the policy.
///
/// The allocating [`PreparedRouter::route`] stays as a convenience; on the host it is the same
/// computation (a backend builds it on `route_into`).
///
/// # After the gate: `dispatch_into`
///
/// [`PreparedRouter::dispatch_into`] turns `topk_ids` into the layout expert kernels and an
/// expert-parallel all-to-all consume: counts and offsets per expert, the pairs sorted by expert
/// (stable), the inverse index, optionally padded to a grouped GEMM's block size, optionally per
/// destination rank ([`crate::dispatch`] describes every output). Rules 1 to 5 hold as written
/// above, with [`check_dispatch_into`] as the shared checks. Its own rules:
///
/// 7. **Skipped, never dispatched.** A pair whose id is `-1` appears in no count, offset, sorted
///    or padded position; its inverse entry is `-1`, and the `invalid` output counts its row.
/// 8. **Every position is written.** Positions past the valid pairs hold the sentinel `T * K`
///    (unused blocks: expert `-1`), so a kernel that iterates over a whole output reads no stale
///    value from an earlier call.
/// 9. **Ids are data.** On the host, an id outside `-1` and `[0, E)` or a rank outside `[0, R)`
///    is refused ([`check_dispatch_values`](crate::check_dispatch_values)) before anything is
///    written. A call enqueued on a device stream cannot look at them first: there such a pair is
///    skipped and counted like a `-1`, never written out of bounds.
pub trait PreparedRouter: Send + Sync + fmt::Debug {
    /// The routing spec this router was prepared for.
    fn spec(&self) -> &RoutingSpec;

    /// The hidden size `H` the weight expects.
    fn hidden_size(&self) -> usize;

    /// The device the router computes on, and where `*_into` arguments must live.
    fn device(&self) -> Device {
        Device::Cpu
    }

    /// Router logits `x · Wᵀ`, f32 `[T, E]`.
    fn router_gemm(&self, hidden: &Dlpack) -> Result<Dlpack, BackendError>;

    /// The fused route: router GEMM and routing in one call. A hash-routed router refuses it
    /// with [`BackendError::MissingTokenIds`]: it needs the token ids of
    /// [`route_with_token_ids`](Self::route_with_token_ids) or of
    /// [`route_into`](Self::route_into)'s inputs.
    fn route(&self, hidden: &Dlpack) -> Result<RoutingOutput, BackendError>;

    /// [`route`](Self::route) with the token ids (i32 or i64 `[T]`) of the hidden states: the
    /// synchronous convenience of a hash-routed layer, as `route` is of the others. Routers that
    /// do not route by token id ignore the ids; a hash-routed one refuses an id outside its table
    /// with [`BackendError::TokenIdOutsideTable`].
    ///
    /// The default body is [`route_into`](Self::route_into) on the host into outputs it allocates,
    /// for a host router. A device router overrides it as it does `route` (host inputs are staged
    /// on its device and the outputs come back to the host; it waits for its own stream), or
    /// refuses with [`BackendError::NotSupported`], which the default body does for it.
    fn route_with_token_ids(
        &self,
        hidden: &Dlpack,
        token_ids: &Dlpack,
    ) -> Result<RoutingOutput, BackendError> {
        const OP: &str = "route_with_token_ids";
        if self.device() != Device::Cpu {
            return Err(BackendError::NotSupported { op: OP });
        }
        let hidden = argument_view(OP, "hidden", hidden)?;
        let token_ids = argument_view(OP, "token_ids", token_ids)?;
        let (tokens, top_k) = (hidden.shape().first().copied().unwrap_or(0), self.spec().top_k);
        let shape = [tokens, top_k];
        let exported = |source| BackendError::Argument { op: OP, arg: "output", source };
        let len = tokens
            .checked_mul(top_k)
            .ok_or(BackendError::OutOfMemory { op: OP, bytes: usize::MAX })?;
        let (mut ids, mut weights) = (vec![0i32; len], vec![0f32; len]);
        {
            let mut outputs = RouteOutputs::new(
                DlpackViewMut::from_slice(&mut ids, &shape).map_err(exported)?,
                DlpackViewMut::from_slice(&mut weights, &shape).map_err(exported)?,
            );
            let inputs = RouteInputs::new(hidden).with_token_ids(token_ids);
            self.route_into(&inputs, &mut outputs, Execution::Host)?;
        }
        RoutingOutput::from_host_vecs(tokens, top_k, ids, weights).map_err(exported)
    }

    /// The bytes of caller workspace a `route_into` of `tokens` tokens needs (0: none).
    fn workspace_bytes(&self, tokens: usize) -> usize {
        let _ = tokens;
        0
    }

    /// Does now whatever a first call of up to `tokens` tokens would otherwise do (compile or
    /// load kernels, choose algorithms, grow the router's own host buffers), so that later
    /// `*_into` calls of up to that many tokens only compute.
    fn warm_up(&self, tokens: usize) -> Result<(), BackendError> {
        let _ = tokens;
        Ok(())
    }

    /// The fused route into caller-owned outputs, on the host or the caller's stream.
    ///
    /// The default body serves backends that only implement [`route`](Self::route): on the host
    /// it routes and copies the results into the outputs (allocating, unlike a native
    /// implementation), and it refuses device streams.
    fn route_into(
        &self,
        inputs: &RouteInputs<'_>,
        outputs: &mut RouteOutputs<'_>,
        execution: Execution,
    ) -> Result<(), BackendError> {
        const OP: &str = "route_into";
        let tokens = check_route_into(OP, self, inputs, outputs, execution, 0)?;
        if execution != Execution::Host {
            return Err(BackendError::UnsupportedExecution { op: OP, execution });
        }
        with_borrowed_dlpack(OP, "hidden", &inputs.hidden, |hidden| {
            let routed = self.route(hidden)?;
            copy_rows::<i32>(OP, "topk_ids", &routed.topk_ids, &mut outputs.topk_ids)?;
            copy_rows::<f32>(OP, "topk_weights", &routed.topk_weights, &mut outputs.topk_weights)?;
            if let Some(logits) = outputs.logits.as_mut() {
                copy_rows::<f32>(OP, "logits", &self.router_gemm(hidden)?, logits)?;
            }
            Ok(())
        })?;
        if let Some(status) = outputs.status.as_mut() {
            let ids = outputs.topk_ids.as_view();
            let ids = ids.as_array2::<i32>().map_err(|source| BackendError::View {
                op: OP,
                arg: "topk_ids",
                source,
            })?;
            write_status(OP, status, (0..tokens).filter(|&row| ids[[row, 0]] < 0))?;
        }
        Ok(())
    }

    /// The dispatch layout of `topk_ids` into caller-owned outputs, on the host or the caller's
    /// stream, under the same rules as `route_into` (see [`crate::dispatch`] for what each output
    /// holds, and the trait docs for the rules).
    ///
    /// The default body checks the arguments and refuses with [`BackendError::NotSupported`]:
    /// a backend that computes the layout overrides it.
    fn dispatch_into(
        &self,
        inputs: &DispatchInputs<'_>,
        outputs: &mut DispatchOutputs<'_>,
        execution: Execution,
    ) -> Result<(), BackendError> {
        const OP: &str = "dispatch_into";
        check_dispatch_into(OP, self, inputs, outputs, execution)?;
        Err(BackendError::NotSupported { op: OP })
    }

    /// The gate and the dispatch layout of its own ids in one call: `route_into` into `outputs`,
    /// then the layout of `outputs.topk_ids` (with `expert_ranks` when `layout` asks for rank
    /// outputs) into `layout`, under the same rules. Everything is checked
    /// ([`check_route_and_dispatch_into`](crate::check_route_and_dispatch_into)) before anything is
    /// written; `outputs.workspace` is sized by [`workspace_bytes`](Self::workspace_bytes) and
    /// `layout.workspace` by [`dispatch_workspace_bytes`](Self::dispatch_workspace_bytes), as for
    /// the two calls.
    ///
    /// The default body makes the two calls. A backend overrides it where it computes the layout
    /// inside the routing kernel, which saves the layout's own launch (the CUDA backend, for
    /// decode batches).
    fn route_and_dispatch_into(
        &self,
        inputs: &RouteInputs<'_>,
        outputs: &mut RouteOutputs<'_>,
        layout: &mut DispatchOutputs<'_>,
        expert_ranks: Option<DlpackView<'_>>,
        execution: Execution,
    ) -> Result<(), BackendError> {
        const OP: &str = "route_and_dispatch_into";
        check_route_and_dispatch_into(OP, self, inputs, outputs, layout, expert_ranks, execution)?;
        self.route_into(inputs, outputs, execution)?;
        let ids = DispatchInputs { topk_ids: outputs.topk_ids.as_view(), expert_ranks };
        self.dispatch_into(&ids, layout, execution)
    }

    /// The bytes of caller workspace (`DispatchOutputs::workspace`) a `dispatch_into` of `tokens`
    /// tokens needs (0: none).
    fn dispatch_workspace_bytes(&self, tokens: usize) -> usize {
        let _ = tokens;
        0
    }

    /// The dispatch layout of host ids into host outputs, synchronously: the convenience beside
    /// [`dispatch_into`](Self::dispatch_into), as [`route`](Self::route) is beside `route_into`.
    /// Arguments are checked as `dispatch_into` checks them, on the host; the outputs' workspace
    /// is not used.
    ///
    /// A router on a device that computes the layout overrides it: it copies the ids (and the rank
    /// table) to its device, computes there with scratch of its own, waits, and copies the outputs
    /// back, so that the host sees what its device computes. The default body is `dispatch_into`
    /// on the host for a host router, and [`BackendError::NotSupported`] for a device router.
    fn dispatch(
        &self,
        inputs: &DispatchInputs<'_>,
        outputs: &mut DispatchOutputs<'_>,
    ) -> Result<(), BackendError> {
        if self.device() != Device::Cpu {
            return Err(BackendError::NotSupported { op: "dispatch" });
        }
        self.dispatch_into(inputs, outputs, Execution::Host)
    }

    /// Router logits into a caller-owned f32 `[T, E]` output, on the host or the caller's stream.
    ///
    /// The default body computes them with [`router_gemm`](Self::router_gemm) and copies them,
    /// on the host only.
    fn router_gemm_into(
        &self,
        hidden: &DlpackView<'_>,
        logits: &mut DlpackViewMut<'_>,
        execution: Execution,
    ) -> Result<(), BackendError> {
        const OP: &str = "router_gemm_into";
        check_logits_into(OP, self, hidden, logits, execution)?;
        if execution != Execution::Host {
            return Err(BackendError::UnsupportedExecution { op: OP, execution });
        }
        with_borrowed_dlpack(OP, "hidden", hidden, |hidden| {
            copy_rows::<f32>(OP, "logits", &self.router_gemm(hidden)?, logits)
        })
    }
}

/// Copies a backend's `[T, N]` host output into the caller's window.
fn copy_rows<T: Element>(
    op: &'static str,
    arg: &'static str,
    from: &Dlpack,
    to: &mut DlpackViewMut<'_>,
) -> Result<(), BackendError> {
    let from = argument_view(op, arg, from)?;
    let from = from.as_array2::<T>().map_err(|source| BackendError::View { op, arg, source })?;
    let mut to =
        to.as_array2_mut::<T>().map_err(|source| BackendError::View { op, arg, source })?;
    if from.dim() != to.dim() {
        return Err(BackendError::Shape {
            op,
            arg,
            shape: from.shape().to_vec(),
            expected: ExpectedShape::exact(to.shape()),
        });
    }
    to.assign(&from);
    Ok(())
}

/// A compute backend: a device plus the router ops, all taking DLPack tensors.
///
/// Implementations must be usable from many threads at once (`Send + Sync`) and through a trait
/// object. Results must match the scalar reference router in `sluice-models`; a backend may fuse and
/// reorder work however it likes.
pub trait Backend: Send + Sync + fmt::Debug {
    /// A short name for messages and benchmarks (`"cpu"`, `"cuda"`, ...).
    fn name(&self) -> &str;

    /// The device this backend computes on.
    fn device(&self) -> Device;

    /// Copies a host tensor to the backend's device (a plain copy for the CPU backend).
    fn upload(&self, host: &Dlpack) -> Result<Dlpack, BackendError>;

    /// Copies a tensor on the backend's device to host memory.
    fn download(&self, tensor: &Dlpack) -> Result<Dlpack, BackendError>;

    /// Router logits `x[T, H] · W[E, H]ᵀ`, f32 `[T, E]`, accumulated in f32. f32 inputs are never
    /// rounded to bf16.
    fn router_gemm(&self, hidden: &Dlpack, weight: &Dlpack) -> Result<Dlpack, BackendError>;

    /// Routing of f32 logits `[T, E]` as `spec` says, with an optional f32 correction bias `[E]`.
    fn route_logits(
        &self,
        logits: &Dlpack,
        bias: Option<&Dlpack>,
        spec: &RoutingSpec,
    ) -> Result<RoutingOutput, BackendError>;

    /// Prepares a router weight (and bias) for repeated fused routing. The backend takes ownership of
    /// the DLPack tensors and may keep them, pack them or upload them.
    fn prepare_router(
        &self,
        weight: Dlpack,
        bias: Option<Dlpack>,
        spec: &RoutingSpec,
    ) -> Result<Box<dyn PreparedRouter>, BackendError>;

    /// Prepares a hash-routed router ([`TopkMethod::Hash`](crate::TopkMethod::Hash)): the weight
    /// that scores the experts and the table `tid2eid` (i32 `[vocab, K]`, checked with
    /// [`check_hash_table`](crate::check_hash_table)) that chooses them. Backends without hash
    /// routing refuse it.
    fn prepare_hash_router(
        &self,
        weight: Dlpack,
        table: Dlpack,
        spec: &RoutingSpec,
    ) -> Result<Box<dyn PreparedRouter>, BackendError> {
        let _ = (weight, table, spec);
        Err(BackendError::Unsupported {
            op: "prepare_hash_router",
            backend: self.name().to_owned(),
        })
    }

    /// The fused route for a single call: prepares the router, then routes. Callers that route more
    /// than once should keep the [`PreparedRouter`] instead.
    fn route(
        &self,
        hidden: &Dlpack,
        weight: Dlpack,
        bias: Option<Dlpack>,
        spec: &RoutingSpec,
    ) -> Result<RoutingOutput, BackendError> {
        self.prepare_router(weight, bias, spec)?.route(hidden)
    }
}

/// Which input of a row held the NaN or infinity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NonFiniteInput {
    /// The hidden states (so the logits were non-finite too).
    HiddenStates,
    /// The router logits, from finite hidden states (an overflow) or given directly.
    Logits,
}

impl fmt::Display for NonFiniteInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NonFiniteInput::HiddenStates => "hidden states",
            NonFiniteInput::Logits => "router logits",
        })
    }
}

/// Why a backend op refused its inputs or failed.
///
/// Every variant names the op and, where one is at fault, the argument.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BackendError {
    /// An argument failed the bridge's validation (a malformed DLPack descriptor, a read-only
    /// output, self-overlapping strides...).
    #[error("{op}: `{arg}`: {source}")]
    Argument {
        /// The op.
        op: &'static str,
        /// The argument.
        arg: &'static str,
        /// What the bridge found.
        source: DlpackError,
    },
    /// Typed host access to an argument was refused.
    #[error("{op}: `{arg}`: {source}")]
    View {
        /// The op.
        op: &'static str,
        /// The argument.
        arg: &'static str,
        /// Why.
        source: ViewError,
    },
    /// An argument's dtype is not supported by the op.
    #[error(
        "{op}: `{arg}` has dtype {dtype}, which this op does not support (supported: {supported})"
    )]
    UnsupportedDType {
        /// The op.
        op: &'static str,
        /// The argument.
        arg: &'static str,
        /// The dtype it had.
        dtype: DType,
        /// What the op takes.
        supported: &'static str,
    },
    /// An argument's shape does not fit the op.
    #[error("{op}: `{arg}` has shape {shape:?}, expected {expected}")]
    Shape {
        /// The op.
        op: &'static str,
        /// The argument.
        arg: &'static str,
        /// The shape it had.
        shape: Vec<usize>,
        /// The shape the op needs.
        expected: ExpectedShape,
    },
    /// An argument lives on a device this backend cannot read.
    #[error("{op}: `{arg}` is on {actual}, this backend computes on {expected}")]
    WrongDevice {
        /// The op.
        op: &'static str,
        /// The argument.
        arg: &'static str,
        /// Where it is.
        actual: Device,
        /// Where it must be.
        expected: Device,
    },
    /// An argument's strides are not supported by the op.
    #[error("{op}: `{arg}` has strides {strides:?} for shape {shape:?}; {requirement}")]
    Layout {
        /// The op.
        op: &'static str,
        /// The argument.
        arg: &'static str,
        /// Its shape.
        shape: Vec<usize>,
        /// Its strides.
        strides: Vec<usize>,
        /// What the op needs.
        requirement: &'static str,
    },
    /// A router weight of hidden size 0: every logit would be 0 and routing meaningless.
    #[error("{op}: `{arg}` has hidden size 0; a router needs at least one hidden feature")]
    ZeroHiddenSize {
        /// The op.
        op: &'static str,
        /// The argument.
        arg: &'static str,
    },
    /// Two arguments share memory that one of them writes.
    #[error("{op}: `{first}` and `{second}` overlap in memory; outputs must not alias")]
    Overlap {
        /// The op.
        op: &'static str,
        /// One argument.
        first: &'static str,
        /// The other, an output.
        second: &'static str,
    },
    /// The caller's workspace is smaller than the call needs.
    #[error("{op}: the workspace holds {bytes} bytes, this call needs {needed}")]
    WorkspaceTooSmall {
        /// The op.
        op: &'static str,
        /// Bytes given.
        bytes: usize,
        /// Bytes needed (`workspace_bytes(T)`).
        needed: usize,
    },
    /// More tokens than the backend is configured to take in one call.
    #[error("{op}: {tokens} tokens exceed the limit of {limit} per call")]
    TooManyTokens {
        /// The op.
        op: &'static str,
        /// Tokens given.
        tokens: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A row holds a NaN or an infinity, under [`NonFinitePolicy::Error`](crate::NonFinitePolicy::Error).
    #[error(
        "{op}: non-finite {input} in row {row}; pass the mark-invalid policy to route the other \
         rows"
    )]
    NonFinite {
        /// The op.
        op: &'static str,
        /// The first bad row.
        row: usize,
        /// Which input held the bad value.
        input: NonFiniteInput,
    },
    /// The correction bias holds a NaN or an infinity, which would make selection meaningless.
    #[error("{op}: the correction bias of expert {expert} is {value}, not a finite number")]
    NonFiniteBias {
        /// The op.
        op: &'static str,
        /// The first bad expert.
        expert: usize,
        /// Its value.
        value: f32,
    },
    /// A correction bias was given to a method that does not use one.
    #[error(
        "{op}: a correction bias was given, but `topk_method` = \"{}\" does not use one",
        method.name()
    )]
    UnexpectedBias {
        /// The op.
        op: &'static str,
        /// The spec's method.
        method: TopkMethod,
    },
    /// The call cannot run where it was asked to.
    #[error("{op}: this backend cannot run on {execution}")]
    UnsupportedExecution {
        /// The op.
        op: &'static str,
        /// Where the call was to run.
        execution: Execution,
    },
    /// The error policy for non-finite rows needs the host to see the result, which a call that
    /// only enqueues work cannot do.
    #[error(
        "{op}: the error policy for non-finite rows needs a host synchronisation; on a device \
         stream use the mark-invalid policy and a status output"
    )]
    PolicyNeedsHost {
        /// The op.
        op: &'static str,
    },
    /// An expert id that is neither `-1` (skip) nor in `[0, E)`.
    #[error(
        "{op}: `topk_ids` row {row} slot {slot} holds {id}; ids are -1 (skip) or in [0, {experts})"
    )]
    ExpertIdOutOfRange {
        /// The op.
        op: &'static str,
        /// The row (token).
        row: usize,
        /// The slot within the row.
        slot: usize,
        /// The id found.
        id: i32,
        /// The number of experts `E`.
        experts: usize,
    },
    /// An expert-to-rank table that names a rank outside `[0, R)`.
    #[error("{op}: `expert_ranks` puts expert {expert} on rank {rank}; ranks are in [0, {ranks})")]
    RankOutOfRange {
        /// The op.
        op: &'static str,
        /// The expert.
        expert: usize,
        /// The rank found.
        rank: i32,
        /// The number of ranks `R`.
        ranks: usize,
    },
    /// A padded layout with block size 0.
    #[error("{op}: the block size of a padded layout must be at least 1")]
    ZeroBlockSize {
        /// The op.
        op: &'static str,
    },
    /// An output whose positions would not fit the i32 indices it holds.
    #[error("{op}: `{arg}` would need {entries} entries, more than i32 indices reach")]
    IndexOverflow {
        /// The op.
        op: &'static str,
        /// The output.
        arg: &'static str,
        /// The entries it would need (`usize::MAX`: beyond counting).
        entries: usize,
    },
    /// An argument that another argument needs was not given.
    #[error("{op}: `{needed_by}` needs `{arg}`, which was not given")]
    MissingArgument {
        /// The op.
        op: &'static str,
        /// What is missing.
        arg: &'static str,
        /// What needs it.
        needed_by: &'static str,
    },
    /// The backend does not implement this op.
    #[error("{op}: this backend does not implement it")]
    NotSupported {
        /// The op.
        op: &'static str,
    },
    /// Memory for an output or a buffer could not be allocated.
    #[error("{op}: cannot allocate {bytes} bytes")]
    OutOfMemory {
        /// The op.
        op: &'static str,
        /// The size asked for.
        bytes: usize,
    },
    /// A hash-routed layer was called without the token ids it selects experts by.
    #[error(
        "{op}: this layer routes by token id (hash routing); pass the token ids of the hidden states"
    )]
    MissingTokenIds {
        /// The op.
        op: &'static str,
    },
    /// A token id names no row of the hash table.
    #[error("{op}: token id {id} of row {row} is outside the hash table's {vocab} rows")]
    TokenIdOutsideTable {
        /// The op.
        op: &'static str,
        /// The row of the batch.
        row: usize,
        /// The id.
        id: i64,
        /// Rows of the table.
        vocab: usize,
    },
    /// A hash table that would index out of range or route a token twice to one expert.
    #[error("{op}: hash table `tid2eid` {source}")]
    HashTable {
        /// The op.
        op: &'static str,
        /// What is wrong with it.
        source: HashTableError,
    },
    /// A hash-routed spec without its table: such a router is made by `prepare_hash_router`.
    #[error(
        "{op}: hash routing needs its table `tid2eid`; prepare the router with prepare_hash_router"
    )]
    MissingHashTable {
        /// The op.
        op: &'static str,
    },
    /// A hash table for a method that ranks scores instead.
    #[error("{op}: a hash table was given, but `topk_method` = \"{}\" does not use one", method.name())]
    UnexpectedHashTable {
        /// The op.
        op: &'static str,
        /// The spec's method.
        method: TopkMethod,
    },
    /// An op this backend does not implement.
    #[error("{op} is not supported by the {backend} backend")]
    Unsupported {
        /// The op.
        op: &'static str,
        /// The backend's name.
        backend: String,
    },
    /// The routing spec is invalid.
    #[error("invalid routing spec: {0}")]
    Spec(#[from] SpecError),
    /// The device or its runtime failed.
    #[error("{backend} backend: {message}")]
    Device {
        /// The backend's name.
        backend: &'static str,
        /// What went wrong.
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_is_object_safe_and_thread_safe() {
        fn assert_send_sync<T: Send + Sync + ?Sized>() {}
        assert_send_sync::<dyn Backend>();
        assert_send_sync::<dyn PreparedRouter>();
        let _: Option<&dyn Backend> = None;
    }

    /// A router that implements only `route`: token `t` goes to expert `t` with weight 1.
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

        fn router_gemm(&self, _: &Dlpack) -> Result<Dlpack, BackendError> {
            Err(BackendError::NotSupported { op: "router_gemm" })
        }

        fn route(&self, hidden: &Dlpack) -> Result<RoutingOutput, BackendError> {
            let tokens = argument_view("route", "hidden", hidden)?.shape()[0];
            let ids = (0..tokens as i32).collect();
            RoutingOutput::from_host_vecs(tokens, 1, ids, vec![1.0; tokens])
                .map_err(|source| BackendError::Argument { op: "route", arg: "output", source })
        }
    }

    #[test]
    fn route_with_token_ids_is_route_into_on_the_host_and_refused_for_a_device_router() {
        let spec = RoutingSpec::builder(4, 1).build().unwrap();
        let host = OnlyRoute { spec, device: Device::Cpu };
        let hidden = export_vec(vec![0.5f32; 6], &[3, 2]).unwrap();
        let token_ids = export_vec(vec![7i64, 8, 9], &[3]).unwrap();
        let routed = host.route_with_token_ids(&hidden, &token_ids).unwrap();
        let ids = DlpackView::from_dlpack(&routed.topk_ids).unwrap();
        assert_eq!(ids.shape(), [3, 1]);
        assert_eq!(ids.as_array2::<i32>().unwrap().iter().copied().collect::<Vec<_>>(), [0, 1, 2]);
        // The ids are checked as route_into checks them: one per row of the hidden states.
        let short = export_vec(vec![7i64, 8], &[2]).unwrap();
        let err = host.route_with_token_ids(&hidden, &short).unwrap_err();
        assert!(matches!(err, BackendError::Shape { arg: "token_ids", .. }), "{err}");
        let device = OnlyRoute { spec, device: Device::Cuda(0) };
        let err = device.route_with_token_ids(&hidden, &token_ids).unwrap_err();
        assert!(matches!(err, BackendError::NotSupported { op: "route_with_token_ids" }), "{err}");
    }
}

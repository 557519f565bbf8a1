//! [`CudaPreparedRouter`]: a router weight and bias on the device, with the routing kernels
//! compiled for its spec; `route_into` and `router_gemm_into` enqueue on the caller's stream.

use std::sync::Arc;

use cudarc::driver::CudaSlice;
use cudarc::driver::sys::CUstream;
use sluice_kernels::{
    DeviceTokenIds, DispatchArgs, FusedLayout, GemmKernel, GemmPlan, GemmShape, RoutingConfig,
    check_hash_table_rows, check_host_token_ids, dispatch_args, hash_table_values,
};
use sluice_tensor::argument_view;
use sluice_tensor::{
    BackendError, DType, Device, DispatchInputs, DispatchOutputs, Dlpack, DlpackView,
    DlpackViewMut, Execution, ExpectedShape, PreparedRouter, RouteInputs, RouteOutputs,
    RoutingOutput, RoutingSpec, TopkMethod, WORKSPACE_ALIGN, check_logits_into,
    check_route_and_dispatch_into, check_route_into, check_router_weight,
};

use crate::cublaslt::{self, LtGemm};
use crate::dispatch::{self, Dispatcher};
use crate::enqueue::{self, HashInputs, Partials, RouteCounters, RoutingTargets, Weight};
use crate::error::CudaError;
use crate::gate::{self, Source};
use crate::gpu::Gpu;
use crate::input::{self, DeviceMatrix};
use crate::memory;
use crate::module::RouterModule;

/// A router prepared by a [`CudaBackend`](crate::CudaBackend): the weight (bf16 or f32) and the
/// f32 bias (or, for a hash-routed layer, the table `tid2eid`) copied to the device once, and the
/// router kernels compiled for the spec by NVRTC.
///
/// `route_into` and `router_gemm_into` take [`Execution::Stream`] on this device and only enqueue
/// kernels (programmatic dependent launch where the device has it): no allocation, compilation
/// or synchronisation, so engines capture them in their graphs. `route` and `router_gemm` are
/// synchronous conveniences on the backend's own stream.
pub struct CudaPreparedRouter {
    gpu: Arc<Gpu>,
    spec: RoutingSpec,
    module: Arc<RouterModule>,
    weight: Weight,
    bias: Option<u64>,
    /// The table of a hash-routed layer.
    hash_table: Option<DeviceHashTable>,
    /// The many-token GEMM, where cuBLASLt is installed.
    lt: Option<LtGemm>,
    dependent_launch: bool,
    _weight_buffer: Option<Dlpack>,
    _bias_buffer: Option<CudaSlice<u8>>,
}

impl std::fmt::Debug for CudaPreparedRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let w = &self.weight.matrix;
        f.debug_struct("CudaPreparedRouter")
            .field("device", &self.gpu.ordinal)
            .field("spec", &self.spec)
            .field("weight", &format_args!("[{}, {}] {}", w.rows, w.cols, w.dtype))
            .field("bias", &self.bias.is_some())
            .field("hash_table_rows", &self.hash_table.as_ref().map(|t| t.rows))
            .finish()
    }
}

/// The hash table `tid2eid` of a hash-routed router on the device: i32 `[rows, K]`, contiguous,
/// every row `K` distinct experts of `[0, E)` (checked before the copy).
struct DeviceHashTable {
    ptr: u64,
    rows: usize,
    _buffer: CudaSlice<u8>,
}

impl DeviceHashTable {
    /// Checks `table` (host or device) against `spec` and copies it to the device.
    fn upload(
        gpu: &Gpu,
        op: &'static str,
        table: &Dlpack,
        spec: &RoutingSpec,
    ) -> Result<Self, BackendError> {
        let on_device = argument_view(op, "table", table)?.device() != Device::Cpu;
        let downloaded = if on_device { Some(memory::download(gpu, table)?) } else { None };
        let view = argument_view(op, "table", downloaded.as_ref().unwrap_or(table))?;
        let values = hash_table_values(op, &view, spec)?;
        let rows = values.len() / spec.top_k;
        check_hash_table_rows(rows).map_err(CudaError::from)?;
        let buffer = memory::upload_i32(gpu, &values)?;
        Ok(DeviceHashTable { ptr: memory::address(gpu, &buffer), rows, _buffer: buffer })
    }
}

// SAFETY: the DLPack tensor owns device memory that this router only reads through kernels; it is
// never mutated after preparation and its deleter may run on any thread (the DLPack contract).
unsafe impl Send for CudaPreparedRouter {}
// SAFETY: see `Send`: shared access only enqueues kernels that read the weight and the bias (or
// the hash table, likewise never mutated after preparation).
unsafe impl Sync for CudaPreparedRouter {}

/// How a router chooses its experts: by their scores (with an optional correction bias), or by
/// the hash table `tid2eid` of a hash-routed layer.
pub(crate) enum Selector<'a> {
    /// Ranked scores; the bias as `prepare_router` takes it.
    TopK { bias: Option<&'a Dlpack> },
    /// Table rows chosen by token id (i32 `[vocab, K]`, host or device).
    Hash { table: &'a Dlpack },
}

impl CudaPreparedRouter {
    /// Prepares `weight` with a correction bias (`prepare_router`) or, for a hash-routed spec,
    /// with its table (`prepare_hash_router`): each is refused for the other kind of spec.
    pub(crate) fn new(
        gpu: Arc<Gpu>,
        weight: &Dlpack,
        selector: Selector<'_>,
        spec: &RoutingSpec,
        dependent_launch: bool,
    ) -> Result<Self, BackendError> {
        let (op, bias, table) = match selector {
            Selector::TopK { bias } => ("prepare_router", bias, None),
            Selector::Hash { table } => ("prepare_hash_router", None, Some(table)),
        };
        let config = RoutingConfig::new(spec).map_err(CudaError::from)?;
        match (spec.method == TopkMethod::Hash, table.is_some()) {
            (true, false) => return Err(BackendError::MissingHashTable { op }),
            (false, true) => {
                return Err(BackendError::UnexpectedHashTable { op, method: spec.method });
            }
            _ => {}
        }
        let expected = ExpectedShape(vec![Some(spec.num_experts), None]);
        let view = argument_view(op, "weight", weight)?;
        check_router_weight(op, view.shape(), spec)?;
        // A private contiguous copy on the device, whatever the caller's layout and location.
        let staged = if view.device() == Device::Cpu {
            gate::stage_matrix(&gpu, op, "weight", weight, gate::WEIGHT_DTYPES, expected)?
        } else {
            input::check_dtype(op, "weight", view.dtype(), gate::WEIGHT_DTYPES)?;
            gate::copy_matrix(&gpu, op, weight, expected)?
        };
        let bias_values = bias.map(|b| gate::bias_values(&gpu, op, b, spec)).transpose()?;
        let bias_buffer =
            bias_values.as_deref().map(|b| memory::upload_f32(&gpu, b)).transpose()?;
        let _span = tracing::debug_span!("cuda_prepare_router", %spec).entered();
        let hash_table = table.map(|t| DeviceHashTable::upload(&gpu, op, t, spec)).transpose()?;
        let module = gpu.module(&config)?;
        let lt = gpu.lt.clone().map(|lt| LtGemm::new(lt, gpu.multiprocessors));
        Ok(CudaPreparedRouter {
            bias: bias_buffer.as_ref().map(|b| memory::address(&gpu, b)),
            gpu,
            spec: *spec,
            module,
            weight: Weight { matrix: staged.matrix },
            hash_table,
            lt,
            dependent_launch,
            _weight_buffer: staged.into_copy(),
            _bias_buffer: bias_buffer,
        })
    }

    /// How the router GEMM of a gate call on `hidden` runs: cuBLASLt past a few bf16 tokens where
    /// it is installed, the backend's kernels otherwise.
    fn gemm_path(&self, hidden: &DeviceMatrix) -> Result<GemmPath<'_>, CudaError> {
        let plan = gate::plan(&self.gpu, hidden, &self.weight, usize::MAX)?;
        // The backend's own kernels for a few and for tens of tokens; cuBLASLt past them.
        if let Some(lt) = &self.lt
            && matches!(plan.kernel, GemmKernel::Mma { .. } | GemmKernel::Simt { .. })
            && LtGemm::accepts(hidden, &self.weight.matrix)
        {
            return Ok(GemmPath::Lt(lt));
        }
        Ok(GemmPath::Kernels(plan))
    }

    /// Bytes of workspace a gate call on `hidden` needs.
    pub(crate) fn call_workspace_bytes(&self, hidden: &DeviceMatrix) -> Result<usize, CudaError> {
        Ok(self.path_workspace_bytes(&self.gemm_path(hidden)?, hidden))
    }

    /// Bytes of workspace the GEMM path `path` of a gate call on `hidden` uses.
    fn path_workspace_bytes(&self, path: &GemmPath<'_>, hidden: &DeviceMatrix) -> usize {
        let (tokens, experts) = (hidden.rows, self.experts());
        match path {
            GemmPath::Lt(_) => {
                lt_logits_bytes(tokens, hidden.cols, experts)
                    + cublaslt::WORKSPACE_ALIGN
                    + cublaslt::workspace_bytes(tokens)
            }
            GemmPath::Kernels(plan) => {
                plan.partials_bytes(GemmShape { tokens, hidden: hidden.cols, experts })
            }
        }
    }

    /// Where the fused layout's ticket lies in a gate call's workspace: after the `path_bytes`
    /// its GEMM path uses, aligned. `workspace_bytes` counts its word for every call.
    fn ticket_offset(path_bytes: usize) -> usize {
        path_bytes.next_multiple_of(WORKSPACE_ALIGN)
    }

    /// Bytes from the ticket to the end of a gate call's workspace on `tokens` rows: its word,
    /// and the counts of the fused layout where this module fuses that call (from
    /// `FUSED_COUNTS_OFFSET` on), aligned.
    fn ticket_bytes(&self, tokens: usize) -> usize {
        let fused = self.module.fused_layout(tokens, false).is_some();
        let counts =
            if fused { sluice_kernels::fused_counts_bytes(self.experts(), tokens) } else { 0 };
        (sluice_kernels::FUSED_COUNTS_OFFSET + counts).next_multiple_of(WORKSPACE_ALIGN)
    }

    fn dispatcher(&self) -> Dispatcher<'_> {
        Dispatcher {
            router: self,
            gpu: &self.gpu,
            module: &self.module,
            dependent_launch: self.dependent_launch,
        }
    }

    fn experts(&self) -> usize {
        self.spec.num_experts
    }

    /// The table and the token ids a hash-routed router's kernel reads, refused without ids; none
    /// for other routers, which ignore token ids.
    fn hash_inputs(
        &self,
        op: &'static str,
        token_ids: Option<DeviceTokenIds>,
    ) -> Result<Option<HashInputs>, BackendError> {
        let Some(table) = &self.hash_table else { return Ok(None) };
        let ids = token_ids.ok_or(BackendError::MissingTokenIds { op })?;
        Ok(Some(HashInputs {
            table: table.ptr,
            table_rows: table.rows,
            token_ids: ids.ptr,
            token_id_bytes: ids.bytes_per_id,
        }))
    }

    /// Enqueues the whole gate on `stream`: GEMM into `workspace` (at least
    /// [`call_workspace_bytes`](Self::call_workspace_bytes), and the ticket's word past it with
    /// `fused`), then routing into `targets` (by the table and token ids of `hash` for a
    /// hash-routed router, which [`hash_inputs`](Self::hash_inputs) makes), or, with `fused`, the
    /// fused kernel that also lays out the ids it writes by the filled argument it carries. Only
    /// enqueues: the module is loaded and the weight is resident, so this can be captured in a
    /// graph.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn enqueue(
        &self,
        stream: CUstream,
        hidden: &DeviceMatrix,
        workspace: u64,
        targets: &RoutingTargets,
        hash: Option<&HashInputs>,
        fused: Option<(&FusedLayout, DispatchArgs)>,
        dependent_launch: bool,
    ) -> Result<(), CudaError> {
        if hidden.rows == 0 {
            return Ok(());
        }
        let (tokens, experts) = (hidden.rows, self.experts());
        let path = self.gemm_path(hidden)?;
        let ticket_offset = Self::ticket_offset(self.path_workspace_bytes(&path, hidden));
        let ticket = fused.as_ref().map(|_| workspace + ticket_offset as u64);
        let counters = RouteCounters { status: targets.status, ticket };
        self.gpu.ctx.bind_to_thread().map_err(CudaError::driver("binding the context"))?;
        let partials = match path {
            GemmPath::Lt(lt) => {
                let logits_bytes = lt_logits_bytes(tokens, hidden.cols, experts);
                let lt_workspace = (workspace + logits_bytes as u64)
                    .next_multiple_of(cublaslt::WORKSPACE_ALIGN as u64);
                // Before the GEMM, so that its launch overlaps the previous kernel.
                if counters.any() {
                    enqueue::reset_status(
                        stream,
                        &self.module,
                        counters,
                        tokens,
                        dependent_launch,
                    )?;
                }
                // SAFETY: `accepts` held for both matrices, which the callers validated; the
                // workspace holds `call_workspace_bytes` for this call (checked by the callers):
                // the partial sums of the most splits at its start, then cuBLASLt's own part,
                // 256-byte aligned, which the slack of `WORKSPACE_ALIGN` bytes keeps inside it;
                // the context is current.
                let splits = unsafe {
                    lt.enqueue(stream, hidden, &self.weight.matrix, workspace, lt_workspace)?
                };
                Partials {
                    ptr: workspace,
                    splits,
                    split_stride: tokens * experts,
                    row_stride: experts,
                }
            }
            GemmPath::Kernels(plan) => {
                let partials = Partials {
                    ptr: workspace,
                    splits: plan.splits,
                    split_stride: tokens * experts,
                    row_stride: experts,
                };
                enqueue::gemm(
                    stream,
                    &self.module,
                    &plan,
                    hidden,
                    &self.weight,
                    &partials,
                    counters,
                    dependent_launch,
                )?;
                partials
            }
        };
        let scale = self.spec.output_scale();
        let (bias, tokens) = (self.bias, hidden.rows);
        if let (Some((fused, layout)), Some(ticket)) = (fused, ticket) {
            return enqueue::route_dispatch(
                stream,
                &self.module,
                &partials,
                bias,
                scale,
                targets,
                fused,
                layout,
                ticket,
                dependent_launch,
            );
        }
        enqueue::route(
            stream,
            &self.module,
            &partials,
            bias,
            tokens,
            scale,
            targets,
            hash,
            dependent_launch,
        )
    }

    /// A gate call whose arguments were checked (`check_route_into`, or
    /// `check_route_and_dispatch_into` with `fused`): its operands as the kernels take them, then
    /// [`enqueue`](Self::enqueue) on the execution's stream.
    fn enqueue_checked(
        &self,
        op: &'static str,
        inputs: &RouteInputs<'_>,
        outputs: &mut RouteOutputs<'_>,
        fused: Option<(&FusedLayout, DispatchArgs)>,
        execution: Execution,
    ) -> Result<(), BackendError> {
        let expected = ExpectedShape(vec![None, Some(self.hidden_size())]);
        let hidden = input::matrix(
            op,
            "hidden",
            &inputs.hidden,
            self.device(),
            gate::HIDDEN_DTYPES,
            expected,
        )?;
        let (ids, ids_row_stride) = input::output_rows(&mut outputs.topk_ids);
        let (weights, weights_row_stride) = input::output_rows(&mut outputs.topk_weights);
        let targets = RoutingTargets {
            ids,
            ids_row_stride,
            weights,
            weights_row_stride,
            logits: outputs.logits.as_mut().map(input::output_rows),
            status: outputs.status.as_mut().map(|s| input::output_rows(s).0),
        };
        // Token ids matter to a hash-routed router only; every other router ignores them.
        let token_ids = match (&self.hash_table, &inputs.token_ids) {
            (Some(_), Some(ids)) => Some(input::token_ids(op, ids, self.device())?),
            _ => None,
        };
        let hash = self.hash_inputs(op, token_ids)?;
        let workspace = outputs.workspace.as_mut().map_or(0, |w| input::output_rows(w).0);
        let stream = Self::stream(execution);
        let dependent_launch = self.dependent_launch;
        self.enqueue(stream, &hidden, workspace, &targets, hash.as_ref(), fused, dependent_launch)?;
        Ok(())
    }

    /// Contiguous, aligned hidden states `[tokens, H]` of `dtype` (for planning; never read).
    fn dense_hidden(&self, tokens: usize, dtype: DType) -> DeviceMatrix {
        let cols = self.hidden_size();
        DeviceMatrix { ptr: 0, rows: tokens, cols, row_stride: cols, col_stride: 1, dtype }
    }

    pub(crate) fn stream(execution: Execution) -> CUstream {
        match execution {
            // The DLPack number is the driver's handle (1 legacy, 2 per-thread, else a CUstream).
            Execution::Stream(stream) => stream.raw() as CUstream,
            // `check_route_into` / `check_logits_into` refuse the host for a device router.
            Execution::Host => std::ptr::null_mut(),
        }
    }
}

/// How one gate call's router GEMM runs.
enum GemmPath<'a> {
    /// The backend's kernels, as planned.
    Kernels(GemmPlan),
    /// cuBLASLt, into partial sums of the logits at the start of the workspace.
    Lt(&'a LtGemm),
}

/// Device buffers for timing a gate call of `T` tokens in `warm_up`: zero hidden states, the
/// routing outputs, token ids (0) and the call's workspace.
struct GateScratch {
    hidden: CudaSlice<u8>,
    ids: CudaSlice<u8>,
    weights: CudaSlice<u8>,
    status: CudaSlice<u8>,
    token_ids: CudaSlice<u8>,
    workspace: CudaSlice<u8>,
}

impl GateScratch {
    fn new(router: &CudaPreparedRouter, hidden: &DeviceMatrix) -> Result<Self, CudaError> {
        let gpu = &router.gpu;
        let pairs = hidden.rows * router.spec.top_k;
        Ok(GateScratch {
            hidden: memory::zeroed(
                gpu,
                hidden.rows * hidden.row_stride * hidden.dtype.size_in_bytes(),
            )?,
            ids: memory::zeroed(gpu, pairs * size_of::<i32>())?,
            weights: memory::zeroed(gpu, pairs * size_of::<f32>())?,
            status: memory::zeroed(gpu, 2 * size_of::<i32>())?,
            token_ids: memory::zeroed(gpu, hidden.rows * size_of::<i32>())?,
            workspace: memory::zeroed(gpu, router.call_workspace_bytes(hidden)?)?,
        })
    }
}

/// Bytes of the f32 partial sums of the logits `[T, E]` that cuBLASLt writes for a hidden size of
/// `hidden`: one `[T, E]` for each of the most splits it may take.
fn lt_logits_bytes(tokens: usize, hidden: usize, experts: usize) -> usize {
    cublaslt::max_splits(tokens, hidden) * tokens * experts * size_of::<f32>()
}

impl PreparedRouter for CudaPreparedRouter {
    fn spec(&self) -> &RoutingSpec {
        &self.spec
    }

    fn hidden_size(&self) -> usize {
        self.weight.matrix.cols
    }

    fn device(&self) -> Device {
        Device::Cuda(self.gpu.ordinal)
    }

    fn router_gemm(&self, hidden: &Dlpack) -> Result<Dlpack, BackendError> {
        const OP: &str = "router_gemm";
        let expected = ExpectedShape(vec![None, Some(self.hidden_size())]);
        let hidden =
            gate::stage_matrix(&self.gpu, OP, "hidden", hidden, gate::HIDDEN_DTYPES, expected)?;
        gate::logits(&self.gpu, &self.module, &hidden, &self.weight)
    }

    fn route(&self, hidden: &Dlpack) -> Result<RoutingOutput, BackendError> {
        const OP: &str = "route";
        let hash = self.hash_inputs(OP, None)?;
        let expected = ExpectedShape(vec![None, Some(self.hidden_size())]);
        let hidden =
            gate::stage_matrix(&self.gpu, OP, "hidden", hidden, gate::HIDDEN_DTYPES, expected)?;
        let source = Source::Gemm { hidden: &hidden, router: self, hash };
        gate::route(OP, &self.gpu, &self.module, &self.spec, self.bias, source)
    }

    /// Host token ids are checked against the table (an id outside it is
    /// [`BackendError::TokenIdOutsideTable`], as on the CPU) and copied up; device ids are
    /// copied down for that check. Outputs are where the hidden states are.
    fn route_with_token_ids(
        &self,
        hidden: &Dlpack,
        token_ids: &Dlpack,
    ) -> Result<RoutingOutput, BackendError> {
        const OP: &str = "route_with_token_ids";
        let Some(table) = &self.hash_table else { return self.route(hidden) };
        let expected = ExpectedShape(vec![None, Some(self.hidden_size())]);
        let hidden =
            gate::stage_matrix(&self.gpu, OP, "hidden", hidden, gate::HIDDEN_DTYPES, expected)?;
        // One copy: up for the kernel when the ids are on the host, down for the check when they
        // are on the device.
        let on_host = argument_view(OP, "token_ids", token_ids)?.device() == Device::Cpu;
        let copy = if on_host {
            memory::upload(&self.gpu, token_ids)?
        } else {
            memory::download(&self.gpu, token_ids)?
        };
        let (host, device) = if on_host { (token_ids, &copy) } else { (&copy, token_ids) };
        check_host_token_ids(
            OP,
            &argument_view(OP, "token_ids", host)?,
            hidden.matrix.rows,
            table.rows,
        )?;
        let ids = input::token_ids(OP, &argument_view(OP, "token_ids", device)?, self.device())?;
        let hash = self.hash_inputs(OP, Some(ids))?;
        let source = Source::Gemm { hidden: &hidden, router: self, hash };
        gate::route(OP, &self.gpu, &self.module, &self.spec, self.bias, source)
    }

    /// The most any gate call on `T` tokens needs, whatever its hidden states' type: the partial
    /// sums of the split router GEMM (`S * T * E * 4` bytes, `S` falling as `T` grows; f32 hidden
    /// states have the most splits), or, past a few bf16 tokens where cuBLASLt runs, the partial
    /// sums of the most splits it may take (`max_splits`: 8 up to 1024 tokens, then fewer, one
    /// from 8192) and cuBLASLt's own workspace; then one aligned word, the ticket of the layout that
    /// `route_and_dispatch_into` computes inside routing, followed, past 64 rows, by that layout's
    /// masks of the rows that chose each expert (`(E + 1) * 8` bytes per 64 rows).
    fn workspace_bytes(&self, tokens: usize) -> usize {
        [DType::BF16, DType::F32]
            .into_iter()
            .map(|dtype| {
                self.call_workspace_bytes(&self.dense_hidden(tokens, dtype))
                    .map_or(0, |bytes| Self::ticket_offset(bytes) + self.ticket_bytes(tokens))
            })
            .max()
            .unwrap_or(0)
    }

    /// The kernels were compiled and loaded by `prepare_router`; this checks that `tokens` fit
    /// the kernels' launch limits, so that later calls fail for no other reason, and, where
    /// cuBLASLt runs the GEMM (past 64 bf16 tokens on Hopper, or 128 where the warpgroup kernel
    /// takes them; 8 before it), chooses its split of the hidden size (a strided batch of GEMMs
    /// whose partial sums routing adds) and its algorithm for exactly `tokens` contiguous bf16
    /// tokens by timing the whole gate call with each of the library's heuristic candidates for
    /// each split (up to 8 for the default split, the most whose tiles fill the device once, 4
    /// for each other), on scratch device buffers (allocated here and freed before this
    /// returns) on the backend's own stream, each run after an L2 flush: the fastest by median
    /// is kept for every later call of that shape, by every router of the backend, where it
    /// beats the default split's first choice by more than 3%. So this call does device work
    /// and waits for it; a candidate the gate fails with is skipped, and where none runs the
    /// default is kept. A shape that `warm_up` never saw takes the default split and the
    /// heuristic's first choice for it at its first call (host-side queries), and never times
    /// anything there.
    fn warm_up(&self, tokens: usize) -> Result<(), BackendError> {
        gate::plan(&self.gpu, &self.dense_hidden(tokens, DType::F32), &self.weight, usize::MAX)?;
        sluice_kernels::route_launch(tokens, sluice_kernels::NVIDIA_WAVE_WIDTH)
            .map_err(CudaError::from)?;
        let bf16 = self.dense_hidden(tokens, DType::BF16);
        if let GemmPath::Lt(lt) = self.gemm_path(&bf16)?
            && !lt.has_timed_plan(&bf16, &self.weight.matrix)?
        {
            self.gpu.ctx.bind_to_thread().map_err(CudaError::driver("binding the context"))?;
            let scratch = match GateScratch::new(self, &bf16) {
                Ok(scratch) => scratch,
                Err(error) => {
                    tracing::warn!(%error, "no memory to time the gate: keeping cuBLASLt's heuristic");
                    return Ok(());
                }
            };
            let hidden = DeviceMatrix { ptr: memory::address(&self.gpu, &scratch.hidden), ..bf16 };
            let targets = RoutingTargets {
                ids: memory::address(&self.gpu, &scratch.ids),
                ids_row_stride: self.spec.top_k,
                weights: memory::address(&self.gpu, &scratch.weights),
                weights_row_stride: self.spec.top_k,
                logits: None,
                status: Some(memory::address(&self.gpu, &scratch.status)),
            };
            // Token id 0 names the table's first row, which every checked table has.
            let hash = self.hash_table.as_ref().map(|table| HashInputs {
                table: table.ptr,
                table_rows: table.rows,
                token_ids: memory::address(&self.gpu, &scratch.token_ids),
                token_id_bytes: size_of::<i32>(),
            });
            let workspace = memory::address(&self.gpu, &scratch.workspace);
            let stream = self.gpu.stream.cu_stream();
            let run_gate = || {
                self.enqueue(
                    stream,
                    &hidden,
                    workspace,
                    &targets,
                    hash.as_ref(),
                    None,
                    self.dependent_launch,
                )
            };
            // `tune` returns with the stream's work done, so the scratch may go after it.
            lt.tune(&self.gpu, &hidden, &self.weight.matrix, &run_gate)?;
        }
        Ok(())
    }

    fn route_into(
        &self,
        inputs: &RouteInputs<'_>,
        outputs: &mut RouteOutputs<'_>,
        execution: Execution,
    ) -> Result<(), BackendError> {
        const OP: &str = "route_into";
        let tokens = inputs.hidden.shape().first().copied().unwrap_or(0);
        let needed = self.workspace_bytes(tokens);
        check_route_into(OP, self, inputs, outputs, execution, needed)?;
        self.enqueue_checked(OP, inputs, outputs, None, execution)
    }

    /// Where routing is a block per token (on an H200 up to 1056 tokens of DeepSeek's 256 experts,
    /// 704 of Kimi-K2's 384) and no rank outputs are asked for, routing lays out (see
    /// `sluice_kernels::FusedLayout`): up to 64 rows the routing block that finishes last lays out
    /// every row, past them routing counts its rows per expert and word of 64 rows and one
    /// kernel after it lays out a word per block; either saves the layout's own launches.
    /// Otherwise the two calls' kernels, one after the other. Either way only enqueues.
    fn route_and_dispatch_into(
        &self,
        inputs: &RouteInputs<'_>,
        outputs: &mut RouteOutputs<'_>,
        layout: &mut DispatchOutputs<'_>,
        expert_ranks: Option<DlpackView<'_>>,
        execution: Execution,
    ) -> Result<(), BackendError> {
        const OP: &str = "route_and_dispatch_into";
        let (shape, ranks) = check_route_and_dispatch_into(
            OP,
            self,
            inputs,
            outputs,
            layout,
            expert_ranks,
            execution,
        )?;
        let tokens = shape.tokens;
        let fused = if tokens == 0 { None } else { self.module.fused_layout(tokens, ranks > 0) };
        let Some(fused) = fused else {
            self.enqueue_checked(OP, inputs, outputs, None, execution)?;
            let ids = DispatchInputs { topk_ids: outputs.topk_ids.as_view(), expert_ranks };
            return self.dispatcher().enqueue_checked(OP, &ids, layout, shape, ranks, execution);
        };
        let ids = DispatchInputs::new(outputs.topk_ids.as_view());
        let mut args = dispatch_args(OP, &ids, layout, shape, 0)?;
        fused.fill(&mut args);
        tracing::trace!(
            tokens,
            threads = fused.threads,
            layout_blocks = fused.layout_blocks,
            "the layout with routing"
        );
        self.enqueue_checked(OP, inputs, outputs, Some((&fused, args)), execution)
    }

    fn dispatch_into(
        &self,
        inputs: &DispatchInputs<'_>,
        outputs: &mut DispatchOutputs<'_>,
        execution: Execution,
    ) -> Result<(), BackendError> {
        self.dispatcher().dispatch_into(inputs, outputs, execution)
    }

    /// Per-block counts at large `T` (see `sluice_kernels::plan_dispatch`), none at small `T`.
    fn dispatch_workspace_bytes(&self, tokens: usize) -> usize {
        dispatch::workspace_bytes(self, tokens)
    }

    fn dispatch(
        &self,
        inputs: &DispatchInputs<'_>,
        outputs: &mut DispatchOutputs<'_>,
    ) -> Result<(), BackendError> {
        self.dispatcher().dispatch(inputs, outputs)
    }

    fn router_gemm_into(
        &self,
        hidden: &DlpackView<'_>,
        logits: &mut DlpackViewMut<'_>,
        execution: Execution,
    ) -> Result<(), BackendError> {
        const OP: &str = "router_gemm_into";
        let tokens = check_logits_into(OP, self, hidden, logits, execution)?;
        let expected = ExpectedShape(vec![None, Some(self.hidden_size())]);
        let hidden =
            input::matrix(OP, "hidden", hidden, self.device(), gate::HIDDEN_DTYPES, expected)?;
        if tokens == 0 {
            return Ok(());
        }
        // No workspace in this call: one split, written straight into the caller's window.
        let plan = gate::plan(&self.gpu, &hidden, &self.weight, 1).map_err(BackendError::from)?;
        let (ptr, row_stride) = input::output_rows(logits);
        let out = Partials { ptr, splits: 1, split_stride: 0, row_stride };
        self.gpu
            .ctx
            .bind_to_thread()
            .map_err(|e| BackendError::from(CudaError::driver("binding the context")(e)))?;
        let stream = Self::stream(execution);
        enqueue::gemm(
            stream,
            &self.module,
            &plan,
            &hidden,
            &self.weight,
            &out,
            RouteCounters::default(),
            self.dependent_launch,
        )?;
        Ok(())
    }
}

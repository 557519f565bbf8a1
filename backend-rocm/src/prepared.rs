//! [`RocmPreparedRouter`]: a router weight and bias on an AMD GPU, with the embedded code object
//! of its routing config loaded; `route_into`, `router_gemm_into` and `dispatch_into` enqueue on
//! the caller's `hipStream_t`.

use std::sync::Arc;

use sluice_kernels::{
    DeviceMatrix, DeviceTokenIds, GemmShape, HIDDEN_DTYPES, HashInputs, Partials, RoutingTargets,
    WEIGHT_DTYPES, check_hash_table_rows, check_host_token_ids, hash_table_values, matrix,
    output_rows, token_ids,
};
use sluice_tensor::{
    BackendError, DType, Device, DispatchInputs, DispatchOutputs, Dlpack, DlpackView,
    DlpackViewMut, Execution, ExpectedShape, PreparedRouter, RouteInputs, RouteOutputs,
    RoutingOutput, RoutingSpec, TopkMethod, argument_view, check_logits_into, check_route_into,
    check_router_weight,
};

use crate::api::Handle;
use crate::device::LoadedModule;
use crate::dispatch::{self, Dispatcher};
use crate::enqueue;
use crate::error::RocmError;
use crate::gate::{self, Source};
use crate::gpu::Gpu;
use crate::memory::DeviceMemory;

/// A router prepared by a [`RocmBackend`](crate::RocmBackend): the weight (bf16 or f32) and the
/// f32 bias (or, for a hash-routed layer, the table `tid2eid`) copied to the device once, and the code object of the spec's routing config loaded
/// (`hipModuleLoadData`, for the device's architecture).
///
/// `route_into`, `router_gemm_into` and `dispatch_into` take [`Execution::Stream`] on this device
/// (DLPack's ROCm numbering: 0 the null stream, larger values a `hipStream_t`) and only enqueue
/// kernels (and `dispatch_into`'s memset of the tokens per rank): no allocation, module load, copy
/// or synchronisation, so engines capture them in HIP graphs. `route`, `router_gemm` and
/// `dispatch` are synchronous conveniences on the backend's own stream.
pub struct RocmPreparedRouter {
    gpu: Arc<Gpu>,
    spec: RoutingSpec,
    module: Arc<LoadedModule>,
    weight: DeviceMatrix,
    bias: Option<u64>,
    /// The table of a hash-routed layer.
    hash_table: Option<DeviceHashTable>,
    _weight_copy: Option<Dlpack>,
    _bias_memory: Option<DeviceMemory>,
}

impl std::fmt::Debug for RocmPreparedRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let w = &self.weight;
        f.debug_struct("RocmPreparedRouter")
            .field("device", &self.gpu.ordinal())
            .field("arch", &self.module.arch())
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
    rows: usize,
    memory: DeviceMemory,
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
        let downloaded =
            if on_device { Some(crate::memory::download(&gpu.stream, table)?) } else { None };
        let view = argument_view(op, "table", downloaded.as_ref().unwrap_or(table))?;
        let values = hash_table_values(op, &view, spec)?;
        let rows = values.len() / spec.top_k;
        check_hash_table_rows(rows).map_err(RocmError::from)?;
        Ok(DeviceHashTable { rows, memory: gate::upload_table(gpu, &values)? })
    }
}

/// How a router chooses its experts: by their scores (with an optional correction bias), or by
/// the hash table `tid2eid` of a hash-routed layer.
pub(crate) enum Selector<'a> {
    /// Ranked scores; the bias as `prepare_router` takes it.
    TopK { bias: Option<&'a Dlpack> },
    /// Table rows chosen by token id (i32 `[vocab, K]`, host or device).
    Hash { table: &'a Dlpack },
}

// SAFETY: the DLPack tensor owns device memory that this router only reads through kernels; it is
// never mutated after preparation and its deleter may run on any thread (the DLPack contract).
// Every other field is `Send` already.
unsafe impl Send for RocmPreparedRouter {}
// SAFETY: see `Send`: shared access only enqueues kernels that read the weight and the bias (or
// the hash table, likewise never mutated after preparation).
unsafe impl Sync for RocmPreparedRouter {}

impl RocmPreparedRouter {
    /// Prepares `weight` with a correction bias (`prepare_router`) or, for a hash-routed spec,
    /// with its table (`prepare_hash_router`): each is refused for the other kind of spec.
    pub(crate) fn new(
        gpu: Arc<Gpu>,
        weight: &Dlpack,
        selector: Selector<'_>,
        spec: &RoutingSpec,
    ) -> Result<Self, BackendError> {
        let (op, bias, table) = match selector {
            Selector::TopK { bias } => ("prepare_router", bias, None),
            Selector::Hash { table } => ("prepare_hash_router", None, Some(table)),
        };
        spec.validate()?;
        match (spec.method == TopkMethod::Hash, table.is_some()) {
            (true, false) => return Err(BackendError::MissingHashTable { op }),
            (false, true) => {
                return Err(BackendError::UnexpectedHashTable { op, method: spec.method });
            }
            _ => {}
        }
        let view = argument_view(op, "weight", weight)?;
        check_router_weight(op, view.shape(), spec)?;
        // Refused configs fail before anything is copied to the device.
        let module = gpu.module(spec)?;
        let expected = ExpectedShape(vec![Some(spec.num_experts), None]);
        // A private contiguous copy on the device, whatever the caller's layout and location.
        let staged = gate::copy_matrix(&gpu, op, "weight", weight, WEIGHT_DTYPES, expected)?;
        let bias_values = bias.map(|b| gate::bias_values(&gpu, op, b, spec)).transpose()?;
        let bias_memory = bias_values.as_deref().map(|b| gate::upload_bias(&gpu, b)).transpose()?;
        let hash_table = table.map(|t| DeviceHashTable::upload(&gpu, op, t, spec)).transpose()?;
        tracing::debug!(%spec, arch = module.arch(), "rocm router prepared");
        Ok(RocmPreparedRouter {
            bias: bias_memory.as_ref().map(DeviceMemory::address),
            gpu,
            spec: *spec,
            module,
            weight: staged.matrix,
            hash_table,
            _weight_copy: staged.into_copy(),
            _bias_memory: bias_memory,
        })
    }

    /// Bytes of partial sums (here: the logits, one split) a gate call on `hidden` needs.
    pub(crate) fn partials_bytes(&self, hidden: &DeviceMatrix) -> Result<usize, RocmError> {
        let plan = gate::plan(hidden, &self.weight, usize::MAX)?;
        let shape = GemmShape { tokens: hidden.rows, hidden: hidden.cols, experts: self.experts() };
        Ok(plan.partials_bytes(shape))
    }

    fn experts(&self) -> usize {
        self.spec.num_experts
    }

    fn dispatcher(&self) -> Dispatcher<'_> {
        Dispatcher { router: self, gpu: &self.gpu, module: &self.module }
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
            table: table.memory.address(),
            table_rows: table.rows,
            token_ids: ids.ptr,
            token_id_bytes: ids.bytes_per_id,
        }))
    }

    /// Enqueues the whole gate on `stream`: GEMM into `workspace` (at least
    /// [`partials_bytes`](Self::partials_bytes)), then routing into `targets` (by the table and
    /// token ids of `hash` for a hash-routed router, which [`hash_inputs`](Self::hash_inputs)
    /// makes). Only enqueues: the module is loaded and the weight is resident, so this can be
    /// captured in a graph.
    pub(crate) fn enqueue(
        &self,
        stream: Handle,
        hidden: &DeviceMatrix,
        workspace: u64,
        targets: &RoutingTargets,
        hash: Option<&HashInputs>,
    ) -> Result<(), RocmError> {
        if hidden.rows == 0 {
            return Ok(());
        }
        let plan = gate::plan(hidden, &self.weight, usize::MAX)?;
        let partials = Partials {
            ptr: workspace,
            splits: plan.splits,
            split_stride: hidden.rows * self.experts(),
            row_stride: self.experts(),
        };
        // The calling thread's current device is what HIP launches refer to; setting it is not a
        // stream operation, so a capture stays valid.
        self.gpu.device.make_current()?;
        let module = &self.module;
        enqueue::gemm(stream, module, &plan, hidden, &self.weight, &partials, targets.status)?;
        let scale = self.spec.output_scale();
        enqueue::route(stream, module, &partials, self.bias, hidden.rows, scale, targets, hash)
    }

    pub(crate) fn stream(execution: Execution) -> Handle {
        match execution {
            // The DLPack number is HIP's handle (0 the null stream, else a `hipStream_t`).
            Execution::Stream(stream) => stream.raw() as Handle,
            // `check_route_into` / `check_logits_into` refuse the host for a device router.
            Execution::Host => std::ptr::null_mut(),
        }
    }

    fn hidden_matrix(&self, tokens: usize, dtype: DType) -> DeviceMatrix {
        let cols = self.hidden_size();
        DeviceMatrix { ptr: 0, rows: tokens, cols, row_stride: cols, col_stride: 1, dtype }
    }
}

impl PreparedRouter for RocmPreparedRouter {
    fn spec(&self) -> &RoutingSpec {
        &self.spec
    }

    fn hidden_size(&self) -> usize {
        self.weight.cols
    }

    fn device(&self) -> Device {
        Device::Rocm(self.gpu.ordinal())
    }

    fn router_gemm(&self, hidden: &Dlpack) -> Result<Dlpack, BackendError> {
        const OP: &str = "router_gemm";
        let expected = ExpectedShape(vec![None, Some(self.hidden_size())]);
        let hidden = gate::stage_matrix(&self.gpu, OP, "hidden", hidden, HIDDEN_DTYPES, expected)?;
        gate::logits(&self.gpu, &self.module, &hidden, &self.weight)
    }

    fn route(&self, hidden: &Dlpack) -> Result<RoutingOutput, BackendError> {
        const OP: &str = "route";
        let hash = self.hash_inputs(OP, None)?;
        let expected = ExpectedShape(vec![None, Some(self.hidden_size())]);
        let hidden = gate::stage_matrix(&self.gpu, OP, "hidden", hidden, HIDDEN_DTYPES, expected)?;
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
        let hidden = gate::stage_matrix(&self.gpu, OP, "hidden", hidden, HIDDEN_DTYPES, expected)?;
        // One copy: up for the kernel when the ids are on the host, down for the check when they
        // are on the device.
        let on_host = argument_view(OP, "token_ids", token_ids)?.device() == Device::Cpu;
        let copy = if on_host {
            crate::memory::upload(&self.gpu.stream, token_ids)?
        } else {
            crate::memory::download(&self.gpu.stream, token_ids)?
        };
        let (host, device) = if on_host { (token_ids, &copy) } else { (&copy, token_ids) };
        let host = argument_view(OP, "token_ids", host)?;
        check_host_token_ids(OP, &host, hidden.matrix.rows, table.rows)?;
        let ids =
            sluice_kernels::token_ids(OP, &argument_view(OP, "token_ids", device)?, self.device())?;
        let hash = self.hash_inputs(OP, Some(ids))?;
        let source = Source::Gemm { hidden: &hidden, router: self, hash };
        gate::route(OP, &self.gpu, &self.module, &self.spec, self.bias, source)
    }

    /// The logits `[T, E]` f32 the GEMM writes before routing reads them: `T * E * 4` bytes
    /// (the same GEMM plan as on NVIDIA, which on AMD always has one split).
    fn workspace_bytes(&self, tokens: usize) -> usize {
        self.partials_bytes(&self.hidden_matrix(tokens, DType::BF16)).unwrap_or(0)
    }

    /// The code object was loaded by `prepare_router`; this only checks that `tokens` fit the
    /// kernels' launch limits, so that later calls fail for no other reason.
    fn warm_up(&self, tokens: usize) -> Result<(), BackendError> {
        gate::plan(&self.hidden_matrix(tokens, DType::F32), &self.weight, usize::MAX)?;
        sluice_kernels::route_launch(tokens, sluice_kernels::AMD_WAVE_WIDTH)
            .map_err(RocmError::from)?;
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
        let expected = ExpectedShape(vec![None, Some(self.hidden_size())]);
        let hidden = matrix(OP, "hidden", &inputs.hidden, self.device(), HIDDEN_DTYPES, expected)?;
        let (ids, ids_row_stride) = output_rows(&mut outputs.topk_ids);
        let (weights, weights_row_stride) = output_rows(&mut outputs.topk_weights);
        let targets = RoutingTargets {
            ids,
            ids_row_stride,
            weights,
            weights_row_stride,
            logits: outputs.logits.as_mut().map(output_rows),
            status: outputs.status.as_mut().map(|s| output_rows(s).0),
        };
        // Token ids matter to a hash-routed router only; every other router ignores them.
        let ids = match (&self.hash_table, &inputs.token_ids) {
            (Some(_), Some(ids)) => Some(token_ids(OP, ids, self.device())?),
            _ => None,
        };
        let hash = self.hash_inputs(OP, ids)?;
        let workspace = outputs.workspace.as_mut().map_or(0, |w| output_rows(w).0);
        self.enqueue(Self::stream(execution), &hidden, workspace, &targets, hash.as_ref())?;
        Ok(())
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
        let hidden = matrix(OP, "hidden", hidden, self.device(), HIDDEN_DTYPES, expected)?;
        if tokens == 0 {
            return Ok(());
        }
        // No workspace in this call: one split, written straight into the caller's window.
        let plan = gate::plan(&hidden, &self.weight, 1)?;
        let (ptr, row_stride) = output_rows(logits);
        let out = Partials { ptr, splits: 1, split_stride: 0, row_stride };
        self.gpu.device.make_current().map_err(BackendError::from)?;
        let stream = Self::stream(execution);
        enqueue::gemm(stream, &self.module, &plan, &hidden, &self.weight, &out, None)?;
        Ok(())
    }
}

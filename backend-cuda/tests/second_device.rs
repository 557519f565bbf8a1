//! The CUDA backend on a second GPU (device ordinal 1): routers prepared from host tensors and
//! from tensors already on that device route like the reference, through `route` and through
//! `route_into` captured in a CUDA graph on a stream of that device; their outputs are on that
//! device by DLPack and by the driver; device tensors keep their pointer and device through the
//! bridge; and tensors on device 0 are refused with the backend's typed error, nothing written.
//!
//! Needs two CUDA devices. With fewer, every test prints why it skipped and passes, whatever
//! `SLUICE_REQUIRE_GPU` says (machines with one GPU run the suite with it set); with
//! `SLUICE_REQUIRE_GPUS=2` (the GPU bundle's `devices` step) a missing second device fails.

mod common;

use std::ffi::c_void;
use std::io::Write;
use std::ops::Range;
use std::sync::Arc;

use common::{
    Buffer, MARKER, RouteBuffers, deepseek_v3_spec, dl, host_values, marker_bytes, on_stream,
    test_stream, values,
};
use cudarc::driver::sys::{
    self, CUgraphInstantiate_flags, CUpointer_attribute, CUstreamCaptureMode,
};
use cudarc::driver::{CudaContext, CudaStream, DevicePtr};
use dlpark::ffi::DLDataType;
use half::bf16;
use sluice_backend_cuda::{CudaBackend, CudaPreparedRouter};
use sluice_models::reference::{self, Routing, Tolerance};
use sluice_tensor::{
    Backend, BackendError, Device, DeviceStream, Dlpack, DlpackView, Execution, PreparedRouter,
    RouteInputs, Tensor,
};

const SECOND: Device = Device::Cuda(1);
const H: usize = 512;
const E: usize = 256;
const K: usize = 8;
/// Token counts of the three GEMM paths on Hopper: the matrix-vector kernel (up to 2 bf16 tokens),
/// the tiles kernel (up to 64) and, past it, cuBLASLt where installed (the tensor-core kernels
/// elsewhere).
const TOKEN_COUNTS: [usize; 3] = [2, 24, 96];
/// Row stride of the output buffers `route_into` writes a window of: wider than `K`.
const ROW: usize = K + 3;
/// Where the window starts in each row; the columns outside it are not the call's to write.
const FIRST_COLUMN: usize = 1;
/// The columns of each row that `route_into` writes.
const WINDOW: Range<usize> = FIRST_COLUMN..FIRST_COLUMN + K;

/// Both devices' backends.
struct Devices {
    first: CudaBackend,
    second: CudaBackend,
}

/// The CUDA devices the driver reports, or why it cannot say.
fn cuda_device_count() -> Result<usize, String> {
    // SAFETY: only tries to dlopen the driver library by its usual names; nothing is called.
    if !unsafe { sys::is_culib_present() } {
        return Err("no CUDA driver".into());
    }
    let count = CudaContext::device_count().map_err(|e| format!("no CUDA device ({e})"))?;
    Ok(usize::try_from(count).unwrap_or(0))
}

/// How many devices `SLUICE_REQUIRE_GPUS` says this machine must have (0 when unset).
fn required_devices() -> usize {
    match std::env::var("SLUICE_REQUIRE_GPUS") {
        Err(_) => 0,
        Ok(value) => value.parse().unwrap_or_else(|_| {
            panic!("SLUICE_REQUIRE_GPUS={value:?} is not a number of CUDA devices")
        }),
    }
}

/// The backends of devices 0 and 1, or `None` after a visible skip where the machine has fewer
/// than two devices and `SLUICE_REQUIRE_GPUS` does not ask for two.
fn devices(test: &str) -> Option<Devices> {
    let found = match cuda_device_count() {
        Ok(count) if count >= 2 => {
            let open = |ordinal| {
                CudaBackend::new(ordinal)
                    .unwrap_or_else(|e| panic!("{test}: the CUDA backend on device {ordinal}: {e}"))
            };
            return Some(Devices { first: open(0), second: open(1) });
        }
        Ok(count) => format!("{count} CUDA device(s)"),
        Err(why) => why,
    };
    if required_devices() >= 2 {
        panic!("{test}: SLUICE_REQUIRE_GPUS asks for two CUDA devices, this machine has {found}");
    }
    // Written past the test harness's capture, so the skip is visible in every run.
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: needs two CUDA devices, found {found}");
    None
}

/// The backends of devices 0 and 1 for the test named `$test`, or a return from that test after
/// the visible skip of [`devices`].
macro_rules! devices_or_skip {
    ($test:literal) => {
        match devices($test) {
            Some(devices) => devices,
            None => return,
        }
    };
}

/// The ordinal of the device the driver places `address` on.
fn driver_ordinal(address: *const u8) -> i32 {
    let mut ordinal: i32 = -1;
    // SAFETY: the attribute is one `int`, written into `ordinal`, which outlives the call; the
    // driver was initialised when the backends were made, and the call only reads its tables.
    unsafe {
        sys::cuPointerGetAttribute(
            (&raw mut ordinal).cast::<c_void>(),
            CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            address as sys::CUdeviceptr,
        )
    }
    .result()
    .unwrap();
    ordinal
}

/// Asserts that a tensor is on device 1 as DLPack says and as the driver says.
fn assert_on_second_device(what: &str, tensor: &Dlpack) {
    let view = DlpackView::from_dlpack(tensor).unwrap();
    assert_eq!(view.device(), SECOND, "{what}");
    assert_eq!(driver_ordinal(view.data_ptr()), 1, "{what}: the driver's answer");
}

fn bf16s(values: &[f32]) -> Vec<bf16> {
    values.iter().copied().map(bf16::from_f32).collect()
}

/// A bf16 router weight `[E, H]` and an f32 bias `[E]`, as host values (bf16-exact).
struct Gate {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl Gate {
    fn new() -> Self {
        let weight = bf16s(&values(1, E * H, 0.2)).iter().map(|v| v.to_f32()).collect();
        Gate { weight, bias: values(2, E, 0.1) }
    }

    fn weight_dl(&self) -> Dlpack {
        dl(bf16s(&self.weight), &[E, H])
    }

    fn bias_dl(&self) -> Dlpack {
        dl(self.bias.clone(), &[E])
    }

    /// The router of this gate on `backend`'s device, prepared from the host tensors.
    fn router(&self, backend: &CudaBackend) -> CudaPreparedRouter {
        backend.prepare(&self.weight_dl(), Some(&self.bias_dl()), &deepseek_v3_spec(E, K)).unwrap()
    }

    /// bf16-exact hidden states `[tokens, H]`.
    fn hidden(&self, seed: u32, tokens: usize) -> Vec<f32> {
        bf16s(&values(seed, tokens * H, 2.0)).iter().map(|v| v.to_f32()).collect()
    }

    /// Asserts that `ids` and `weights` (`[tokens, K]`, row-major) route `hidden` as the
    /// reference does: the same expert sets except on near ties, weights within 1e-5.
    fn assert_routes(&self, context: &str, hidden: &[f32], ids: Vec<i32>, weights: Vec<f32>) {
        let tokens = hidden.len() / H;
        let logits = reference::router_logits(hidden, &self.weight, tokens, H, E).unwrap();
        let spec = deepseek_v3_spec(E, K);
        let expected = reference::route(&logits, tokens, Some(&self.bias), &spec).unwrap();
        let ties =
            reference::near_tie_rows(&logits, tokens, Some(&self.bias), &spec, 1e-4).unwrap();
        let ours = Routing::new(tokens, K, ids, weights).unwrap();
        reference::check_sorted(&ours).unwrap_or_else(|e| panic!("{context}: {e}"));
        reference::compare_routings(&expected, &ours, E, &ties, Tolerance { abs: 1e-5, rel: 1e-5 })
            .unwrap_or_else(|e| panic!("{context}: {e}"));
    }
}

/// The window's values of a `[rows, ROW]` buffer read back, row-major, after asserting that
/// every value outside it still holds the marker.
fn window_values(context: &str, buffer: Vec<i32>) -> Vec<i32> {
    let mut inside = Vec::new();
    for row in buffer.chunks(ROW) {
        let (before, rest) = row.split_at(FIRST_COLUMN);
        let (written, after) = rest.split_at(K);
        assert!(before.iter().chain(after).all(|&v| v == MARKER), "{context}: wrote past K");
        inside.extend_from_slice(written);
    }
    inside
}

#[test]
fn routers_on_the_second_device_route_there_like_the_reference() {
    let Devices { second, .. } =
        devices_or_skip!("routers_on_the_second_device_route_there_like_the_reference");
    let gate = Gate::new();
    let spec = deepseek_v3_spec(E, K);
    let from_host = gate.router(&second);
    let (weight_there, bias_there) =
        (second.upload(&gate.weight_dl()).unwrap(), second.upload(&gate.bias_dl()).unwrap());
    assert_on_second_device("uploaded weight", &weight_there);
    let from_device = second.prepare(&weight_there, Some(&bias_there), &spec).unwrap();
    for (prepared_from, router) in [("host", &from_host), ("device 1", &from_device)] {
        assert_eq!(router.device(), SECOND);
        for (seed, tokens) in (10..).zip(TOKEN_COUNTS) {
            let context = format!("prepared from {prepared_from}, T={tokens}");
            router.warm_up(tokens).unwrap();
            let hidden = gate.hidden(seed, tokens);
            let hidden_dl = || dl(bf16s(&hidden), &[tokens, H]);

            // Host hidden states: staged on device 1, outputs copied back.
            let out = router.route(&hidden_dl()).unwrap();
            let (ids, weights) = (host_values(out.topk_ids), host_values(out.topk_weights));
            gate.assert_routes(&format!("{context}, host in"), &hidden, ids, weights);

            // Hidden states on device 1: outputs stay there.
            let out = router.route(&second.upload(&hidden_dl()).unwrap()).unwrap();
            assert_on_second_device(&format!("{context}: topk_ids"), &out.topk_ids);
            assert_on_second_device(&format!("{context}: topk_weights"), &out.topk_weights);
            let ids = host_values(second.download(&out.topk_ids).unwrap());
            let weights = host_values(second.download(&out.topk_weights).unwrap());
            gate.assert_routes(&format!("{context}, device in"), &hidden, ids, weights);
        }
    }
}

/// `route_into`'s outputs on `stream`'s device, all marked but the workspace: the ids and weights
/// in the windows of wider rows, and a status.
fn marked_outputs(
    stream: &Arc<CudaStream>,
    router: &CudaPreparedRouter,
    tokens: usize,
) -> RouteBuffers {
    let workspace_bytes = router.workspace_bytes(tokens).max(1);
    RouteBuffers::new(
        stream,
        Buffer::marked_window(stream, tokens, WINDOW, ROW, DLDataType::I32),
        Buffer::marked_window(stream, tokens, WINDOW, ROW, DLDataType::F32),
        Buffer::contiguous(stream, &marker_bytes(2), &[2], DLDataType::I32),
        Buffer::zeroed(stream, workspace_bytes, &[workspace_bytes], &[1], DLDataType::U8),
    )
}

#[test]
fn route_into_on_a_stream_of_the_second_device_is_captured_and_replayed() {
    let Devices { second, .. } =
        devices_or_skip!("route_into_on_a_stream_of_the_second_device_is_captured_and_replayed");
    let gate = Gate::new();
    let router = gate.router(&second);
    let stream = test_stream(1);
    // SAFETY: the stream lives to the end of the test; every buffer of the call outlives the
    // graph's replays, and is read after synchronising.
    let execution = unsafe { on_stream(&stream) };
    for tokens in TOKEN_COUNTS {
        router.warm_up(tokens).unwrap();
        let zeros = vec![0u8; tokens * H * 2];
        let mut hidden_buffer = Buffer::contiguous(&stream, &zeros, &[tokens, H], DLDataType::BF16);
        let hidden_descriptor = hidden_buffer.descriptor(&stream);
        let mut outputs = marked_outputs(&stream, &router, tokens);
        // SAFETY: the descriptor points at the test's live buffer of hidden states with its
        // shape and strides; the test writes it only between replays, on the same stream.
        let hidden_view = unsafe { DlpackView::from_raw(&hidden_descriptor) }.unwrap();
        let inputs = RouteInputs::new(hidden_view);
        stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
        router.route_into(&inputs, &mut outputs.views(), execution).unwrap();
        let graph = stream
            .end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH)
            .unwrap()
            .expect("a captured graph");
        // A capture records the work, it does not run it.
        assert!(outputs.ids.read(&stream).iter().all(|&v| v == MARKER), "T={tokens}");

        for round in 0..2 {
            let context = format!("T={tokens} replay {round}");
            // New activations in the same buffer, as the engine's next step would have.
            let hidden = gate.hidden(20 + round, tokens);
            let bytes: Vec<u8> = bf16s(&hidden).iter().flat_map(|v| v.to_le_bytes()).collect();
            stream.memcpy_htod(&bytes, &mut hidden_buffer.memory).unwrap();
            graph.launch().unwrap();
            let ids = window_values(&context, outputs.ids.read(&stream));
            let weights = window_values(&context, outputs.weights.read(&stream));
            let weights = weights.into_iter().map(|bits| f32::from_bits(bits as u32));
            gate.assert_routes(&context, &hidden, ids, weights.collect());
            assert_eq!(outputs.status.read(&stream), [0, -1], "{context}");
            let driver = driver_ordinal(outputs.ids.memory.device_ptr(&stream).0 as *const u8);
            assert_eq!(driver, 1, "{context}: the driver places the outputs on device 1");
        }
    }
}

#[test]
fn device_tensors_on_the_second_device_keep_their_pointer_and_device() {
    let Devices { second, .. } =
        devices_or_skip!("device_tensors_on_the_second_device_keep_their_pointer_and_device");
    let values: Vec<f32> = (0..24).map(|v| v as f32).collect();
    let device = second.upload(&dl(values.clone(), &[4, 6])).unwrap();
    assert_on_second_device("uploaded", &device);
    let address = DlpackView::from_dlpack(&device).unwrap().data_ptr();
    let tensor = Tensor::from_dlpack(device).unwrap();
    assert_eq!(tensor.device(), SECOND);
    assert_eq!(tensor.data_ptr(), address);
    let again = tensor.to_dlpack().unwrap();
    assert_on_second_device("exported again", &again);
    assert_eq!(DlpackView::from_dlpack(&again).unwrap().data_ptr(), address);
    assert_eq!(host_values::<f32>(second.download(&again).unwrap()), values);
}

/// Asserts a refusal of a tensor on device 0 by a device-1 router, naming the argument.
fn assert_refused<T>(context: &str, result: Result<T, BackendError>, arg: &str) {
    let Err(error) = result else { panic!("{context}: a tensor on device 0 was accepted") };
    let message = error.to_string();
    assert!(
        matches!(
            error,
            BackendError::WrongDevice { arg: refused, actual: Device::Cuda(0), expected: SECOND, .. }
                if refused == arg
        ),
        "{context}: {message}"
    );
    let expected = format!("`{arg}` is on cuda:0, this backend computes on cuda:1");
    assert!(message.contains(&expected), "{context}: {message}");
}

#[test]
fn tensors_on_the_first_device_are_refused_by_a_second_device_router() {
    let Devices { first, second } =
        devices_or_skip!("tensors_on_the_first_device_are_refused_by_a_second_device_router");
    let gate = Gate::new();
    let spec = deepseek_v3_spec(E, K);
    let on_first = |host: Dlpack| first.upload(&host).unwrap();
    assert_refused(
        "a weight on device 0",
        second.prepare(&on_first(gate.weight_dl()), Some(&gate.bias_dl()), &spec),
        "weight",
    );
    assert_refused(
        "a bias on device 0",
        second.prepare(&gate.weight_dl(), Some(&on_first(gate.bias_dl())), &spec),
        "bias",
    );
    assert_refused("download", second.download(&on_first(gate.bias_dl())), "tensor");

    let router = gate.router(&second);
    let tokens = TOKEN_COUNTS[0];
    let hidden_first = on_first(dl(bf16s(&gate.hidden(30, tokens)), &[tokens, H]));
    assert_refused("route", router.route(&hidden_first), "hidden");
    assert_refused("router_gemm", router.router_gemm(&hidden_first), "hidden");

    let stream = test_stream(1);
    // SAFETY: the stream lives to the end of the test; every call below is refused before it
    // enqueues anything.
    let execution = unsafe { on_stream(&stream) };
    let mut outputs = marked_outputs(&stream, &router, tokens);
    let inputs = RouteInputs::new(DlpackView::from_dlpack(&hidden_first).unwrap());
    assert_refused(
        "route_into",
        router.route_into(&inputs, &mut outputs.views(), execution),
        "hidden",
    );
    // Hidden states on device 1, ids on device 0.
    let hidden_second = second.upload(&dl(bf16s(&gate.hidden(31, tokens)), &[tokens, H])).unwrap();
    let inputs = RouteInputs::new(DlpackView::from_dlpack(&hidden_second).unwrap());
    let stream_first = test_stream(0);
    let mut outputs_first = marked_outputs(&stream_first, &router, tokens);
    let mut views = outputs.views();
    views.topk_ids = outputs_first.views().topk_ids;
    assert_refused("route_into", router.route_into(&inputs, &mut views, execution), "topk_ids");
    // A stream of device 0.
    // SAFETY: the per-thread default stream; the call is refused before it enqueues anything.
    let per_thread_first = unsafe { DeviceStream::new(Device::Cuda(0), 2) }.unwrap();
    let result =
        router.route_into(&inputs, &mut outputs.views(), Execution::Stream(per_thread_first));
    assert!(matches!(result, Err(BackendError::UnsupportedExecution { .. })), "{result:?}");

    for (what, buffer, stream) in [
        ("ids", &outputs.ids, &stream),
        ("weights", &outputs.weights, &stream),
        ("status", &outputs.status, &stream),
        ("ids on device 0", &outputs_first.ids, &stream_first),
    ] {
        let values = buffer.read(stream);
        assert!(values.iter().all(|&v| v == MARKER), "{what}: a refused call wrote {values:?}");
    }
}

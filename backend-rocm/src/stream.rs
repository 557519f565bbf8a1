//! HIP streams and graphs of our own: the stream of the synchronous convenience calls, and what a
//! caller (or a test) needs to capture `route_into` into a graph and replay it.

use std::ffi::c_int;
use std::sync::Arc;

use crate::api::Handle;
use crate::device::RocmDevice;
use crate::error::RocmError;

/// `hipStreamNonBlocking`: no implicit synchronisation with the null stream.
const STREAM_NON_BLOCKING: u32 = 0x01;
/// `hipStreamCaptureModeThreadLocal`: only this thread's unsafe calls invalidate the capture.
const CAPTURE_MODE_THREAD_LOCAL: c_int = 1;

/// What `hipStreamIsCapturing` says about a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureStatus {
    /// Not capturing.
    None,
    /// Capturing, and the capture is still valid.
    Active,
    /// Capturing, but an operation invalidated the capture.
    Invalidated,
}

/// A non-blocking stream on one AMD GPU, destroyed on drop.
#[derive(Debug)]
pub struct HipStream {
    device: Arc<RocmDevice>,
    raw: Handle,
}

// SAFETY: a `hipStream_t` names a runtime object that any thread may enqueue on (the HIP runtime
// is thread-safe); this type only passes the handle to the runtime and destroys it once, on drop.
unsafe impl Send for HipStream {}
// SAFETY: as for `Send`; shared access only enqueues work or queries the stream.
unsafe impl Sync for HipStream {}

impl HipStream {
    /// A new non-blocking stream on `device`.
    pub fn new(device: Arc<RocmDevice>) -> Result<Self, RocmError> {
        device.make_current()?;
        let mut raw: Handle = std::ptr::null_mut();
        // SAFETY: writes one stream handle into `raw`; the flags are a valid combination.
        let status = unsafe {
            (device.runtime().api().hipStreamCreateWithFlags)(&mut raw, STREAM_NON_BLOCKING)
        };
        device.runtime().check("hipStreamCreateWithFlags", status)?;
        Ok(HipStream { device, raw })
    }

    /// The `hipStream_t`, which is also its DLPack stream number.
    pub fn raw(&self) -> Handle {
        self.raw
    }

    /// The device it belongs to.
    pub fn device(&self) -> &Arc<RocmDevice> {
        &self.device
    }

    /// Waits until all work enqueued on it has finished.
    pub fn synchronize(&self) -> Result<(), RocmError> {
        // SAFETY: `raw` is a live stream of this runtime.
        let status = unsafe { (self.device.runtime().api().hipStreamSynchronize)(self.raw) };
        Ok(self.device.runtime().check("hipStreamSynchronize", status)?)
    }

    /// Starts capturing the work enqueued on it into a graph (thread-local mode).
    pub fn begin_capture(&self) -> Result<(), RocmError> {
        // SAFETY: `raw` is a live stream of this runtime; the mode is one HIP defines.
        let status = unsafe {
            (self.device.runtime().api().hipStreamBeginCapture)(self.raw, CAPTURE_MODE_THREAD_LOCAL)
        };
        Ok(self.device.runtime().check("hipStreamBeginCapture", status)?)
    }

    /// Whether it is capturing, and whether the capture is still valid.
    pub fn capture_status(&self) -> Result<CaptureStatus, RocmError> {
        let mut raw_status: c_int = 0;
        // SAFETY: `raw` is a live stream; one `hipStreamCaptureStatus` (an int) is written.
        let status = unsafe {
            (self.device.runtime().api().hipStreamIsCapturing)(self.raw, &mut raw_status)
        };
        self.device.runtime().check("hipStreamIsCapturing", status)?;
        Ok(match raw_status {
            0 => CaptureStatus::None,
            1 => CaptureStatus::Active,
            _ => CaptureStatus::Invalidated,
        })
    }

    /// Ends the capture and instantiates the graph it recorded.
    pub fn end_capture(&self) -> Result<HipGraph, RocmError> {
        let api = self.device.runtime().api();
        let mut graph: Handle = std::ptr::null_mut();
        // SAFETY: `raw` is a live stream; one graph handle is written into `graph`.
        let status = unsafe { (api.hipStreamEndCapture)(self.raw, &mut graph) };
        self.device.runtime().check("hipStreamEndCapture", status)?;
        if graph.is_null() {
            return Err(RocmError::EmptyCapture);
        }
        let mut exec: Handle = std::ptr::null_mut();
        // SAFETY: `graph` was just returned by the runtime; no error node or log is asked for
        // (null pointers and a zero log size are allowed).
        let status = unsafe {
            (api.hipGraphInstantiate)(
                &mut exec,
                graph,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
        let graph = HipGraph { device: Arc::clone(&self.device), graph, exec };
        self.device.runtime().check("hipGraphInstantiate", status)?;
        Ok(graph)
    }
}

impl Drop for HipStream {
    fn drop(&mut self) {
        // SAFETY: `raw` came from `hipStreamCreateWithFlags` and is destroyed exactly once, here.
        // A failure cannot be reported from drop and leaves nothing unsafe behind.
        let _ = unsafe { (self.device.runtime().api().hipStreamDestroy)(self.raw) };
    }
}

/// A captured graph and its executable instance, destroyed on drop.
#[derive(Debug)]
pub struct HipGraph {
    device: Arc<RocmDevice>,
    graph: Handle,
    exec: Handle,
}

impl HipGraph {
    /// Enqueues one replay of the graph on `stream`.
    pub fn launch(&self, stream: &HipStream) -> Result<(), RocmError> {
        // SAFETY: `exec` is an instantiated graph of this runtime (a `HipGraph` is only handed
        // out after instantiation succeeded) and `stream` a live stream.
        let status = unsafe { (self.device.runtime().api().hipGraphLaunch)(self.exec, stream.raw) };
        Ok(self.device.runtime().check("hipGraphLaunch", status)?)
    }
}

impl Drop for HipGraph {
    fn drop(&mut self) {
        let api = self.device.runtime().api();
        // SAFETY: each handle came from the runtime and is destroyed exactly once, here; a null
        // instance (failed instantiation) is skipped. Failures cannot be reported from drop.
        unsafe {
            if !self.exec.is_null() {
                let _ = (api.hipGraphExecDestroy)(self.exec);
            }
            let _ = (api.hipGraphDestroy)(self.graph);
        }
    }
}

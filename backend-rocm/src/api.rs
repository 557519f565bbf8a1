//! The HIP runtime functions this backend calls, declared by hand and resolved from the library
//! loaded at run time.
//!
//! Only functions whose C signatures have been the same from ROCm 5 to ROCm 7 are listed (structs
//! that changed, such as `hipDeviceProp_t`, are avoided). Every function returns a `hipError_t`
//! except `hipGetErrorName`. A missing symbol is a typed error, never a panic: that is why this
//! table exists instead of a crate that loads HIP by dlopen.

use std::ffi::{c_char, c_int, c_uint, c_void};

use libloading::Library;

use crate::error::RocmError;

/// `hipError_t`.
pub type HipStatus = c_int;
/// `hipStream_t`, `hipModule_t`, `hipFunction_t`, `hipEvent_t`, `hipGraph_t`, `hipGraphExec_t`:
/// opaque handles.
pub type Handle = *mut c_void;

macro_rules! hip_api {
    ($( $(#[$doc:meta])* $name:ident($($arg:ident: $ty:ty),* $(,)?); )*) => {
        /// The resolved HIP functions, valid for as long as this value (which owns the library)
        /// lives. Calling one is `unsafe`: the caller upholds the HIP API's own preconditions.
        #[allow(non_snake_case)]
        pub struct HipApi {
            $( $(#[$doc])* pub $name: unsafe extern "C" fn($($arg: $ty),*) -> HipStatus, )*
            /// `const char* hipGetErrorName(hipError_t)`: a static string for any code.
            pub hipGetErrorName: unsafe extern "C" fn(HipStatus) -> *const c_char,
            // Last: the functions above point into it.
            _library: Library,
        }

        impl HipApi {
            /// Resolves every function from `library` (loaded from `path`).
            #[allow(non_snake_case)]
            pub(crate) fn resolve(library: Library, path: &str) -> Result<Self, RocmError> {
                $( let $name = resolve::<unsafe extern "C" fn($($ty),*) -> HipStatus>(&library, path, stringify!($name))?; )*
                let hipGetErrorName = resolve::<unsafe extern "C" fn(HipStatus) -> *const c_char>(&library, path, "hipGetErrorName")?;
                Ok(HipApi { $($name,)* hipGetErrorName, _library: library })
            }
        }
    };
}

/// Looks `symbol` up in `library` as a function pointer of type `F`.
fn resolve<F: Copy>(library: &Library, path: &str, symbol: &'static str) -> Result<F, RocmError> {
    // SAFETY: `F` is always one of the `unsafe extern "C" fn` types of the table above, each the
    // C signature HIP declares for `symbol` in `hip_runtime_api.h` (ROCm 5 to 7). The pointer is
    // copied out of the `Symbol`, and `HipApi` keeps `library` loaded for as long as it is used.
    let symbol_fn = unsafe { library.get::<F>(symbol) };
    symbol_fn.map(|f| *f).map_err(|_| RocmError::MissingSymbol { library: path.to_owned(), symbol })
}

hip_api! {
    /// `hipInit(unsigned flags)`.
    hipInit(flags: c_uint);
    /// `hipRuntimeGetVersion(int* version)`.
    hipRuntimeGetVersion(version: *mut c_int);
    /// `hipGetDeviceCount(int* count)`.
    hipGetDeviceCount(count: *mut c_int);
    /// `hipDeviceGetName(char* name, int len, int device)`.
    hipDeviceGetName(name: *mut c_char, len: c_int, device: c_int);
    /// `hipSetDevice(int device)`.
    hipSetDevice(device: c_int);
    /// `hipMalloc(void** ptr, size_t bytes)`.
    hipMalloc(ptr: *mut *mut c_void, bytes: usize);
    /// `hipFree(void* ptr)`.
    hipFree(ptr: *mut c_void);
    /// `hipMemcpyHtoDAsync(hipDeviceptr_t dst, void* src, size_t bytes, hipStream_t stream)`.
    hipMemcpyHtoDAsync(dst: *mut c_void, src: *const c_void, bytes: usize, stream: Handle);
    /// `hipMemcpyDtoHAsync(void* dst, hipDeviceptr_t src, size_t bytes, hipStream_t stream)`.
    hipMemcpyDtoHAsync(dst: *mut c_void, src: *const c_void, bytes: usize, stream: Handle);
    /// `hipMemsetAsync(void* dst, int value, size_t bytes, hipStream_t stream)`.
    hipMemsetAsync(dst: *mut c_void, value: c_int, bytes: usize, stream: Handle);
    /// `hipStreamCreateWithFlags(hipStream_t* stream, unsigned flags)`.
    hipStreamCreateWithFlags(stream: *mut Handle, flags: c_uint);
    /// `hipStreamDestroy(hipStream_t stream)`.
    hipStreamDestroy(stream: Handle);
    /// `hipStreamSynchronize(hipStream_t stream)`.
    hipStreamSynchronize(stream: Handle);
    /// `hipEventCreate(hipEvent_t* event)`.
    hipEventCreate(event: *mut Handle);
    /// `hipEventRecord(hipEvent_t event, hipStream_t stream)`.
    hipEventRecord(event: Handle, stream: Handle);
    /// `hipEventSynchronize(hipEvent_t event)`.
    hipEventSynchronize(event: Handle);
    /// `hipEventDestroy(hipEvent_t event)`.
    hipEventDestroy(event: Handle);
    /// `hipModuleLoadData(hipModule_t* module, const void* image)`.
    hipModuleLoadData(module: *mut Handle, image: *const c_void);
    /// `hipModuleUnload(hipModule_t module)`.
    hipModuleUnload(module: Handle);
    /// `hipModuleGetFunction(hipFunction_t* function, hipModule_t module, const char* name)`.
    hipModuleGetFunction(function: *mut Handle, module: Handle, name: *const c_char);
    /// `hipModuleLaunchKernel(f, gridX, gridY, gridZ, blockX, blockY, blockZ, sharedBytes, stream,
    /// void** params, void** extra)`.
    hipModuleLaunchKernel(
        function: Handle, grid_x: c_uint, grid_y: c_uint, grid_z: c_uint, block_x: c_uint,
        block_y: c_uint, block_z: c_uint, shared_bytes: c_uint, stream: Handle,
        params: *mut *mut c_void, extra: *mut *mut c_void,
    );
    /// `hipStreamBeginCapture(hipStream_t stream, hipStreamCaptureMode mode)`.
    hipStreamBeginCapture(stream: Handle, mode: c_int);
    /// `hipStreamEndCapture(hipStream_t stream, hipGraph_t* graph)`.
    hipStreamEndCapture(stream: Handle, graph: *mut Handle);
    /// `hipStreamIsCapturing(hipStream_t stream, hipStreamCaptureStatus* status)`.
    hipStreamIsCapturing(stream: Handle, status: *mut c_int);
    /// `hipGraphInstantiate(hipGraphExec_t* exec, hipGraph_t graph, hipGraphNode_t* error_node,
    /// char* log, size_t log_bytes)`.
    hipGraphInstantiate(exec: *mut Handle, graph: Handle, error_node: *mut Handle, log: *mut c_char, log_bytes: usize);
    /// `hipGraphLaunch(hipGraphExec_t exec, hipStream_t stream)`.
    hipGraphLaunch(exec: Handle, stream: Handle);
    /// `hipGraphExecDestroy(hipGraphExec_t exec)`.
    hipGraphExecDestroy(exec: Handle);
    /// `hipGraphDestroy(hipGraph_t graph)`.
    hipGraphDestroy(graph: Handle);
}

//! Finding, loading and initialising the HIP runtime, with every failure a [`RocmError`].

use std::ffi::{CStr, c_char, c_int};
use std::path::PathBuf;

use libloading::Library;

use crate::api::{HipApi, HipStatus};
use crate::error::{
    HIP_ERROR_INVALID_DEVICE, HIP_ERROR_NO_DEVICE, HipError, HipVersion, RocmError,
};

/// The sonames tried, newest ROCm first (ROCm 7, 6, then 5, which Debian bookworm ships).
const SONAMES: [&str; 3] = ["libamdhip64.so.7", "libamdhip64.so.6", "libamdhip64.so.5"];

/// The ROCm major versions this backend's declarations match.
const SUPPORTED_MAJORS: std::ops::RangeInclusive<i32> = 5..=7;

/// A loaded HIP runtime: its functions, where it came from and its version.
pub struct HipRuntime {
    api: HipApi,
    path: String,
    version: HipVersion,
}

impl HipRuntime {
    /// Loads the HIP runtime: `$ROCM_PATH/lib/` first when set, then the loader's search path.
    /// Needs no GPU; fails with [`RocmError::NoLibrary`], [`RocmError::MissingSymbol`] or
    /// [`RocmError::UnsupportedVersion`].
    pub fn load() -> Result<Self, RocmError> {
        Self::load_from(&default_candidates())
    }

    /// Loads the first of `candidates` (file names or paths) that opens.
    pub fn load_from(candidates: &[String]) -> Result<Self, RocmError> {
        let mut last = String::from("no candidates");
        for candidate in candidates {
            // SAFETY: loading a shared library runs its initialisers. libamdhip64's only set up
            // the runtime's own state: on Debian's ROCm 5.2 without an AMD GPU loading it prints
            // nothing and touches no device (CI loads it every run), and loading it is what every
            // HIP program does at start. The library stays loaded as long as the `HipApi` owning it.
            match unsafe { Library::new(candidate) } {
                Ok(library) => {
                    return Self::from_library(HipApi::resolve(library, candidate)?, candidate);
                }
                Err(error) => last = error.to_string(),
            }
        }
        Err(RocmError::NoLibrary { tried: candidates.join(", "), last })
    }

    fn from_library(api: HipApi, path: &str) -> Result<Self, RocmError> {
        let mut raw: c_int = 0;
        // SAFETY: `hipRuntimeGetVersion` writes one int through its pointer, which points at `raw`;
        // it needs neither `hipInit` nor a device.
        let status = unsafe { (api.hipRuntimeGetVersion)(&mut raw) };
        let runtime = HipRuntime { api, path: path.to_owned(), version: HipVersion(raw) };
        runtime.check("hipRuntimeGetVersion", status)?;
        if !SUPPORTED_MAJORS.contains(&runtime.version.major()) {
            return Err(RocmError::UnsupportedVersion(runtime.version));
        }
        Ok(runtime)
    }

    /// Initialises the runtime and counts the AMD GPUs; none is [`RocmError::NoDevice`].
    pub fn device_count(&self) -> Result<usize, RocmError> {
        // SAFETY: `hipInit` takes flags, which must be 0, and may be called any number of times.
        let status = unsafe { (self.api.hipInit)(0) };
        self.check("hipInit", status).map_err(no_device)?;
        let mut count: c_int = 0;
        // SAFETY: `hipGetDeviceCount` writes one int through its pointer, which points at `count`.
        let status = unsafe { (self.api.hipGetDeviceCount)(&mut count) };
        self.check("hipGetDeviceCount", status).map_err(no_device)?;
        match usize::try_from(count) {
            Ok(count) if count > 0 => Ok(count),
            _ => Err(RocmError::NoDevice(HipError {
                call: "hipGetDeviceCount",
                code: HIP_ERROR_NO_DEVICE,
                name: format!("{count} devices"),
            })),
        }
    }

    /// The marketing name of device `ordinal` (e.g. "AMD Instinct MI300X").
    pub fn device_name(&self, ordinal: usize) -> Result<String, RocmError> {
        let count = self.device_count()?;
        if ordinal >= count {
            return Err(RocmError::DeviceOutOfRange { ordinal, count });
        }
        let mut name = [0 as c_char; 256];
        // SAFETY: `hipDeviceGetName` writes at most `len` bytes, NUL-terminated, into `name`, which
        // holds 256; `ordinal` < the device count, so it fits an int and names a device.
        let status =
            unsafe { (self.api.hipDeviceGetName)(name.as_mut_ptr(), 256, ordinal as c_int) };
        self.check("hipDeviceGetName", status)?;
        // SAFETY: the call succeeded, so `name` holds a NUL-terminated string inside its 256 bytes
        // (the zeroed array ends in NUL even if the runtime wrote fewer).
        Ok(unsafe { CStr::from_ptr(name.as_ptr()) }.to_string_lossy().into_owned())
    }

    /// `Ok` for `hipSuccess`, else the call's [`HipError`] with HIP's name for the code.
    pub fn check(&self, call: &'static str, status: HipStatus) -> Result<(), HipError> {
        if status == 0 {
            return Ok(());
        }
        // SAFETY: `hipGetErrorName` accepts any int and returns a pointer to a static
        // NUL-terminated string ("hipErrorUnknown" for codes it does not know), never null in
        // ROCm 5 to 7; the null check below keeps a broken runtime from being dereferenced.
        let name = unsafe { (self.api.hipGetErrorName)(status) };
        let name = if name.is_null() {
            "unnamed".to_owned()
        } else {
            // SAFETY: non-null, so a static NUL-terminated string (see above).
            unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned()
        };
        Err(HipError { call, code: status, name })
    }

    /// The resolved functions, for the layers that enqueue work.
    pub fn api(&self) -> &HipApi {
        &self.api
    }

    /// The library file that was loaded (a soname or a path under `$ROCM_PATH`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The runtime's version.
    pub fn version(&self) -> HipVersion {
        self.version
    }
}

impl std::fmt::Debug for HipRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HipRuntime")
            .field("path", &self.path)
            .field("version", &self.version)
            .finish()
    }
}

/// `hipInit` says "invalid device" and `hipGetDeviceCount` "no device" where no AMD GPU is.
fn no_device(error: HipError) -> RocmError {
    if [HIP_ERROR_NO_DEVICE, HIP_ERROR_INVALID_DEVICE].contains(&error.code) {
        RocmError::NoDevice(error)
    } else {
        RocmError::Hip(error)
    }
}

/// `$ROCM_PATH/lib/<soname>` for each soname when `ROCM_PATH` is set, then the bare sonames.
fn default_candidates() -> Vec<String> {
    let rocm = std::env::var_os("ROCM_PATH").map(|root| PathBuf::from(root).join("lib"));
    rocm.iter()
        .flat_map(|lib| SONAMES.iter().map(move |soname| lib.join(soname).display().to_string()))
        .chain(SONAMES.iter().map(|soname| (*soname).to_owned()))
        .collect()
}

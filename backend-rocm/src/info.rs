//! What this build and this machine offer for AMD GPUs, for `sluice info`.

use crate::code_objects::{self, CODE_OBJECTS, COMPILER};
use crate::error::RocmError;
use crate::runtime::HipRuntime;

/// The embedded kernels, the HIP runtime found and the devices it sees.
#[derive(Debug)]
pub struct RocmInfo {
    /// The compiler that built the code objects; `None`: built without AMD kernels.
    pub compiler: Option<&'static str>,
    /// The embedded architectures.
    pub architectures: Vec<&'static str>,
    /// The routing configs with embedded kernels.
    pub configs: Vec<&'static str>,
    /// The kernels in the code objects (the same in every one), sorted.
    pub kernels: Vec<String>,
    /// The runtime library loaded and its version, or why none.
    pub runtime: Result<(String, String), RocmError>,
    /// The names of the AMD GPUs, or why none; `None` where no runtime loaded to ask.
    pub devices: Option<Result<Vec<String>, RocmError>>,
}

impl RocmInfo {
    /// Why the backend cannot route here (`None`: it can): the first missing piece of kernels,
    /// runtime and device.
    pub fn why_unavailable(&self) -> Option<&RocmError> {
        const NO_KERNELS: RocmError = RocmError::BuiltWithoutKernels;
        if self.compiler.is_none() {
            return Some(&NO_KERNELS);
        }
        if let Err(error) = &self.runtime {
            return Some(error);
        }
        match &self.devices {
            Some(Err(error)) => Some(error),
            _ => None,
        }
    }
}

/// Looks at the build and the machine; never fails, every problem is a field.
pub fn probe() -> RocmInfo {
    let kernels = CODE_OBJECTS.first().and_then(|object| object.inspect()).map(|info| info.kernels);
    let runtime = HipRuntime::load();
    let devices = runtime.as_ref().ok().map(|runtime| {
        runtime
            .device_count()
            .and_then(|count| (0..count).map(|ordinal| runtime.device_name(ordinal)).collect())
    });
    RocmInfo {
        compiler: (!COMPILER.is_empty()).then_some(COMPILER),
        architectures: code_objects::architectures(),
        configs: code_objects::configs(),
        kernels: kernels.unwrap_or_default(),
        runtime: runtime.map(|runtime| (runtime.path().to_owned(), runtime.version().to_string())),
        devices,
    }
}

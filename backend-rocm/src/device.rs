//! Opening one AMD GPU: everything that must hold before anything is enqueued on it.

use crate::code_objects::built_with_kernels;
use crate::error::RocmError;
use crate::runtime::HipRuntime;

/// An AMD GPU that this build has kernels for and the runtime can reach.
#[derive(Debug)]
pub struct RocmDevice {
    runtime: HipRuntime,
    ordinal: usize,
    name: String,
}

impl RocmDevice {
    /// Checks, in this order, that the build embeds AMD kernels, that the HIP runtime loads and
    /// that device `ordinal` exists; the first that fails is the error.
    pub fn open(ordinal: usize) -> Result<Self, RocmError> {
        if !built_with_kernels() {
            return Err(RocmError::BuiltWithoutKernels);
        }
        let runtime = HipRuntime::load()?;
        let name = runtime.device_name(ordinal)?;
        Ok(RocmDevice { runtime, ordinal, name })
    }

    /// The runtime it was opened through.
    pub fn runtime(&self) -> &HipRuntime {
        &self.runtime
    }

    /// Its ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// Its name as the runtime reports it.
    pub fn name(&self) -> &str {
        &self.name
    }
}

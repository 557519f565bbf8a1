//! Why the ROCm backend could not start or run.

use sluice_kernels::KernelError;
use sluice_tensor::BackendError;
use thiserror::Error;

/// HIP's `hipErrorNoDevice`: the runtime found no AMD GPU.
pub const HIP_ERROR_NO_DEVICE: i32 = 100;
/// HIP's `hipErrorInvalidDevice`: what `hipInit` answers on a machine without an AMD GPU.
pub const HIP_ERROR_INVALID_DEVICE: i32 = 101;

/// A failure of the ROCm backend itself (bad arguments are `sluice_tensor::BackendError`s).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RocmError {
    /// No HIP runtime library could be loaded.
    #[error("no HIP runtime found (tried {tried}): {last}")]
    NoLibrary {
        /// The file names and paths tried, in order.
        tried: String,
        /// Why the last one failed to load.
        last: String,
    },
    /// The library loaded but lacks a function this backend calls.
    #[error("the HIP runtime {library} has no symbol {symbol}")]
    MissingSymbol {
        /// The library that was loaded.
        library: String,
        /// The missing function.
        symbol: &'static str,
    },
    /// The runtime's major version is one this backend was not written against.
    #[error("HIP runtime version {0} is not supported (ROCm 5, 6 or 7 expected)")]
    UnsupportedVersion(HipVersion),
    /// The runtime loaded but found no usable AMD GPU.
    #[error("no AMD GPU: {0}")]
    NoDevice(HipError),
    /// A device ordinal beyond the devices present.
    #[error("AMD GPU {ordinal} asked for, {count} present")]
    DeviceOutOfRange {
        /// The ordinal asked for.
        ordinal: usize,
        /// How many devices the runtime reports.
        count: usize,
    },
    /// A HIP call failed.
    #[error(transparent)]
    Hip(#[from] HipError),
    /// This build embeds no AMD kernels (no clang was found when it was compiled).
    #[error("built without AMD kernels (no clang++ 19 or newer when sluice was compiled)")]
    BuiltWithoutKernels,
    /// No embedded code object loads on this device.
    #[error("no embedded code object for {config} loads on this GPU (refused: {archs})")]
    NoCodeObjectForDevice {
        /// The routing config.
        config: String,
        /// Each architecture tried, with the runtime's answer.
        archs: String,
    },
    /// The routing config was not compiled ahead of time (AMD has no run-time compiler here).
    #[error(
        "no AMD kernels were compiled for the routing config {config}; this build embeds {embedded} \
         (the list is kernels/gpu/offline_configs.txt)"
    )]
    ConfigNotEmbedded {
        /// The config asked for, as its spec reads.
        config: String,
        /// The configs this build embeds, by name.
        embedded: String,
    },
    /// The routing config or a shape is outside what the kernels take.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// A kernel the plan names is not in the loaded code object.
    #[error("the kernel {0} is not in the AMD code object")]
    MissingKernel(String),
    /// A stream handle was refused.
    #[error(transparent)]
    Stream(#[from] sluice_tensor::StreamError),
    /// A stream capture ended without a graph.
    #[error("the HIP stream capture recorded no graph")]
    EmptyCapture,
}

impl From<RocmError> for BackendError {
    fn from(error: RocmError) -> Self {
        match error {
            RocmError::Kernel(KernelError::Spec(spec)) => BackendError::Spec(spec),
            other => BackendError::Device { backend: "rocm", message: other.to_string() },
        }
    }
}

/// A HIP return code other than `hipSuccess`, with the call that returned it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{call} returned {code} ({name})")]
pub struct HipError {
    /// The HIP function.
    pub call: &'static str,
    /// The `hipError_t` value.
    pub code: i32,
    /// Its name as `hipGetErrorName` gives it.
    pub name: String,
}

/// A HIP runtime version as `hipRuntimeGetVersion` encodes it: major * 10^7 + minor * 10^5 + patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HipVersion(pub i32);

impl HipVersion {
    /// The major version (5 for ROCm 5.x).
    pub fn major(self) -> i32 {
        self.0 / 10_000_000
    }

    /// The minor version.
    pub fn minor(self) -> i32 {
        self.0 / 100_000 % 100
    }

    /// The patch number.
    pub fn patch(self) -> i32 {
        self.0 % 100_000
    }
}

impl std::fmt::Display for HipVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major(), self.minor(), self.patch())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_decode_as_hip_encodes_them() {
        // Debian bookworm's libamdhip64.so.5 answers 50221153: HIP 5.2, build 21153.
        let version = HipVersion(50_221_153);
        assert_eq!((version.major(), version.minor(), version.patch()), (5, 2, 21153));
        assert_eq!(version.to_string(), "5.2.21153");
        assert_eq!(HipVersion(70_000_000).major(), 7);
    }
}

//! Where a backend call runs: on the host, or enqueued on a device stream the caller owns.

use std::fmt;

use thiserror::Error;

use crate::Device;

/// Where the work of a `*_into` call runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Execution {
    /// On the calling thread (and the backend's own host threads); the outputs are written when
    /// the call returns.
    Host,
    /// Enqueued on a device stream; the outputs are written when the stream reaches the work.
    Stream(DeviceStream),
}

impl fmt::Display for Execution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Execution::Host => f.write_str("the host"),
            Execution::Stream(stream) => write!(f, "{stream}"),
        }
    }
}

/// A device stream given as an opaque handle, numbered as DLPack's `__dlpack__(stream=...)`
/// numbers them:
///
/// | device | value | stream |
/// | --- | --- | --- |
/// | CUDA | 1 | the legacy default stream |
/// | CUDA | 2 | the per-thread default stream |
/// | CUDA | larger | a `cudaStream_t` / `CUstream` |
/// | ROCm | 0 | the default stream |
/// | ROCm | larger than 2 | a `hipStream_t` |
///
/// CUDA 0 and ROCm 1 and 2 are ambiguous in DLPack and refused. For both vendors the value is
/// exactly the handle their runtimes take (`CU_STREAM_LEGACY` is 1, `CU_STREAM_PER_THREAD` is 2,
/// HIP's null stream is 0), so a backend passes [`raw`](DeviceStream::raw) straight through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceStream {
    device: Device,
    raw: usize,
}

/// Why a stream handle was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum StreamError {
    /// Host memory has no streams.
    #[error("the host has no device streams; use `Execution::Host`")]
    Host,
    /// A value DLPack reserves or leaves ambiguous for this device type.
    #[error("stream value {value} is not a valid DLPack stream for {device}")]
    Reserved {
        /// The device.
        device: Device,
        /// The value given.
        value: usize,
    },
}

impl DeviceStream {
    /// A stream of `device` from its DLPack number.
    ///
    /// # Safety
    ///
    /// This is the whole asynchronous contract of a device call, stated once. While any call made
    /// with this stream may still be running on the device:
    /// - the stream stays alive (it is not destroyed) and belongs to `device`'s context;
    /// - every buffer handed to the call (inputs, outputs, workspace) stays allocated and is not
    ///   reused for anything else;
    /// - the inputs are ready on this stream: work that writes them was enqueued on it before the
    ///   call, or the caller made the stream wait for it;
    /// - nobody else reads or writes the outputs and the workspace until the stream has passed the
    ///   call's work (read them on this stream, or after synchronising with it).
    pub unsafe fn new(device: Device, raw: usize) -> Result<Self, StreamError> {
        let reserved = match device {
            Device::Cpu => return Err(StreamError::Host),
            Device::Cuda(_) => raw == 0,
            Device::Rocm(_) => raw == 1 || raw == 2,
        };
        if reserved {
            return Err(StreamError::Reserved { device, value: raw });
        }
        Ok(DeviceStream { device, raw })
    }

    /// The device whose stream this is.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The handle as the vendor runtime takes it (`CUstream`, `hipStream_t`).
    pub fn raw(&self) -> usize {
        self.raw
    }
}

impl fmt::Display for DeviceStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stream {:#x} of {}", self.raw, self.device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dlpack_stream_numbers() {
        // SAFETY: no work is enqueued on these streams; only their numbering is checked.
        unsafe {
            assert!(DeviceStream::new(Device::Cuda(0), 1).is_ok());
            assert!(DeviceStream::new(Device::Cuda(0), 2).is_ok());
            assert!(DeviceStream::new(Device::Cuda(1), 0x7f00_1234).is_ok());
            assert_eq!(
                DeviceStream::new(Device::Cuda(0), 0),
                Err(StreamError::Reserved { device: Device::Cuda(0), value: 0 })
            );
            assert!(DeviceStream::new(Device::Rocm(0), 0).is_ok());
            assert!(DeviceStream::new(Device::Rocm(0), 1).is_err());
            assert!(DeviceStream::new(Device::Rocm(0), 2).is_err());
            assert_eq!(DeviceStream::new(Device::Cpu, 5), Err(StreamError::Host));
        }
    }
}

//! Where a tensor's data lives.

use std::fmt;

use dlpark::ffi::{DLDevice, DLDeviceType};

/// The device that holds a tensor's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    /// Host memory.
    Cpu,
    /// An NVIDIA GPU, by ordinal.
    Cuda(usize),
    /// An AMD GPU through ROCm/HIP, by ordinal.
    Rocm(usize),
}

impl Device {
    /// The DLPack device type code: 1 (CPU), 2 (CUDA) or 10 (ROCm).
    pub const fn dlpack_device_type(self) -> u32 {
        match self {
            Device::Cpu => DLDeviceType::CPU.0,
            Device::Cuda(_) => DLDeviceType::CUDA.0,
            Device::Rocm(_) => DLDeviceType::ROCM.0,
        }
    }

    /// The DLPack device descriptor, or `None` if the ordinal does not fit DLPack's `i32`.
    pub fn to_dlpack(self) -> Option<DLDevice> {
        let ordinal = match self {
            Device::Cpu => 0,
            Device::Cuda(i) | Device::Rocm(i) => i32::try_from(i).ok()?,
        };
        Some(DLDevice { device_type: DLDeviceType(self.dlpack_device_type()), device_id: ordinal })
    }

    /// The device for a DLPack descriptor, or `None` for device types sluice does not handle or a
    /// negative ordinal.
    pub fn from_dlpack(device: DLDevice) -> Option<Device> {
        let ordinal = usize::try_from(device.device_id).ok();
        match device.device_type {
            DLDeviceType::CPU => Some(Device::Cpu),
            DLDeviceType::CUDA => ordinal.map(Device::Cuda),
            DLDeviceType::ROCM => ordinal.map(Device::Rocm),
            _ => None,
        }
    }

    /// Whether this is host memory.
    pub const fn is_cpu(self) -> bool {
        matches!(self, Device::Cpu)
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
            Device::Rocm(i) => write!(f, "rocm:{i}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_types_are_the_dlpack_codes() {
        assert_eq!(Device::Cpu.dlpack_device_type(), 1);
        assert_eq!(Device::Cuda(3).dlpack_device_type(), 2);
        assert_eq!(Device::Rocm(1).dlpack_device_type(), 10);
    }

    #[test]
    fn devices_round_trip_through_dlpack() {
        for device in [Device::Cpu, Device::Cuda(0), Device::Cuda(7), Device::Rocm(2)] {
            let dl = device.to_dlpack().unwrap();
            assert_eq!(Device::from_dlpack(dl), Some(device));
        }
    }

    #[test]
    fn foreign_devices_and_bad_ordinals_are_refused() {
        let metal = DLDevice { device_type: DLDeviceType::METAL, device_id: 0 };
        assert_eq!(Device::from_dlpack(metal), None);
        let negative = DLDevice { device_type: DLDeviceType::CUDA, device_id: -1 };
        assert_eq!(Device::from_dlpack(negative), None);
        assert_eq!(Device::Cuda(usize::MAX).to_dlpack(), None);
    }
}

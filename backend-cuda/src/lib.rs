//! NVIDIA backend for sluice.
//!
//! This crate will implement `sluice_tensor::Backend` on NVIDIA GPUs through cudarc with dynamic
//! loading (driver, NVRTC, cuBLASLt), specialise the routing kernels from `sluice-kernels` per
//! routing config, and keep every launch capturable in a CUDA graph. It is empty until the GPU work
//! lands.

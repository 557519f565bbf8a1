//! AMD ROCm backend for sluice.
//!
//! This crate will implement `sluice_tensor::Backend` on AMD Instinct GPUs: the HIP runtime is loaded
//! at run time (opening it never panics), and the kernels from `sluice-kernels` are compiled offline
//! into code objects for gfx90a and gfx942. It is empty until the GPU work lands.

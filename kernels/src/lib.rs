//! GPU device source for the sluice router kernels, written once for CUDA and HIP.
//!
//! This crate will hold the router GEMM and routing kernels as portable C++ source behind a small
//! compatibility header of our own (wave width, shuffles, lane masks, launch bounds), plus the
//! launch-geometry rules that both GPU backends share. It is empty until the GPU work lands.

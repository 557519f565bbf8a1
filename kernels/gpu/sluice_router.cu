// The whole device source, for compilers that read files (CI builds it with clang for NVPTX and
// AMDGPU). The backends receive the same text, concatenated in this order, from `sluice-kernels`.
#include "compat.h"
#include "router_gemm.cuh"
#include "routing.cuh"
#include "route_block.cuh"
#include "dispatch.cuh"
#include "route_dispatch.cuh"

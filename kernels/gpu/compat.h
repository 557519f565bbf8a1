// compat.h: the few things that differ between the compilers and vendors this source is built with.
//
// Four ways in, one set of names out:
//   - NVRTC (what the CUDA backend compiles at run time): CUDA built-ins, no headers needed;
//   - nvcc (developers' experiments): the same built-ins;
//   - clang -x cuda -nocudainc with SLUICE_NO_VENDOR_HEADERS (CI: PTX with no CUDA SDK);
//   - clang -x hip -nogpuinc with SLUICE_NO_VENDOR_HEADERS (CI: AMD code objects with no ROCm).
// Kernels use only what is defined here: our own wave width (never `warpSize`, which is not a
// constant on ROCm 7), shuffles that take a mask where the vendor needs one, lane masks of the
// vendor's width, launch bounds with one meaning, and the grid-dependency hooks of programmatic
// dependent launch (no-ops where the hardware has none).

#if defined(__HIP__) || defined(__HIPCC__)
#define GPU_AMD 1
#else
#define GPU_NVIDIA 1
#endif

#if defined(SLUICE_NO_VENDOR_HEADERS)
#define __global__ __attribute__((global))
#define __device__ __attribute__((device))
#define __shared__ __attribute__((shared))
#define __forceinline__ inline __attribute__((always_inline))
#endif

#define GPU_KERNEL extern "C" __global__
#define GPU_INLINE static __device__ __forceinline__

// ---- wave width and lane masks ---------------------------------------------------------------
#if defined(GPU_AMD)
#ifndef GPU_WARP
#define GPU_WARP 64  // CDNA (gfx90a, gfx942, gfx950) runs wave64
#endif
typedef unsigned long long gpu_lanemask_t;
#else
#define GPU_WARP 32
typedef unsigned int gpu_lanemask_t;
#endif
#define GPU_FULL_MASK ((gpu_lanemask_t)~(gpu_lanemask_t)0)

// ---- launch bounds: the most threads a block of this kernel is launched with ------------------
#if defined(GPU_AMD)
#define GPU_LAUNCH_BOUNDS(threads) __attribute__((amdgpu_flat_work_group_size(1, threads)))
#elif defined(SLUICE_NO_VENDOR_HEADERS)
#define GPU_LAUNCH_BOUNDS(threads) __attribute__((launch_bounds(threads)))
#else
#define GPU_LAUNCH_BOUNDS(threads) __launch_bounds__(threads)
#endif

// ---- thread and block indices ----------------------------------------------------------------
#if defined(GPU_AMD)
#define GPU_TID ((int)__builtin_amdgcn_workitem_id_x())
#define GPU_BID_X ((int)__builtin_amdgcn_workgroup_id_x())
#define GPU_BID_Y ((int)__builtin_amdgcn_workgroup_id_y())
#define GPU_BID_Z ((int)__builtin_amdgcn_workgroup_id_z())
#define GPU_THREADS_X ((int)__builtin_amdgcn_workgroup_size_x())
#elif defined(SLUICE_NO_VENDOR_HEADERS)
#define GPU_TID ((int)__nvvm_read_ptx_sreg_tid_x())
#define GPU_BID_X ((int)__nvvm_read_ptx_sreg_ctaid_x())
#define GPU_BID_Y ((int)__nvvm_read_ptx_sreg_ctaid_y())
#define GPU_BID_Z ((int)__nvvm_read_ptx_sreg_ctaid_z())
#define GPU_THREADS_X ((int)__nvvm_read_ptx_sreg_ntid_x())
#else
#define GPU_TID ((int)threadIdx.x)
#define GPU_BID_X ((int)blockIdx.x)
#define GPU_BID_Y ((int)blockIdx.y)
#define GPU_BID_Z ((int)blockIdx.z)
#define GPU_THREADS_X ((int)blockDim.x)
#endif

// ---- bit casts -------------------------------------------------------------------------------
#if defined(SLUICE_NO_VENDOR_HEADERS)
GPU_INLINE unsigned gpu_float_bits(float v) { return __builtin_bit_cast(unsigned, v); }
GPU_INLINE float gpu_bits_float(unsigned v) { return __builtin_bit_cast(float, v); }
#else
GPU_INLINE unsigned gpu_float_bits(float v) { return __float_as_uint(v); }
GPU_INLINE float gpu_bits_float(unsigned v) { return __uint_as_float(v); }
#endif
GPU_INLINE int gpu_float_bits_i(float v) { return (int)gpu_float_bits(v); }
GPU_INLINE float gpu_bits_float_i(int v) { return gpu_bits_float((unsigned)v); }

#define GPU_INFINITY gpu_bits_float(0x7f800000u)
#define GPU_INT_MAX 0x7fffffff

GPU_INLINE bool gpu_is_finite(float v) { return (gpu_float_bits(v) & 0x7f800000u) != 0x7f800000u; }

// ---- exp -------------------------------------------------------------------------------------
#if defined(GPU_AMD)
GPU_INLINE float gpu_expf(float v) { return __builtin_expf(v); }
// No device library is linked for AMD, and ln(1 + v) has no LLVM intrinsic: Goldberg's form
// keeps full relative precision for small v from the natural logarithm, which has one.
GPU_INLINE float gpu_log1pf(float v) {
  const float u = 1.f + v;
  return u == 1.f ? v : __builtin_logf(u) * (v / (u - 1.f));
}
GPU_INLINE float gpu_sqrtf(float v) { return __builtin_sqrtf(v); }
#elif defined(SLUICE_NO_VENDOR_HEADERS)
extern "C" __device__ float __nv_expf(float);  // libdevice, linked by the driver's JIT
extern "C" __device__ float __nv_log1pf(float);
extern "C" __device__ float __nv_sqrtf(float);
GPU_INLINE float gpu_expf(float v) { return __nv_expf(v); }
GPU_INLINE float gpu_log1pf(float v) { return __nv_log1pf(v); }
GPU_INLINE float gpu_sqrtf(float v) { return __nv_sqrtf(v); }
#else
GPU_INLINE float gpu_expf(float v) { return expf(v); }
GPU_INLINE float gpu_log1pf(float v) { return log1pf(v); }
GPU_INLINE float gpu_sqrtf(float v) { return sqrtf(v); }
#endif

// 1 / d for d >= 1, as the correctly rounded division gives it below 2^126, and 0 from there on
// (where the quotient is under 2^-126). On NVIDIA this is the division's own fast path (an
// approximate reciprocal and one Newton step) without its range check and slow-path call.
#if defined(GPU_AMD)
GPU_INLINE float gpu_rcp_from_one(float d) { return 1.f / d; }
#else
GPU_INLINE float gpu_rcp_from_one(float d) {
  float r, refined;
  asm("{\n\t.reg .f32 e;\n\t"
      "rcp.approx.ftz.f32 %0, %2;\n\t"
      "fma.rn.f32 e, %3, %0, 0f3F800000;\n\t"  // e = 1 - d r
      "fma.rn.f32 %1, %0, e, %0;\n\t"          // r + r e
      "}"
      : "=&f"(r), "=f"(refined)
      : "f"(d), "f"(-d));
  return d < 0x1p126f ? refined : r;
}
#endif

// ---- half precision: f16 bits to f32 (exact) -------------------------------------------------
#if defined(GPU_AMD)
GPU_INLINE float gpu_f16_to_f32(unsigned short h) { return (float)__builtin_bit_cast(_Float16, h); }
#else
GPU_INLINE float gpu_f16_to_f32(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
#endif

// ---- wave-level communication ----------------------------------------------------------------
#if defined(GPU_AMD)
GPU_INLINE int gpu_lane_id() {
  return (int)__builtin_amdgcn_mbcnt_hi(~0u, __builtin_amdgcn_mbcnt_lo(~0u, 0u));
}
GPU_INLINE int gpu_shfl_i(int v, int src) { return __builtin_amdgcn_ds_bpermute(src << 2, v); }
GPU_INLINE int gpu_shfl_xor_i(int v, int m) { return gpu_shfl_i(v, gpu_lane_id() ^ m); }
GPU_INLINE bool gpu_any(bool p) { return __builtin_amdgcn_ballot_w64(p) != 0; }
GPU_INLINE void gpu_syncwarp() {
  __builtin_amdgcn_fence(__ATOMIC_RELEASE, "wavefront");
  __builtin_amdgcn_wave_barrier();
  __builtin_amdgcn_fence(__ATOMIC_ACQUIRE, "wavefront");
}
GPU_INLINE void gpu_syncthreads() {
  __builtin_amdgcn_fence(__ATOMIC_RELEASE, "workgroup");
  __builtin_amdgcn_s_barrier();
  __builtin_amdgcn_fence(__ATOMIC_ACQUIRE, "workgroup");
}
#elif defined(SLUICE_NO_VENDOR_HEADERS)
GPU_INLINE int gpu_shfl_i(int v, int src) { return __nvvm_shfl_sync_idx_i32(GPU_FULL_MASK, v, src, 0x1f); }
GPU_INLINE int gpu_shfl_xor_i(int v, int m) { return __nvvm_shfl_sync_bfly_i32(GPU_FULL_MASK, v, m, 0x1f); }
GPU_INLINE bool gpu_any(bool p) { return __nvvm_vote_any_sync(GPU_FULL_MASK, p); }
GPU_INLINE void gpu_syncwarp() { __nvvm_bar_warp_sync(GPU_FULL_MASK); }
GPU_INLINE void gpu_syncthreads() { __syncthreads(); }
#else
GPU_INLINE int gpu_shfl_i(int v, int src) { return __shfl_sync(GPU_FULL_MASK, v, src, GPU_WARP); }
GPU_INLINE int gpu_shfl_xor_i(int v, int m) { return __shfl_xor_sync(GPU_FULL_MASK, v, m, GPU_WARP); }
GPU_INLINE bool gpu_any(bool p) { return __any_sync(GPU_FULL_MASK, p) != 0; }
GPU_INLINE void gpu_syncwarp() { __syncwarp(GPU_FULL_MASK); }
GPU_INLINE void gpu_syncthreads() { __syncthreads(); }
#endif
// Lane masks of a predicate over the wave (bit i: lane i).
#if defined(GPU_AMD)
GPU_INLINE gpu_lanemask_t gpu_ballot(bool p) { return __builtin_amdgcn_ballot_w64(p); }
#elif defined(SLUICE_NO_VENDOR_HEADERS)
GPU_INLINE gpu_lanemask_t gpu_ballot(bool p) { return __nvvm_vote_ballot_sync(GPU_FULL_MASK, p); }
#else
GPU_INLINE gpu_lanemask_t gpu_ballot(bool p) { return __ballot_sync(GPU_FULL_MASK, p); }
#endif

// Wave-wide unsigned max / min: one `redux.sync` on NVIDIA sm_80 and later, shuffles elsewhere.
#if defined(GPU_NVIDIA) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#if defined(SLUICE_NO_VENDOR_HEADERS)
GPU_INLINE unsigned gpu_wave_max_u32(unsigned v) { return __nvvm_redux_sync_umax(v, GPU_FULL_MASK); }
GPU_INLINE unsigned gpu_wave_min_u32(unsigned v) { return __nvvm_redux_sync_umin(v, GPU_FULL_MASK); }
#else
GPU_INLINE unsigned gpu_wave_max_u32(unsigned v) { return __reduce_max_sync(GPU_FULL_MASK, v); }
GPU_INLINE unsigned gpu_wave_min_u32(unsigned v) { return __reduce_min_sync(GPU_FULL_MASK, v); }
#endif
#else
GPU_INLINE unsigned gpu_wave_max_u32(unsigned v) {
  for (int off = GPU_WARP / 2; off > 0; off >>= 1) {
    const unsigned o = (unsigned)gpu_shfl_xor_i((int)v, off);
    v = o > v ? o : v;
  }
  return v;
}
GPU_INLINE unsigned gpu_wave_min_u32(unsigned v) {
  for (int off = GPU_WARP / 2; off > 0; off >>= 1) {
    const unsigned o = (unsigned)gpu_shfl_xor_i((int)v, off);
    v = o < v ? o : v;
  }
  return v;
}
#endif

// Lanes of the wave holding the same `key` as this one (every lane must take part; keys >= 0).
// One `match.any` on NVIDIA sm_70 and later; elsewhere one ballot per bit of the largest key.
#if defined(GPU_NVIDIA) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700 && defined(SLUICE_NO_VENDOR_HEADERS)
GPU_INLINE gpu_lanemask_t gpu_match_any_i(int key) { return __nvvm_match_any_sync_i32(GPU_FULL_MASK, key); }
#elif defined(GPU_NVIDIA) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
GPU_INLINE gpu_lanemask_t gpu_match_any_i(int key) { return __match_any_sync(GPU_FULL_MASK, key); }
#else
GPU_INLINE gpu_lanemask_t gpu_match_any_i(int key) {
  gpu_lanemask_t peers = GPU_FULL_MASK;
  const unsigned highest = gpu_wave_max_u32((unsigned)key);
  for (int bit = 0; bit < 32 && (highest >> bit) != 0u; ++bit) {
    const bool set = (((unsigned)key >> bit) & 1u) != 0u;
    const gpu_lanemask_t same = gpu_ballot(set);
    peers &= set ? same : ~same;
  }
  return peers;
}
#endif
// Set bits of a lane mask.
#if defined(GPU_AMD)
GPU_INLINE int gpu_popc_mask(gpu_lanemask_t m) { return __builtin_popcountll(m); }
#elif defined(SLUICE_NO_VENDOR_HEADERS)
GPU_INLINE int gpu_popc_mask(gpu_lanemask_t m) { return __builtin_popcount(m); }
#else
GPU_INLINE int gpu_popc_mask(gpu_lanemask_t m) { return __popc(m); }
#endif
// The lowest set lane of a non-empty lane mask.
#if defined(GPU_AMD)
GPU_INLINE int gpu_lowest_lane(gpu_lanemask_t m) { return __builtin_ctzll(m); }
#elif defined(SLUICE_NO_VENDOR_HEADERS)
GPU_INLINE int gpu_lowest_lane(gpu_lanemask_t m) { return __builtin_ctz(m); }
#else
GPU_INLINE int gpu_lowest_lane(gpu_lanemask_t m) { return __ffs((int)m) - 1; }
#endif
// The lanes below `lane`.
GPU_INLINE gpu_lanemask_t gpu_lanes_below(int lane) { return ((gpu_lanemask_t)1 << lane) - 1; }

GPU_INLINE float gpu_shfl_f(float v, int src) { return gpu_bits_float_i(gpu_shfl_i(gpu_float_bits_i(v), src)); }
GPU_INLINE float gpu_shfl_xor_f(float v, int m) { return gpu_bits_float_i(gpu_shfl_xor_i(gpu_float_bits_i(v), m)); }

// ---- atomics on device memory ----------------------------------------------------------------
#if defined(GPU_AMD) || defined(SLUICE_NO_VENDOR_HEADERS)
GPU_INLINE void gpu_atomic_add_i32(int *p, int v) { __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
GPU_INLINE void gpu_atomic_min_u32(unsigned *p, unsigned v) { __atomic_fetch_min(p, v, __ATOMIC_RELAXED); }
#else
GPU_INLINE void gpu_atomic_add_i32(int *p, int v) { atomicAdd(p, v); }
GPU_INLINE void gpu_atomic_min_u32(unsigned *p, unsigned v) { atomicMin(p, v); }
#endif

// ---- 64-bit masks: set bits, the lowest one (of a non-empty mask), and an atomic or -----------
#if defined(GPU_AMD) || defined(SLUICE_NO_VENDOR_HEADERS)
GPU_INLINE int gpu_popc_u64(unsigned long long m) { return __builtin_popcountll(m); }
GPU_INLINE int gpu_lowest_bit_u64(unsigned long long m) { return __builtin_ctzll(m); }
GPU_INLINE void gpu_atomic_or_u64(unsigned long long *p, unsigned long long v) {
  __atomic_fetch_or(p, v, __ATOMIC_RELAXED);
}
#else
GPU_INLINE int gpu_popc_u64(unsigned long long m) { return __popcll(m); }
GPU_INLINE int gpu_lowest_bit_u64(unsigned long long m) { return __ffsll((long long)m) - 1; }
GPU_INLINE void gpu_atomic_or_u64(unsigned long long *p, unsigned long long v) { atomicOr(p, v); }
#endif

// ---- arrival at a grid-wide count (NVIDIA) ---------------------------------------------------
// Adds 1 to `*counter` at device scope and returns the value before, as one acquire-release
// operation: called by one thread after a block-wide barrier, it publishes every write the block
// made before the barrier to whichever block arrives after it, and sees every write of the blocks
// that arrived before it (the pattern of a grid's "last block").
#if defined(GPU_NVIDIA)
GPU_INLINE unsigned gpu_grid_arrive(unsigned *counter) {
  unsigned before;
  asm volatile("atom.add.acq_rel.gpu.u32 %0, [%1], 1;" : "=r"(before) : "l"(counter) : "memory");
  return before;
}
#endif

// ---- programmatic dependent launch (Hopper and later; no-ops elsewhere) ----------------------
// `gpu_wait_for_previous_grid` returns once the kernel this one depends on has finished and its
// writes are visible; everything before it may only read memory that kernel does not write.
// `gpu_allow_dependents` lets the next kernel start its own prologue early; it is always safe,
// because that kernel waits in turn before touching what this one writes.
#if defined(GPU_NVIDIA) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
GPU_INLINE void gpu_wait_for_previous_grid() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
GPU_INLINE void gpu_allow_dependents() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
#else
GPU_INLINE void gpu_wait_for_previous_grid() {}
GPU_INLINE void gpu_allow_dependents() {}
#endif

// ---- tensor cores: mma.sync (NVIDIA sm_80 and later) -----------------------------------------
#if defined(GPU_NVIDIA) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define GPU_HAS_MMA_SYNC 1
#endif
// ---- bulk copies into shared memory, counted on shared-memory barriers (NVIDIA sm_90 and later)
#if defined(GPU_NVIDIA) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define GPU_HAS_BULK_COPY 1
#endif
// ---- Hopper's tensor copies and warpgroup MMA (NVIDIA sm_90a: compiled for sm_90a, run on 9.0) --
// Tensor copies (`cp.async.bulk.tensor`) from a tensor map passed by value, counted on
// shared-memory barriers, and `wgmma`, which exists only on 9.0 and only in code compiled for the
// architecture-specific target.
#if defined(GPU_NVIDIA) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GPU_HAS_WGMMA 1
#endif
// A kernel parameter whose address is taken (a tensor map the copy unit reads in place).
#if defined(SLUICE_NO_VENDOR_HEADERS) && __has_attribute(grid_constant)
#define GPU_GRID_CONSTANT __attribute__((grid_constant))
#elif defined(SLUICE_NO_VENDOR_HEADERS)
// clang before 20 has no such attribute: CI's compile check still covers the kernel, whose PTX
// from that compiler is never run (the backend compiles its own with NVRTC).
#define GPU_GRID_CONSTANT
#else
#define GPU_GRID_CONSTANT __grid_constant__
#endif

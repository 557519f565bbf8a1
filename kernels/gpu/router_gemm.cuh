// Router GEMM: partial logits x[T, H] . W[E, H]^T, f32, split over the hidden dimension.
//
// Every kernel here writes `partials[split * split_stride + t * row_stride + e]` (f32): S partial
// sums of each logit, which the routing kernel (or `sluice_sum_partials`) adds in a fixed order, so
// results do not depend on scheduling. With S = 1 the output is the logits themselves, written
// straight into a caller's window. Element kinds: hidden states bf16, f16 or f32; weight bf16 (tensor cores)
// or f32 (the scalar path). f32 inputs are never rounded to bf16: an f32 (or f16) value is split
// exactly into a sum of bf16 terms, each multiplied on the tensor cores with f32 accumulation.

#define SLUICE_X_BF16 0
#define SLUICE_X_F16 1
#define SLUICE_X_F32 2
#define SLUICE_W_BF16 0
#define SLUICE_W_F32 1

// Warps per block of the scalar GEMM kernel.
#define SLUICE_GEMM_WARPS 4
// Warps per block of the tensor-core kernel, by token tiles: the warps of a block split the
// hidden range and add their sums in shared memory, so more warps per block means fewer partial
// sums for the routing kernel to add; the shared memory (warps x tiles x 1 KiB) bounds them.
#define SLUICE_MMA_WARPS(TILES) ((TILES) <= 2 ? 16 : ((TILES) == 4 ? 8 : 4))

GPU_INLINE float sluice_bf16_to_f32(unsigned short v) { return gpu_bits_float(((unsigned)v) << 16); }

// 16 bytes as four u32.
struct alignas(16) sluice_u32x4 {
  unsigned x, y, z, w;
};

// ---- the fused layout's workspace (`route_dispatch.cuh`) ----------------------------------------
// The ticket, a u32 at a 16-byte aligned address of the gate call's workspace; past the rows the
// last routing block lays out (`FusedLayout`'s `LAST_BLOCK_MAX_ROWS`), 16 bytes after it, the counts of the pairs of each expert in each word of 64 rows: E + 1 rows of
// i32 (row E: the rows marked invalid), `sluice_fused_count_stride(T)` counts each (a multiple of
// 4, for 16-byte loads).
#define SLUICE_WORD_ROWS 64
#define SLUICE_LAST_BLOCK_MAX_ROWS 64
GPU_INLINE int sluice_fused_count_stride(int tokens) { return (tokens + 255) / 256 * 4; }
GPU_INLINE int *sluice_fused_word_counts(unsigned *ticket) { return (int *)(ticket + 4); }
GPU_INLINE const int *sluice_fused_word_counts(const unsigned *ticket) {
  return (const int *)(ticket + 4);
}

// What a gate call's routing counts into, reset by the first warp of the GEMM's first block
// after the wait for the previous kernel (which may still count into the same memory): the status
// to [0, -1] (no row marked invalid), and the fused layout's ticket to 0 (no block arrived) and,
// past the last block's rows, its counts to 0 (no row chose anything). Status and ticket may be
// null.
GPU_INLINE void sluice_reset_counters(int *status, unsigned *ticket, int tokens, bool first_block) {
  if (!first_block || GPU_TID >= GPU_WARP) return;
  if (GPU_TID == 0) {
    if (status != 0) {
      status[0] = 0;
      status[1] = -1;
    }
    if (ticket != 0) *ticket = 0u;
  }
  if (ticket != 0 && tokens > SLUICE_LAST_BLOCK_MAX_ROWS) {
    // 16 bytes a store: the counts start 16 bytes after the ticket, 16-byte aligned as it is.
    sluice_u32x4 *counts = (sluice_u32x4 *)sluice_fused_word_counts(ticket);
    const int stores = (SLUICE_E + 1) * sluice_fused_count_stride(tokens) / 4;
    for (int i = GPU_TID; i < stores; i += GPU_WARP) counts[i] = sluice_u32x4{0u, 0u, 0u, 0u};
  }
}

template <int XKIND>
GPU_INLINE float sluice_load_x(const void *x, long long index) {
  if (XKIND == SLUICE_X_F32) return ((const float *)x)[index];
  if (XKIND == SLUICE_X_F16) return gpu_f16_to_f32(((const unsigned short *)x)[index]);
  return sluice_bf16_to_f32(((const unsigned short *)x)[index]);
}

template <int WKIND>
GPU_INLINE float sluice_load_w(const void *w, long long index) {
  if (WKIND == SLUICE_W_F32) return ((const float *)w)[index];
  return sluice_bf16_to_f32(((const unsigned short *)w)[index]);
}

// The scalar path: any strides, any element kinds, no split (S = 1). One warp per (expert, token):
// block (E-index, token block of SLUICE_GEMM_WARPS tokens). It serves f32 weights and hidden states
// whose rows are not 16-byte aligned.
template <int XKIND, int WKIND>
GPU_INLINE void sluice_gemm_simt(const void *x, long long x_row_stride, long long x_col_stride,
                                 const void *w, long long w_row_stride, long long w_col_stride,
                                 int tokens, int hidden, int experts, float *partials,
                                 long long row_stride, int *status, unsigned *ticket) {
  gpu_allow_dependents();
  gpu_wait_for_previous_grid();
  const int lane = GPU_TID % GPU_WARP, warp = GPU_TID / GPU_WARP;
  const int e = GPU_BID_X, t = GPU_BID_Y * SLUICE_GEMM_WARPS + warp;
  sluice_reset_counters(status, ticket, tokens, GPU_BID_X == 0 && GPU_BID_Y == 0);
  if (t >= tokens) return;
  float acc = 0.f;
  for (int k = lane; k < hidden; k += GPU_WARP)
    acc += sluice_load_x<XKIND>(x, t * x_row_stride + k * x_col_stride) *
           sluice_load_w<WKIND>(w, e * w_row_stride + k * w_col_stride);
  for (int off = GPU_WARP / 2; off > 0; off >>= 1) acc += gpu_shfl_xor_f(acc, off);
  if (lane == 0) partials[t * row_stride + e] = acc;
}

#define SLUICE_INSTANTIATE_SIMT(name, XKIND, WKIND)                                                \
  GPU_KERNEL GPU_LAUNCH_BOUNDS(SLUICE_GEMM_WARPS *GPU_WARP) void name(                             \
      const void *x, long long x_row_stride, long long x_col_stride, const void *w,                \
      long long w_row_stride, long long w_col_stride, int tokens, int hidden, int experts,         \
      float *partials, long long row_stride, int *status, unsigned *ticket) {                      \
    sluice_gemm_simt<XKIND, WKIND>(x, x_row_stride, x_col_stride, w, w_row_stride, w_col_stride,  \
                                   tokens, hidden, experts, partials, row_stride, status, ticket); \
  }
SLUICE_INSTANTIATE_SIMT(sluice_gemm_simt_bf16_bf16, SLUICE_X_BF16, SLUICE_W_BF16)
SLUICE_INSTANTIATE_SIMT(sluice_gemm_simt_f16_bf16, SLUICE_X_F16, SLUICE_W_BF16)
SLUICE_INSTANTIATE_SIMT(sluice_gemm_simt_f32_bf16, SLUICE_X_F32, SLUICE_W_BF16)
SLUICE_INSTANTIATE_SIMT(sluice_gemm_simt_bf16_f32, SLUICE_X_BF16, SLUICE_W_F32)
SLUICE_INSTANTIATE_SIMT(sluice_gemm_simt_f16_f32, SLUICE_X_F16, SLUICE_W_F32)
SLUICE_INSTANTIATE_SIMT(sluice_gemm_simt_f32_f32, SLUICE_X_F32, SLUICE_W_F32)

// Adds the S partial sums of every logit in order: logits[t][e] (any row stride).
GPU_KERNEL GPU_LAUNCH_BOUNDS(256) void sluice_sum_partials(const float *partials, int splits, int tokens,
                                                           int experts, float *logits,
                                                           long long logits_row_stride) {
  gpu_allow_dependents();
  gpu_wait_for_previous_grid();
  const long long i = (long long)GPU_BID_X * 256 + GPU_TID;
  const long long per_split = (long long)tokens * experts;
  if (i >= per_split) return;
  float sum = 0.f;
  for (int s = 0; s < splits; ++s) sum += partials[s * per_split + i];
  logits[(i / experts) * logits_row_stride + i % experts] = sum;
}

// ---- 16-byte loads ----------------------------------------------------------------------------

// 16 bytes of the weight, which nothing writes while the kernel runs: on NVIDIA the read-only
// path without an L1 fill. Not volatile, and without a memory clobber, so the compiler may issue it
// as early as it likes, before the grid-dependency wait too (the weight does not depend on the
// previous kernel).
GPU_INLINE sluice_u32x4 sluice_load_weight16(const unsigned short *p) {
#if defined(GPU_AMD)
  return *(const sluice_u32x4 *)p;
#else
  sluice_u32x4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
#endif
}

// 16 bytes of the hidden states: an ordinary load, which stays after the grid-dependency wait.
GPU_INLINE sluice_u32x4 sluice_load16(const void *p) { return *(const sluice_u32x4 *)p; }

// ---- few tokens: one pass over the weight, every load in flight at once -----------------------
//
// With a handful of tokens the router GEMM is a matrix-vector product whose time is one memory
// latency plus the reduction, if every byte of the weight is requested at once. Block (expert
// block, token block): EPB consecutive experts and TOKENS tokens; each thread takes 8-wide chunks of
// the hidden size (16-byte loads) at a stride of the block size, ILP chunks per round, and issues
// all their weight loads before it waits for the previous kernel (the weight does not depend on it).
// The block adds its threads' sums in a fixed order (shuffles, then warps in order), so the logits
// are written once, straight, and do not depend on scheduling. Needs a bf16 weight and bf16 hidden
// states whose rows are 16-byte aligned with a hidden size that is a multiple of 8.

#define SLUICE_GEMV_MAX_THREADS 512
#define SLUICE_GEMV_ILP 2

GPU_INLINE void sluice_bf16x8_to_f32(const sluice_u32x4 &v, float (&out)[8]) {
  const unsigned words[4] = {v.x, v.y, v.z, v.w};
  #pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = gpu_bits_float(words[i] << 16);
    out[2 * i + 1] = gpu_bits_float(words[i] & 0xffff0000u);
  }
}

template <int TOKENS, int EPB>
GPU_INLINE void sluice_gemv(const unsigned short *x, long long x_row_stride,
                            const unsigned short *w, long long w_row_stride, int tokens,
                            int hidden, int experts, float *logits, long long row_stride,
                            int *status, unsigned *ticket) {
  __shared__ float sums[SLUICE_GEMV_MAX_THREADS / GPU_WARP][TOKENS * EPB];
  const int lane = GPU_TID % GPU_WARP, warp = GPU_TID / GPU_WARP;
  const int threads = GPU_THREADS_X, warps = threads / GPU_WARP;
  const int e0 = GPU_BID_X * EPB, t0 = GPU_BID_Y * TOKENS;
  const int chunks = hidden / 8;
  float acc[TOKENS][EPB];
  #pragma unroll
  for (int t = 0; t < TOKENS; ++t)
    #pragma unroll
    for (int e = 0; e < EPB; ++e) acc[t][e] = 0.f;

  gpu_allow_dependents();
  bool waited = false;
  for (int c0 = GPU_TID; c0 < chunks; c0 += SLUICE_GEMV_ILP * threads) {
    sluice_u32x4 wv[SLUICE_GEMV_ILP][EPB];
    #pragma unroll
    for (int i = 0; i < SLUICE_GEMV_ILP; ++i) {
      const int c = c0 + i * threads;
      #pragma unroll
      for (int e = 0; e < EPB; ++e)
        wv[i][e] = (c < chunks && e0 + e < experts)
                       ? sluice_load_weight16(w + (e0 + e) * w_row_stride + 8 * c)
                       : sluice_u32x4{0u, 0u, 0u, 0u};
    }
    if (!waited) {
      gpu_wait_for_previous_grid();
      waited = true;
    }
    #pragma unroll
    for (int i = 0; i < SLUICE_GEMV_ILP; ++i) {
      const int c = c0 + i * threads;
      if (c >= chunks) break;
      float wf[EPB][8];
      #pragma unroll
      for (int e = 0; e < EPB; ++e) sluice_bf16x8_to_f32(wv[i][e], wf[e]);
      #pragma unroll
      for (int t = 0; t < TOKENS; ++t) {
        if (t0 + t >= tokens) break;
        float xf[8];
        sluice_bf16x8_to_f32(sluice_load16(x + (t0 + t) * x_row_stride + 8 * c), xf);
        #pragma unroll
        for (int e = 0; e < EPB; ++e)
          #pragma unroll
          for (int j = 0; j < 8; ++j) acc[t][e] += wf[e][j] * xf[j];
      }
    }
  }
  gpu_wait_for_previous_grid();  // for threads without a chunk; returns at once otherwise
  sluice_reset_counters(status, ticket, tokens, GPU_BID_X == 0 && GPU_BID_Y == 0);
  #pragma unroll
  for (int t = 0; t < TOKENS; ++t)
    #pragma unroll
    for (int e = 0; e < EPB; ++e) {
      float v = acc[t][e];
      for (int off = GPU_WARP / 2; off > 0; off >>= 1) v += gpu_shfl_xor_f(v, off);
      if (lane == 0) sums[warp][t * EPB + e] = v;
    }
  gpu_syncthreads();
  if (GPU_TID < TOKENS * EPB) {
    const int t = t0 + GPU_TID / EPB, e = e0 + GPU_TID % EPB;
    float sum = 0.f;
    for (int wi = 0; wi < warps; ++wi) sum += sums[wi][GPU_TID];
    if (t < tokens && e < experts) logits[t * row_stride + e] = sum;
  }
}

#define SLUICE_INSTANTIATE_GEMV(name, TOKENS, EPB)                                                 \
  GPU_KERNEL GPU_LAUNCH_BOUNDS(SLUICE_GEMV_MAX_THREADS) void name(                                 \
      const unsigned short *x, long long x_row_stride, const unsigned short *w,                    \
      long long w_row_stride, int tokens, int hidden, int experts, float *logits,                  \
      long long row_stride, int *status, unsigned *ticket) {                                       \
    sluice_gemv<TOKENS, EPB>(x, x_row_stride, w, w_row_stride, tokens, hidden, experts, logits,    \
                             row_stride, status, ticket);                                          \
  }
SLUICE_INSTANTIATE_GEMV(sluice_gemv_1_1, 1, 1)
SLUICE_INSTANTIATE_GEMV(sluice_gemv_1_2, 1, 2)
SLUICE_INSTANTIATE_GEMV(sluice_gemv_2_1, 2, 1)
SLUICE_INSTANTIATE_GEMV(sluice_gemv_2_2, 2, 2)
SLUICE_INSTANTIATE_GEMV(sluice_gemv_4_1, 4, 1)
SLUICE_INSTANTIATE_GEMV(sluice_gemv_4_2, 4, 2)
SLUICE_INSTANTIATE_GEMV(sluice_gemv_8_1, 8, 1)
SLUICE_INSTANTIATE_GEMV(sluice_gemv_8_2, 8, 2)

#if defined(GPU_HAS_MMA_SYNC)
// ---- tensor-core path -------------------------------------------------------------------------
//
// mma.sync m16n8k16 (bf16 in, f32 accumulate) with the experts as M and the tokens as N, so both
// operands are read straight from their row-major tensors: W[E, H] is A in "row" layout and x[T, H]
// is B in "col" layout. A dot product does not care in which order its terms are added, so the k
// index of the fragments is permuted to make every lane's loads 16 bytes wide: lane (g, q) (g =
// lane / 4, q = lane % 4) reads 8 consecutive values at k = 8q of a 32-wide chunk, for its expert
// rows and for its token, and feeds them to two MMAs (values 0-3 to the first, 4-7 to the second).
//
// Block: SLUICE_MMA_WARPS(TILES) warps; each warp owns 32 experts (two M tiles, so every token
// fragment feeds two MMAs) and a k range of `k_per_warp`; the warps of a block take consecutive k
// ranges and their sums are added in shared memory. Grid: (ceil(E / 32), S, ceil(T / (8 TILES))).

GPU_INLINE void sluice_mma_bf16(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                unsigned b0, unsigned b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// How many bf16 terms a hidden-state value is split into, exactly: bf16 is itself, an f16 value
// has 11 significant bits (8 + 3), an f32 value 24 (8 + 8 + 8).
template <int XKIND>
struct sluice_x_terms {
  static const int value = XKIND == SLUICE_X_BF16 ? 1 : (XKIND == SLUICE_X_F16 ? 2 : 3);
};

// Splits 8 f32 values into TERMS bf16 vectors (pairs packed low element first): each term keeps the
// top 8 significant bits of what is left by truncation, so the remainder stays exact in f32 and the
// terms add up to the value exactly (TERMS = 3 for any f32, 2 for any f16).
template <int TERMS>
GPU_INLINE void sluice_split8(const float (&v)[8], sluice_u32x4 (&out)[TERMS]) {
  float rest[8];
  #pragma unroll
  for (int i = 0; i < 8; ++i) rest[i] = v[i];
  #pragma unroll
  for (int term = 0; term < TERMS; ++term) {
    unsigned hi[8];
    #pragma unroll
    for (int i = 0; i < 8; ++i) {
      hi[i] = gpu_float_bits(rest[i]) & 0xffff0000u;
      rest[i] -= gpu_bits_float(hi[i]);
    }
    out[term].x = (hi[0] >> 16) | hi[1];
    out[term].y = (hi[2] >> 16) | hi[3];
    out[term].z = (hi[4] >> 16) | hi[5];
    out[term].w = (hi[6] >> 16) | hi[7];
  }
}

// The 8 hidden-state values of token row `row` at k, as bf16 terms; zeros outside the matrix.
template <int XKIND>
GPU_INLINE void sluice_load_x8(const void *x, long long offset, bool inside,
                               sluice_u32x4 (&out)[sluice_x_terms<XKIND>::value]) {
  const int TERMS = sluice_x_terms<XKIND>::value;
  if (!inside) {
    #pragma unroll
    for (int term = 0; term < TERMS; ++term) out[term] = sluice_u32x4{0u, 0u, 0u, 0u};
    return;
  }
  if (XKIND == SLUICE_X_BF16) {
    out[0] = sluice_load16((const unsigned short *)x + offset);
    return;
  }
  float v[8];
  if (XKIND == SLUICE_X_F32) {
    const sluice_u32x4 lo = sluice_load16((const float *)x + offset);
    const sluice_u32x4 hi = sluice_load16((const float *)x + offset + 4);
    const unsigned bits[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    #pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = gpu_bits_float(bits[i]);
  } else {
    const sluice_u32x4 h = sluice_load16((const unsigned short *)x + offset);
    const unsigned pairs[4] = {h.x, h.y, h.z, h.w};
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = gpu_f16_to_f32((unsigned short)(pairs[i] & 0xffffu));
      v[2 * i + 1] = gpu_f16_to_f32((unsigned short)(pairs[i] >> 16));
    }
  }
  sluice_split8<sluice_x_terms<XKIND>::value>(v, out);
}

// Chunks of 32 k values whose weight loads a warp issues before it uses the first.
#define SLUICE_CHUNKS_IN_FLIGHT 4

template <int XKIND, int TILES, int WARPS>
GPU_INLINE void sluice_gemm_mma(const void *x, long long x_row_stride, const unsigned short *w,
                                long long w_row_stride, int tokens, int hidden, int experts,
                                int k_per_warp, float *partials, long long split_stride,
                                long long row_stride, int *status, unsigned *ticket) {
  const int TERMS = sluice_x_terms<XKIND>::value;
  __shared__ float sums[WARPS][TILES * 8][GPU_WARP];
  const int lane = GPU_TID % GPU_WARP, warp = GPU_TID / GPU_WARP;
  const int g = lane >> 2, q = lane & 3;
  const int e0 = GPU_BID_X * 32;
  const int t0 = GPU_BID_Z * 8 * TILES;
  const int k_begin = (GPU_BID_Y * WARPS + warp) * k_per_warp;
  const int k_end = k_begin + k_per_warp < hidden ? k_begin + k_per_warp : hidden;
  // This lane's expert rows: g and g + 8 of each of the two M tiles.
  int rows[4];
  #pragma unroll
  for (int r = 0; r < 4; ++r) rows[r] = e0 + (r >> 1) * 16 + g + (r & 1) * 8;

  float acc[TILES][2][4];
  #pragma unroll
  for (int n = 0; n < TILES; ++n)
    #pragma unroll
    for (int m = 0; m < 2; ++m)
      #pragma unroll
      for (int i = 0; i < 4; ++i) acc[n][m][i] = 0.f;

  gpu_allow_dependents();
  bool waited = false;
  for (int k0 = k_begin; k0 < k_end; k0 += 32 * SLUICE_CHUNKS_IN_FLIGHT) {
    // The weight does not depend on the previous kernel: its loads go out before the wait.
    sluice_u32x4 wv[SLUICE_CHUNKS_IN_FLIGHT][4];
    #pragma unroll
    for (int c = 0; c < SLUICE_CHUNKS_IN_FLIGHT; ++c) {
      const int k = k0 + 32 * c + 8 * q;
      #pragma unroll
      for (int r = 0; r < 4; ++r)
        wv[c][r] = (k < k_end && rows[r] < experts)
                       ? sluice_load_weight16(w + rows[r] * w_row_stride + k)
                       : sluice_u32x4{0u, 0u, 0u, 0u};
    }
    if (!waited) {
      gpu_wait_for_previous_grid();
      waited = true;
    }
    #pragma unroll
    for (int c = 0; c < SLUICE_CHUNKS_IN_FLIGHT; ++c) {
      const int k = k0 + 32 * c + 8 * q;
      #pragma unroll
      for (int n = 0; n < TILES; ++n) {
        const int t = t0 + n * 8 + g;
        sluice_u32x4 xv[TERMS];
        sluice_load_x8<XKIND>(x, t * x_row_stride + k, t < tokens && k < k_end, xv);
        #pragma unroll
        for (int term = 0; term < TERMS; ++term)
          #pragma unroll
          for (int m = 0; m < 2; ++m) {
            const sluice_u32x4 &top = wv[c][2 * m], &bottom = wv[c][2 * m + 1];
            sluice_mma_bf16(acc[n][m], top.x, bottom.x, top.y, bottom.y, xv[term].x, xv[term].y);
            sluice_mma_bf16(acc[n][m], top.z, bottom.z, top.w, bottom.w, xv[term].z, xv[term].w);
          }
      }
    }
  }
  gpu_wait_for_previous_grid();  // for warps with an empty k range; returns at once otherwise
  sluice_reset_counters(status, ticket, tokens,
                        GPU_BID_X == 0 && GPU_BID_Y == 0 && GPU_BID_Z == 0);

  #pragma unroll
  for (int n = 0; n < TILES; ++n)
    #pragma unroll
    for (int m = 0; m < 2; ++m)
      #pragma unroll
      for (int i = 0; i < 4; ++i) sums[warp][n * 8 + m * 4 + i][lane] = acc[n][m][i];
  gpu_syncthreads();
  // Accumulator i of lane l in tile (n, m): token 2 (l % 4) + i % 2 of the N tile, expert
  // l / 4 + 8 (i / 2) of the M tile.
  for (int idx = GPU_TID; idx < TILES * 8 * GPU_WARP; idx += WARPS * GPU_WARP) {
    const int slot = idx / GPU_WARP, l = idx % GPU_WARP;
    const int n = slot / 8, m = (slot / 4) % 2, i = slot % 4;
    const int t = t0 + n * 8 + (l & 3) * 2 + (i & 1);
    const int e = e0 + m * 16 + (l >> 2) + (i >> 1) * 8;
    if (t < tokens && e < experts) {
      float sum = 0.f;
      #pragma unroll
      for (int wi = 0; wi < WARPS; ++wi) sum += sums[wi][slot][l];
      partials[GPU_BID_Y * split_stride + t * row_stride + e] = sum;
    }
  }
}

#define SLUICE_INSTANTIATE_MMA(name, XKIND, TILES)                                                 \
  GPU_KERNEL GPU_LAUNCH_BOUNDS(SLUICE_MMA_WARPS(TILES) * GPU_WARP) void name(                     \
      const void *x, long long x_row_stride, const unsigned short *w, long long w_row_stride,      \
      int tokens, int hidden, int experts, int k_per_warp, float *partials,                        \
      long long split_stride, long long row_stride, int *status, unsigned *ticket) {               \
    sluice_gemm_mma<XKIND, TILES, SLUICE_MMA_WARPS(TILES)>(x, x_row_stride, w, w_row_stride, tokens, hidden, experts,       \
                                  k_per_warp, partials, split_stride, row_stride, status, ticket); \
  }
#define SLUICE_INSTANTIATE_MMA_TILES(prefix, XKIND)                                                \
  SLUICE_INSTANTIATE_MMA(prefix##_1, XKIND, 1)                                                     \
  SLUICE_INSTANTIATE_MMA(prefix##_2, XKIND, 2)                                                     \
  SLUICE_INSTANTIATE_MMA(prefix##_4, XKIND, 4)                                                     \
  SLUICE_INSTANTIATE_MMA(prefix##_8, XKIND, 8)
SLUICE_INSTANTIATE_MMA_TILES(sluice_gemm_mma_bf16, SLUICE_X_BF16)
SLUICE_INSTANTIATE_MMA_TILES(sluice_gemm_mma_f16, SLUICE_X_F16)
SLUICE_INSTANTIATE_MMA_TILES(sluice_gemm_mma_f32, SLUICE_X_F32)
#if defined(GPU_HAS_BULK_COPY)
// ---- up to 16 tokens: tiles copied whole into shared memory ------------------------------------
//
// Between the matrix-vector kernel's few tokens and a library GEMM's thousands, the router GEMM is
// still a stream of the weight, but every weight value now meets several tokens, so the hidden
// states are shared through shared memory by the warps that use them. From 3 to 16 tokens on
// Hopper (its one instance takes blocks of 16); past 16 the warpgroup kernel below takes over. Block (expert block of
// SLUICE_TILE_EXPERTS, split, token block of TB): the block's weight rows and its tokens' hidden
// states over its k range land in shared memory by bulk copies (one per row and part, issued to
// the copy engine; per-thread `cp.async` copies measured up to 4.5 times slower on an H200), the
// weight's before the grid-dependency wait, the hidden states' after it; the block multiplies out of
// shared memory with `ldmatrix` and `mma.sync`, each of the SLUICE_TILE_PARTS parts of its k range
// as soon as that part has landed.
//
// Warps: TB / 16 along the tokens (two 8-token N tiles each), SLUICE_TILE_EXPERTS / 32 along the
// experts (two 16-row M tiles each) and WK along k (k16 step i goes to warp i % WK). The WK sums of
// each logit are added in order in shared memory, so every partial sum has one fixed order and
// nothing depends on scheduling. Needs bf16 hidden states and weight whose rows are 16-byte aligned
// (a hidden size that is a multiple of 8), a `k_per_split` that is a multiple of 64, and the
// dynamic shared memory of the launch geometry's `tile_shared_bytes`.

#define SLUICE_TILE_EXPERTS 32
#define SLUICE_TILE_PARTS 2
// Bytes before the tiles: 16 per part's barrier (8 bytes, 16-aligned).
#define SLUICE_TILE_BARRIER_BYTES 32
#define SLUICE_TILE_WARPS(TB, WK) ((TB) / 16 * (SLUICE_TILE_EXPERTS / 32) * (WK))

extern __shared__ sluice_u32x4 sluice_dynamic_shared[];

GPU_INLINE unsigned sluice_shared_address(const void *p) {
  unsigned address;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(address) : "l"(p));
  return address;
}

GPU_INLINE void sluice_barrier_init(unsigned barrier) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(barrier) : "memory");
}
// The one arrival a barrier waits for, with the bytes its copies will bring.
GPU_INLINE void sluice_barrier_expect(unsigned barrier, unsigned bytes) {
  asm volatile("{ .reg .b64 state; mbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1; }" ::"r"(
                   barrier),
               "r"(bytes)
               : "memory");
}
GPU_INLINE void sluice_barrier_wait(unsigned barrier) {
  unsigned done = 0;
  while (!done)
    asm volatile(
        "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], 0; selp.u32 %0, 1, 0, p; }"
        : "=r"(done)
        : "r"(barrier)
        : "memory");
}
// `bytes` (a multiple of 16) from global to shared memory by the copy engine, counted on `barrier`.
GPU_INLINE void sluice_bulk_copy(unsigned shared, const void *global, unsigned bytes,
                                 unsigned barrier) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
          shared),
      "l"(global), "r"(bytes), "r"(barrier)
      : "memory");
}

GPU_INLINE int sluice_min_i(int a, int b) { return a < b ? a : b; }

GPU_INLINE void sluice_ldmatrix_x4(unsigned (&r)[4], unsigned shared) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared));
}

// k [begin, end) of part `part` of a k range of `length` values: parts of whole k16 steps.
GPU_INLINE void sluice_tile_part(int length, int part, int &begin, int &end) {
  const int steps = (length + 15) / 16;
  const int per_part = (steps + SLUICE_TILE_PARTS - 1) / SLUICE_TILE_PARTS;
  begin = sluice_min_i(part * per_part * 16, length);
  end = sluice_min_i(begin + per_part * 16, length);
}

// Issues the bulk copies of rows [row0, row0 + count) of `src` (row stride `row_stride` bf16) over
// k [k_begin, k_begin + length) into the tile at `tile` (rows of `pitch` bf16), each part on its
// barrier; thread i of the block takes row i.
GPU_INLINE void sluice_tile_copy_rows(unsigned tile, int pitch, const unsigned short *src,
                                      long long row_stride, int row0, int count, int k_begin,
                                      int length, unsigned barriers) {
  for (int r = GPU_TID; r < count; r += GPU_THREADS_X)
    #pragma unroll
    for (int part = 0; part < SLUICE_TILE_PARTS; ++part) {
      int begin, end;
      sluice_tile_part(length, part, begin, end);
      if (end > begin)
        sluice_bulk_copy(tile + (r * pitch + begin) * 2, src + (row0 + r) * row_stride + k_begin + begin,
                         (end - begin) * 2, barriers + 16 * part);
    }
}

template <int TB, int WK>
GPU_INLINE void sluice_gemm_tiles(const unsigned short *x, long long x_row_stride,
                                  const unsigned short *w, long long w_row_stride, int tokens,
                                  int hidden, int experts, int k_per_split, float *partials,
                                  long long split_stride, long long row_stride, int *status,
                                  unsigned *ticket) {
  const int EB = SLUICE_TILE_EXPERTS, THREADS = SLUICE_TILE_WARPS(TB, WK) * GPU_WARP;
  const int lane = GPU_TID % GPU_WARP, warp = GPU_TID / GPU_WARP;
  const int wk = warp % WK, wm = warp / WK % (EB / 32), wn = warp / WK / (EB / 32);
  const int e0 = GPU_BID_X * EB, t0 = GPU_BID_Z * TB;
  const int k_begin = GPU_BID_Y * k_per_split;
  const int length = sluice_min_i(k_per_split, hidden - k_begin);
  const int padded = (length + 15) / 16 * 16;
  const int expert_rows = sluice_min_i(EB, experts - e0), token_rows = sluice_min_i(TB, tokens - t0);
  // Rows of k_per_split + 8 bf16: 16 bytes of padding make the pitch an odd number of 16-byte
  // units, so the 8 rows one `ldmatrix` phase reads fall in distinct banks.
  const int pitch = k_per_split + 8;
  const unsigned barriers = sluice_shared_address(sluice_dynamic_shared);
  const unsigned weight_tile = barriers + SLUICE_TILE_BARRIER_BYTES;
  const unsigned token_tile = weight_tile + EB * pitch * 2;
  unsigned short *tiles = (unsigned short *)((char *)sluice_dynamic_shared + SLUICE_TILE_BARRIER_BYTES);

  gpu_allow_dependents();
  if (GPU_TID == 0) {
    for (int part = 0; part < SLUICE_TILE_PARTS; ++part) sluice_barrier_init(barriers + 16 * part);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  // Zeros where no copy lands but the multiplications read: rows past the matrices (so that
  // nothing but finite values meets the real rows' sums) and the last k16 step's tail.
  for (int i = GPU_TID; i < (EB + TB) * (padded - length); i += THREADS)
    tiles[i / (padded - length) * pitch + length + i % (padded - length)] = 0;
  for (int i = GPU_TID; i < (EB - expert_rows) * padded; i += THREADS)
    tiles[(expert_rows + i / padded) * pitch + i % padded] = 0;
  for (int i = GPU_TID; i < (TB - token_rows) * padded; i += THREADS)
    tiles[(EB + token_rows + i / padded) * pitch + i % padded] = 0;
  gpu_syncthreads();
  if (GPU_TID == 0)
    for (int part = 0; part < SLUICE_TILE_PARTS; ++part) {
      int begin, end;
      sluice_tile_part(length, part, begin, end);
      sluice_barrier_expect(barriers + 16 * part, (expert_rows + token_rows) * (end - begin) * 2);
    }
  // The weight does not depend on the previous kernel: its copies go out before the wait.
  sluice_tile_copy_rows(weight_tile, pitch, w, w_row_stride, e0, expert_rows, k_begin, length,
                        barriers);
  gpu_wait_for_previous_grid();
  sluice_reset_counters(status, ticket, tokens,
                        GPU_BID_X == 0 && GPU_BID_Y == 0 && GPU_BID_Z == 0);
  sluice_tile_copy_rows(token_tile, pitch, x, x_row_stride, t0, token_rows, k_begin, length,
                        barriers);

  float acc[2][2][4];
  #pragma unroll
  for (int m = 0; m < 2; ++m)
    #pragma unroll
    for (int n = 0; n < 2; ++n)
      #pragma unroll
      for (int i = 0; i < 4; ++i) acc[m][n][i] = 0.f;
  // This lane's ldmatrix rows: expert rows of each M tile (lanes 16-31 read k + 8), and token rows
  // of the warp's two N tiles (lanes 8-15 and 24-31 read k + 8).
  const unsigned a_base = weight_tile + ((wm * 32 + lane % 16) * pitch + lane / 16 * 8) * 2;
  const unsigned b_base = token_tile + ((wn * 16 + lane % 8 + lane / 16 * 8) * pitch + lane / 8 % 2 * 8) * 2;
  #pragma unroll 1
  for (int part = 0; part < SLUICE_TILE_PARTS; ++part) {
    int begin, end;
    sluice_tile_part(length, part, begin, end);
    sluice_barrier_wait(barriers + 16 * part);
    for (int k = begin + 16 * wk; k < end; k += 16 * WK) {
      unsigned a[2][4], b[4];
      #pragma unroll
      for (int m = 0; m < 2; ++m) sluice_ldmatrix_x4(a[m], a_base + (16 * m * pitch + k) * 2);
      sluice_ldmatrix_x4(b, b_base + k * 2);
      #pragma unroll
      for (int m = 0; m < 2; ++m)
        #pragma unroll
        for (int n = 0; n < 2; ++n)
          sluice_mma_bf16(acc[m][n], a[m][0], a[m][1], a[m][2], a[m][3], b[2 * n], b[2 * n + 1]);
    }
  }
  gpu_syncthreads();

  // Sums [WK][TB][EB] in shared memory (over the tiles, no longer needed), added over the k warps
  // in order. Accumulator i of lane (g, q) in tile (m, n): expert 16 m + g + 8 (i / 2), token
  // 8 n + 2 q + i % 2, relative to the warp's corner.
  float *sums = (float *)tiles;
  const int g = lane / 4, q = lane % 4;
  #pragma unroll
  for (int m = 0; m < 2; ++m)
    #pragma unroll
    for (int n = 0; n < 2; ++n)
      #pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int e = wm * 32 + 16 * m + g + 8 * (i / 2), t = wn * 16 + 8 * n + 2 * q + i % 2;
        sums[(wk * TB + t) * EB + e] = acc[m][n][i];
      }
  gpu_syncthreads();
  for (int i = GPU_TID; i < TB * EB; i += THREADS) {
    const int t = i / EB, e = i % EB;
    if (t < token_rows && e < expert_rows) {
      float sum = 0.f;
      #pragma unroll
      for (int k = 0; k < WK; ++k) sum += sums[k * TB * EB + i];
      partials[GPU_BID_Y * split_stride + (t0 + t) * row_stride + e0 + e] = sum;
    }
  }
}

#define SLUICE_INSTANTIATE_TILES(name, TB, WK)                                                     \
  GPU_KERNEL GPU_LAUNCH_BOUNDS(SLUICE_TILE_WARPS(TB, WK) * GPU_WARP) void name(                    \
      const unsigned short *x, long long x_row_stride, const unsigned short *w,                    \
      long long w_row_stride, int tokens, int hidden, int experts, int k_per_split,                \
      float *partials, long long split_stride, long long row_stride,                               \
      int *status, unsigned *ticket) {                                                             \
    sluice_gemm_tiles<TB, WK>(x, x_row_stride, w, w_row_stride, tokens, hidden, experts,           \
                              k_per_split, partials, split_stride, row_stride, status, ticket);    \
  }
SLUICE_INSTANTIATE_TILES(sluice_gemm_tiles_16, 16, 4)
#endif  // GPU_HAS_BULK_COPY
#endif  // GPU_HAS_MMA_SYNC

#if defined(GPU_HAS_WGMMA)
// ---- tens of tokens on Hopper: tiles brought in by the tensor-copy unit, warpgroup MMA ----------
//
// From 17 to 64 tokens on compute capability 9.0 this kernel replaces the bulk-copy one above
// (which keeps up to 16, where it measured faster inside the gate), and it takes up to 128 where
// its blocks all run at once (two token blocks). Block (expert block of
// SLUICE_WG_EXPERTS, split, token block of `token_rows` <= SLUICE_WG_TOKENS): one warpgroup. Its
// k range lands in shared memory in chunks of SLUICE_WG_K values, by 2-D tensor copies (one per
// chunk and operand, all issued by one thread, swizzled as `wgmma` reads them), each chunk counted
// on its own barrier: the weight's copies before the grid-dependency wait, the hidden states'
// after it. The
// warpgroup multiplies each chunk as soon as it has landed (`wgmma`, 64 tokens by 32 experts by
// 16, f32 accumulators in registers) and stores its partial sums from the registers: no sums over
// warps in shared memory, no copy issued lane by lane.
//
// Rows past either matrix and k past the hidden size arrive as zeros: the copy unit fills what
// lies outside the tensor. A token box of fewer than 64 rows (fewer tokens) leaves the rest of its
// tile as it was; those rows reach only accumulator rows that are not stored.
//
// Against the bulk-copy kernel, on an H200 (V3, graph-replayed gate): 6.9 against 8.3 us at 64
// tokens, 6.2 against 7.7 at 32.
//
// Needs: the launch geometry's `warpgroup_shared_bytes` of dynamic shared memory; a `k_per_split`
// that is a multiple of SLUICE_WG_K; tensor maps made by the backend of bf16 matrices, k
// innermost, 128-byte swizzle, zero fill, boxes of SLUICE_WG_K by `token_rows` (hidden states)
// and by SLUICE_WG_EXPERTS (weight).

#define SLUICE_WG_EXPERTS 32
#define SLUICE_WG_TOKENS 64
#define SLUICE_WG_K 64
#define SLUICE_WG_THREADS 128
// One chunk of each operand: rows of SLUICE_WG_K bf16, 128 bytes.
#define SLUICE_WG_TOKEN_BYTES (SLUICE_WG_TOKENS * SLUICE_WG_K * 2)
#define SLUICE_WG_WEIGHT_BYTES (SLUICE_WG_EXPERTS * SLUICE_WG_K * 2)
// The 128-byte swizzle repeats every 1024 bytes; every tile starts at a multiple of it.
#define SLUICE_WG_ALIGN 1024

// Two f32, stored as one 8-byte store.
struct alignas(8) sluice_f32x2 {
  float first, second;
};

// A `CUtensorMap`: the copy unit's description of a matrix in global memory, made by the driver.
struct alignas(64) sluice_tensor_map {
  unsigned long long words[16];
};

// The box of `map` at k `k`, row `row` into shared memory at `tile`, counted on `barrier`.
GPU_INLINE void sluice_tensor_copy(unsigned tile, const sluice_tensor_map *map, int k, int row,
                                   unsigned barrier) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, "
      "{%2, %3}], [%4];" ::"r"(tile),
      "l"(map), "r"(k), "r"(row), "r"(barrier)
      : "memory");
}

// `wgmma`'s description of a tile at `address` in shared memory: rows of 128 bytes as the
// 128-byte swizzle lays them out, in groups of 8 rows 1024 bytes apart. A step of 16 k values
// within the rows is 32 bytes more on the address; the swizzle applies to the address bits.
GPU_INLINE unsigned long long sluice_tile_descriptor(unsigned address) {
  return (unsigned long long)((address & 0x3FFFF) >> 4)  // start, in 16-byte units
         | (1ull << 16)                                 // leading offset (unused by this swizzle)
         | ((unsigned long long)(1024 >> 4) << 32)      // stride: from one 8-row group to the next
         | (1ull << 62);                                // 128-byte swizzle
}

// acc[64 tokens x 32 experts] += tokens[64 x 16] . experts[32 x 16]^T, both tiles k-major, by the
// warpgroup, asynchronously (complete after `wgmma.wait_group`).
GPU_INLINE void sluice_wgmma_64x32(float (&acc)[16], unsigned long long tokens,
                                   unsigned long long experts) {
  asm volatile(
      "{ .reg .pred p; setp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, "
      "%9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, 0, 0; }"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3]), "+f"(acc[4]), "+f"(acc[5]),
        "+f"(acc[6]), "+f"(acc[7]), "+f"(acc[8]), "+f"(acc[9]), "+f"(acc[10]), "+f"(acc[11]),
        "+f"(acc[12]), "+f"(acc[13]), "+f"(acc[14]), "+f"(acc[15])
      : "l"(tokens), "l"(experts), "r"(1));
}

GPU_KERNEL GPU_LAUNCH_BOUNDS(SLUICE_WG_THREADS) void sluice_gemm_warpgroup(
    const GPU_GRID_CONSTANT sluice_tensor_map hidden_map,
    const GPU_GRID_CONSTANT sluice_tensor_map weight_map, int tokens, int hidden, int experts,
    int k_per_split, int token_rows, float *partials, long long split_stride,
    long long row_stride, int *status, unsigned *ticket) {
  const int warp = GPU_TID / GPU_WARP, lane = GPU_TID % GPU_WARP;
  const int e0 = GPU_BID_X * SLUICE_WG_EXPERTS, t0 = GPU_BID_Z * token_rows;
  const int k_begin = GPU_BID_Y * k_per_split;
  const int chunks = (sluice_min_i(k_per_split, hidden - k_begin) + SLUICE_WG_K - 1) / SLUICE_WG_K;
  const int planned = k_per_split / SLUICE_WG_K;
  // Shared memory from its first 1024-aligned byte: the token tiles, the weight tiles, a barrier
  // per chunk.
  const unsigned token_tiles = (sluice_shared_address(sluice_dynamic_shared) + SLUICE_WG_ALIGN - 1) &
                               ~(unsigned)(SLUICE_WG_ALIGN - 1);
  const unsigned weight_tiles = token_tiles + planned * SLUICE_WG_TOKEN_BYTES;
  const unsigned barriers = weight_tiles + planned * SLUICE_WG_WEIGHT_BYTES;

  gpu_allow_dependents();
  if (GPU_TID == 0) {
    asm volatile("prefetch.tensormap [%0];" ::"l"(&hidden_map) : "memory");
    asm volatile("prefetch.tensormap [%0];" ::"l"(&weight_map) : "memory");
    for (int c = 0; c < chunks; ++c) sluice_barrier_init(barriers + 8 * c);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    // The weight does not depend on the previous kernel: its copies go out before the wait.
    for (int c = 0; c < chunks; ++c) {
      sluice_barrier_expect(barriers + 8 * c, (token_rows + SLUICE_WG_EXPERTS) * SLUICE_WG_K * 2);
      sluice_tensor_copy(weight_tiles + c * SLUICE_WG_WEIGHT_BYTES, &weight_map,
                         k_begin + c * SLUICE_WG_K, e0, barriers + 8 * c);
    }
  }
  gpu_wait_for_previous_grid();
  sluice_reset_counters(status, ticket, tokens,
                        GPU_BID_X == 0 && GPU_BID_Y == 0 && GPU_BID_Z == 0);
  if (GPU_TID == 0)
    for (int c = 0; c < chunks; ++c)
      sluice_tensor_copy(token_tiles + c * SLUICE_WG_TOKEN_BYTES, &hidden_map,
                         k_begin + c * SLUICE_WG_K, t0, barriers + 8 * c);
  // Every barrier is initialised before any thread waits on it.
  gpu_syncthreads();

  float acc[16];
  #pragma unroll
  for (int i = 0; i < 16; ++i) acc[i] = 0.f;
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
  for (int c = 0; c < chunks; ++c) {
    sluice_barrier_wait(barriers + 8 * c);
    #pragma unroll
    for (int k = 0; k < SLUICE_WG_K / 16; ++k)
      sluice_wgmma_64x32(acc, sluice_tile_descriptor(token_tiles + c * SLUICE_WG_TOKEN_BYTES + 32 * k),
                         sluice_tile_descriptor(weight_tiles + c * SLUICE_WG_WEIGHT_BYTES + 32 * k));
  }
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");

  // Accumulator 4 j + 2 h + i of lane (g, q) of warp w: row 16 w + g + 8 h of the block's tokens,
  // expert 8 j + 2 q + i. Rows past the box are not the block's. The two experts of a lane go out
  // as one 8-byte store where they can, so that the four lanes of a row write whole 32-byte
  // sectors: on an H200 the gate at 64 tokens took 6.46 us with them against 6.85 with 4-byte
  // stores (V3; Kimi-K2 6.64 against 6.97). An ordinary store, which the compiler may schedule:
  // 0.02 to 0.04 us less than the same store as inline assembly with a memory clobber, at 24 to
  // 64 tokens.
  const int g = lane / 4, q = lane % 4;
  float *out = partials + GPU_BID_Y * split_stride;
  #pragma unroll
  for (int j = 0; j < SLUICE_WG_EXPERTS / 8; ++j)
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = 16 * warp + g + 8 * h, t = t0 + row, e = e0 + 8 * j + 2 * q;
      if (row >= token_rows || t >= tokens) continue;
      float *at = out + t * row_stride + e;
      const float first = acc[4 * j + 2 * h], second = acc[4 * j + 2 * h + 1];
      if (e + 1 < experts && ((unsigned long long)at & 7) == 0) {
        *(sluice_f32x2 *)at = sluice_f32x2{first, second};
      } else {
        if (e < experts) at[0] = first;
        if (e + 1 < experts) at[1] = second;
      }
    }
}
#endif  // GPU_HAS_WGMMA

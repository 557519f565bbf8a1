// Routing for decode batches and beyond (while one wave of the device's threads holds the blocks,
// `plan_route`): a block per token, a thread per expert.
//
// For one token the warp kernel is a single serial chain: one warp scores every expert, ranks
// the groups and runs K selection rounds over eight candidates per lane. Here every expert has its
// own thread, and the selection is three short block-wide steps instead of K rounds:
//   1. each warp's Q-th best candidate key: the M-th largest of those (M = K / Q, rounded up) is
//      reached by at least M * Q >= K distinct candidates, so no expert below it can be among
//      the K best;
//   2. the candidates at or above that bound (typically a little more than K) are packed into a
//      list in expert order;
//   3. each listed candidate counts the candidates ranked before it (larger key, then lower
//      expert): that count is its place among the choices, if it is below K (the warp kernel's
//      own count, `sluice_list_place`).
// One warp then writes the row exactly as the warp kernel does (`sluice_finish_row`).
//
// The results are bit for bit the warp kernel's: the same score functions, the softmax sum added
// in its order (per lane over the lane's experts in order, then the butterfly), the same group
// selection (`sluice_select_groups` on one warp), the same total order, the same row writer.
// Ranked scores only (hash routing keeps the warp kernel), and NVIDIA only for now.

#if !defined(GPU_AMD) && SLUICE_METHOD != SLUICE_HASH
#define SLUICE_HAS_ROUTE_BLOCK 1
#define SLUICE_BLOCK_WARPS ((SLUICE_E + GPU_WARP - 1) / GPU_WARP)
#define SLUICE_BLOCK_THREADS (SLUICE_BLOCK_WARPS * GPU_WARP)
// Warps that hold allowed experts, at least; the bound takes each warp's Q-th best key, with Q
// such that those warps hold K candidates (at most 4 rounds: with fewer warps than K / 4 the
// bound may not apply, and then every candidate is listed).
#if SLUICE_GROUPED
#define SLUICE_BLOCK_ALLOWED_WARPS ((SLUICE_KG * SLUICE_PER_GROUP) / GPU_WARP)
#else
#define SLUICE_BLOCK_ALLOWED_WARPS (SLUICE_E / GPU_WARP)
#endif
#define SLUICE_BLOCK_Q_WANTED                                                                      \
  (SLUICE_BLOCK_ALLOWED_WARPS > 0                                                                  \
       ? (SLUICE_K + SLUICE_BLOCK_ALLOWED_WARPS - 1) / SLUICE_BLOCK_ALLOWED_WARPS                  \
       : 4)
#define SLUICE_BLOCK_Q (SLUICE_BLOCK_Q_WANTED < 4 ? SLUICE_BLOCK_Q_WANTED : 4)
#define SLUICE_BLOCK_M ((SLUICE_K + SLUICE_BLOCK_Q - 1) / SLUICE_BLOCK_Q)

template <int MAX_PARTIALS>
GPU_INLINE void sluice_route_block_impl(
    const float *partials, int splits, long long split_stride, long long row_stride,
    const float *bias, float scale, int *ids, long long ids_row_stride, float *weights,
    long long weights_row_stride, float *logits, long long logits_row_stride, int *status) {
  // Scores (scoring after the top-k: logits), read back for the chosen; selection values.
  __shared__ float s_shared[SLUICE_BLOCK_THREADS];
  __shared__ float c_shared[SLUICE_BLOCK_THREADS];
  __shared__ float warp_value[SLUICE_BLOCK_WARPS];
  __shared__ unsigned warp_qth[SLUICE_BLOCK_WARPS];
  __shared__ int warp_count[SLUICE_BLOCK_WARPS];
  __shared__ unsigned list_key[SLUICE_BLOCK_THREADS];
  __shared__ int list_expert[SLUICE_BLOCK_THREADS];
  __shared__ int chosen[SLUICE_K];
  __shared__ int any_invalid;
#if SLUICE_GROUPED
  __shared__ float group_score[SLUICE_G];
  __shared__ unsigned char kept[SLUICE_G];
#endif
  const int e = GPU_TID, lane = e % GPU_WARP, warp = e / GPU_WARP;
  const int t = GPU_BID_X;
  const bool expert = e < SLUICE_E;
  // The bias was written at preparation, not by the previous kernel: read it before the wait.
  const bool biased = SLUICE_METHOD == SLUICE_NOAUX_TC || SLUICE_LOGIT_BIAS;
  const float b = (biased && bias != 0 && expert) ? bias[e] : 0.f;
  if (e == 0) any_invalid = 0;
  gpu_syncthreads();
  gpu_allow_dependents();
  gpu_wait_for_previous_grid();

  // The logit: the sum of the split partials, in split order.
  float l = 0.f;
  if (expert) {
    const float *p = partials + t * row_stride + e;
#pragma unroll
    for (int s = 0; s < MAX_PARTIALS; ++s)
      if (s < splits) l += p[s * split_stride];
    if (logits != 0) logits[t * logits_row_stride + e] = l;
    if (SLUICE_LOGIT_BIAS) l += b;
    if (!gpu_is_finite(l)) any_invalid = 1;
  } else {
    l = -GPU_INFINITY;
  }
  // A non-finite row is found at the next block-wide barrier that every path reaches (after the
  // bound below); until then its values only flow through arithmetic and comparisons.

  // Scores s and selection values c, as the warp kernel computes them.
#if SLUICE_AFTER_TOPK
  const float s = l, c = l;
#else
#if SLUICE_SCORING == SLUICE_SOFTMAX
  const float lane_max = sluice_warp_max(l);
  if (lane == 0) warp_value[warp] = lane_max;
  gpu_syncthreads();
  float m = -GPU_INFINITY;
#pragma unroll
  for (int w = 0; w < SLUICE_BLOCK_WARPS; ++w) m = warp_value[w] > m ? warp_value[w] : m;
  const float term = gpu_expf(l - m);
  s_shared[e] = term;
  gpu_syncthreads();
  if (warp == 0) {
    // Lane lambda adds the warp kernel's experts of its lane, lambda * SLUICE_PER_LANE onwards,
    // in order, then the butterfly.
    float lane_sum = 0.f;
#pragma unroll
    for (int j = 0; j < SLUICE_PER_LANE; ++j) lane_sum += s_shared[lane * SLUICE_PER_LANE + j];
    const float sum = sluice_warp_sum(lane_sum);
    if (lane == 0) warp_value[0] = sum;
  }
  gpu_syncthreads();
  const float s = term / warp_value[0];
#else
  const float s = sluice_elementwise_score(l);
#endif
  const float c = SLUICE_METHOD == SLUICE_NOAUX_TC ? s + b : s;
#endif
  s_shared[e] = s;
  c_shared[e] = c;

  bool allowed = expert;
#if SLUICE_GROUPED
  gpu_syncthreads();
  if (warp == 0) sluice_select_groups(c_shared, group_score, kept, lane);
  gpu_syncthreads();
  allowed = allowed && kept[e / SLUICE_PER_GROUP];
#endif
  const unsigned key = allowed ? sluice_order_key(c) : 0u;

  // 1. The bound: each warp's SLUICE_BLOCK_Q-th best key (0 where it has fewer candidates).
  unsigned remaining = key, qth = 0u;
#pragma unroll
  for (int q = 0; q < SLUICE_BLOCK_Q; ++q) {
    qth = gpu_wave_max_u32(remaining);
    const int at = (int)gpu_wave_min_u32(remaining == qth ? (unsigned)lane : 0xffffffffu);
    if (lane == at) remaining = 0u;
  }
  if (lane == 0) warp_qth[warp] = qth;
  gpu_syncthreads();
  if (any_invalid) {  // the same value in every thread: the whole block leaves
    if (warp == 0) sluice_mark_row(lane, t, ids, ids_row_stride, weights, weights_row_stride, status);
    return;
  }
  // The M-th largest of the warps' values, M = ceil(K / Q): those M warps hold M * Q >= K
  // candidates at or above it. Lane w takes warp w's value and counts the values ranked before
  // it (larger, then lower warp); with fewer than M values, every candidate is listed.
  const unsigned mine = lane < SLUICE_BLOCK_WARPS ? warp_qth[lane] : 0u;
  int rank = 0;
#pragma unroll
  for (int w = 0; w < SLUICE_BLOCK_WARPS; ++w) {
    const unsigned v = (unsigned)gpu_shfl_i((int)mine, w);
    rank += (v > mine || (v == mine && w < lane)) ? 1 : 0;
  }
  const gpu_lanemask_t at_m = gpu_ballot(mine != 0u && rank == SLUICE_BLOCK_M - 1);
  const unsigned bound = at_m != 0 ? (unsigned)gpu_shfl_i((int)mine, gpu_lowest_lane(at_m)) : 1u;

  // 2. The candidates at or above it, listed in expert order.
  const bool listed = key != 0u && key >= bound;
  const gpu_lanemask_t listed_lanes = gpu_ballot(listed);
  if (lane == 0) warp_count[warp] = gpu_popc_mask(listed_lanes);
  gpu_syncthreads();
  int before = 0, count = 0;
#pragma unroll
  for (int w = 0; w < SLUICE_BLOCK_WARPS; ++w) {
    before += w < warp ? warp_count[w] : 0;
    count += warp_count[w];
  }
  if (listed) {
    const int at = before + gpu_popc_mask(listed_lanes & gpu_lanes_below(lane));
    list_key[at] = key;
    list_expert[at] = e;
  }
  gpu_syncthreads();

  // 3. Each listed candidate's place among them (`sluice_list_place`, as the warp kernel places
  // its own): on the first warp alone when the list fits in it (the common case), else every
  // thread takes one entry.
  const bool one_warp = count <= GPU_WARP;
  if (one_warp && warp != 0) return;
  if (e < count) {
    const int place = sluice_list_place(list_key, count, e);
    if (place < SLUICE_K) chosen[place] = list_expert[e];
  }
  if (one_warp) {
    gpu_syncwarp();
  } else {
    gpu_syncthreads();
    if (warp != 0) return;
  }
  const int my_id = lane < SLUICE_K ? chosen[lane] : -1;
  sluice_finish_row(s_shared, my_id, lane, t, scale, ids, ids_row_stride, weights,
                    weights_row_stride);
}

#define SLUICE_INSTANTIATE_ROUTE_BLOCK(name, MAX_PARTIALS)                                         \
  GPU_KERNEL GPU_LAUNCH_BOUNDS(SLUICE_BLOCK_THREADS) void name(                                    \
      const float *partials, int splits, long long split_stride, long long row_stride,             \
      const float *bias, int tokens, float scale, int *ids, long long ids_row_stride,              \
      float *weights, long long weights_row_stride, float *logits, long long logits_row_stride,    \
      int *status, const int *hash_table, int hash_rows, const void *token_ids,                   \
      int token_id_bytes) {                                                                        \
    (void)tokens; /* one block per token: the grid is the token count */                           \
    (void)hash_table;                                                                              \
    (void)hash_rows;                                                                               \
    (void)token_ids;                                                                               \
    (void)token_id_bytes;                                                                          \
    sluice_route_block_impl<MAX_PARTIALS>(partials, splits, split_stride, row_stride, bias, scale, \
                                          ids, ids_row_stride, weights, weights_row_stride,       \
                                          logits, logits_row_stride, status);                      \
  }
SLUICE_INSTANTIATE_ROUTE_BLOCK(sluice_route_block, SLUICE_MAX_PARTIALS)
SLUICE_INSTANTIATE_ROUTE_BLOCK(sluice_route_block_logits, 1)
#endif

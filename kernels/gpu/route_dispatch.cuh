// The gate's routing and its dispatch layout in one kernel, for decode batches (`plan_route`'s
// block-per-token range, up to 64 rows, no rank outputs): `sluice_route_block_dispatch` and its
// compact form.
//
// A layout launched after routing is one more kernel in the chain, and the general one-block
// layout of `dispatch.cuh` spends its time on work proportional to E (per-warp counts zeroed,
// summed and scanned over warps, one dependent shared-memory step after another): about 5 us on an
// H200 for one token, launched on its own or run by the last routing block alike. Here every block
// routes its token as `sluice_route_block` does, then counts itself in at a ticket; the block that
// arrives last has every row's ids and lays them all out with `sluice_dispatch_decode`, which uses
// what a routing's ids guarantee (each row K distinct experts, or K -1s of a row marked invalid):
// a 64-bit mask of the rows that chose each expert says both how many pairs the expert has (its
// set bits) and each pair's place in the expert's run (the set bits below its row), so the stable
// order costs one pass over the pairs and one scan over the experts, a thread per expert.
//
// The ticket is a word of the caller's route workspace, set to 0 by the GEMM of the same call (or
// by `sluice_reset_status` before a GEMM not of ours) after its wait for the previous kernel, so
// no state is carried from one call to the next. Which block arrives last changes from call to
// call; what it writes does not: the layout is a function of the ids alone, equal to the general
// layout's (the same outputs, entry for entry).

#if defined(SLUICE_HAS_ROUTE_BLOCK)
// Rows a decode layout takes: one bit each in a 64-bit mask.
#define SLUICE_DECODE_MAX_ROWS 64

// The layout of `a.tokens` (at most SLUICE_DECODE_MAX_ROWS) rows of a routing's ids, each K
// distinct experts of [0, E) or K -1s, without rank outputs, by a block of `a.threads` >= E
// threads (see the top of the file), over a `padded_pairs` already all sentinels
// (`sluice_route_dispatch_impl`). Writes what `sluice_dispatch_scatter` writes for such ids.
GPU_INLINE void sluice_dispatch_decode(const sluice_dispatch_args &a) {
  __shared__ unsigned long long rows_of[SLUICE_E];  // bit t: row t chose the expert
  __shared__ int run_start[SLUICE_E];               // offsets in `sorted_pairs`
  __shared__ int padded_run_start[SLUICE_E];        // offsets in `padded_pairs`
  __shared__ int warp_totals[2][SLUICE_BLOCK_WARPS];
  __shared__ unsigned long long invalid_rows;       // bit t: row t holds a skipped pair
  __shared__ int expert_of[SLUICE_DECODE_MAX_ROWS * SLUICE_K];  // each pair's, -1: skipped
  const int tid = GPU_TID, lane = tid % GPU_WARP, warp = tid / GPU_WARP, threads = a.threads;
  const int pairs = a.tokens * SLUICE_K, sentinel = pairs, bs = a.block_size;
  if (tid < SLUICE_E) rows_of[tid] = 0ull;
  if (tid == 0) invalid_rows = 0ull;
  gpu_syncthreads();

  // 1. The rows of each expert, and the rows with a skipped pair.
  for (int pair = tid; pair < pairs; pair += threads) {
    const int row = pair / SLUICE_K, e = sluice_dispatch_expert(a, 0, pair);
    expert_of[pair] = e;
    gpu_atomic_or_u64(e >= 0 ? &rows_of[e] : &invalid_rows, 1ull << row);
  }
  gpu_syncthreads();

  // 2. Counts, and where each expert's run starts, padded or not: a scan over the experts, a
  // thread each (exclusive: the warps before, then the lanes before).
  const int e = tid;
  const unsigned long long rows = e < SLUICE_E ? rows_of[e] : 0ull;
  const int count = gpu_popc_u64(rows);
  const int padded = bs > 0 ? (count + bs - 1) / bs * bs : 0;
  int count_below = count, padded_below = padded;
  for (int off = 1; off < GPU_WARP; off <<= 1) {
    const int c = gpu_shfl_i(count_below, lane >= off ? lane - off : lane);
    const int p = gpu_shfl_i(padded_below, lane >= off ? lane - off : lane);
    if (lane >= off) {
      count_below += c;
      padded_below += p;
    }
  }
  if (lane == GPU_WARP - 1) {
    warp_totals[0][warp] = count_below;
    warp_totals[1][warp] = padded_below;
  }
  gpu_syncthreads();
  int valid = 0, padded_total = 0;
  count_below -= count;
  padded_below -= padded;
#pragma unroll
  for (int w = 0; w < SLUICE_BLOCK_WARPS; ++w) {
    count_below += w < warp ? warp_totals[0][w] : 0;
    padded_below += w < warp ? warp_totals[1][w] : 0;
    valid += warp_totals[0][w];
    padded_total += warp_totals[1][w];
  }
  if (e < SLUICE_E) {
    run_start[e] = count_below;
    padded_run_start[e] = padded_below;
    a.expert_counts[e] = count;
    a.expert_offsets[e] = count_below;
  }
  if (tid == 0) {
    a.expert_offsets[SLUICE_E] = valid;
    if (bs > 0) *a.padded_total = padded_total;
    if (a.invalid != 0) {
      a.invalid[0] = gpu_popc_u64(invalid_rows);
      a.invalid[1] = invalid_rows != 0ull ? gpu_lowest_bit_u64(invalid_rows) : -1;
    }
  }
  gpu_syncthreads();

  // 3. Every pair at its place: the expert's run start, plus the rows before its own that chose
  // the expert (pair order within an expert).
  for (int pair = tid; pair < pairs; pair += threads) {
    const int row = pair / SLUICE_K, slot = pair - row * SLUICE_K;
    const int x = expert_of[pair];
    int *inverse = a.inverse + row * a.inverse_row_stride + slot;
    if (x < 0) {
      *inverse = -1;
      continue;
    }
    const int in_run = gpu_popc_u64(rows_of[x] & ((1ull << row) - 1ull));
    const int position = run_start[x] + in_run;
    a.sorted_pairs[position] = pair;
    *inverse = position;
    if (bs > 0) a.padded_pairs[padded_run_start[x] + in_run] = pair;
  }

  // 4. Sentinels after the valid pairs; the expert of every block, -1 after the last.
  for (int i = valid + tid; i < pairs; i += threads) a.sorted_pairs[i] = sentinel;
  if (bs > 0) {
    if (e < SLUICE_E)
      for (int b = padded_below / bs; b < (padded_below + padded) / bs; ++b) a.block_experts[b] = e;
    for (int b = padded_total / bs + tid; b < a.capacity / bs; b += threads) a.block_experts[b] = -1;
  }
}

template <int MAX_PARTIALS>
GPU_INLINE void sluice_route_dispatch_impl(
    const float *partials, int splits, long long split_stride, long long row_stride,
    const float *bias, int tokens, float scale, int *ids, long long ids_row_stride,
    float *weights, long long weights_row_stride, float *logits, long long logits_row_stride,
    int *status, const sluice_dispatch_args &layout, unsigned *ticket) {
  __shared__ int last;
  sluice_route_block_impl<MAX_PARTIALS>(partials, splits, split_stride, row_stride, bias, scale,
                                        ids, ids_row_stride, weights, weights_row_stride, logits,
                                        logits_row_stride, status);
  // The padded layout is mostly sentinels (each run padded to the block size, then the rest of
  // the capacity): every block writes its share of them, coalesced, before it counts itself in,
  // so the last block only places the pairs over them.
  const int share = (layout.capacity + tokens - 1) / tokens, begin = GPU_BID_X * share;
  const int end = begin + share < layout.capacity ? begin + share : layout.capacity;
  for (int i = begin + GPU_TID; i < end; i += SLUICE_BLOCK_THREADS)
    layout.padded_pairs[i] = tokens * SLUICE_K;
  gpu_syncthreads();  // this block's row (ids, or the -1s of an invalid row) is written
  // One token's block is the last by itself: no count (its fence and round trip to L2) needed.
  if (GPU_TID == 0) last = tokens == 1 || gpu_grid_arrive(ticket) == (unsigned)(tokens - 1);
  gpu_syncthreads();
  if (last) sluice_dispatch_decode(layout);
}

// `layout` is the layout's argument for `tokens` rows laid out by one block of
// SLUICE_BLOCK_THREADS threads (`FusedLayout::fill`); `ticket` is the word the GEMM reset.
#define SLUICE_INSTANTIATE_ROUTE_DISPATCH(name, MAX_PARTIALS)                                      \
  GPU_KERNEL GPU_LAUNCH_BOUNDS(SLUICE_BLOCK_THREADS) void name(                                    \
      const float *partials, int splits, long long split_stride, long long row_stride,             \
      const float *bias, int tokens, float scale, int *ids, long long ids_row_stride,              \
      float *weights, long long weights_row_stride, float *logits, long long logits_row_stride,    \
      int *status, const int *hash_table, int hash_rows, const void *token_ids,                   \
      int token_id_bytes, sluice_dispatch_args layout, unsigned *ticket) {                         \
    (void)hash_table;                                                                              \
    (void)hash_rows;                                                                               \
    (void)token_ids;                                                                               \
    (void)token_id_bytes;                                                                          \
    sluice_route_dispatch_impl<MAX_PARTIALS>(partials, splits, split_stride, row_stride, bias,     \
                                             tokens, scale, ids, ids_row_stride, weights,          \
                                             weights_row_stride, logits, logits_row_stride,        \
                                             status, layout, ticket);                              \
  }
SLUICE_INSTANTIATE_ROUTE_DISPATCH(sluice_route_block_dispatch, SLUICE_MAX_PARTIALS)
SLUICE_INSTANTIATE_ROUTE_DISPATCH(sluice_route_block_dispatch_logits, 1)
#endif

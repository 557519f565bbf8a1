// The gate's routing and its dispatch layout in one kernel, for the batches that block-per-token
// routing takes (`plan_route`'s block range; `FusedLayout::plan`: up to 16 pairs per thread and
// `SLUICE_FUSED_MAX_WORDS` * 64 rows, no rank outputs): `sluice_route_block_dispatch` and its
// compact form.
//
// A layout launched after routing is one more kernel in the chain, and the general one-block
// layout of `dispatch.cuh` spends its time on work proportional to E (per-warp counts zeroed,
// summed and scanned over warps, one dependent shared-memory step after another): about 5 us on an
// H200 for one token, launched on its own or run by the last routing block alike. Here every block
// routes its token as `sluice_route_block` does, then counts itself in at a ticket; the block that
// arrives last has every row's ids and lays them all out. It uses what a routing's ids guarantee
// (each row K distinct experts, or K -1s of a row marked invalid): a mask of the rows that chose
// each expert says both how many pairs the expert has (its set bits) and each pair's place in the
// expert's run (the set bits below its row), so the stable order costs one pass over the pairs
// and one scan over the experts, a thread per expert.
//   - Decode batches (up to 64 rows, `sluice_dispatch_decode`): the last block builds one 64-bit
//     mask per expert in shared memory from the ids.
//   - Past them (`sluice_dispatch_masks`): every block sets its row's bits in masks of 64-bit
//     words in the caller's workspace as it finishes, so the last block reads the masks rather
//     than building them; it keeps, per expert and word, the pairs in the words before (16-bit
//     counts in shared memory), and finds each pair's word in the masks.
//
// The ticket is a word of the caller's route workspace, and the masks follow it there
// (`router_gemm.cuh`); the GEMM of the same call sets both to 0 (or `sluice_reset_status` before
// a GEMM not of ours) after its wait for the previous kernel, so no state is carried from one
// call to the next. Which block arrives last changes from call to call; what it writes does not:
// the layout is a function of the ids alone, equal to the general layout's (the same outputs,
// entry for entry).

#if defined(SLUICE_HAS_ROUTE_BLOCK)
// Words of 64 rows that the masks' table of pairs before each word holds: its 16-bit entries
// (words x E) fit in 16 KiB, at most 16 words (1024 rows), an even count (16-byte loads).
#define SLUICE_FUSED_PREFIX_ENTRIES 8192
#define SLUICE_FUSED_WORDS_FIT (SLUICE_FUSED_PREFIX_ENTRIES / SLUICE_E / 2 * 2)
#define SLUICE_FUSED_MAX_WORDS (SLUICE_FUSED_WORDS_FIT < 16 ? SLUICE_FUSED_WORDS_FIT : 16)
// Pairs a thread of the masks' layout places at once: their ids, then their mask words, loaded
// together.
#define SLUICE_FUSED_PLACE_BATCH 8

// The decode layout's masks: a 64-bit mask of rows per expert, and each pair's expert.
struct sluice_decode_shared {
  unsigned long long rows_of[SLUICE_E];              // bit t: row t chose the expert
  int expert_of[SLUICE_DECODE_MAX_ROWS * SLUICE_K];  // -1: skipped
};

// The last block's shared memory. One call takes either layout, so their tables share the space.
struct sluice_layout_shared {
  int run_start[SLUICE_E];         // offsets in `sorted_pairs`
  int padded_run_start[SLUICE_E];  // offsets in `padded_pairs`
  int warp_totals[2][SLUICE_BLOCK_WARPS];
  unsigned long long invalid_rows;  // decode: bit t, row t holds a skipped pair
  union {
    sluice_decode_shared decode;
    // Past decode batches: the expert's pairs in the mask words before word w.
    unsigned short in_words_before[SLUICE_FUSED_MAX_WORDS][SLUICE_E];
  } tables;
};

// What the scan over experts leaves to the last step.
struct sluice_layout_runs {
  int padded_below;  // this thread's expert: where its padded run starts
  int padded;        // its padded length
  int valid;         // pairs placed
  int padded_total;
};

// Counts, and where each expert's run starts, padded or not: a scan over the experts, a thread
// each (exclusive: the warps before, then the lanes before), for `count` pairs of this thread's
// expert. Writes the counts, the offsets and the padded total, and the run starts to `sh`.
GPU_INLINE sluice_layout_runs sluice_layout_scan(const sluice_dispatch_args &a,
                                                 sluice_layout_shared &sh, int count) {
  const int tid = GPU_TID, lane = tid % GPU_WARP, warp = tid / GPU_WARP, e = tid;
  const int bs = a.block_size;
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
    sh.warp_totals[0][warp] = count_below;
    sh.warp_totals[1][warp] = padded_below;
  }
  gpu_syncthreads();
  int valid = 0, padded_total = 0;
  count_below -= count;
  padded_below -= padded;
#pragma unroll
  for (int w = 0; w < SLUICE_BLOCK_WARPS; ++w) {
    count_below += w < warp ? sh.warp_totals[0][w] : 0;
    padded_below += w < warp ? sh.warp_totals[1][w] : 0;
    valid += sh.warp_totals[0][w];
    padded_total += sh.warp_totals[1][w];
  }
  if (e < SLUICE_E) {
    sh.run_start[e] = count_below;
    sh.padded_run_start[e] = padded_below;
    a.expert_counts[e] = count;
    a.expert_offsets[e] = count_below;
  }
  if (tid == 0) {
    a.expert_offsets[SLUICE_E] = valid;
    if (bs > 0) *a.padded_total = padded_total;
  }
  gpu_syncthreads();
  return sluice_layout_runs{padded_below, padded, valid, padded_total};
}

// Pair `pair` of expert `x` (-1: skipped) at its place, `in_run` pairs into the expert's run.
GPU_INLINE void sluice_layout_place(const sluice_dispatch_args &a, const sluice_layout_shared &sh,
                                    int pair, int x, int in_run) {
  const int row = pair / SLUICE_K, slot = pair - row * SLUICE_K;
  int *inverse = a.inverse + row * a.inverse_row_stride + slot;
  if (x < 0) {
    *inverse = -1;
    return;
  }
  const int position = sh.run_start[x] + in_run;
  a.sorted_pairs[position] = pair;
  *inverse = position;
  if (a.block_size > 0) a.padded_pairs[sh.padded_run_start[x] + in_run] = pair;
}

// Sentinels after the valid pairs; the expert of every block, -1 after the last.
GPU_INLINE void sluice_layout_tail(const sluice_dispatch_args &a, const sluice_layout_runs &runs) {
  const int tid = GPU_TID, e = tid, threads = a.threads, bs = a.block_size;
  const int pairs = a.tokens * SLUICE_K, sentinel = pairs;
  for (int i = runs.valid + tid; i < pairs; i += threads) a.sorted_pairs[i] = sentinel;
  if (bs > 0) {
    if (e < SLUICE_E)
      for (int b = runs.padded_below / bs; b < (runs.padded_below + runs.padded) / bs; ++b)
        a.block_experts[b] = e;
    for (int b = runs.padded_total / bs + tid; b < a.capacity / bs; b += threads)
      a.block_experts[b] = -1;
  }
}

// The layout of `a.tokens` (at most SLUICE_DECODE_MAX_ROWS) rows of a routing's ids, each K
// distinct experts of [0, E) or K -1s, without rank outputs, by a block of `a.threads` >= E
// threads (see the top of the file), over a `padded_pairs` already all sentinels
// (`sluice_route_dispatch_impl`). Writes what `sluice_dispatch_scatter` writes for such ids.
GPU_INLINE void sluice_dispatch_decode(const sluice_dispatch_args &a, sluice_layout_shared &sh) {
  sluice_decode_shared &d = sh.tables.decode;
  const int tid = GPU_TID, threads = a.threads, pairs = a.tokens * SLUICE_K;
  if (tid < SLUICE_E) d.rows_of[tid] = 0ull;
  if (tid == 0) sh.invalid_rows = 0ull;
  gpu_syncthreads();

  // 1. The rows of each expert, and the rows with a skipped pair.
  for (int pair = tid; pair < pairs; pair += threads) {
    const int row = pair / SLUICE_K, e = sluice_dispatch_expert(a, 0, pair);
    d.expert_of[pair] = e;
    gpu_atomic_or_u64(e >= 0 ? &d.rows_of[e] : &sh.invalid_rows, 1ull << row);
  }
  gpu_syncthreads();

  // 2. The runs, from each expert's count.
  const int count = tid < SLUICE_E ? gpu_popc_u64(d.rows_of[tid]) : 0;
  const sluice_layout_runs runs = sluice_layout_scan(a, sh, count);
  if (tid == 0 && a.invalid != 0) {
    a.invalid[0] = gpu_popc_u64(sh.invalid_rows);
    a.invalid[1] = sh.invalid_rows != 0ull ? gpu_lowest_bit_u64(sh.invalid_rows) : -1;
  }

  // 3. Every pair at its place: the expert's run start, plus the rows before its own that chose
  // the expert (pair order within an expert).
  for (int pair = tid; pair < pairs; pair += threads) {
    const int row = pair / SLUICE_K, x = d.expert_of[pair];
    const int in_run = x >= 0 ? gpu_popc_u64(d.rows_of[x] & ((1ull << row) - 1ull)) : 0;
    sluice_layout_place(a, sh, pair, x, in_run);
  }

  // 4. Sentinels and the experts of the blocks.
  sluice_layout_tail(a, runs);
}

// The layout of `a.tokens` rows (past SLUICE_DECODE_MAX_ROWS, at most 64 * SLUICE_FUSED_MAX_WORDS)
// as `sluice_dispatch_decode` makes it, from the masks every routing block set (`masks`: rows of
// `sluice_fused_mask_words(T)` words, row E the rows marked invalid).
GPU_INLINE void sluice_dispatch_masks(const sluice_dispatch_args &a, sluice_layout_shared &sh,
                                      const unsigned long long *masks) {
  const int tid = GPU_TID, lane = tid % GPU_WARP, threads = a.threads;
  const int pairs = a.tokens * SLUICE_K, words = (a.tokens + 63) / 64;
  const long long stride = sluice_fused_mask_words(a.tokens);

  // 1. A thread per expert: its count, and its pairs in the words before each word. The
  // expert's masks are loaded whole first, 16 bytes at a time, all loads in flight at once.
  int count = 0;
  if (tid < SLUICE_E) {
    const sluice_u32x4 *row = (const sluice_u32x4 *)(masks + tid * stride);
    sluice_u32x4 pair_of_words[SLUICE_FUSED_MAX_WORDS / 2];
#pragma unroll
    for (int c = 0; c < SLUICE_FUSED_MAX_WORDS / 2; ++c)
      if (2 * c < words) pair_of_words[c] = row[c];
#pragma unroll
    for (int c = 0; c < SLUICE_FUSED_MAX_WORDS / 2; ++c) {
      if (2 * c >= words) break;
      const sluice_u32x4 m = pair_of_words[c];
      sh.tables.in_words_before[2 * c][tid] = (unsigned short)count;
      count += gpu_popc_u64(((unsigned long long)m.y << 32) | m.x);
      sh.tables.in_words_before[2 * c + 1][tid] = (unsigned short)count;
      count += gpu_popc_u64(((unsigned long long)m.w << 32) | m.z);
    }
  }
  // The rows with a skipped pair: the first warp, a lane per word.
  if (a.invalid != 0 && tid < GPU_WARP) {
    const unsigned long long w = lane < words ? masks[SLUICE_E * stride + lane] : 0ull;
    const int rows = sluice_warp_sum_i(gpu_popc_u64(w));
    const gpu_lanemask_t any = gpu_ballot(w != 0ull);
    const int first_lane = any != 0 ? gpu_lowest_lane(any) : 0;
    const int first_bit = gpu_shfl_i(w != 0ull ? gpu_lowest_bit_u64(w) : 0, first_lane);
    if (lane == 0) {
      a.invalid[0] = rows;
      a.invalid[1] = rows > 0 ? first_lane * 64 + first_bit : -1;
    }
  }

  // 2. The runs.
  const sluice_layout_runs runs = sluice_layout_scan(a, sh, count);

  // 3. Every pair at its place, a batch at a time: the ids, then the word of each pair's row in
  // its expert's masks, then the pairs below it in that word.
  for (int first = tid; first < pairs; first += threads * SLUICE_FUSED_PLACE_BATCH) {
    int x[SLUICE_FUSED_PLACE_BATCH];
    unsigned long long word[SLUICE_FUSED_PLACE_BATCH];
#pragma unroll
    for (int i = 0; i < SLUICE_FUSED_PLACE_BATCH; ++i) {
      const int pair = first + i * threads;
      x[i] = pair < pairs ? sluice_dispatch_expert(a, 0, pair) : -1;
    }
#pragma unroll
    for (int i = 0; i < SLUICE_FUSED_PLACE_BATCH; ++i) {
      const int row = (first + i * threads) / SLUICE_K;
      word[i] = x[i] >= 0 ? masks[x[i] * stride + row / 64] : 0ull;
    }
#pragma unroll
    for (int i = 0; i < SLUICE_FUSED_PLACE_BATCH; ++i) {
      const int pair = first + i * threads, row = pair / SLUICE_K;
      if (pair >= pairs) break;
      const int in_run = x[i] >= 0 ? sh.tables.in_words_before[row / 64][x[i]] +
                                         gpu_popc_u64(word[i] & ((1ull << (row % 64)) - 1ull))
                                   : 0;
      sluice_layout_place(a, sh, pair, x[i], in_run);
    }
  }

  // 4. Sentinels and the experts of the blocks.
  sluice_layout_tail(a, runs);
}

template <int MAX_PARTIALS>
GPU_INLINE void sluice_route_dispatch_impl(
    const float *partials, int splits, long long split_stride, long long row_stride,
    const float *bias, int tokens, float scale, int *ids, long long ids_row_stride,
    float *weights, long long weights_row_stride, float *logits, long long logits_row_stride,
    int *status, const sluice_dispatch_args &layout, unsigned *ticket) {
  __shared__ int last;
  __shared__ sluice_layout_shared layout_shared;
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
  const bool decode = tokens <= SLUICE_DECODE_MAX_ROWS;
  unsigned long long *masks = sluice_fused_masks(ticket);
  if (!decode && GPU_TID < SLUICE_K) {
    // The row into the masks: a bit in the word of each of its experts, or once in row E.
    const int t = GPU_BID_X, id = ids[t * ids_row_stride + GPU_TID];
    const bool chose = (unsigned)id < (unsigned)SLUICE_E;
    if (chose || GPU_TID == 0)
      gpu_atomic_or_u64(&masks[(long long)(chose ? id : SLUICE_E) * sluice_fused_mask_words(tokens) +
                               t / 64],
                        1ull << (t % 64));
  }
  gpu_syncthreads();  // the bits are set before the block counts itself in
  // One token's block is the last by itself: no count (its fence and round trip to L2) needed.
  if (GPU_TID == 0) last = tokens == 1 || gpu_grid_arrive(ticket) == (unsigned)(tokens - 1);
  gpu_syncthreads();
  if (!last) return;
  if (decode)
    sluice_dispatch_decode(layout, layout_shared);
  else
    sluice_dispatch_masks(layout, layout_shared, masks);
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

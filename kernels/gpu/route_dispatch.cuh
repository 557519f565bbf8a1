// The gate's routing and its dispatch layout together, for the batches that block-per-token
// routing takes (`plan_route`'s block range; `FusedLayout::plan`: no rank outputs):
// `sluice_route_block_dispatch` and its compact form, and past decode batches
// `sluice_dispatch_words` after them.
//
// A layout launched after routing is one more kernel in the chain, and the general one-block
// layout of `dispatch.cuh` spends its time on work proportional to E (per-warp counts zeroed,
// summed and scanned over warps, one dependent shared-memory step after another): about 5 us on an
// H200 for one token. Here the layout uses what a routing's ids guarantee (each row K distinct
// experts, or K -1s of a row marked invalid): a 64-bit mask of the rows of a word of 64 rows that
// chose each expert says both how many pairs the expert has there (its set bits) and each pair's
// place in the expert's run (the set bits below its row), so the stable order costs one pass over
// the pairs and one scan over the experts, a thread per expert (`sluice_dispatch_word`).
//   - Decode batches (up to `FusedLayout`'s last-block rows, one word): every block routes its
//     token as `sluice_route_block` does, then counts itself in at a ticket; the block that
//     arrives last has every row's ids and lays them all out. One token's block is the last by
//     itself.
//   - Past them every routing block adds its row to a count per expert and word of 64 rows as it
//     finishes, and `sluice_dispatch_words`, launched after routing (programmatic dependent
//     launch), lays out a word of rows per block: the counts give each expert's total (the scan)
//     and its pairs in the words before the block's own; the block's own rows give the masks.
//     The last routing block used to lay out every row from masks of all of them, alone: 32 pairs
//     a thread at 1024 rows of V3, 20 us on an H200.
//
// The ticket is a word of the caller's route workspace, and the counts follow it there
// (`router_gemm.cuh`); the GEMM of the same call sets both to 0 (or `sluice_reset_status` before
// a GEMM not of ours) after its wait for the previous kernel, so no state is carried from one
// call to the next. Which block arrives last changes from call to call, and the counts are sums;
// what is written does not change: the layout is a function of the ids alone, equal to the
// general layout's (the same outputs, entry for entry).

#if defined(SLUICE_HAS_ROUTE_BLOCK)
// Pairs of a word of rows per thread of a layout block (a block of SLUICE_BLOCK_THREADS).
#define SLUICE_WORD_PAIRS_PER_THREAD                                                              \
  ((SLUICE_WORD_ROWS * SLUICE_K + SLUICE_BLOCK_THREADS - 1) / SLUICE_BLOCK_THREADS)

// A layout block's shared memory.
struct sluice_layout_shared {
  int run_start[SLUICE_E];         // offsets in `sorted_pairs`
  int padded_run_start[SLUICE_E];  // offsets in `padded_pairs`
  int in_words_before[SLUICE_E];   // the expert's pairs in the words before this block's
  int warp_totals[2][SLUICE_BLOCK_WARPS];
  unsigned long long invalid_rows;  // bit r: row 64 w + r holds a skipped pair
  unsigned long long rows_of[SLUICE_E];  // bit r: row 64 w + r chose the expert
  int expert_of[SLUICE_WORD_ROWS * SLUICE_K];  // -1: skipped
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
// expert. Writes the run starts to `sh`, and with `writes` the counts, the offsets and the padded
// total (every layout block scans; one writes).
GPU_INLINE sluice_layout_runs sluice_layout_scan(const sluice_dispatch_args &a,
                                                 sluice_layout_shared &sh, int count,
                                                 bool writes) {
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
    if (writes) {
      a.expert_counts[e] = count;
      a.expert_offsets[e] = count_below;
    }
  }
  if (writes && tid == 0) {
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

// Layout block `part` of `parts`' share of the sentinels after the valid pairs and of the expert
// of every block (-1 after the last).
GPU_INLINE void sluice_layout_tail(const sluice_dispatch_args &a, const sluice_layout_runs &runs,
                                   int part, int parts) {
  const int tid = GPU_TID, e = tid, bs = a.block_size;
  const int first = part * a.threads + tid, step = parts * a.threads;
  const int pairs = a.tokens * SLUICE_K, sentinel = pairs;
  for (int i = runs.valid + first; i < pairs; i += step) a.sorted_pairs[i] = sentinel;
  if (bs > 0) {
    if (e < SLUICE_E && e % parts == part)
      for (int b = runs.padded_below / bs; b < (runs.padded_below + runs.padded) / bs; ++b)
        a.block_experts[b] = e;
    for (int b = runs.padded_total / bs + first; b < a.capacity / bs; b += step)
      a.block_experts[b] = -1;
  }
}

// The layout of the rows of word `word` of `words` (rows 64 word to 64 word + 63) of a routing's
// `a.tokens` rows, each K distinct experts of [0, E) or K -1s, without rank outputs, by a block
// of SLUICE_BLOCK_THREADS threads (`a.threads`, a thread per expert), over a `padded_pairs`
// already all sentinels: what `sluice_dispatch_scatter` writes for such ids, the `words` blocks
// together. With one word, `word_counts` is null and the block finds every count in its own
// masks; otherwise it holds a count per expert and word (rows of `sluice_fused_count_stride(T)`
// counts, row E the rows marked invalid), summed over every row.
GPU_INLINE void sluice_dispatch_word(const sluice_dispatch_args &a, sluice_layout_shared &sh,
                                     int word, int words, const int *word_counts) {
  const int tid = GPU_TID, lane = tid % GPU_WARP;
  const int row0 = word * SLUICE_WORD_ROWS, pair0 = row0 * SLUICE_K;
  const int rows = a.tokens - row0 < SLUICE_WORD_ROWS ? a.tokens - row0 : SLUICE_WORD_ROWS;
  const int pairs = rows * SLUICE_K, stride = sluice_fused_count_stride(a.tokens);

  // 1. With counts (a layout block after routing), everything the block reads, all in flight at
  // once: the ids of its rows; a thread per expert its pairs in every word and in the words
  // before this one (16 bytes a load); the first warp each word's rows marked invalid, a lane a
  // word. (The last routing block, which has no counts, loads its ids in step 2: registers held
  // here would cost that kernel occupancy.)
  int expert[SLUICE_WORD_PAIRS_PER_THREAD];
  int count = 0, before = 0, invalid_total = 0, first_invalid_word = words;
  if (word_counts != 0) {
#pragma unroll
    for (int i = 0; i < SLUICE_WORD_PAIRS_PER_THREAD; ++i) {
      const int pair = tid + i * SLUICE_BLOCK_THREADS;
      expert[i] = pair < pairs ? sluice_dispatch_expert(a, 0, pair0 + pair) : -1;
    }
    if (tid < SLUICE_E) {
      const sluice_u32x4 *row = (const sluice_u32x4 *)(word_counts + tid * stride);
#pragma unroll 4
      for (int c = 0; c < stride / 4; ++c) {
        const sluice_u32x4 v = row[c];
        const int w = 4 * c;
        count += (int)(v.x + v.y + v.z + v.w);
        before += (w < word ? (int)v.x : 0) + (w + 1 < word ? (int)v.y : 0) +
                  (w + 2 < word ? (int)v.z : 0) + (w + 3 < word ? (int)v.w : 0);
      }
    }
    if (a.invalid != 0 && tid < GPU_WARP)
      for (int w = lane; w < words; w += GPU_WARP) {
        const int c = word_counts[SLUICE_E * stride + w];
        invalid_total += c;
        first_invalid_word = c > 0 && w < first_invalid_word ? w : first_invalid_word;
      }
  }
  if (tid < SLUICE_E) {
    sh.rows_of[tid] = 0ull;
    sh.in_words_before[tid] = before;
  }
  if (tid == 0) sh.invalid_rows = 0ull;
  gpu_syncthreads();

  // 2. The rows of this word that chose each expert, and those with a skipped pair.
#pragma unroll
  for (int i = 0; i < SLUICE_WORD_PAIRS_PER_THREAD; ++i) {
    const int pair = tid + i * SLUICE_BLOCK_THREADS, row = pair / SLUICE_K;
    if (pair < pairs) {
      const int x = word_counts != 0 ? expert[i] : sluice_dispatch_expert(a, 0, pair0 + pair);
      sh.expert_of[pair] = x;
      gpu_atomic_or_u64(x >= 0 ? &sh.rows_of[x] : &sh.invalid_rows, 1ull << row);
    }
  }
  gpu_syncthreads();

  // 3. The runs, from each expert's count.
  if (word_counts == 0) count = tid < SLUICE_E ? gpu_popc_u64(sh.rows_of[tid]) : 0;
  const sluice_layout_runs runs = sluice_layout_scan(a, sh, count, word == 0);
  if (a.invalid != 0 && tid < GPU_WARP) {
    // The rows marked invalid: their number, and the first of them, in the first word that has
    // one (each word's count of them in row E of the counts).
    const int local_first =
        sh.invalid_rows != 0ull ? row0 + gpu_lowest_bit_u64(sh.invalid_rows) : -1;
    int total = invalid_total, first_word = first_invalid_word;
    if (word_counts == 0) {
      total = gpu_popc_u64(sh.invalid_rows);
    } else {
      total = sluice_warp_sum_i(total);
      first_word = (int)gpu_wave_min_u32((unsigned)first_word);
    }
    if (lane == 0) {
      if (word == 0) a.invalid[0] = total;
      if (word_counts == 0 || first_word == word || (word == 0 && total == 0))
        a.invalid[1] = local_first;
    }
  }

  // 4. Every pair of the word at its place: the expert's run start, plus its pairs in the words
  // before, plus the rows of this word before its own that chose it (pair order within an expert).
  for (int pair = tid; pair < pairs; pair += SLUICE_BLOCK_THREADS) {
    const int row = pair / SLUICE_K, x = sh.expert_of[pair];
    const int in_run =
        x >= 0 ? sh.in_words_before[x] + gpu_popc_u64(sh.rows_of[x] & ((1ull << row) - 1ull)) : 0;
    sluice_layout_place(a, sh, pair0 + pair, x, in_run);
  }

  // 5. This block's share of the sentinels and of the experts of the blocks.
  sluice_layout_tail(a, runs, word, words);
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
  // the capacity): every block writes its share of them, coalesced, before the layout places the
  // pairs over them.
  const int share = (layout.capacity + tokens - 1) / tokens, begin = GPU_BID_X * share;
  const int end = begin + share < layout.capacity ? begin + share : layout.capacity;
  for (int i = begin + GPU_TID; i < end; i += SLUICE_BLOCK_THREADS)
    layout.padded_pairs[i] = tokens * SLUICE_K;
  gpu_syncthreads();  // this block's row (ids, or the -1s of an invalid row) is written
  if (layout.blocks > 0) {
    // `sluice_dispatch_words` lays out: the row into the counts of its word, once for each of
    // its experts, or once in row E.
    if (GPU_TID < SLUICE_K) {
      const int t = GPU_BID_X, id = ids[t * ids_row_stride + GPU_TID];
      const bool chose = (unsigned)id < (unsigned)SLUICE_E;
      if (chose || GPU_TID == 0)
        gpu_atomic_add_i32(sluice_fused_word_counts(ticket) +
                               (chose ? id : SLUICE_E) * sluice_fused_count_stride(tokens) +
                               t / SLUICE_WORD_ROWS,
                           1);
    }
    return;
  }
  // One token's block is the last by itself: no count (its fence and round trip to L2) needed.
  if (GPU_TID == 0) last = tokens == 1 || gpu_grid_arrive(ticket) == (unsigned)(tokens - 1);
  gpu_syncthreads();
  if (last) sluice_dispatch_word(layout, layout_shared, 0, 1, 0);
}

// `layout` is the layout's argument for `tokens` rows (`FusedLayout::fill`: `blocks` 0 where the
// last routing block lays out every row, else the blocks of `sluice_dispatch_words`); `ticket` is
// the word the GEMM reset, the counts after it.
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

// The layout after the fused routing kernel past its last-block rows: block w lays out word w of
// `a.blocks` words of rows (`FusedLayout::fill`), from the counts at `ticket` (the routing
// kernel's; the GEMM reset them).
GPU_KERNEL GPU_LAUNCH_BOUNDS(SLUICE_BLOCK_THREADS) void sluice_dispatch_words(
    sluice_dispatch_args a, const unsigned *ticket) {
  __shared__ sluice_layout_shared sh;
  gpu_allow_dependents();
  // Everything below reads what routing wrote.
  gpu_wait_for_previous_grid();
  sluice_dispatch_word(a, sh, GPU_BID_X, a.blocks, sluice_fused_word_counts(ticket));
}
#endif

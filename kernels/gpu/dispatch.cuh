// Dispatch layout: from `topk_ids [T, K]` to work per expert (see `sluice_tensor::dispatch` for what
// every output holds). Compiled into each routing config's module, so E and K are the config's
// SLUICE_E and SLUICE_K.
//
// A counting sort, stable and deterministic: no atomic whose order reaches an output.
//   - One block (up to a few thousand pairs): `sluice_dispatch_scatter` alone. Each warp owns a
//     contiguous segment of the pairs, counts it per expert in shared memory, the block turns the
//     counts into offsets (a scan over experts) and each warp's first position inside each expert's
//     run (a scan over warps, in warp order), then every warp walks its segment in pair order and
//     places each pair at its expert's next position: lanes of one expert are ranked among
//     themselves by `match.any` and the lanes below them, so pair order is kept within an expert.
//   - Many blocks: `sluice_dispatch_count` writes each block's per-expert counts to the caller's
//     workspace, then `sluice_dispatch_scatter` (same tiles) adds the counts of the blocks before
//     its own to every warp's start, in block order, and places its pairs the same way.
// Shared-memory atomics only count (integer sums, the same in any order); global ones only add
// each block's distinct-token counts per rank (`sluice_dispatch_rank_tokens`, with rank outputs
// only), likewise.
//
// An id outside [0, E) (the -1 of a row marked invalid, or any other value), or an expert whose
// rank-table entry is outside [0, R), is skipped: never dispatched, counted in `invalid` like a -1.

#if !defined(SLUICE_E) || !defined(SLUICE_K)
#error "the dispatch kernels need SLUICE_E and SLUICE_K"
#endif

// Shared slots of the per-warp counts, [warps][E]: the block's warps are at most SLOTS / E.
#define SLUICE_DISPATCH_HIST_SLOTS 6144
#define SLUICE_DISPATCH_MAX_THREADS 1024
#define SLUICE_DISPATCH_MAX_WARPS (SLUICE_DISPATCH_MAX_THREADS / GPU_WARP)
// `#pragma unroll N` with N a macro: the argument is expanded before it is made a string.
#define SLUICE_PRAGMA(x) _Pragma(#x)
#define SLUICE_UNROLL(n) SLUICE_PRAGMA(unroll n)
// Ids a lane loads at once, into registers: all in flight together, then counted or placed, so a
// pass pays the load latency once per batch rather than once per 32 pairs.
// AMD's wave64 holds twice the pairs per chunk, and its scalar registers (the chunks' uniform
// bounds) run out sooner: a quarter of the chunks there.
// The per-expert loops over blocks and warps are unrolled there too, for their loads; on AMD
// that would spill scalar registers, so they stay loops. The one-block path's sum over warps is
// left to the compiler on NVIDIA; on AMD its unrolled form (a scalar address per warp, while every
// argument is held in scalar registers for the passes after it) took gfx942 past the code
// objects' 102 scalar registers, so it stays a loop there too.
#if defined(GPU_AMD)
#define SLUICE_DISPATCH_BATCH 4
#define SLUICE_DISPATCH_UNROLL_BLOCKS 1
#define SLUICE_DISPATCH_UNROLL_WARPS 1
#define SLUICE_DISPATCH_WARP_TOTALS_LOOP SLUICE_PRAGMA(unroll 1)
#else
#define SLUICE_DISPATCH_BATCH 16
#define SLUICE_DISPATCH_UNROLL_BLOCKS 16
#define SLUICE_DISPATCH_UNROLL_WARPS 4
#define SLUICE_DISPATCH_WARP_TOTALS_LOOP
#endif
// Threads per block of `sluice_dispatch_rank_tokens`, one row each (the geometry's
// `RANK_TOKENS_THREADS`).
#define SLUICE_DISPATCH_RANK_THREADS 256
#if SLUICE_DISPATCH_HIST_SLOTS / SLUICE_E < 1
#error "too many experts for the dispatch kernels' shared counts"
#endif

// The kernels' one argument, passed by value (the launch geometry's `DispatchArgs`, same layout).
struct sluice_dispatch_args {
  const int *ids;            // [T, K], rows `ids_row_stride` apart
  const int *expert_ranks;   // [E], or null without rank outputs
  int *expert_counts;        // [E]
  int *expert_offsets;       // [E + 1]
  int *sorted_pairs;         // [T * K]
  int *inverse;              // [T, K], rows `inverse_row_stride` apart
  int *invalid;              // [2], or null
  int *padded_pairs;         // [capacity], or null without padding
  int *block_experts;        // [capacity / block_size]
  int *padded_total;         // [1]
  int *rank_counts;          // [R], or null without rank outputs
  int *rank_offsets;         // [R + 1]
  int *rank_pairs;           // [T * K]
  int *rank_tokens;          // [R]
  int *block_counts;         // workspace [blocks, E + 2] of the many-block path, or null
  long long ids_row_stride;
  long long inverse_row_stride;
  int tokens;
  int block_size;            // 0: no padding
  int capacity;              // length of `padded_pairs`
  int ranks;                 // R, 0: no rank outputs
  int rows_per_block;        // rows of `ids` per block
  int blocks;                // blocks of each kernel
  int threads;               // threads per block (a multiple of GPU_WARP)
};

// The expert of pair `pair`, or -1 if it is skipped. `rank_of` is read only with rank outputs.
GPU_INLINE int sluice_dispatch_expert(const sluice_dispatch_args &a, const int *rank_of, int pair) {
  const int row = pair / SLUICE_K, slot = pair - row * SLUICE_K;
  const int id = a.ids[row * a.ids_row_stride + slot];
  if ((unsigned)id >= (unsigned)SLUICE_E) return -1;
  if (a.ranks > 0 && (unsigned)rank_of[id] >= (unsigned)a.ranks) return -1;
  return id;
}

// The expert-to-rank table into shared memory (rank outputs only).
GPU_INLINE void sluice_dispatch_load_ranks(const sluice_dispatch_args &a, int *rank_of) {
  if (a.ranks > 0)
    for (int e = GPU_TID; e < SLUICE_E; e += a.threads) rank_of[e] = a.expert_ranks[e];
}

// Counts the rows of [row0, row1) that hold a skipped pair, and the first of them.
GPU_INLINE void sluice_dispatch_invalid_rows(const sluice_dispatch_args &a, const int *rank_of,
                                             int row0, int row1, int *rows, unsigned *first) {
  for (int row = row0 + GPU_TID; row < row1; row += a.threads) {
    bool skipped = false;
    // `|`, not `||`: every load of the row is issued at once.
    for (int slot = 0; slot < SLUICE_K; ++slot)
      skipped = skipped | (sluice_dispatch_expert(a, rank_of, row * SLUICE_K + slot) < 0);
    if (skipped) {
      gpu_atomic_add_i32(rows, 1);
      gpu_atomic_min_u32(first, (unsigned)row);
    }
  }
}

GPU_INLINE int sluice_warp_sum_i(int v) {
  for (int off = GPU_WARP / 2; off > 0; off >>= 1) v += gpu_shfl_xor_i(v, off);
  return v;
}

// In place over shared `data[0, n)`: the exclusive prefix sums, and the total in `data[n]`.
// `warp_sums` holds SLUICE_DISPATCH_MAX_WARPS + 1 ints. Every thread of the block calls it.
GPU_INLINE void sluice_block_exclusive_scan(int *data, int n, int *warp_sums, int threads) {
  const int tid = GPU_TID, lane = tid % GPU_WARP, warp = tid / GPU_WARP;
  const int warps = threads / GPU_WARP;
  const int per = (n + threads - 1) / threads;
  const int begin = tid * per < n ? tid * per : n;
  const int end = begin + per < n ? begin + per : n;
  int sum = 0;
  for (int i = begin; i < end; ++i) sum += data[i];
  int inclusive = sum;
  for (int off = 1; off < GPU_WARP; off <<= 1) {
    const int below = gpu_shfl_i(inclusive, lane >= off ? lane - off : lane);
    if (lane >= off) inclusive += below;
  }
  if (lane == GPU_WARP - 1) warp_sums[warp] = inclusive;
  gpu_syncthreads();
  if (warp == 0) {
    const int mine = lane < warps ? warp_sums[lane] : 0;
    int total = mine;
    for (int off = 1; off < GPU_WARP; off <<= 1) {
      const int below = gpu_shfl_i(total, lane >= off ? lane - off : lane);
      if (lane >= off) total += below;
    }
    if (lane < warps) warp_sums[lane] = total - mine;
    if (lane == GPU_WARP - 1) warp_sums[SLUICE_DISPATCH_MAX_WARPS] = total;
  }
  gpu_syncthreads();
  int running = warp_sums[warp] + inclusive - sum;
  for (int i = begin; i < end; ++i) {
    const int value = data[i];
    data[i] = running;
    running += value;
  }
  if (tid == 0) data[n] = warp_sums[SLUICE_DISPATCH_MAX_WARPS];
  gpu_syncthreads();
}

// Many-block path, first kernel: the per-expert counts of this block's rows, then the number of
// its rows holding a skipped pair and the first of them, into `block_counts[block]`.
GPU_KERNEL GPU_LAUNCH_BOUNDS(SLUICE_DISPATCH_MAX_THREADS) void sluice_dispatch_count(
    sluice_dispatch_args a) {
  __shared__ int counts[SLUICE_E];
  __shared__ int rank_of[SLUICE_E];
  __shared__ int invalid_rows;
  __shared__ unsigned first_invalid;
  const int tid = GPU_TID, block = GPU_BID_X;
  for (int e = tid; e < SLUICE_E; e += a.threads) counts[e] = 0;
  if (tid == 0) {
    invalid_rows = 0;
    first_invalid = 0xffffffffu;
  }
  gpu_allow_dependents();
  // Everything below reads what the previous kernel (routing) wrote, or writes what it may read.
  gpu_wait_for_previous_grid();
  sluice_dispatch_load_ranks(a, rank_of);
  gpu_syncthreads();
  const int row0 = block * a.rows_per_block;
  const int row1 = row0 + a.rows_per_block < a.tokens ? row0 + a.rows_per_block : a.tokens;
  const int batch = SLUICE_DISPATCH_BATCH * a.threads;
  for (int first = row0 * SLUICE_K + tid; first < row1 * SLUICE_K; first += batch) {
    int experts[SLUICE_DISPATCH_BATCH];
#pragma unroll
    for (int i = 0; i < SLUICE_DISPATCH_BATCH; ++i) {
      const int pair = first + i * a.threads;
      experts[i] = pair < row1 * SLUICE_K ? sluice_dispatch_expert(a, rank_of, pair) : -1;
    }
#pragma unroll
    for (int i = 0; i < SLUICE_DISPATCH_BATCH; ++i)
      if (experts[i] >= 0) gpu_atomic_add_i32(&counts[experts[i]], 1);
  }
  sluice_dispatch_invalid_rows(a, rank_of, row0, row1, &invalid_rows, &first_invalid);
  gpu_syncthreads();
  int *out = a.block_counts + (long long)block * (SLUICE_E + 2);
  for (int e = tid; e < SLUICE_E; e += a.threads) out[e] = counts[e];
  if (tid == 0) {
    out[SLUICE_E] = invalid_rows;
    out[SLUICE_E + 1] = (int)first_invalid;  // 0xffffffff reads back as -1: none
  }
}

// The layout of this block's rows (all rows on the one-block path; see the top of the file).
GPU_KERNEL GPU_LAUNCH_BOUNDS(SLUICE_DISPATCH_MAX_THREADS) void sluice_dispatch_scatter(
    sluice_dispatch_args a) {
  // [warps][E]: this block's counts per warp, then each warp's next position in each expert's run.
  __shared__ int cursor[SLUICE_DISPATCH_HIST_SLOTS];
  __shared__ int count[SLUICE_E];             // valid pairs per expert, all blocks
  __shared__ int start[SLUICE_E + 1];         // offsets in `sorted_pairs`
  __shared__ int padded_start[SLUICE_E + 1];  // offsets in `padded_pairs`
  __shared__ int rank_start[SLUICE_E];        // where each expert's run starts in `rank_pairs`
  __shared__ int rank_of[SLUICE_E];
  __shared__ int warp_sums[SLUICE_DISPATCH_MAX_WARPS + 1];
  __shared__ int invalid_rows;
  __shared__ unsigned first_invalid;
  const int tid = GPU_TID, lane = tid % GPU_WARP, warp = tid / GPU_WARP;
  const int threads = a.threads, warps = threads / GPU_WARP, block = GPU_BID_X;
  const bool one_block = a.block_counts == 0;
  const int pairs = a.tokens * SLUICE_K, sentinel = pairs;
  for (int i = tid; i < warps * SLUICE_E; i += threads) cursor[i] = 0;
  if (tid == 0) {
    invalid_rows = 0;
    first_invalid = 0xffffffffu;
  }
  gpu_allow_dependents();
  // Everything below reads what earlier kernels wrote, or writes what they may read.
  gpu_wait_for_previous_grid();
  sluice_dispatch_load_ranks(a, rank_of);
  gpu_syncthreads();

  // This block's rows, and this warp's contiguous segment of their pairs.
  const int row0 = block * a.rows_per_block;
  const int row1 = row0 + a.rows_per_block < a.tokens ? row0 + a.rows_per_block : a.tokens;
  const int first_pair = row0 * SLUICE_K, tile = (row1 - row0) * SLUICE_K;
  const int segment = ((tile + warps - 1) / warps + GPU_WARP - 1) / GPU_WARP * GPU_WARP;
  const int seg0 = first_pair + (warp * segment < tile ? warp * segment : tile);
  const int seg1 = first_pair + ((warp + 1) * segment < tile ? (warp + 1) * segment : tile);
  int *my_cursor = cursor + warp * SLUICE_E;

  // The experts of a batch of this warp's pairs: lane `lane` of chunk i holds pair
  // `batch_start + i * GPU_WARP + lane` (-1: skipped, or past the segment).
  int experts[SLUICE_DISPATCH_BATCH];
  const int batch = SLUICE_DISPATCH_BATCH * GPU_WARP;

  // 1. Counts per warp.
  for (int batch_start = seg0; batch_start < seg1; batch_start += batch) {
#pragma unroll
    for (int i = 0; i < SLUICE_DISPATCH_BATCH; ++i) {
      const int pair = batch_start + i * GPU_WARP + lane;
      experts[i] = pair < seg1 ? sluice_dispatch_expert(a, rank_of, pair) : -1;
    }
#pragma unroll
    for (int i = 0; i < SLUICE_DISPATCH_BATCH; ++i)
      if (experts[i] >= 0) gpu_atomic_add_i32(&my_cursor[experts[i]], 1);
  }
  if (one_block) sluice_dispatch_invalid_rows(a, rank_of, row0, row1, &invalid_rows, &first_invalid);
  gpu_syncthreads();

  // 2. Totals per expert, and each warp's first position inside each expert's run: the pairs of
  // the blocks before this one, then of the warps before this one, in order.
  for (int e = tid; e < SLUICE_E; e += threads) {
    int before = 0, total = 0;
    if (one_block) {
      SLUICE_DISPATCH_WARP_TOTALS_LOOP
      for (int w = 0; w < warps; ++w) total += cursor[w * SLUICE_E + e];
    } else {
      // Unrolled so that the loads of many blocks' counts are in flight together.
      SLUICE_UNROLL(SLUICE_DISPATCH_UNROLL_BLOCKS)
      for (int b = 0; b < a.blocks; ++b) {
        const int c = a.block_counts[(long long)b * (SLUICE_E + 2) + e];
        before += b < block ? c : 0;
        total += c;
      }
    }
    count[e] = total;
    start[e] = total;
    if (a.block_size > 0) padded_start[e] = (total + a.block_size - 1) / a.block_size * a.block_size;
    int running = before;
    SLUICE_UNROLL(SLUICE_DISPATCH_UNROLL_WARPS)
    for (int w = 0; w < warps; ++w) {
      const int c = cursor[w * SLUICE_E + e];
      cursor[w * SLUICE_E + e] = running;
      running += c;
    }
  }
  gpu_syncthreads();
  sluice_block_exclusive_scan(start, SLUICE_E, warp_sums, threads);
  if (a.block_size > 0) sluice_block_exclusive_scan(padded_start, SLUICE_E, warp_sums, threads);

  // 3. Rank outputs: expert e's run starts after every pair of a lower rank, and of a lower
  // expert on its rank. One warp per expert sums over all experts: E * E / threads steps.
  if (a.ranks > 0) {
    for (int e = warp; e < SLUICE_E; e += warps) {
      const int r = rank_of[e];
      int before = 0;
      for (int other = lane; other < SLUICE_E; other += GPU_WARP) {
        const int r2 = rank_of[other];
        if (r2 < r || (r2 == r && other < e)) before += count[other];
      }
      before = sluice_warp_sum_i(before);
      if (lane == 0) rank_start[e] = before;
    }
    gpu_syncthreads();
  }

  // 4. Every warp places its segment's pairs, in pair order, a batch at a time.
  for (int batch_start = seg0; batch_start < seg1; batch_start += batch) {
#pragma unroll
    for (int i = 0; i < SLUICE_DISPATCH_BATCH; ++i) {
      const int pair = batch_start + i * GPU_WARP + lane;
      experts[i] = pair < seg1 ? sluice_dispatch_expert(a, rank_of, pair) : -1;
    }
#pragma unroll
    for (int i = 0; i < SLUICE_DISPATCH_BATCH; ++i) {
      const int base = batch_start + i * GPU_WARP;
      if (base >= seg1) break;  // the same for the whole warp
      const int pair = base + lane, e = experts[i];
      const gpu_lanemask_t peers = gpu_match_any_i(e >= 0 ? e : SLUICE_E);
      const gpu_lanemask_t peers_below = peers & gpu_lanes_below(lane);
      const int in_run = e >= 0 ? my_cursor[e] + gpu_popc_mask(peers_below) : -1;
      gpu_syncwarp();  // every lane has read its cursor before the lowest peer moves it
      if (e >= 0 && peers_below == 0) my_cursor[e] += gpu_popc_mask(peers);
      gpu_syncwarp();
      if (pair >= seg1) continue;
      const int row = pair / SLUICE_K, slot = pair - row * SLUICE_K;
      int *inverse = a.inverse + row * a.inverse_row_stride + slot;
      if (e < 0) {
        *inverse = -1;
        continue;
      }
      const int position = start[e] + in_run;
      a.sorted_pairs[position] = pair;
      *inverse = position;
      if (a.block_size > 0) a.padded_pairs[padded_start[e] + in_run] = pair;
      if (a.ranks > 0) a.rank_pairs[rank_start[e] + in_run] = pair;
    }
  }

  // 5. Every other position, spread over all blocks: sentinels after the valid pairs, padding.
  const int global = block * threads + tid, stride = a.blocks * threads;
  const int valid = start[SLUICE_E];
  for (int i = valid + global; i < pairs; i += stride) {
    a.sorted_pairs[i] = sentinel;
    if (a.ranks > 0) a.rank_pairs[i] = sentinel;
  }
  if (a.block_size > 0) {
    const int bs = a.block_size, padded = padded_start[SLUICE_E];
    for (int e = global; e < SLUICE_E; e += stride) {
      for (int i = padded_start[e] + count[e]; i < padded_start[e + 1]; ++i) a.padded_pairs[i] = sentinel;
      for (int b = padded_start[e] / bs; b < padded_start[e + 1] / bs; ++b) a.block_experts[b] = e;
    }
    for (int i = padded + global; i < a.capacity; i += stride) a.padded_pairs[i] = sentinel;
    for (int b = padded / bs + global; b < a.capacity / bs; b += stride) a.block_experts[b] = -1;
  }
  if (block != 0) return;

  // 6. Block 0 writes what is one for the whole layout.
  for (int e = tid; e < SLUICE_E; e += threads) {
    a.expert_counts[e] = count[e];
    a.expert_offsets[e] = start[e];
  }
  if (tid == 0) {
    a.expert_offsets[SLUICE_E] = valid;
    if (a.block_size > 0) *a.padded_total = padded_start[SLUICE_E];
    if (a.invalid != 0) {
      int rows = invalid_rows, first = (int)first_invalid;
      if (!one_block) {
        rows = 0;
        first = -1;
        for (int b = 0; b < a.blocks; ++b) {
          const int *stats = a.block_counts + (long long)b * (SLUICE_E + 2) + SLUICE_E;
          if (first < 0 && stats[0] > 0) first = stats[1];
          rows += stats[0];
        }
      }
      a.invalid[0] = rows;
      a.invalid[1] = first;
    }
  }
  if (a.ranks > 0) {
    // Rank r's pairs: every pair of an expert on r; rank r starts after those of lower ranks.
    for (int r = warp; r <= a.ranks; r += warps) {
      int below = 0, on = 0;
      for (int e = lane; e < SLUICE_E; e += GPU_WARP) {
        below += rank_of[e] < r ? count[e] : 0;
        on += rank_of[e] == r ? count[e] : 0;
      }
      below = sluice_warp_sum_i(below);
      on = sluice_warp_sum_i(on);
      if (lane == 0) {
        a.rank_offsets[r] = below;
        if (r < a.ranks) a.rank_counts[r] = on;
      }
    }
  }
}

// With rank outputs, after the scatter and a memset of `rank_tokens` to 0 (the launcher's): distinct
// tokens per rank, a token counting once for every rank one of its experts is on. One row per
// thread; each block adds its counts per rank.
GPU_KERNEL GPU_LAUNCH_BOUNDS(SLUICE_DISPATCH_RANK_THREADS) void sluice_dispatch_rank_tokens(
    sluice_dispatch_args a) {
  __shared__ int per_rank[SLUICE_DISPATCH_HIST_SLOTS];
  __shared__ int rank_of[SLUICE_E];
  const int tid = GPU_TID;
  const bool in_shared = a.ranks <= SLUICE_DISPATCH_HIST_SLOTS;
  if (in_shared)
    for (int r = tid; r < a.ranks; r += SLUICE_DISPATCH_RANK_THREADS) per_rank[r] = 0;
  gpu_allow_dependents();
  // Everything below adds to the zeroed `rank_tokens`, or reads what earlier kernels wrote.
  gpu_wait_for_previous_grid();
  for (int e = tid; e < SLUICE_E; e += SLUICE_DISPATCH_RANK_THREADS) rank_of[e] = a.expert_ranks[e];
  gpu_syncthreads();
  const int row = GPU_BID_X * SLUICE_DISPATCH_RANK_THREADS + tid;
  if (row < a.tokens) {
    int rank[SLUICE_K];  // the rank of each slot's expert, -1 for a skipped pair
#pragma unroll
    for (int slot = 0; slot < SLUICE_K; ++slot) {
      const int e = sluice_dispatch_expert(a, rank_of, row * SLUICE_K + slot);
      rank[slot] = e >= 0 ? rank_of[e] : -1;
    }
#pragma unroll
    for (int slot = 0; slot < SLUICE_K; ++slot) {
      bool seen = rank[slot] < 0;
#pragma unroll
      for (int earlier = 0; earlier < slot; ++earlier) seen = seen | (rank[earlier] == rank[slot]);
      if (!seen) gpu_atomic_add_i32(in_shared ? &per_rank[rank[slot]] : &a.rank_tokens[rank[slot]], 1);
    }
  }
  gpu_syncthreads();
  if (in_shared)
    for (int r = tid; r < a.ranks; r += SLUICE_DISPATCH_RANK_THREADS)
      if (per_rank[r] != 0) gpu_atomic_add_i32(&a.rank_tokens[r], per_rank[r]);
}

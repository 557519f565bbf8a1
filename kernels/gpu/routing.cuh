// Routing: scores, group selection, top-k, renormalisation and scaling, one warp per token.
//
// The routing config is fixed at compile time (NVRTC defines, one module per config), so every
// loop below has constant bounds and the per-lane arrays stay in registers:
//   SLUICE_E        experts E (at most 32 * GPU_WARP)
//   SLUICE_G        groups G (E % G == 0; experts g*E/G .. (g+1)*E/G form group g)
//   SLUICE_KG       groups kept
//   SLUICE_K        experts per token K (at most GPU_WARP)
//   SLUICE_SCORING  SLUICE_SOFTMAX, SLUICE_SIGMOID or SLUICE_SQRTSOFTPLUS
//   SLUICE_METHOD   SLUICE_GREEDY, SLUICE_GROUP_LIMITED_GREEDY, SLUICE_NOAUX_TC or SLUICE_HASH
//                   (the K experts are row `token_ids[t]` of the table `tid2eid`, one group)
//   SLUICE_NORM     1: divide the weights by their sum + 1e-20
//   SLUICE_AFTER_TOPK  1: select the K largest logits, then score only those (softmax over the
//                      K, or the element-wise score of each); greedy only
//   SLUICE_LOGIT_BIAS  1: the bias is the router's, added to every logit before anything else
//                      (otherwise it is noaux_tc's correction, for selection only)
// Scoring is one switch (`sluice_score`) and the group score another (`sluice_group_score`), so a
// new scoring function or selection rule is one more case in each.
//
// Lane `lane` holds the SLUICE_PER_LANE experts lane * SLUICE_PER_LANE + j, in order: its loads
// share one address, a group whose size is a multiple of SLUICE_PER_LANE is a run of whole lanes
// (its score needs shuffles only), and lane order then j order is expert order.
//
// Semantics are those of the scalar reference router: f32 scores; the bias (noaux_tc) is added for
// selection only and the unbiased scores are carried alongside; groups and experts are ranked by
// larger value, then lower index; rows are written sorted by weight, then id; a row with a
// non-finite logit gets ids -1 and weights 0 and is counted in `status` ([count, first row]).
// Under hash routing a row whose token id names no row of the table is marked and counted the
// same way: a call that only enqueues cannot raise, and the kernel must not read outside the table.

#define SLUICE_SOFTMAX 0
#define SLUICE_SIGMOID 1
#define SLUICE_SQRTSOFTPLUS 2
#define SLUICE_GREEDY 0
#define SLUICE_GROUP_LIMITED_GREEDY 1
#define SLUICE_NOAUX_TC 2
#define SLUICE_HASH 3

#if !defined(SLUICE_E) || !defined(SLUICE_G) || !defined(SLUICE_KG) || !defined(SLUICE_K) || \
    !defined(SLUICE_SCORING) || !defined(SLUICE_METHOD) || !defined(SLUICE_NORM) ||            \
    !defined(SLUICE_AFTER_TOPK) || !defined(SLUICE_LOGIT_BIAS)
#error "the routing config must be defined: SLUICE_E, _G, _KG, _K, _SCORING, _METHOD, _NORM, _AFTER_TOPK, _LOGIT_BIAS"
#endif
#if SLUICE_AFTER_TOPK && SLUICE_METHOD != SLUICE_GREEDY
#error "scoring after the top-k is for greedy selection only"
#endif
#if SLUICE_METHOD == SLUICE_HASH && SLUICE_G != 1
#error "hash routing has no expert groups"
#endif
#if SLUICE_E % SLUICE_G != 0 || SLUICE_K > GPU_WARP || SLUICE_E > 32 * GPU_WARP
#error "routing config out of range"
#endif

#define SLUICE_ROUTE_WARPS 4
// The most partial sums per logit the GEMM writes (`MAX_PARTIALS` in the launch geometry).
#define SLUICE_MAX_PARTIALS 16
#define SLUICE_PER_LANE ((SLUICE_E + GPU_WARP - 1) / GPU_WARP)
#define SLUICE_PER_GROUP (SLUICE_E / SLUICE_G)
#define SLUICE_GROUPED (SLUICE_METHOD != SLUICE_GREEDY && SLUICE_KG < SLUICE_G)
#define SLUICE_RENORM_EPSILON 1e-20f

// The total order of groups and experts: larger value first, then lower index.
GPU_INLINE bool sluice_ranks_before(float value, int index, float other_value, int other_index) {
  return value > other_value || (value == other_value && index < other_index);
}

// A u32 whose unsigned order is the order of the f32 values (-0 and +0 equal, as they compare).
GPU_INLINE unsigned sluice_order_key(float value) {
  const unsigned bits = gpu_float_bits(value + 0.0f);  // + 0.0f turns -0 into +0
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// The index of the best (larger value, then lower index) of the lanes' candidates, each given as
// (order key, index); key 0 means no candidate. Every lane gets it.
GPU_INLINE int sluice_warp_best_index(unsigned key, int index) {
  const unsigned top = gpu_wave_max_u32(key);
  return (int)gpu_wave_min_u32(key == top ? (unsigned)index : 0xffffffffu);
}

GPU_INLINE float sluice_warp_max(float v) {
  for (int off = GPU_WARP / 2; off > 0; off >>= 1) {
    const float o = gpu_shfl_xor_f(v, off);
    v = o > v ? o : v;
  }
  return v;
}

GPU_INLINE float sluice_warp_sum(float v) {
  for (int off = GPU_WARP / 2; off > 0; off >>= 1) v += gpu_shfl_xor_f(v, off);
  return v;
}

// The element-wise scores: the sigmoid, or sqrt(ln(1 + e^l)) computed as
// sqrt(max(l, 0) + ln(1 + e^-|l|)) (no overflow for large l, full precision for very negative l:
// the reference's formula).
GPU_INLINE float sluice_elementwise_score(float l) {
#if SLUICE_SCORING == SLUICE_SQRTSOFTPLUS
  const float l_abs = l < 0.f ? -l : l;
  return gpu_sqrtf((l > 0.f ? l : 0.f) + gpu_log1pf(gpu_expf(-l_abs)));
#else
  return gpu_rcp_from_one(1.f + gpu_expf(-l));
#endif
}

// Scores s from logits l, for this lane's experts (-inf logits for the padding lanes, which are
// never allowed).
GPU_INLINE void sluice_score(const float (&l)[SLUICE_PER_LANE], float (&s)[SLUICE_PER_LANE]) {
#if SLUICE_SCORING == SLUICE_SOFTMAX
  float m = -GPU_INFINITY;
  #pragma unroll
  for (int j = 0; j < SLUICE_PER_LANE; ++j) m = l[j] > m ? l[j] : m;
  m = sluice_warp_max(m);
  float sum = 0.f;
  #pragma unroll
  for (int j = 0; j < SLUICE_PER_LANE; ++j) {
    s[j] = gpu_expf(l[j] - m);
    sum += s[j];
  }
  sum = sluice_warp_sum(sum);
  #pragma unroll
  for (int j = 0; j < SLUICE_PER_LANE; ++j) s[j] = s[j] / sum;
#elif SLUICE_SCORING == SLUICE_SIGMOID || SLUICE_SCORING == SLUICE_SQRTSOFTPLUS
  #pragma unroll
  for (int j = 0; j < SLUICE_PER_LANE; ++j) s[j] = sluice_elementwise_score(l[j]);
#else
#error "unknown SLUICE_SCORING"
#endif
}

// This lane's best candidate (larger key, then lower expert; key 0 is none) and its expert.
GPU_INLINE void sluice_lane_best(const unsigned (&key)[SLUICE_PER_LANE], int lane, unsigned &best,
                                 int &best_expert) {
  best = 0u;
  best_expert = GPU_INT_MAX;
#pragma unroll
  for (int j = 0; j < SLUICE_PER_LANE; ++j)
    // j ascending and a strict >: among equal keys this lane keeps its lowest expert.
    if (key[j] > best) {
      best = key[j];
      best_expert = lane * SLUICE_PER_LANE + j;
    }
}

#if SLUICE_GROUPED
// Merges the top two of another lane into (a >= b).
GPU_INLINE void sluice_merge_top2(float &a, float &b, float oa, float ob) {
  const float lo = a < oa ? a : oa;
  const float hb = b > ob ? b : ob;
  a = a > oa ? a : oa;
  b = lo > hb ? lo : hb;
}

// The group score from the top two selection values of the group.
GPU_INLINE float sluice_group_score(float first, float second) {
#if SLUICE_METHOD == SLUICE_NOAUX_TC
  return first + second;
#elif SLUICE_METHOD == SLUICE_GROUP_LIMITED_GREEDY
  (void)second;
  return first;
#else
#error "unknown grouped SLUICE_METHOD"
#endif
}

// Marks the SLUICE_KG best groups in `kept`, from the selection values in `c_shared`.
// Lanes work in segments of SLUICE_LANES_PER_GROUP (a power of two) per group.
#define SLUICE_LANES_PER_GROUP                                                                     \
  (SLUICE_G >= GPU_WARP ? 1                                                                        \
                        : (GPU_WARP / SLUICE_G >= 32 ? 32                                          \
                                                     : (GPU_WARP / SLUICE_G >= 16 ? 16             \
                                                     : (GPU_WARP / SLUICE_G >= 8 ? 8               \
                                                     : (GPU_WARP / SLUICE_G >= 4 ? 4               \
                                                     : (GPU_WARP / SLUICE_G >= 2 ? 2 : 1))))))
#define SLUICE_GROUPS_PER_PASS (GPU_WARP / SLUICE_LANES_PER_GROUP)
GPU_INLINE void sluice_select_groups(const float *c_shared, float *group_score,
                                     unsigned char *kept, int lane) {
  for (int pass = 0; pass < (SLUICE_G + SLUICE_GROUPS_PER_PASS - 1) / SLUICE_GROUPS_PER_PASS; ++pass) {
    const int group = pass * SLUICE_GROUPS_PER_PASS + lane / SLUICE_LANES_PER_GROUP;
    const int sub = lane % SLUICE_LANES_PER_GROUP;
    float a = -GPU_INFINITY, b = -GPU_INFINITY;
    // A constant trip count and no branch: the loads are all in flight at once.
#pragma unroll
    for (int k = 0; k < (SLUICE_PER_GROUP + SLUICE_LANES_PER_GROUP - 1) / SLUICE_LANES_PER_GROUP; ++k) {
      const int i = sub + k * SLUICE_LANES_PER_GROUP;
      const float v = group < SLUICE_G && i < SLUICE_PER_GROUP ? c_shared[group * SLUICE_PER_GROUP + i]
                                                               : -GPU_INFINITY;
      b = b > v ? b : (a < v ? a : v);  // the larger of b and min(a, v)
      a = a > v ? a : v;
    }
    for (int off = SLUICE_LANES_PER_GROUP / 2; off > 0; off >>= 1)
      sluice_merge_top2(a, b, gpu_shfl_xor_f(a, off), gpu_shfl_xor_f(b, off));
    if (sub == 0 && group < SLUICE_G) group_score[group] = sluice_group_score(a, b);
  }
  gpu_syncwarp();
#if SLUICE_G <= GPU_WARP
  // One group per lane: its rank among the groups decides, all groups at once.
  const float mine = lane < SLUICE_G ? group_score[lane] : -GPU_INFINITY;
  int rank = 0;
#pragma unroll
  for (int g = 0; g < SLUICE_G; ++g)
    if (sluice_ranks_before(gpu_shfl_f(mine, g), g, mine, lane)) ++rank;
  const gpu_lanemask_t mask = gpu_ballot(lane < SLUICE_G && rank < SLUICE_KG);
  for (int g = lane; g < SLUICE_G; g += GPU_WARP) kept[g] = (unsigned char)((mask >> g) & 1u);
#else
  for (int g = lane; g < SLUICE_G; g += GPU_WARP) kept[g] = 0;
  gpu_syncwarp();
  for (int round = 0; round < SLUICE_KG; ++round) {
    unsigned best = 0;
    int best_group = GPU_INT_MAX;
    for (int g = lane; g < SLUICE_G; g += GPU_WARP) {
      const unsigned key = sluice_order_key(group_score[g]);
      if (!kept[g] && key > best) {
        best = key;
        best_group = g;
      }
    }
    best_group = sluice_warp_best_index(best, best_group);
    gpu_syncwarp();  // every lane has read `kept` before it changes
    if (lane == 0) kept[best_group] = 1;
    gpu_syncwarp();
  }
#endif
  gpu_syncwarp();
}
#endif

#if SLUICE_GROUPED && SLUICE_PER_GROUP % SLUICE_PER_LANE == 0 &&                                 \
    ((SLUICE_PER_GROUP / SLUICE_PER_LANE) & (SLUICE_PER_GROUP / SLUICE_PER_LANE - 1)) == 0
// A group is SLUICE_GROUP_LANES whole lanes (a power of two): its score is a butterfly over them.
#define SLUICE_GROUP_LANES (SLUICE_PER_GROUP / SLUICE_PER_LANE)
// Whether this lane's group is among the SLUICE_KG best, from the lanes' selection values c: the
// same top two, group score and order as `sluice_select_groups`, in registers.
GPU_INLINE bool sluice_lane_group_kept(const float (&c)[SLUICE_PER_LANE], int lane) {
  float a = -GPU_INFINITY, b = -GPU_INFINITY;
  // Selects, not branches: c[j] merged as a top two of its own.
#pragma unroll
  for (int j = 0; j < SLUICE_PER_LANE; ++j) sluice_merge_top2(a, b, c[j], -GPU_INFINITY);
#pragma unroll
  for (int off = SLUICE_GROUP_LANES / 2; off > 0; off >>= 1)
    sluice_merge_top2(a, b, gpu_shfl_xor_f(a, off), gpu_shfl_xor_f(b, off));
  const float mine = sluice_group_score(a, b);
  const int group = lane / SLUICE_GROUP_LANES;
  int rank = 0;
#pragma unroll
  for (int g = 0; g < SLUICE_G; ++g)
    if (sluice_ranks_before(gpu_shfl_f(mine, g * SLUICE_GROUP_LANES), g, mine, group)) ++rank;
  return group < SLUICE_G && rank < SLUICE_KG;
}
#endif

// The place of list entry i among the first `listed` entries: how many rank before it (larger
// key, then the earlier entry; every list is in expert order, so earlier is lower expert).
GPU_INLINE int sluice_list_place(const unsigned *list_key, int listed, int i) {
  const unsigned mine = list_key[i];
  int place = 0;
  for (int m = 0; m < listed; ++m) {
    const unsigned other = list_key[m];
    place += (other > mine || (other == mine && m < i)) ? 1 : 0;
  }
  return place;
}

// The K best candidates (larger key, then lower expert; key 0 is none) of this lane's experts and
// the others', in choice order: lane r < K gets the r-th, the others -1. `list_key` and
// `list_expert` hold GPU_WARP entries, `chosen` SLUICE_K, all this warp's own shared memory.
//
// The K-th largest of the lanes' best keys bounds the choices from below: the lanes holding the K
// largest hold K distinct candidates at or above it, so no expert under it is among the K best
// (every candidate is above a bound of 0, where fewer lanes hold any). The candidates at or above
// it, typically a few more than K, are listed in expert order, and each counts those ranked
// before it: that count is its place. Where more than a warp's worth reach the bound (many equal
// keys, or K near the lanes' count), K rounds take the best remaining head instead.
GPU_INLINE int sluice_warp_top_k(unsigned (&key)[SLUICE_PER_LANE], int lane, unsigned *list_key,
                                 int *list_expert, int *chosen) {
  unsigned best = 0u;
#pragma unroll
  for (int j = 0; j < SLUICE_PER_LANE; ++j) best = key[j] > best ? key[j] : best;
  unsigned bound = 0u, rest = best;
#pragma unroll
  for (int r = 0; r < SLUICE_K; ++r) {
    bound = gpu_wave_max_u32(rest);
    if (lane == gpu_lowest_lane(gpu_ballot(rest == bound))) rest = 0u;
  }
  const unsigned least = bound > 1u ? bound : 1u;
  int mine = 0;
#pragma unroll
  for (int j = 0; j < SLUICE_PER_LANE; ++j) mine += key[j] >= least ? 1 : 0;
  int upto = mine;  // inclusive prefix sum over the lanes
#pragma unroll
  for (int off = 1; off < GPU_WARP; off <<= 1) {
    const int other = gpu_shfl_i(upto, (lane - off) & (GPU_WARP - 1));
    if (lane >= off) upto += other;
  }
  const int listed = gpu_shfl_i(upto, GPU_WARP - 1);
  if (listed <= GPU_WARP) {
    int at = upto - mine;
#pragma unroll
    for (int j = 0; j < SLUICE_PER_LANE; ++j)
      if (key[j] >= least) {
        list_key[at] = key[j];
        list_expert[at] = lane * SLUICE_PER_LANE + j;
        ++at;
      }
    gpu_syncwarp();
    if (lane < listed) {
      const int place = sluice_list_place(list_key, listed, lane);
      if (place < SLUICE_K) chosen[place] = list_expert[lane];
    }
    gpu_syncwarp();
    return lane < SLUICE_K ? chosen[lane] : -1;
  }
  // Each lane keeps its best remaining candidate as its head; a round compares only the heads
  // (two warp reductions), and only the winning lane drops its head and looks again. Rounds stay
  // a loop: unrolled, K of them would multiply the code, and a kernel that runs once per layer
  // fetches its instructions from L2 (or memory) every time.
  int my_id = -1;
  unsigned head_key;
  int head;
  sluice_lane_best(key, lane, head_key, head);
#pragma unroll 1
  for (int round = 0; round < SLUICE_K; ++round) {
    const int winner = sluice_warp_best_index(head_key, head);
    if (head == winner) {  // experts are distinct: exactly one lane
#pragma unroll
      for (int j = 0; j < SLUICE_PER_LANE; ++j)
        if (lane * SLUICE_PER_LANE + j == winner) key[j] = 0u;
      sluice_lane_best(key, lane, head_key, head);
    }
    if (lane == round) my_id = winner;
  }
  return my_id;
}

// Marks row t as not routed: ids -1 and weights 0 (written by lanes 0..K-1 of one warp), counted
// in `status` ([count, first row]) by lane 0.
GPU_INLINE void sluice_mark_row(int lane, int t, int *ids, long long ids_row_stride,
                                float *weights, long long weights_row_stride, int *status) {
  if (lane < SLUICE_K) {
    ids[t * ids_row_stride + lane] = -1;
    weights[t * weights_row_stride + lane] = 0.f;
  }
  if (lane == 0 && status != 0) {
    gpu_atomic_add_i32(status, 1);
    gpu_atomic_min_u32((unsigned *)status + 1, (unsigned)t);
  }
}

// Writes row t from its choices, one warp: lane r < K holds the r-th choice `my_id` (in choice
// order), and `s_row` the scores of every expert (scoring after the top-k: the logits). The
// weights are the chosen scores (scored now, after the top-k), divided by their sum taken in
// choice order as the reference adds it, scaled, and the row is sorted by (weight descending, id
// ascending).
GPU_INLINE void sluice_finish_row(const float *s_row, int my_id, int lane, int t, float scale,
                                  int *ids, long long ids_row_stride, float *weights,
                                  long long weights_row_stride) {
  const float my_score = lane < SLUICE_K ? s_row[my_id] : 0.f;
  float sum = 0.f;
#pragma unroll 8
  for (int r = 0; r < SLUICE_K; ++r) sum += gpu_shfl_f(my_score, r);

  float weight = my_score;
#if SLUICE_AFTER_TOPK
  // Lane r holds the r-th chosen logit, the first the largest: score the K of them.
#if SLUICE_SCORING == SLUICE_SOFTMAX
  const float largest = gpu_shfl_f(my_score, 0);
  const float term = lane < SLUICE_K ? gpu_expf(my_score - largest) : 0.f;
  weight = term / sluice_warp_sum(term);
#else
  weight = lane < SLUICE_K ? sluice_elementwise_score(my_score) : 0.f;
#endif
  sum = sluice_warp_sum(weight);
#endif
#if SLUICE_NORM
  // Lanes past K divide 1, not their 0: a zero numerator sends the whole warp down the division's
  // slow path, and those lanes' weights are never read.
  weight = (lane < SLUICE_K ? weight : 1.f) / (sum + SLUICE_RENORM_EPSILON);
#endif
  weight = weight * scale;

  // The rank of each entry among the K by (weight descending, id ascending).
  int rank = 0;
#pragma unroll 8
  for (int r = 0; r < SLUICE_K; ++r) {
    const float w = gpu_shfl_f(weight, r);
    const int id = gpu_shfl_i(my_id, r);
    if (sluice_ranks_before(w, id, weight, my_id)) ++rank;
  }
  if (lane < SLUICE_K) {
    ids[t * ids_row_stride + rank] = my_id;
    weights[t * weights_row_stride + rank] = weight;
  }
}

#if SLUICE_METHOD == SLUICE_HASH
// The table row of token t: its id (i32 or i64, `token_id_bytes` wide), or -1 where the id names
// no row of the `table_rows` rows.
GPU_INLINE int sluice_hash_table_row(const void *token_ids, int token_id_bytes, int t,
                                     int table_rows) {
  const long long id = token_id_bytes == 8 ? ((const long long *)token_ids)[t]
                                           : (long long)((const int *)token_ids)[t];
  return id >= 0 && id < table_rows ? (int)id : -1;
}
#endif

// MAX_PARTIALS is the most partial sums per logit this instance adds: SLUICE_MAX_PARTIALS for the
// split GEMM, 1 where the GEMM wrote the logits themselves. The second instance is much smaller
// code, and a kernel that runs once per layer fetches its instructions cold every time.
template <int MAX_PARTIALS>
GPU_INLINE void sluice_route_tokens(
    const float *partials, int splits, long long split_stride, long long row_stride,
    const float *bias, int tokens, float scale, int *ids, long long ids_row_stride, float *weights,
    long long weights_row_stride, float *logits, long long logits_row_stride, int *status,
    const int *hash_table, int hash_rows, const void *token_ids, int token_id_bytes) {
#if SLUICE_GROUPED && !defined(SLUICE_GROUP_LANES)
  __shared__ float c_shared[SLUICE_ROUTE_WARPS][SLUICE_E];
  __shared__ float group_score[SLUICE_ROUTE_WARPS][SLUICE_G];
  __shared__ unsigned char kept[SLUICE_ROUTE_WARPS][SLUICE_G];
#endif
#if SLUICE_METHOD != SLUICE_HASH
  __shared__ unsigned list_key[SLUICE_ROUTE_WARPS][GPU_WARP];
  __shared__ int list_expert[SLUICE_ROUTE_WARPS][GPU_WARP];
  __shared__ int chosen[SLUICE_ROUTE_WARPS][SLUICE_K];
#endif
  // The unbiased scores, read back by the lane that keeps each choice.
  __shared__ float s_shared[SLUICE_ROUTE_WARPS][SLUICE_E];
  const int lane = GPU_TID % GPU_WARP, warp = GPU_TID / GPU_WARP;
  const int first = lane * SLUICE_PER_LANE;  // this lane's first expert
  // The bias was written at preparation, not by the previous kernel: read it before the wait.
  float b[SLUICE_PER_LANE];
#pragma unroll
  for (int j = 0; j < SLUICE_PER_LANE; ++j) {
    const bool biased = SLUICE_METHOD == SLUICE_NOAUX_TC || SLUICE_LOGIT_BIAS;
    b[j] = (biased && bias != 0 && first + j < SLUICE_E) ? bias[first + j] : 0.f;
  }
  gpu_allow_dependents();
  gpu_wait_for_previous_grid();
  const int t = GPU_BID_X * SLUICE_ROUTE_WARPS + warp;
  if (t >= tokens) return;  // the whole warp leaves; no block-wide barrier follows

  // Logits: the sum of the split partials, in split order. The split loop has a constant bound
  // (the planner never makes more than MAX_PARTIALS), so every load of this lane's experts for
  // every split can be in flight at once.
  float l[SLUICE_PER_LANE];
#pragma unroll
  for (int j = 0; j < SLUICE_PER_LANE; ++j) l[j] = 0.f;
  const float *row = partials + t * row_stride + first;
#pragma unroll
  for (int s = 0; s < MAX_PARTIALS; ++s) {
    if (s < splits) {
#pragma unroll
      for (int j = 0; j < SLUICE_PER_LANE; ++j)
        if (first + j < SLUICE_E) l[j] += row[s * split_stride + j];
    }
  }
  // The logits handed out are x . W^T; a router bias joins them after, and the non-finite check
  // sees the sum (a bias can overflow a large logit).
  if (logits != 0) {  // one branch, not one an expert
    float *out = logits + t * logits_row_stride + first;
#pragma unroll
    for (int j = 0; j < SLUICE_PER_LANE; ++j)
      if (first + j < SLUICE_E) out[j] = l[j];
  }
  bool finite = true;
#pragma unroll
  for (int j = 0; j < SLUICE_PER_LANE; ++j) {
    if (first + j < SLUICE_E) {
      if (SLUICE_LOGIT_BIAS) l[j] += b[j];
      finite = finite && gpu_is_finite(l[j]);
    } else {
      l[j] = -GPU_INFINITY;
    }
  }
#if SLUICE_METHOD == SLUICE_HASH
  // Read after the wait: the token ids may come from the previous kernel.
  const int hash_row = sluice_hash_table_row(token_ids, token_id_bytes, t, hash_rows);
  const bool invalid = gpu_any(!finite) || hash_row < 0;
#else
  (void)hash_table;  // the hash arguments are 0 for every other method
  (void)hash_rows;
  (void)token_ids;
  (void)token_id_bytes;
  const bool invalid = gpu_any(!finite);
#endif
  if (invalid) {
    sluice_mark_row(lane, t, ids, ids_row_stride, weights, weights_row_stride, status);
    return;
  }

  // Lane r keeps the r-th choice; s are the scores the weights are made of.
  int my_id = -1;
  float s[SLUICE_PER_LANE];
#if SLUICE_METHOD == SLUICE_HASH
  // The table row is the choice, in its own order.
  sluice_score(l, s);
  if (lane < SLUICE_K) my_id = hash_table[(long long)hash_row * SLUICE_K + lane];
#else
  // Scores s and selection values c (s + bias for noaux_tc). Scoring after the top-k selects on
  // the logits and carries them, to be scored once chosen.
  float c[SLUICE_PER_LANE];
#if SLUICE_AFTER_TOPK
  #pragma unroll
  for (int j = 0; j < SLUICE_PER_LANE; ++j) s[j] = c[j] = l[j];
#else
  sluice_score(l, s);
  #pragma unroll
  for (int j = 0; j < SLUICE_PER_LANE; ++j) c[j] = SLUICE_METHOD == SLUICE_NOAUX_TC ? s[j] + b[j] : s[j];
#endif

  // The selection keys: 0 for the experts that may not be chosen (padding, groups not kept).
  unsigned key[SLUICE_PER_LANE];
#if SLUICE_GROUPED && defined(SLUICE_GROUP_LANES)
  const bool group_kept = sluice_lane_group_kept(c, lane);
  #pragma unroll
  for (int j = 0; j < SLUICE_PER_LANE; ++j)
    key[j] = group_kept && first + j < SLUICE_E ? sluice_order_key(c[j]) : 0u;
#elif SLUICE_GROUPED
  #pragma unroll
  for (int j = 0; j < SLUICE_PER_LANE; ++j)
    if (first + j < SLUICE_E) c_shared[warp][first + j] = c[j];
  gpu_syncwarp();
  sluice_select_groups(c_shared[warp], group_score[warp], kept[warp], lane);
  #pragma unroll
  for (int j = 0; j < SLUICE_PER_LANE; ++j) {
    const int e = first + j;
    key[j] = e < SLUICE_E && kept[warp][e / SLUICE_PER_GROUP] ? sluice_order_key(c[j]) : 0u;
  }
#else
  #pragma unroll
  for (int j = 0; j < SLUICE_PER_LANE; ++j) key[j] = first + j < SLUICE_E ? sluice_order_key(c[j]) : 0u;
#endif
  my_id = sluice_warp_top_k(key, lane, list_key[warp], list_expert[warp], chosen[warp]);
#endif
  // Each lane that keeps a choice reads its score back.
#pragma unroll
  for (int j = 0; j < SLUICE_PER_LANE; ++j)
    if (first + j < SLUICE_E) s_shared[warp][first + j] = s[j];
  gpu_syncwarp();
  sluice_finish_row(s_shared[warp], my_id, lane, t, scale, ids, ids_row_stride, weights,
                    weights_row_stride);
}

#define SLUICE_INSTANTIATE_ROUTE(name, MAX_PARTIALS)                                               \
  GPU_KERNEL GPU_LAUNCH_BOUNDS(SLUICE_ROUTE_WARPS *GPU_WARP) void name(                            \
      const float *partials, int splits, long long split_stride, long long row_stride,             \
      const float *bias, int tokens, float scale, int *ids, long long ids_row_stride,              \
      float *weights, long long weights_row_stride, float *logits, long long logits_row_stride,    \
      int *status, const int *hash_table, int hash_rows, const void *token_ids,                   \
      int token_id_bytes) {                                                                        \
    sluice_route_tokens<MAX_PARTIALS>(partials, splits, split_stride, row_stride, bias, tokens,   \
                                      scale, ids, ids_row_stride, weights, weights_row_stride,     \
                                      logits, logits_row_stride, status, hash_table, hash_rows,    \
                                      token_ids, token_id_bytes);                                  \
  }
SLUICE_INSTANTIATE_ROUTE(sluice_route, SLUICE_MAX_PARTIALS)
SLUICE_INSTANTIATE_ROUTE(sluice_route_logits, 1)

// Resets what routing counts into (the status, the fused layout's ticket and counts for `tokens`
// rows; status and ticket may be null) where no GEMM kernel of ours runs before routing (the
// cuBLASLt path). It waits for the previous kernel, which may still count into the same memory.
GPU_KERNEL GPU_LAUNCH_BOUNDS(GPU_WARP) void sluice_reset_status(int *status, unsigned *ticket,
                                                                int tokens) {
  gpu_allow_dependents();
  gpu_wait_for_previous_grid();
  sluice_reset_counters(status, ticket, tokens, true);
}

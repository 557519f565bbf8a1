//! The scalar reference router: the one source of truth for routing semantics.
//!
//! Everything here is written to be obviously correct, not fast: one token at a time, plain
//! loops, sorts with an explicit total order. Every fast path (the CPU backend, the GPU kernels) is
//! tested against it, with the comparison helpers of this module.
//!
//! # Semantics
//!
//! For one token with f32 logits `l[E]` (the product `x·Wᵀ`), an optional f32 bias `b[E]` (absent
//! means zero) and a [`RoutingSpec`](sluice_tensor::RoutingSpec):
//!
//! | step | rule |
//! | --- | --- |
//! | router bias | bias role `logits` (gpt-oss): `l = l + b` in f32, first (a sum that overflows makes the row non-finite); `b` is then no correction bias. Role `correction`: `b` is the correction bias of `noaux_tc`, refused by every other method |
//! | scoring after the top-k | [`ScoringOrder::AfterTopk`](sluice_tensor::ScoringOrder::AfterTopk) (gpt-oss, Llama 4; plain top-k only): the `top_k` largest `l` (larger first, then lower index) are chosen, and `s` of those alone is softmax over their `K` logits (f64, rounded once), or the sigmoid of each; the rest of this table (renormalisation, scaling, order) applies as written, groups and bias correction do not |
//! | scores `s` | `softmax(l)`, `sigmoid(l)` or `sqrt(softplus(l))`, computed in f64 and rounded once to f32 (softplus as `max(l, 0) + ln_1p(e^-abs(l))`) |
//! | selection values `c` | `s + b` added in f32 for `noaux_tc`, `s` otherwise; `s` itself is carried alongside, never recovered by subtracting `b` |
//! | group score | `group_limited_greedy`: the largest `c` of the group; `noaux_tc`: the sum (f32) of the two largest `c` of the group |
//! | kept groups | the `topk_group` best groups; experts of the other groups are masked with `-inf` |
//! | experts | the `top_k` best unmasked experts by `c`; for a hash-routed layer ([`route_hashed`]) instead row `token_id` of the table `tid2eid`, whatever the scores |
//! | order | larger value first, then lower index, for groups and experts alike |
//! | weights | `s` of the chosen experts; if `norm_topk_prob`, divided by `sum + 1e-20` (sum rounded to f32, then the epsilon added in f32); then multiplied once by [`output_scale`](sluice_tensor::RoutingSpec::output_scale) |
//! | output row | sorted by weight descending, then by expert id |
//! | non-finite logits | [`NonFinitePolicy::Error`](sluice_tensor::NonFinitePolicy::Error): [`ReferenceError::NonFinite`] naming the first bad row; `MarkInvalid`: the row gets ids `-1` and weights `0`, the others are untouched |
//!
//! Because every unmasked selection value is finite and validation guarantees that the kept groups
//! hold at least `top_k` experts, masking with `-inf` is the same as choosing among the kept groups'
//! experts only, which is how it is written here. Unlike transformers' V2 router, `norm_topk_prob`
//! is honoured for softmax scoring too (no released V2 checkpoint sets it).
//!
//! The router GEMM ([`router_logits`]) multiplies exactly (every f32, bf16 or f16 product is exact
//! in f64), accumulates in f64 and rounds each logit once to f32.
//!
//! # Comparing a fast path
//!
//! Fast paths round differently, so where two experts (or two groups) score almost the same they
//! may legitimately choose differently. [`near_tie_rows`] lists those rows for given logits;
//! [`compare_routings`] checks expert sets exactly on every other row and weights by expert id
//! within a [`Tolerance`].

mod compare;
mod dispatch;
mod gemm;
mod hash;
mod ranking;
mod router;
mod ties;

pub use compare::{ComparisonSummary, RoutingMismatch, Tolerance, check_sorted, compare_routings};
pub use dispatch::{DispatchLayout, LayoutViolation, PaddedLayout, RankLayout, RankMap, dispatch};
pub use gemm::router_logits;
pub use hash::route_hashed;
pub use router::{ReferenceError, Routing, route};
pub use ties::near_tie_rows;

#[cfg(test)]
mod tests;

//! The reference routing of f32 logits.

use sluice_tensor::{
    HashTableError, NonFinitePolicy, RENORM_EPSILON, RoutingSpec, SpecError, TopkMethod,
};
use std::borrow::Cow;

use thiserror::Error;

use super::ranking::{best_first, rank_row};

/// Why the reference router (or router GEMM) refused its inputs.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum ReferenceError {
    /// The routing spec is invalid.
    #[error("invalid routing spec: {0}")]
    Spec(#[from] SpecError),
    /// A buffer's length does not match the shape it should hold.
    #[error("`{what}` holds {len} values, expected {expected} for shape {shape}")]
    Length {
        /// The argument.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The length the shape implies.
        expected: usize,
        /// The shape, in words (`[T, E]` with numbers).
        shape: String,
    },
    /// A shape whose element count overflows `usize`.
    #[error("shape of `{what}` overflows: {shape}")]
    Overflow {
        /// The argument.
        what: &'static str,
        /// The shape.
        shape: String,
    },
    /// A row of logits holds a NaN or an infinity, under [`NonFinitePolicy::Error`].
    #[error("non-finite router logits in row {row}; the mark-invalid policy routes the other rows")]
    NonFinite {
        /// The first bad row.
        row: usize,
    },
    /// The correction bias holds a NaN or an infinity.
    #[error("correction bias of expert {expert} is {value}, not a finite number")]
    NonFiniteBias {
        /// The expert.
        expert: usize,
        /// Its bias.
        value: f32,
    },
    /// A bias was given to a spec that takes none (see
    /// [`RoutingSpec::takes_bias`](sluice_tensor::RoutingSpec::takes_bias)).
    #[error(
        "a bias was given, but `{}` routing takes none (noaux_tc takes a correction bias; a spec \
         whose bias role is `logits` takes a router bias)",
        .0.name()
    )]
    UnexpectedBias(TopkMethod),
    /// More experts than an i32 id can name.
    #[error("{0} experts do not fit i32 expert ids")]
    TooManyExperts(usize),
    /// A hash-routed spec given to [`route`]: it needs the table and the token ids, through
    /// [`route_hashed`](super::route_hashed).
    #[error("hash routing needs the table and the token ids (route_hashed)")]
    HashNeedsTable,
    /// A top-k spec given to [`route_hashed`](super::route_hashed).
    #[error("route_hashed takes a hash-routed spec, got `{}`", .0.name())]
    NotHashed(TopkMethod),
    /// The hash table or the token ids are unusable.
    #[error("hash table: {0}")]
    HashTable(#[from] HashTableError),
    /// A token id names no row of the hash table.
    #[error("token id {id} of row {row} is outside the hash table's {vocab} rows")]
    TokenIdOutsideTable {
        /// The row.
        row: usize,
        /// The id.
        id: i64,
        /// Rows of the table.
        vocab: usize,
    },
    /// `top_k` of a routing is zero.
    #[error("a routing needs top_k >= 1")]
    ZeroTopK,
    /// A dispatch id that is neither `-1` nor in `[0, E)`.
    #[error("`topk_ids` row {row} slot {slot} holds {id}; ids are -1 (skip) or in [0, {experts})")]
    ExpertId {
        /// The row.
        row: usize,
        /// The slot.
        slot: usize,
        /// The id.
        id: i32,
        /// `E`.
        experts: usize,
    },
    /// A rank table entry outside `[0, R)`.
    #[error("expert {expert} is on rank {rank}; ranks are in [0, {ranks})")]
    Rank {
        /// The expert.
        expert: usize,
        /// Its rank.
        rank: i32,
        /// `R`.
        ranks: usize,
    },
    /// A padded dispatch layout with block size 0.
    #[error("the block size of a padded layout must be at least 1")]
    ZeroBlockSize,
}

/// A routing result: expert ids and weights, both `[T, K]` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    tokens: usize,
    top_k: usize,
    ids: Vec<i32>,
    weights: Vec<f32>,
}

impl Routing {
    /// Wraps ids and weights of `tokens` rows of `top_k` entries (for example a backend's output or
    /// a golden fixture's) so they can be compared with [`compare_routings`](super::compare_routings).
    pub fn new(
        tokens: usize,
        top_k: usize,
        ids: Vec<i32>,
        weights: Vec<f32>,
    ) -> Result<Self, ReferenceError> {
        if top_k == 0 {
            return Err(ReferenceError::ZeroTopK);
        }
        let expected = checked_len("topk_ids", tokens, top_k)?;
        let shape = || format!("[{tokens}, {top_k}]");
        if ids.len() != expected {
            return Err(ReferenceError::Length {
                what: "topk_ids",
                len: ids.len(),
                expected,
                shape: shape(),
            });
        }
        if weights.len() != expected {
            return Err(ReferenceError::Length {
                what: "topk_weights",
                len: weights.len(),
                expected,
                shape: shape(),
            });
        }
        Ok(Routing { tokens, top_k, ids, weights })
    }

    /// Number of rows `T`.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Experts per row `K`.
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// All ids, `[T, K]` row-major; `-1` marks an invalid row.
    pub fn ids(&self) -> &[i32] {
        &self.ids
    }

    /// All weights, `[T, K]` row-major.
    pub fn weights(&self) -> &[f32] {
        &self.weights
    }

    /// The rows, as `(ids, weights)` pairs of `K` entries.
    pub fn rows(&self) -> impl Iterator<Item = (&[i32], &[f32])> {
        self.ids.chunks_exact(self.top_k).zip(self.weights.chunks_exact(self.top_k))
    }

    /// Takes the buffers apart: `(ids, weights)`.
    pub fn into_parts(self) -> (Vec<i32>, Vec<f32>) {
        (self.ids, self.weights)
    }
}

/// Routes `tokens` rows of f32 logits `[T, E]` (the product `x·Wᵀ`) as `spec` says, with an
/// optional f32 bias `[E]`: the correction bias of `noaux_tc`, or a router bias added to the
/// logits when the spec's bias role says so. An absent bias means a zero bias.
///
/// See the [module documentation](super) for the exact semantics.
pub fn route(
    logits: &[f32],
    tokens: usize,
    bias: Option<&[f32]>,
    spec: &RoutingSpec,
) -> Result<Routing, ReferenceError> {
    let _span = tracing::debug_span!("reference_route", tokens, %spec).entered();
    check_inputs(logits, tokens, bias, spec)?;
    if spec.method == TopkMethod::Hash {
        return Err(ReferenceError::HashNeedsTable);
    }
    let (logits, bias) = with_logit_bias(logits, bias, spec);
    route_rows(&logits, tokens, spec, |_, row_logits| {
        let ranked = rank_row(row_logits, bias, spec);
        let chosen = ranked.ranked_experts.iter().take(spec.top_k).copied();
        weigh(&ranked.scores, chosen, spec)
    })
}

/// Routes every row with `route_row` (which gets the row index and its finite logits), applying
/// the non-finite policy first.
pub(crate) fn route_rows(
    logits: &[f32],
    tokens: usize,
    spec: &RoutingSpec,
    mut route_row: impl FnMut(usize, &[f32]) -> (Vec<i32>, Vec<f32>),
) -> Result<Routing, ReferenceError> {
    let top_k = spec.top_k;
    let mut ids = Vec::with_capacity(tokens * top_k);
    let mut weights = Vec::with_capacity(tokens * top_k);
    let mut invalid_rows = 0usize;
    for (row, row_logits) in logits.chunks_exact(spec.num_experts).enumerate() {
        if row_logits.iter().any(|x| !x.is_finite()) {
            match spec.non_finite {
                NonFinitePolicy::Error => return Err(ReferenceError::NonFinite { row }),
                NonFinitePolicy::MarkInvalid => {
                    ids.extend(std::iter::repeat_n(-1, top_k));
                    weights.extend(std::iter::repeat_n(0.0, top_k));
                    invalid_rows += 1;
                    continue;
                }
            }
        }
        let (row_ids, row_weights) = route_row(row, row_logits);
        ids.extend(row_ids);
        weights.extend(row_weights);
    }
    if invalid_rows > 0 {
        tracing::debug!(invalid_rows, "rows with non-finite logits marked invalid");
    }
    Routing::new(tokens, top_k, ids, weights)
}

/// The weights of the `chosen` experts of one row, given its scores: renormalised, scaled, and
/// sorted by weight descending, then by id.
pub(crate) fn weigh(
    scores: &[f32],
    chosen: impl Iterator<Item = usize>,
    spec: &RoutingSpec,
) -> (Vec<i32>, Vec<f32>) {
    let mut picked: Vec<(f32, usize)> = chosen.map(|e| (scores[e], e)).collect();
    if spec.norm_topk_prob {
        let sum = picked.iter().map(|&(w, _)| f64::from(w)).sum::<f64>() as f32;
        let denominator = sum + RENORM_EPSILON;
        for (w, _) in &mut picked {
            *w /= denominator;
        }
    }
    let scale = spec.output_scale();
    for (w, _) in &mut picked {
        *w *= scale;
    }
    picked.sort_by(|a, b| best_first(*a, *b));
    // Ids fit i32: `check_inputs` refused more experts than that.
    picked.into_iter().map(|(w, e)| (e as i32, w)).unzip()
}

/// The logits routing works on, and the correction bias it selects with: a bias whose role is
/// [`BiasRole::Logits`](sluice_tensor::BiasRole::Logits) is added in f32 to every logit (rows
/// whose sum overflows are then non-finite) and is no correction bias; any other bias is the
/// correction bias and the logits are used as given.
pub(crate) fn with_logit_bias<'a>(
    logits: &'a [f32],
    bias: Option<&'a [f32]>,
    spec: &RoutingSpec,
) -> (Cow<'a, [f32]>, Option<&'a [f32]>) {
    match bias {
        Some(bias) if spec.bias_on_logits() => {
            let biased = logits
                .chunks_exact(spec.num_experts)
                .flat_map(|row| row.iter().zip(bias).map(|(&l, &b)| l + b))
                .collect();
            (Cow::Owned(biased), None)
        }
        _ => (Cow::Borrowed(logits), bias),
    }
}

pub(crate) fn check_inputs(
    logits: &[f32],
    tokens: usize,
    bias: Option<&[f32]>,
    spec: &RoutingSpec,
) -> Result<(), ReferenceError> {
    spec.validate()?;
    let experts = spec.num_experts;
    if i32::try_from(experts).is_err() {
        return Err(ReferenceError::TooManyExperts(experts));
    }
    let expected = checked_len("logits", tokens, experts)?;
    if logits.len() != expected {
        return Err(ReferenceError::Length {
            what: "logits",
            len: logits.len(),
            expected,
            shape: format!("[{tokens}, {experts}]"),
        });
    }
    if let Some(bias) = bias {
        if !spec.takes_bias() {
            return Err(ReferenceError::UnexpectedBias(spec.method));
        }
        if bias.len() != experts {
            return Err(ReferenceError::Length {
                what: "bias",
                len: bias.len(),
                expected: experts,
                shape: format!("[{experts}]"),
            });
        }
        if let Some((expert, &value)) = bias.iter().enumerate().find(|(_, b)| !b.is_finite()) {
            return Err(ReferenceError::NonFiniteBias { expert, value });
        }
    }
    Ok(())
}

/// `rows * cols`, or an overflow error naming the argument.
pub(crate) fn checked_len(
    what: &'static str,
    rows: usize,
    cols: usize,
) -> Result<usize, ReferenceError> {
    rows.checked_mul(cols)
        .ok_or_else(|| ReferenceError::Overflow { what, shape: format!("[{rows}, {cols}]") })
}

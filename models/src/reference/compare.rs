//! Comparing two routings: the check every fast-path and fixture test in the workspace uses.

use std::collections::BTreeSet;
use std::fmt;

use thiserror::Error;

use super::router::Routing;

/// How far apart two weights of the same expert may be: `|actual - expected| <= abs + rel *
/// |expected|`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// Absolute part.
    pub abs: f32,
    /// Relative part.
    pub rel: f32,
}

impl Tolerance {
    /// An absolute tolerance only (1e-5 for f32 inputs).
    pub const fn absolute(abs: f32) -> Self {
        Tolerance { abs, rel: 0.0 }
    }

    /// A relative tolerance only (2e-2 for bf16 inputs).
    pub const fn relative(rel: f32) -> Self {
        Tolerance { abs: 0.0, rel }
    }

    /// Whether `actual` is within the tolerance of `expected`.
    pub fn accepts(&self, expected: f32, actual: f32) -> bool {
        (actual - expected).abs() <= self.abs + self.rel * expected.abs()
    }
}

impl fmt::Display for Tolerance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "abs {:e} + rel {:e}", self.abs, self.rel)
    }
}

/// What a successful comparison covered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ComparisonSummary {
    /// Rows whose expert sets and weights were compared.
    pub rows_compared: usize,
    /// Near-tie rows that were only checked for well-formed ids.
    pub rows_skipped: usize,
    /// Rows both sides marked invalid.
    pub rows_invalid: usize,
}

/// The first difference between two routings.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum RoutingMismatch {
    /// The two routings have different shapes.
    #[error(
        "shape differs: expected [{expected_tokens}, {expected_top_k}], got [{tokens}, {top_k}]"
    )]
    Shape {
        /// Expected rows.
        expected_tokens: usize,
        /// Expected experts per row.
        expected_top_k: usize,
        /// Actual rows.
        tokens: usize,
        /// Actual experts per row.
        top_k: usize,
    },
    /// A row is malformed: an id out of range, a duplicate id, or a partly invalid row.
    #[error("{side} row {row} is malformed ({reason}): ids {ids:?}, weights {weights:?}")]
    Malformed {
        /// `"expected"` or `"actual"`.
        side: &'static str,
        /// The row.
        row: usize,
        /// What is wrong.
        reason: String,
        /// The row's ids.
        ids: Vec<i32>,
        /// The row's weights.
        weights: Vec<f32>,
    },
    /// The rows choose different experts.
    #[error(
        "row {row}: expert sets differ: expected {expected_ids:?} (weights {expected_weights:?}), \
         got {actual_ids:?} (weights {actual_weights:?})"
    )]
    ExpertSet {
        /// The row.
        row: usize,
        /// Expected ids, as given.
        expected_ids: Vec<i32>,
        /// Expected weights, as given.
        expected_weights: Vec<f32>,
        /// Actual ids, as given.
        actual_ids: Vec<i32>,
        /// Actual weights, as given.
        actual_weights: Vec<f32>,
    },
    /// A row is not sorted by weight descending, then by expert id.
    #[error(
        "row {row} is not sorted by weight descending, then id: ids {ids:?}, weights {weights:?}"
    )]
    Order {
        /// The row.
        row: usize,
        /// Its ids.
        ids: Vec<i32>,
        /// Its weights.
        weights: Vec<f32>,
    },
    /// An expert's weight differs by more than the tolerance.
    #[error(
        "row {row}, expert {expert}: weight {actual:e} differs from the expected {expected:e} \
         by {:e} (tolerance {tolerance})", (actual - expected).abs()
    )]
    Weight {
        /// The row.
        row: usize,
        /// The expert.
        expert: i32,
        /// Expected weight.
        expected: f32,
        /// Actual weight.
        actual: f32,
        /// The tolerance that was exceeded.
        tolerance: Tolerance,
    },
}

/// Checks that `actual` routes like `expected`.
///
/// Every row of both must be well formed: ids in `0..num_experts` and distinct, or the whole row
/// invalid (ids `-1`, weights `0`). A row invalid on one side must be invalid on the other. On every
/// row not listed in `near_ties`, the expert sets must be equal and each expert's weight within
/// `tolerance`; the order inside a row is not compared (transformers does not sort its rows).
pub fn compare_routings(
    expected: &Routing,
    actual: &Routing,
    num_experts: usize,
    near_ties: &[usize],
    tolerance: Tolerance,
) -> Result<ComparisonSummary, RoutingMismatch> {
    if (expected.tokens(), expected.top_k()) != (actual.tokens(), actual.top_k()) {
        return Err(RoutingMismatch::Shape {
            expected_tokens: expected.tokens(),
            expected_top_k: expected.top_k(),
            tokens: actual.tokens(),
            top_k: actual.top_k(),
        });
    }
    let skip: BTreeSet<usize> = near_ties.iter().copied().collect();
    let mut summary = ComparisonSummary { rows_compared: 0, rows_skipped: 0, rows_invalid: 0 };
    for (row, ((e_ids, e_weights), (a_ids, a_weights))) in
        expected.rows().zip(actual.rows()).enumerate()
    {
        let e_valid = check_row("expected", row, e_ids, e_weights, num_experts)?;
        let a_valid = check_row("actual", row, a_ids, a_weights, num_experts)?;
        if e_valid != a_valid {
            return Err(RoutingMismatch::Malformed {
                side: "actual",
                row,
                reason: format!(
                    "the row is {} but the expected row is {}",
                    validity(a_valid),
                    validity(e_valid)
                ),
                ids: a_ids.to_vec(),
                weights: a_weights.to_vec(),
            });
        }
        if !e_valid {
            summary.rows_invalid += 1;
            continue;
        }
        if skip.contains(&row) {
            summary.rows_skipped += 1;
            continue;
        }
        let e_set: BTreeSet<i32> = e_ids.iter().copied().collect();
        let a_set: BTreeSet<i32> = a_ids.iter().copied().collect();
        if e_set != a_set {
            return Err(RoutingMismatch::ExpertSet {
                row,
                expected_ids: e_ids.to_vec(),
                expected_weights: e_weights.to_vec(),
                actual_ids: a_ids.to_vec(),
                actual_weights: a_weights.to_vec(),
            });
        }
        for (&expert, &e_weight) in e_ids.iter().zip(e_weights) {
            let a_weight = a_ids
                .iter()
                .zip(a_weights)
                .find_map(|(&id, &w)| (id == expert).then_some(w))
                .unwrap_or(f32::NAN);
            if !tolerance.accepts(e_weight, a_weight) {
                return Err(RoutingMismatch::Weight {
                    row,
                    expert,
                    expected: e_weight,
                    actual: a_weight,
                    tolerance,
                });
            }
        }
        summary.rows_compared += 1;
    }
    Ok(summary)
}

fn validity(valid: bool) -> &'static str {
    if valid { "valid" } else { "marked invalid" }
}

/// Whether a well-formed row is valid (`true`) or marked invalid (`false`); an error if malformed.
fn check_row(
    side: &'static str,
    row: usize,
    ids: &[i32],
    weights: &[f32],
    num_experts: usize,
) -> Result<bool, RoutingMismatch> {
    let malformed = |reason: String| RoutingMismatch::Malformed {
        side,
        row,
        reason,
        ids: ids.to_vec(),
        weights: weights.to_vec(),
    };
    if ids.iter().all(|&id| id == -1) {
        return if weights.iter().all(|&w| w == 0.0) {
            Ok(false)
        } else {
            Err(malformed("an invalid row must have zero weights".to_owned()))
        };
    }
    if let Some(&id) =
        ids.iter().find(|&&id| usize::try_from(id).map_or(true, |e| e >= num_experts))
    {
        return Err(malformed(format!("id {id} is outside 0..{num_experts}")));
    }
    let distinct: BTreeSet<i32> = ids.iter().copied().collect();
    if distinct.len() != ids.len() {
        return Err(malformed("duplicate ids".to_owned()));
    }
    if let Some(&w) = weights.iter().find(|w| !w.is_finite()) {
        return Err(malformed(format!("weight {w} is not finite")));
    }
    Ok(true)
}

/// Checks the output order sluice promises: in every row, weights descending, equal weights by
/// increasing expert id. (Golden fixtures from transformers are not sorted; backends' outputs are.)
pub fn check_sorted(routing: &Routing) -> Result<(), RoutingMismatch> {
    for (row, (ids, weights)) in routing.rows().enumerate() {
        let in_order =
            ids.iter().zip(weights).zip(ids.iter().zip(weights).skip(1)).all(
                |((&id, &w), (&next_id, &next_w))| w > next_w || (w == next_w && id < next_id),
            );
        let invalid = ids.iter().all(|&id| id == -1);
        if !in_order && !invalid {
            return Err(RoutingMismatch::Order {
                row,
                ids: ids.to_vec(),
                weights: weights.to_vec(),
            });
        }
    }
    Ok(())
}

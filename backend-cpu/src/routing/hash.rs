//! Hash-routed selection: a token's experts are a row of the frozen table `tid2eid`, chosen by its
//! token id; their weights are their scores.
//!
//! For the element-wise scoring functions only the `K` chosen experts are scored (with the same
//! f64 functions the SIMD paths round like); softmax needs the whole row for its denominator.

use ndarray::ArrayView1;
use sluice_tensor::{BackendError, ExpectedShape, ScoringFunc, first_token_outside_table};

use super::RouteScratch;
use super::score;
use crate::kernel::Isa;

/// The token ids of a call, `[T]`, i32 or i64 as the caller has them.
#[derive(Debug, Clone, Copy)]
pub(crate) enum TokenIds<'a> {
    /// i32 ids.
    I32(ArrayView1<'a, i32>),
    /// i64 ids.
    I64(ArrayView1<'a, i64>),
}

impl TokenIds<'_> {
    fn len(&self) -> usize {
        match self {
            TokenIds::I32(ids) => ids.len(),
            TokenIds::I64(ids) => ids.len(),
        }
    }

    fn get(&self, row: usize) -> i64 {
        match self {
            TokenIds::I32(ids) => i64::from(ids[row]),
            TokenIds::I64(ids) => ids[row],
        }
    }
}

/// A checked table and the token ids of one call: every id names a row of the table.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HashSelection<'a> {
    /// `tid2eid`, `[vocab, K]` row-major, every row `K` distinct experts of `[0, E)`.
    table: &'a [i32],
    top_k: usize,
    token_ids: TokenIds<'a>,
}

impl<'a> HashSelection<'a> {
    /// Checks that there is one token id per row of the call, each naming a row of `table`
    /// (which [`check_hash_table`](sluice_tensor::check_hash_table) has passed).
    pub(crate) fn new(
        op: &'static str,
        table: &'a [i32],
        top_k: usize,
        token_ids: TokenIds<'a>,
        tokens: usize,
    ) -> Result<Self, BackendError> {
        if token_ids.len() != tokens {
            return Err(BackendError::Shape {
                op,
                arg: "token_ids",
                shape: vec![token_ids.len()],
                expected: ExpectedShape::exact(&[tokens]),
            });
        }
        let vocab = table.len() / top_k;
        let ids = (0..tokens).map(|row| token_ids.get(row));
        if let Some((row, id)) = first_token_outside_table(ids, vocab) {
            return Err(BackendError::TokenIdOutsideTable { op, row, id, vocab });
        }
        Ok(HashSelection { table, top_k, token_ids })
    }

    /// The experts of row `row` of the call: the table row of its token id.
    pub(super) fn experts_of(&self, row: usize) -> &'a [i32] {
        // In range: `new` checked every id of the call.
        let table_row = self.token_ids.get(row) as usize;
        &self.table[table_row * self.top_k..(table_row + 1) * self.top_k]
    }
}

/// The unnormalised weights of the chosen `experts` of one row: their scores.
pub(super) fn score_chosen(
    scoring: ScoringFunc,
    kernel: Isa,
    logits: &[f32],
    experts: &[i32],
    scratch: &mut RouteScratch,
    weights: &mut [f32],
) {
    // Experts are in [0, E): the table was checked against the spec.
    let logit = |expert: i32| logits[expert as usize];
    match scoring {
        ScoringFunc::Sigmoid => {
            for (w, &e) in weights.iter_mut().zip(experts) {
                *w = score::sigmoid(logit(e));
            }
        }
        ScoringFunc::SqrtSoftplus => {
            for (w, &e) in weights.iter_mut().zip(experts) {
                *w = score::sqrt_softplus(logit(e));
            }
        }
        ScoringFunc::Softmax => {
            let RouteScratch { scores, exps, .. } = scratch;
            score::softmax(kernel, logits, exps, scores);
            for (w, &e) in weights.iter_mut().zip(experts) {
                *w = scores[e as usize];
            }
        }
    }
}

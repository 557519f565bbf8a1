//! The reference routing of a hash-routed layer: experts from the table, weights from the scores.

use sluice_tensor::{RoutingSpec, TopkMethod, check_hash_table, first_token_outside_table};

use super::ranking::scores;
use super::router::{ReferenceError, Routing, check_inputs, route_rows, weigh};

/// Routes `tokens` rows of f32 logits `[T, E]` of a hash-routed layer: token `t` goes to the
/// experts of row `token_ids[t]` of `table` (`[vocab, top_k]` row-major); their weights are their
/// scores, renormalised and scaled as `spec` says, and the row is sorted by weight, then id.
///
/// The table is checked first (every id in `[0, E)`, none twice in a row), then the token ids
/// (one per row, each naming a row of the table); rows with non-finite logits follow the spec's
/// non-finite policy.
pub fn route_hashed(
    logits: &[f32],
    tokens: usize,
    table: &[i32],
    token_ids: &[i64],
    spec: &RoutingSpec,
) -> Result<Routing, ReferenceError> {
    let _span = tracing::debug_span!("reference_route_hashed", tokens, %spec).entered();
    check_inputs(logits, tokens, None, spec)?;
    if spec.method != TopkMethod::Hash {
        return Err(ReferenceError::NotHashed(spec.method));
    }
    let top_k = spec.top_k;
    let vocab = table.len() / top_k;
    check_hash_table(table, &[vocab, top_k], top_k, spec.num_experts)?;
    if token_ids.len() != tokens {
        return Err(ReferenceError::Length {
            what: "token_ids",
            len: token_ids.len(),
            expected: tokens,
            shape: format!("[{tokens}]"),
        });
    }
    if let Some((row, id)) = first_token_outside_table(token_ids.iter().copied(), vocab) {
        return Err(ReferenceError::TokenIdOutsideTable { row, id, vocab });
    }
    route_rows(logits, tokens, spec, |row, row_logits| {
        // In range: checked above.
        let table_row = token_ids[row] as usize;
        let chosen = table[table_row * top_k..(table_row + 1) * top_k].iter().map(|&e| e as usize);
        weigh(&scores(row_logits, spec.scoring), chosen, spec)
    })
}

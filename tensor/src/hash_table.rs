//! The frozen expert table of hash-routed layers (`tid2eid`, `[vocab, top_k]`) and the checks that
//! make indexing with it safe: every row names `top_k` distinct experts of `[0, E)`, and every token
//! id names a row.
//!
//! The checks live here, beside [`RoutingSpec`](crate::RoutingSpec), so that the loader (which
//! names the checkpoint tensor) and every backend (which must not trust its caller) apply the same
//! rule.

use thiserror::Error;

/// Why a hash table cannot route.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum HashTableError {
    /// The table is not `[vocab, top_k]`.
    #[error(
        "has shape {shape:?}, expected [vocab, {top_k}] (one row of top_k expert ids per token id)"
    )]
    Shape {
        /// The shape found.
        shape: Vec<usize>,
        /// `top_k` of the routing spec.
        top_k: usize,
    },
    /// A row names an expert that does not exist.
    #[error("row {row} (token id {row}) holds expert id {id}, outside [0, {experts})")]
    ExpertOutOfRange {
        /// The row, which is the token id it serves.
        row: usize,
        /// The id found.
        id: i64,
        /// `E`.
        experts: usize,
    },
    /// A row names one expert twice, which would route a token twice to it.
    #[error("row {row} (token id {row}) names expert {id} more than once")]
    RepeatedExpert {
        /// The row.
        row: usize,
        /// The repeated id.
        id: i64,
    },
}

/// Checks a row-major table of `rows x top_k` expert ids against `experts` experts: every id in
/// `[0, experts)`, no id twice in a row. Errors name the first bad row.
pub fn check_hash_table<I: Copy + Into<i64>>(
    table: &[I],
    shape: &[usize],
    top_k: usize,
    experts: usize,
) -> Result<(), HashTableError> {
    let shape_error = || HashTableError::Shape { shape: shape.to_vec(), top_k };
    let [rows, width] = *shape else { return Err(shape_error()) };
    if width != top_k || rows == 0 || rows.checked_mul(width) != Some(table.len()) {
        return Err(shape_error());
    }
    // One bit per expert, set while its row is checked and cleared after: O(vocab x top_k).
    let mut seen = vec![0u64; experts.div_ceil(64)];
    for (row, ids) in table.chunks_exact(top_k).enumerate() {
        for &id in ids {
            let id: i64 = id.into();
            let expert = usize::try_from(id)
                .ok()
                .filter(|&e| e < experts)
                .ok_or(HashTableError::ExpertOutOfRange { row, id, experts })?;
            let (word, bit) = (expert / 64, 1u64 << (expert % 64));
            if seen[word] & bit != 0 {
                return Err(HashTableError::RepeatedExpert { row, id });
            }
            seen[word] |= bit;
        }
        for &id in ids {
            // In range: checked above.
            seen[id.into() as usize / 64] = 0;
        }
    }
    Ok(())
}

/// The first token id (with its row in the batch) that names no row of a table of `vocab` rows.
pub fn first_token_outside_table(
    token_ids: impl IntoIterator<Item = i64>,
    vocab: usize,
) -> Option<(usize, i64)> {
    token_ids
        .into_iter()
        .enumerate()
        .find(|&(_, id)| !usize::try_from(id).is_ok_and(|row| row < vocab))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_table_passes() {
        let table: Vec<i32> = vec![0, 1, 2, 3, 2, 1, 7, 0, 5];
        assert_eq!(check_hash_table(&table, &[3, 3], 3, 8), Ok(()));
        let wide: Vec<i64> = (0..130).rev().collect();
        assert_eq!(check_hash_table(&wide, &[1, 130], 130, 130), Ok(()));
    }

    #[test]
    fn bad_tables_name_the_row() {
        let table: Vec<i32> = vec![0, 1, 2, 3, 8, 1];
        assert_eq!(
            check_hash_table(&table, &[2, 3], 3, 8),
            Err(HashTableError::ExpertOutOfRange { row: 1, id: 8, experts: 8 })
        );
        let table: Vec<i64> = vec![0, 1, 2, 3, -1, 1];
        assert_eq!(
            check_hash_table(&table, &[2, 3], 3, 8),
            Err(HashTableError::ExpertOutOfRange { row: 1, id: -1, experts: 8 })
        );
        // Experts 64 apart share a bit position in different words, and must not collide.
        let table: Vec<i32> = vec![0, 64, 5, 1, 2, 1];
        assert_eq!(
            check_hash_table(&table, &[2, 3], 3, 128),
            Err(HashTableError::RepeatedExpert { row: 1, id: 1 })
        );
        let message = check_hash_table(&[4i32, 4], &[1, 2], 2, 8).unwrap_err().to_string();
        assert!(message.contains("row 0") && message.contains('4'), "{message}");
    }

    #[test]
    fn shapes_that_are_not_vocab_by_top_k_are_refused() {
        let table = [0i32; 6];
        for shape in [&[2, 3][..], &[6], &[3, 2, 1], &[0, 2]] {
            let top_k = 2;
            assert!(
                matches!(
                    check_hash_table(&table, shape, top_k, 8),
                    Err(HashTableError::Shape { .. })
                ),
                "{shape:?}"
            );
        }
    }

    #[test]
    fn token_ids_outside_the_table_are_found() {
        assert_eq!(first_token_outside_table([0, 3, 1], 4), None);
        assert_eq!(first_token_outside_table([0, 4, -1], 4), Some((1, 4)));
        assert_eq!(first_token_outside_table([2, -1], 4), Some((1, -1)));
    }
}

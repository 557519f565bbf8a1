//! The hash table `tid2eid` of a hash-routed layer: read from a checkpoint (i32 or i64), checked
//! with [`check_hash_table`], held as i32; and the token ids a hash-routed layer is routed with.

use std::path::Path;

use sluice_tensor::{DType, RoutingSpec, Tensor, check_hash_table, first_token_outside_table};

use crate::checkpoint::Checkpoint;
use crate::error::ModelError;

/// Loads layer `layer`'s table `name`, which must be `[vocab, K]`.
pub(crate) fn load_hash_table(
    checkpoint: &Checkpoint,
    layer: usize,
    name: &str,
    vocab: usize,
    spec: &RoutingSpec,
) -> Result<Tensor, ModelError> {
    let dir = checkpoint.dir();
    if !checkpoint.contains(name)? {
        return Err(ModelError::MissingHashTable {
            dir: dir.to_path_buf(),
            layer,
            tensor: name.to_owned(),
        });
    }
    let stored = checkpoint.tensor(name)?;
    let expected = [vocab, spec.top_k];
    if stored.shape() != expected {
        return Err(ModelError::GateShape {
            dir: dir.to_path_buf(),
            tensor: name.to_owned(),
            shape: stored.shape().to_vec(),
            expected: expected.to_vec(),
        });
    }
    hash_table_tensor(dir, name, &stored, spec)
}

/// The table as i32 `[vocab, K]`, after checking that every row names `K` distinct experts.
pub(crate) fn hash_table_tensor(
    dir: &Path,
    name: &str,
    table: &Tensor,
    spec: &RoutingSpec,
) -> Result<Tensor, ModelError> {
    let refused =
        |source| ModelError::HashTable { dir: dir.to_path_buf(), tensor: name.to_owned(), source };
    let (shape, top_k, experts) = (table.shape(), spec.top_k, spec.num_experts);
    let ids: Vec<i32> = match table.dtype() {
        DType::I32 => {
            let ids = table.to_vec::<i32>()?;
            check_hash_table(&ids, shape, top_k, experts).map_err(refused)?;
            ids
        }
        DType::I64 => {
            let ids = table.to_vec::<i64>()?;
            check_hash_table(&ids, shape, top_k, experts).map_err(refused)?;
            // Every id is in [0, E), and E fits i32 (validated specs have fewer experts than
            // that): the narrowing is exact.
            ids.into_iter().map(|id| id as i32).collect()
        }
        dtype => {
            return Err(ModelError::GateDType {
                dir: dir.to_path_buf(),
                tensor: name.to_owned(),
                dtype,
                supported: "i32, i64",
            });
        }
    };
    Ok(Tensor::from_vec(ids, shape)?)
}

/// Checks the token ids of `tokens` hidden-state rows: i32 or i64 `[T]`, each naming a row of the
/// layer's table where its size (`vocab`) is known here.
pub(crate) fn check_token_ids(
    layer: usize,
    tokens: usize,
    vocab: Option<usize>,
    token_ids: &Tensor,
) -> Result<(), ModelError> {
    let ids: Vec<i64> = match (token_ids.dtype(), token_ids.shape()) {
        (DType::I32, &[n]) if n == tokens => {
            token_ids.to_vec::<i32>()?.into_iter().map(i64::from).collect()
        }
        (DType::I64, &[n]) if n == tokens => token_ids.to_vec::<i64>()?,
        (dtype, shape) => {
            return Err(ModelError::TokenIds { layer, dtype, shape: shape.to_vec(), tokens });
        }
    };
    let Some(vocab) = vocab else { return Ok(()) };
    match first_token_outside_table(ids, vocab) {
        Some((row, id)) => Err(ModelError::TokenIdOutsideTable { layer, row, id, vocab }),
        None => Ok(()),
    }
}

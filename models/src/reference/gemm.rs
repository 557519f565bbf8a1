//! The reference router GEMM.

use super::router::{ReferenceError, checked_len};

/// Router logits `x[T, H] · W[E, H]ᵀ` as f32 `[T, E]` row-major.
///
/// Elements may be f32, [`half::bf16`] or [`half::f16`] (anything that converts to f64 exactly).
/// Every product is exact in f64; the sum is accumulated in f64 and each logit rounded once to f32,
/// so the result is as close to the exact dot product as an f32 can be, up to f64 summation error.
pub fn router_logits<X, W>(
    hidden: &[X],
    weight: &[W],
    tokens: usize,
    hidden_size: usize,
    num_experts: usize,
) -> Result<Vec<f32>, ReferenceError>
where
    X: Copy + Into<f64>,
    W: Copy + Into<f64>,
{
    let _span =
        tracing::debug_span!("reference_router_gemm", tokens, hidden_size, num_experts).entered();
    for (what, slice_len, rows) in
        [("hidden", hidden.len(), tokens), ("weight", weight.len(), num_experts)]
    {
        let expected = checked_len(what, rows, hidden_size)?;
        if slice_len != expected {
            return Err(ReferenceError::Length {
                what,
                len: slice_len,
                expected,
                shape: format!("[{rows}, {hidden_size}]"),
            });
        }
    }
    checked_len("logits", tokens, num_experts)?;
    if hidden_size == 0 {
        return Ok(vec![0.0; tokens * num_experts]);
    }
    let logits = hidden
        .chunks_exact(hidden_size)
        .flat_map(|x| {
            weight.chunks_exact(hidden_size).map(move |w| {
                let dot: f64 = x.iter().zip(w).map(|(&a, &b)| a.into() * b.into()).sum();
                dot as f32
            })
        })
        .collect();
    Ok(logits)
}

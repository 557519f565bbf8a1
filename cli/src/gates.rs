//! Which MoE gates a checkpoint holds. Every command that reads a whole checkpoint asks here, so a
//! partial checkpoint (the gates of some layers only) is read the same way by all of them: a gate
//! that is absent under every name it may have is *missing*; anything else that is wrong with it
//! (a malformed file, a wrong shape or dtype, a missing correction bias) is an error.

use std::path::Path;

use sluice_models::{Checkpoint, ModelError, MoeGate};

use crate::error::CliError;

/// An MoE layer whose gate the checkpoint does not hold.
#[derive(Debug, Clone)]
pub struct MissingGate {
    /// The decoder layer.
    pub layer: usize,
    /// The weight names looked for.
    pub looked_for: Vec<String>,
}

/// The gates of the MoE layers asked about: loaded (zero-copy, nothing read yet), or missing.
#[derive(Debug)]
pub struct Gates {
    /// The gates the checkpoint holds, in layer order.
    pub present: Vec<MoeGate>,
    /// The layers whose gates it does not hold, in layer order.
    pub missing: Vec<MissingGate>,
}

impl Gates {
    /// Loads the gate of each of `layers` (which must be MoE layers) that the checkpoint holds.
    pub fn load(
        checkpoint: &Checkpoint,
        layers: impl IntoIterator<Item = usize>,
    ) -> Result<Self, CliError> {
        let mut gates = Gates { present: Vec::new(), missing: Vec::new() };
        for layer in layers {
            match MoeGate::load(checkpoint, layer) {
                Ok(gate) => gates.present.push(gate),
                Err(ModelError::MissingGate { tried, .. }) => {
                    gates.missing.push(MissingGate { layer, looked_for: tried });
                }
                Err(other) => return Err(other.into()),
            }
        }
        Ok(gates)
    }

    /// Loads the gate of every MoE layer that the checkpoint holds.
    pub fn load_all(checkpoint: &Checkpoint) -> Result<Self, CliError> {
        Self::load(checkpoint, checkpoint.config().moe_layers())
    }

    /// The layers of the missing gates, in words: `layer 4`, `layers 4-57, 60`.
    pub fn missing_layers(&self) -> String {
        let layers: Vec<usize> = self.missing.iter().map(|m| m.layer).collect();
        let noun = if layers.len() == 1 { "layer" } else { "layers" };
        format!("{noun} {}", ranges(&layers))
    }

    /// The present gates, or an error listing the missing ones and saying what to do instead
    /// (`alternative`, e.g. "pass --skip-missing to route the layers that are present").
    pub fn require_all(self, dir: &Path, alternative: &str) -> Result<Vec<MoeGate>, CliError> {
        let Some(first) = self.missing.first() else { return Ok(self.present) };
        Err(CliError::Input(format!(
            "{}: {} of {} MoE gates are missing ({}; for layer {} looked for {}); {alternative}",
            dir.display(),
            self.missing.len(),
            self.missing.len() + self.present.len(),
            self.missing_layers(),
            first.layer,
            first.looked_for.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(" or "),
        )))
    }
}

/// `1, 2, 3, 5, 7, 8` as `1-3, 5, 7-8`.
pub fn ranges(values: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < values.len() {
        let start = values[i];
        let mut end = start;
        while i + 1 < values.len() && values[i + 1] == end + 1 {
            end += 1;
            i += 1;
        }
        parts.push(if start == end { start.to_string() } else { format!("{start}-{end}") });
        i += 1;
    }
    if parts.is_empty() { "none".to_owned() } else { parts.join(", ") }
}

#[cfg(test)]
mod tests {
    #[test]
    fn layer_ranges_are_compressed() {
        assert_eq!(super::ranges(&[1, 2, 3, 5, 7, 8]), "1-3, 5, 7-8");
        assert_eq!(super::ranges(&[4]), "4");
        assert_eq!(super::ranges(&[]), "none");
    }
}

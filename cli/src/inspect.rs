//! `sluice inspect <DIR>`: what a checkpoint holds, as far as routing is concerned.

use std::path::PathBuf;

use clap::Args;
use sluice_models::{Checkpoint, MoeGate};
use sluice_tensor::Tensor;

use crate::error::CliError;

/// Arguments of `sluice inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A Hugging Face checkpoint folder (config.json + safetensors).
    pub dir: PathBuf,
}

/// Prints the family, the MoE layers, each gate's shapes and dtypes, and the routing config.
pub fn run(args: &InspectArgs) -> Result<(), CliError> {
    let checkpoint = Checkpoint::open(&args.dir)?;
    let config = checkpoint.config();
    let gates = MoeGate::load_all(&checkpoint)?;
    let mut files: Vec<String> = checkpoint
        .files()
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    files.sort();
    let layers: Vec<usize> = config.moe_layers().collect();

    println!("checkpoint  {}", args.dir.display());
    println!(
        "family      {} (model_type \"{}\"{})",
        config.family(),
        config.model_type(),
        if config.has_nested_text_config() { ", fields under text_config" } else { "" }
    );
    println!("files       {}", files.join(", "));
    println!("hidden      {}", config.hidden_size());
    println!("layers      {} ({} MoE: {})", config.num_layers(), layers.len(), ranges(&layers));
    println!("routing     {}", config.routing());
    println!("gates");
    for gate in &gates {
        let bias = gate.bias().map(describe).unwrap_or_else(|| "none".to_owned());
        println!("  layer {:>3}  weight {}  bias {}", gate.layer(), describe(gate.weight()), bias);
    }
    Ok(())
}

fn describe(tensor: &Tensor) -> String {
    format!("{} {:?}", tensor.dtype(), tensor.shape())
}

/// `1, 2, 3, 5, 7, 8` as `1-3, 5, 7-8`.
fn ranges(values: &[usize]) -> String {
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

//! `sluice inspect <DIR>`: what a checkpoint holds, as far as routing is concerned.

use std::path::PathBuf;

use clap::Args;
use sluice_models::{Checkpoint, MoeGate};
use sluice_tensor::Tensor;

use crate::error::CliError;
use crate::gates::ranges;

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

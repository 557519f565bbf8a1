//! `sluice inspect <DIR>`: what a checkpoint holds, as far as routing is concerned, including
//! partial checkpoints that hold the gates of some MoE layers only.

use std::path::PathBuf;

use clap::Args;
use serde_json::{Value, json};
use sluice_models::Checkpoint;
use sluice_tensor::Tensor;

use crate::error::CliError;
use crate::gates::{Gates, ranges};

/// Arguments of `sluice inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A Hugging Face checkpoint folder (config.json + safetensors).
    pub dir: PathBuf,
    /// Print JSON instead of text, for scripts.
    #[arg(long)]
    pub json: bool,
}

/// Prints the family, the MoE layers, each gate's shapes and dtypes (or the names looked for where
/// the gate is missing), the routing config, and how many gates are present. Missing gates are
/// reported, not refused; broken files and gates are.
pub fn run(args: &InspectArgs) -> Result<(), CliError> {
    let checkpoint = Checkpoint::open(&args.dir)?;
    let config = checkpoint.config();
    let gates = Gates::load_all(&checkpoint)?;
    let mut files: Vec<String> = checkpoint
        .files()
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    files.sort();
    let layers: Vec<usize> = config.moe_layers().collect();
    let hashed: Vec<usize> = layers.iter().copied().filter(|&l| config.is_hash_layer(l)).collect();
    let summary = format!("{} of {} MoE gates present", gates.present.len(), layers.len());

    if args.json {
        let mut entries: Vec<(usize, Value)> = gates
            .present
            .iter()
            .map(|gate| {
                let entry = json!({
                    "layer": gate.layer(),
                    "present": true,
                    "weight": describe_json(gate.weight()),
                    "bias": gate.bias().map(describe_json),
                    "hash_table": gate.hash_table().map(describe_json),
                });
                (gate.layer(), entry)
            })
            .chain(gates.missing.iter().map(|missing| {
                let entry = json!({
                    "layer": missing.layer,
                    "present": false,
                    "looked_for": missing.looked_for,
                });
                (missing.layer, entry)
            }))
            .collect();
        entries.sort_by_key(|(layer, _)| *layer);
        let document = json!({
            "checkpoint": args.dir.display().to_string(),
            "family": config.family().name(),
            "model_type": config.model_type(),
            "fields_under_text_config": config.has_nested_text_config(),
            "files": files,
            "hidden_size": config.hidden_size(),
            "num_layers": config.num_layers(),
            "moe_layers": layers,
            "hash_layers": hashed,
            "routing": config.routing().to_string(),
            "gates": entries.into_iter().map(|(_, entry)| entry).collect::<Vec<_>>(),
            "gates_present": gates.present.len(),
            "summary": summary,
        });
        let text = serde_json::to_string_pretty(&document)
            .map_err(|e| CliError::Input(format!("cannot encode the description: {e}")))?;
        println!("{text}");
        return Ok(());
    }

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
    if !hashed.is_empty() {
        println!(
            "hash        {} layers route by token id: {} (tables of {} token ids)",
            hashed.len(),
            ranges(&hashed),
            config.vocab_size().unwrap_or_default()
        );
    }
    println!("routing     {}", config.routing());
    println!("gates");
    let mut lines: Vec<(usize, String)> = gates
        .present
        .iter()
        .map(|gate| {
            let (selection, tensor) = match (gate.hash_table(), gate.bias()) {
                (Some(table), _) => ("hash table", describe(table)),
                (None, Some(bias)) => ("bias", describe(bias)),
                (None, None) => ("bias", "none".to_owned()),
            };
            (gate.layer(), format!("weight {}  {selection} {tensor}", describe(gate.weight())))
        })
        .chain(gates.missing.iter().map(|missing| {
            (missing.layer, format!("missing (looked for {})", missing.looked_for.join(", ")))
        }))
        .collect();
    lines.sort_by_key(|(layer, _)| *layer);
    for (layer, line) in lines {
        println!("  layer {layer:>3}  {line}");
    }
    println!("{summary}");
    Ok(())
}

fn describe(tensor: &Tensor) -> String {
    format!("{} {:?}", tensor.dtype(), tensor.shape())
}

fn describe_json(tensor: &Tensor) -> Value {
    json!({ "dtype": tensor.dtype().name(), "shape": tensor.shape() })
}

//! `sluice info`: which backends this build has, and for each whether it can run here or why not.

use clap::Args;
use serde_json::{Value, json};
use sluice_backend_cpu::CpuBackend;
use sluice_backend_cuda::CudaBackend;
use sluice_backend_rocm::RocmInfo;

use crate::error::CliError;

/// Arguments of `sluice info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Prints the report.
pub fn run(args: &InfoArgs) -> Result<(), CliError> {
    let report = json!({ "backends": [cpu(), cuda(), rocm(&sluice_backend_rocm::probe())] });
    if args.json {
        println!("{report:#}");
    } else {
        print!("{}", text(&report));
    }
    Ok(())
}

fn cpu() -> Value {
    match CpuBackend::new() {
        Ok(backend) => json!({
            "name": "cpu",
            "available": true,
            "kernel": format!("{:?}", backend.kernel()),
            "threads": backend.threads(),
        }),
        Err(error) => json!({ "name": "cpu", "available": false, "why_not": error.to_string() }),
    }
}

fn cuda() -> Value {
    match CudaBackend::new(0) {
        Ok(backend) => {
            let (major, minor) = backend.compute_capability();
            json!({
                "name": "cuda",
                "available": true,
                "compute_capability": format!("{major}.{minor}"),
                "multiprocessors": backend.multiprocessors(),
            })
        }
        Err(error) => json!({ "name": "cuda", "available": false, "why_not": error.to_string() }),
    }
}

fn rocm(info: &RocmInfo) -> Value {
    let mut report = json!({
        "name": "rocm",
        "available": info.why_unavailable().is_none(),
        "compiler": info.compiler,
        "architectures": info.architectures,
        "routing_configs": info.configs,
        "kernels": info.kernels,
    });
    if let Some(error) = info.why_unavailable() {
        report["why_not"] = json!(error.to_string());
    }
    match &info.runtime {
        Ok((library, version)) => {
            report["hip_runtime"] = json!({ "library": library, "version": version });
        }
        Err(error) => report["hip_runtime"] = json!({ "error": error.to_string() }),
    }
    if let Some(Ok(devices)) = &info.devices {
        report["devices"] = json!(devices);
    }
    report
}

/// The report as aligned text: one line per backend, then its details indented.
fn text(report: &Value) -> String {
    let mut out = String::new();
    for backend in report["backends"].as_array().into_iter().flatten() {
        let name = backend["name"].as_str().unwrap_or_default();
        let verdict = match backend["why_not"].as_str() {
            Some(why) => format!("unavailable: {why}"),
            None => "available".to_owned(),
        };
        out.push_str(&format!("{name:<5} {verdict}\n"));
        for (key, value) in backend.as_object().into_iter().flatten() {
            if ["name", "available", "why_not"].contains(&key.as_str()) {
                continue;
            }
            out.push_str(&format!("      {key}: {}\n", flat(value)));
        }
    }
    out
}

/// A JSON value on one line, without quotes around strings.
fn flat(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "none".to_owned(),
        Value::Array(items) => items.iter().map(flat).collect::<Vec<_>>().join(", "),
        Value::Object(fields) => {
            fields.iter().map(|(k, v)| format!("{k} {}", flat(v))).collect::<Vec<_>>().join(", ")
        }
        other => other.to_string(),
    }
}

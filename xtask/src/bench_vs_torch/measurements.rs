//! The numbers of all rounds: read from the JSON files both benchmarks write, kept per cell, and
//! summarised as the lowest per-round median (the anchor's own rule for its rounds).

use std::collections::BTreeMap;
use std::path::Path;

use super::options::{InputDType, Model};
use crate::json::{self, Value};

/// The anchor column compared with sluice's bf16-input gate.
pub const TORCH_BF16_GATE: &str = "gate_best";
/// The anchor column compared with sluice's f32-input gate.
pub const TORCH_F32_GATE: &str = "gate_hf";
/// The stand-in for `gate_hf` when the anchor ran without transformers (GEMM only).
pub const TORCH_F32_GEMM: &str = "lin_f32";

/// Every per-round median, in milliseconds per call.
#[derive(Debug, Default)]
pub struct Measurements {
    /// (model name, dtype, T) -> one median per round.
    sluice: BTreeMap<(&'static str, InputDType, usize), Vec<f64>>,
    /// (anchor shape, T, column) -> one median per round.
    torch: BTreeMap<(String, usize, String), Vec<f64>>,
    /// The `meta` object of each `sluice bench` run that wrote one (its timing budget), in run
    /// order.
    pub sluice_metas: Vec<Value>,
    /// The `meta` object of each anchor run (versions, quiet-machine figures), in run order.
    pub anchor_metas: Vec<Value>,
}

impl Measurements {
    /// Adds one `sluice bench --json` file: `{"results": [{"model", "tokens", "dtype", "backend",
    /// "median_ms", ...}]}`. Every T in `tokens` must be there for `model` and `dtype` on the cpu
    /// backend.
    pub fn add_sluice(
        &mut self,
        path: &Path,
        model: &'static Model,
        dtype: InputDType,
        tokens: &[usize],
    ) -> Result<(), String> {
        let document = read(path)?;
        let results = document
            .get("results")
            .and_then(Value::as_array)
            .ok_or_else(|| format!("{}: no `results` array", path.display()))?;
        for &t in tokens {
            let entry = results.iter().find(|r| {
                r.get("model").and_then(Value::as_str) == Some(model.name)
                    && r.get("dtype").and_then(Value::as_str) == Some(dtype.name())
                    && r.get("tokens").and_then(Value::as_f64) == Some(t as f64)
                    && r.get("backend").and_then(Value::as_str).is_none_or(|b| b == "cpu")
            });
            let median_ms = entry
                .and_then(|e| e.get("median_ms"))
                .and_then(Value::as_f64)
                .filter(|ms| ms.is_finite() && *ms > 0.0)
                .ok_or_else(|| {
                    format!(
                        "{}: no positive `median_ms` for model {}, dtype {}, tokens {t}",
                        path.display(),
                        model.name,
                        dtype.name()
                    )
                })?;
            self.sluice.entry((model.name, dtype, t)).or_default().push(median_ms);
        }
        if let Some(meta) = document.get("meta") {
            self.sluice_metas.push(meta.clone());
        }
        Ok(())
    }

    /// Adds one anchor `--json` file: `{"meta": {...}, "results": {shape: {"T": {column: ms}}}}`.
    /// Every shape in `shapes` and T in `tokens` must be there; columns are taken as found.
    pub fn add_torch(
        &mut self,
        path: &Path,
        shapes: &[&str],
        tokens: &[usize],
    ) -> Result<(), String> {
        let document = read(path)?;
        for &shape in shapes {
            for &t in tokens {
                let columns = document
                    .get("results")
                    .and_then(|r| r.get(shape))
                    .and_then(|s| s.get(&t.to_string()))
                    .and_then(Value::as_object)
                    .ok_or_else(|| {
                        format!("{}: no results for shape {shape}, T = {t}", path.display())
                    })?;
                for (column, value) in columns {
                    let ms = value.as_f64().filter(|ms| ms.is_finite() && *ms > 0.0).ok_or_else(
                        || format!("{}: {shape} T = {t} {column}: not a time", path.display()),
                    )?;
                    self.torch.entry((shape.to_owned(), t, column.clone())).or_default().push(ms);
                }
            }
        }
        if let Some(meta) = document.get("meta") {
            self.anchor_metas.push(meta.clone());
        }
        Ok(())
    }

    /// sluice's best time for a cell: the lowest per-round median.
    pub fn sluice_ms(&self, model: &Model, dtype: InputDType, tokens: usize) -> Option<f64> {
        self.sluice.get(&(model.name, dtype, tokens)).and_then(|rounds| lowest(rounds))
    }

    /// The anchor's best time for a cell and column: the lowest per-round median.
    pub fn torch_ms(&self, shape: &str, tokens: usize, column: &str) -> Option<f64> {
        self.torch.get(&(shape.to_owned(), tokens, column.to_owned())).and_then(|r| lowest(r))
    }

    /// The largest max/min ratio of per-round medians over sluice's and the anchor's cells:
    /// how much the rounds disagreed (1.0 with one round).
    pub fn worst_spread(&self) -> (f64, f64) {
        (worst_spread(self.sluice.values()), worst_spread(self.torch.values()))
    }
}

fn read(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    json::parse(&text).map_err(|e| format!("{}: not JSON: {e}", path.display()))
}

fn lowest(rounds: &[f64]) -> Option<f64> {
    rounds.iter().copied().reduce(f64::min)
}

fn worst_spread<'a>(cells: impl Iterator<Item = &'a Vec<f64>>) -> f64 {
    cells
        .filter_map(|rounds| {
            let low = lowest(rounds)?;
            let high = rounds.iter().copied().reduce(f64::max)?;
            Some(high / low)
        })
        .fold(1.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::super::options::MODELS;
    use super::super::test_file::TempFile;
    use super::*;

    const V3: &Model = &MODELS[0];

    fn sluice_json(rows: &[(&str, usize, &str, f64)]) -> String {
        let rows: Vec<String> = rows
            .iter()
            .map(|(model, tokens, dtype, ms)| {
                format!(
                    r#"{{"model": "{model}", "tokens": {tokens}, "dtype": "{dtype}",
                        "backend": "cpu", "median_ms": {ms}, "gflops": 1.0}}"#
                )
            })
            .collect();
        format!(r#"{{"results": [{}], "meta": {{"min_calls": 20}}}}"#, rows.join(","))
    }

    #[test]
    fn sluice_rounds_keep_the_lowest_median() {
        let mut m = Measurements::default();
        let round1 = sluice_json(&[("v3", 1, "bf16", 0.02), ("v3", 8, "bf16", 0.09)]);
        let round2 = sluice_json(&[
            ("v3", 8, "bf16", 0.07),
            ("v3", 1, "bf16", 0.03),
            ("kimi-k2", 1, "bf16", 0.001),
        ]);
        let a = TempFile::new("r1.json", &round1);
        let b = TempFile::new("r2.json", &round2);
        m.add_sluice(a.path(), V3, InputDType::Bf16, &[1, 8]).expect("round 1");
        m.add_sluice(b.path(), V3, InputDType::Bf16, &[1, 8]).expect("round 2");
        assert_eq!(m.sluice_ms(V3, InputDType::Bf16, 1), Some(0.02));
        assert_eq!(m.sluice_ms(V3, InputDType::Bf16, 8), Some(0.07));
        assert_eq!(m.sluice_ms(V3, InputDType::F32, 8), None);
        assert_eq!(m.sluice_metas.len(), 2);
        assert_eq!(m.sluice_metas[0].get("min_calls").and_then(Value::as_f64), Some(20.0));
        let (sluice_spread, torch_spread) = m.worst_spread();
        assert!((sluice_spread - 1.5).abs() < 1e-12, "{sluice_spread}");
        assert_eq!(torch_spread, 1.0);
    }

    #[test]
    fn sluice_file_missing_a_cell_is_an_error() {
        let file = TempFile::new("missing.json", &sluice_json(&[("v3", 1, "f32", 0.02)]));
        let mut m = Measurements::default();
        let error = m.add_sluice(file.path(), V3, InputDType::Bf16, &[1]).unwrap_err();
        assert!(
            error.ends_with("no positive `median_ms` for model v3, dtype bf16, tokens 1"),
            "{error}"
        );
        let broken = TempFile::new("broken.json", "{\"results\": [");
        let error = m.add_sluice(broken.path(), V3, InputDType::Bf16, &[1]).unwrap_err();
        assert!(error.contains("not JSON: line 1"), "{error}");
        let wrong_backend = sluice_json(&[("v3", 1, "bf16", 0.02)]).replace("cpu", "cuda");
        let file = TempFile::new("cuda.json", &wrong_backend);
        assert!(m.add_sluice(file.path(), V3, InputDType::Bf16, &[1]).is_err());
    }

    #[test]
    fn anchor_file_as_the_anchor_writes_it() {
        let text = r#"{"script": "torch_gate_cpu.py", "unit": "ms",
            "meta": {"torch": "2.15.0", "worst_foreign_cpu_share": 0.01, "quiet_at_start": null},
            "results": {"v3": {"1": {"lin_f32": 0.11, "gate_best": 0.06, "gate_hf": 0.17},
                               "8": {"lin_f32": 0.49, "gate_best": 0.2, "gate_hf": 0.57}}},
            "per_round_medians": {"v3": {"1": {"lin_f32": [0.11]}}}}"#;
        let file = TempFile::new("anchor.json", text);
        let mut m = Measurements::default();
        m.add_torch(file.path(), &["v3"], &[1, 8]).expect("round 1");
        m.add_torch(file.path(), &["v3"], &[1]).expect("round 2");
        assert_eq!(m.torch_ms("v3", 1, TORCH_BF16_GATE), Some(0.06));
        assert_eq!(m.torch_ms("v3", 8, TORCH_F32_GATE), Some(0.57));
        assert_eq!(m.torch_ms("kimi", 1, TORCH_F32_GATE), None);
        assert_eq!(m.anchor_metas.len(), 2);
        let meta = &m.anchor_metas[1];
        assert_eq!(meta.get("torch").and_then(Value::as_str), Some("2.15.0"));
        let error = m.add_torch(file.path(), &["v3", "kimi"], &[1]).unwrap_err();
        assert!(error.ends_with("no results for shape kimi, T = 1"), "{error}");
        let error = m.add_torch(file.path(), &["v3"], &[64]).unwrap_err();
        assert!(error.ends_with("no results for shape v3, T = 64"), "{error}");
    }
}

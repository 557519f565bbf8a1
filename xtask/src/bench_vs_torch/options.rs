//! The command line of `cargo xtask bench-vs-torch`, the models it knows and the targets.

use std::path::PathBuf;
use std::time::Duration;

/// A router shape `sluice bench` can time.
#[derive(Debug, PartialEq)]
pub struct Model {
    /// The name `sluice bench --model` takes and writes into its JSON.
    pub name: &'static str,
    /// The name for people.
    pub title: &'static str,
    /// The anchor's `--shapes` key, where the anchor has this shape.
    pub anchor_shape: Option<&'static str>,
    /// Hidden size H (GEMM depth).
    pub hidden: usize,
    /// Routed experts E (GEMM width).
    pub experts: usize,
    /// Whether the project sets speed targets for it (V3 and Kimi-K2 only).
    pub has_targets: bool,
}

impl Model {
    /// GEMM flops of one gate call with `tokens` rows: 2 * T * H * E.
    pub fn gemm_flops(&self, tokens: usize) -> f64 {
        2.0 * tokens as f64 * self.hidden as f64 * self.experts as f64
    }
}

/// Every model, in report order.
pub const MODELS: &[Model] = &[
    Model {
        name: "v3",
        title: "DeepSeek-V3",
        anchor_shape: Some("v3"),
        hidden: 7168,
        experts: 256,
        has_targets: true,
    },
    Model {
        name: "kimi-k2",
        title: "Kimi-K2",
        anchor_shape: Some("kimi"),
        hidden: 7168,
        experts: 384,
        has_targets: true,
    },
    Model {
        name: "v2",
        title: "DeepSeek-V2",
        anchor_shape: None,
        hidden: 5120,
        experts: 160,
        has_targets: false,
    },
    Model {
        name: "v2-lite",
        title: "DeepSeek-V2-Lite",
        anchor_shape: Some("v2lite"),
        hidden: 2048,
        experts: 64,
        has_targets: false,
    },
    Model {
        name: "v4",
        title: "DeepSeek-V4",
        anchor_shape: Some("v4"),
        hidden: 4096,
        experts: 256,
        has_targets: false,
    },
];

/// The input dtype of a gate call (the weight is bf16 either way, as in real checkpoints).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum InputDType {
    /// bf16 input: compared with the anchor's "torch best gate" (bf16 GEMM + routing).
    Bf16,
    /// f32 input: compared with the HF router on f32 (f32 GEMM + routing).
    F32,
}

impl InputDType {
    /// The name `sluice bench --dtype` takes.
    pub fn name(self) -> &'static str {
        match self {
            InputDType::Bf16 => "bf16",
            InputDType::F32 => "f32",
        }
    }

    /// How many times faster than the anchor sluice should be at `tokens` (the project's targets:
    /// bf16 3x at T = 1, 1.5x at T = 8 and 64, 1x at T = 512 and 2048; f32 1x at every T).
    /// `None` where the project sets none.
    pub fn target_speedup(self, tokens: usize) -> Option<f64> {
        match (self, tokens) {
            (InputDType::F32, _) => Some(1.0),
            (InputDType::Bf16, 1) => Some(3.0),
            (InputDType::Bf16, 8 | 64) => Some(1.5),
            (InputDType::Bf16, 512 | 2048) => Some(1.0),
            (InputDType::Bf16, _) => None,
        }
    }
}

/// Parsed `bench-vs-torch` arguments.
#[derive(Debug, PartialEq)]
pub struct Options {
    /// Token counts T.
    pub tokens: Vec<usize>,
    /// Models, in the order given.
    pub models: Vec<&'static Model>,
    /// Input dtypes, in the order given.
    pub dtypes: Vec<InputDType>,
    /// Threads on both sides.
    pub threads: usize,
    /// Interleaved rounds; each cell keeps its lowest per-round median.
    pub rounds: usize,
    /// Fewer calls per median in the anchor (a smoke test).
    pub quick: bool,
    /// The longest wait for a quiet machine before each round (also passed to the anchor).
    pub max_wait: Duration,
    /// Where the report and the raw JSON files go, relative to the project root unless absolute.
    pub out: PathBuf,
    /// A prebuilt `sluice` to time instead of building `sluice-cli` in release.
    pub sluice_bin: Option<PathBuf>,
}

/// The usage text of this task, also shown in `cargo xtask --help`.
pub const USAGE: &str =
    "  bench-vs-torch [--tokens 1,8,64,512,2048] [--models v3,kimi-k2] [--dtypes bf16,f32]
                 [--threads N] [--rounds 3] [--quick] [--max-wait 900] [--out target/bench]
                 [--sluice-bin PATH]
            time `sluice bench` and the PyTorch CPU anchor (xtask/anchors/torch_gate_cpu.py) in
            interleaved rounds on this machine; print per model and T both times, the ratio and
            the target; write target/bench/bench-vs-torch.md and the raw JSON files
            (models: v3 kimi-k2 v2 v2-lite v4; threads default: nproc; max-wait in seconds, 0 = none;
            paths relative to the project root; --sluice-bin skips the release build; Python as
            for fixtures, packages from xtask/anchors/requirements.txt)
";

impl Options {
    /// Parses the arguments after the task name; `nproc` is the default thread count.
    pub fn parse(args: &[String], nproc: usize) -> Result<Options, String> {
        let mut options = Options {
            tokens: vec![1, 8, 64, 512, 2048],
            models: vec![&MODELS[0], &MODELS[1]],
            dtypes: vec![InputDType::Bf16, InputDType::F32],
            threads: nproc.max(1),
            rounds: 3,
            quick: false,
            max_wait: Duration::from_secs(900),
            out: PathBuf::from("target/bench"),
            sluice_bin: None,
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let (flag, inline_value) = match arg.split_once('=') {
                Some((flag, value)) if flag.starts_with("--") => (flag, Some(value.to_owned())),
                _ => (arg.as_str(), None),
            };
            // The value is taken only by the flags that have one, so `--quick` never eats the
            // next argument and an unknown flag is reported as such.
            let mut value = || {
                inline_value
                    .clone()
                    .or_else(|| args.next().cloned())
                    .ok_or_else(|| format!("{flag} needs a value"))
            };
            match flag {
                "--quick" => options.quick = true,
                "--tokens" => {
                    options.tokens =
                        list(&value()?, |t| t.parse().ok().filter(|&t: &usize| t >= 1))
                            .map_err(|bad| format!("--tokens: not a token count >= 1: `{bad}`"))?;
                }
                "--models" => {
                    options.models =
                        list(&value()?, |m| MODELS.iter().find(|model| model.name == m)).map_err(
                            |bad| {
                                format!(
                                    "--models: unknown model `{bad}` (v3, kimi-k2, v2, v2-lite, v4)"
                                )
                            },
                        )?;
                }
                "--dtypes" => {
                    options.dtypes = list(&value()?, |d| match d {
                        "bf16" => Some(InputDType::Bf16),
                        "f32" => Some(InputDType::F32),
                        _ => None,
                    })
                    .map_err(|bad| format!("--dtypes: unknown dtype `{bad}` (bf16, f32)"))?;
                }
                "--threads" => options.threads = positive(flag, &value()?)?,
                "--rounds" => options.rounds = positive(flag, &value()?)?,
                "--max-wait" => {
                    let value = value()?;
                    let seconds: u64 = value
                        .parse()
                        .map_err(|_| format!("--max-wait: not a number of seconds: `{value}`"))?;
                    options.max_wait = Duration::from_secs(seconds);
                }
                "--out" => options.out = PathBuf::from(value()?),
                "--sluice-bin" => options.sluice_bin = Some(PathBuf::from(value()?)),
                other => return Err(format!("bench-vs-torch: unknown flag `{other}`")),
            }
        }
        Ok(options)
    }

    /// The anchor's `--shapes` keys of the chosen models that it has.
    pub fn anchor_shapes(&self) -> Vec<&'static str> {
        self.models.iter().filter_map(|m| m.anchor_shape).collect()
    }

    /// The token counts as the comma list both benchmarks take.
    pub fn tokens_list(&self) -> String {
        self.tokens.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
    }
}

/// Splits a comma list and maps each item; an empty list or an unknown item is an error that
/// returns the offending text. Repeats are dropped, the first occurrence keeps its place.
fn list<T: PartialEq>(value: &str, item: impl Fn(&str) -> Option<T>) -> Result<Vec<T>, String> {
    let mut items = Vec::new();
    for text in value.split(',').map(str::trim) {
        let parsed = item(text).ok_or_else(|| text.to_owned())?;
        if !items.contains(&parsed) {
            items.push(parsed);
        }
    }
    Ok(items)
}

fn positive(flag: &str, value: &str) -> Result<usize, String> {
    value
        .parse()
        .ok()
        .filter(|&n: &usize| n >= 1)
        .ok_or_else(|| format!("{flag}: not a whole number >= 1: `{value}`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Options, String> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        Options::parse(&args, 4)
    }

    #[test]
    fn defaults() {
        let options = parse(&[]).expect("no arguments are fine");
        assert_eq!(options.tokens, [1, 8, 64, 512, 2048]);
        let names: Vec<&str> = options.models.iter().map(|m| m.name).collect();
        assert_eq!(names, ["v3", "kimi-k2"]);
        assert_eq!(options.dtypes, [InputDType::Bf16, InputDType::F32]);
        assert_eq!((options.threads, options.rounds, options.quick), (4, 3, false));
        assert_eq!(options.max_wait, Duration::from_secs(900));
        assert_eq!(options.out, PathBuf::from("target/bench"));
        assert_eq!(options.anchor_shapes(), ["v3", "kimi"]);
        assert_eq!(options.tokens_list(), "1,8,64,512,2048");
    }

    #[test]
    fn every_flag_in_both_spellings() {
        let options = parse(&[
            "--tokens=1,8,8",
            "--models",
            "v2-lite,v2,kimi-k2",
            "--dtypes",
            "f32",
            "--threads=2",
            "--rounds",
            "1",
            "--quick",
            "--max-wait",
            "0",
            "--out",
            "x/y",
            "--sluice-bin=bin/sluice",
        ])
        .expect("valid arguments");
        assert_eq!(options.tokens, [1, 8]);
        assert_eq!(options.anchor_shapes(), ["v2lite", "kimi"]);
        assert_eq!(options.models.len(), 3);
        assert_eq!(options.dtypes, [InputDType::F32]);
        assert_eq!((options.threads, options.rounds, options.quick), (2, 1, true));
        assert_eq!(options.max_wait, Duration::ZERO);
        assert_eq!(options.out, PathBuf::from("x/y"));
        assert_eq!(options.sluice_bin, Some(PathBuf::from("bin/sluice")));
    }

    #[test]
    fn bad_arguments_name_the_flag_and_value() {
        let cases: &[(&[&str], &str)] = &[
            (&["--tokens", "1,0"], "--tokens: not a token count >= 1: `0`"),
            (&["--tokens", ""], "--tokens: not a token count >= 1: ``"),
            (&["--models", "v5"], "--models: unknown model `v5`"),
            (&["--dtypes", "f16"], "--dtypes: unknown dtype `f16`"),
            (&["--threads", "0"], "--threads: not a whole number >= 1: `0`"),
            (&["--rounds", "x"], "--rounds: not a whole number >= 1: `x`"),
            (&["--max-wait", "-1"], "--max-wait: not a number of seconds: `-1`"),
            (&["--threads"], "--threads needs a value"),
            (&["--fast"], "bench-vs-torch: unknown flag `--fast`"),
        ];
        for (args, expected) in cases {
            let error = parse(args).expect_err(expected);
            assert!(error.starts_with(expected), "{args:?}: {error}");
        }
    }

    #[test]
    fn targets_follow_the_project_goals() {
        let bf16: Vec<_> =
            [1, 8, 64, 512, 2048, 16].map(|t| InputDType::Bf16.target_speedup(t)).into();
        assert_eq!(bf16, [Some(3.0), Some(1.5), Some(1.5), Some(1.0), Some(1.0), None]);
        assert!([1, 7, 2048].iter().all(|&t| InputDType::F32.target_speedup(t) == Some(1.0)));
    }

    #[test]
    fn gemm_flops_counts_two_per_multiply_add() {
        let v3 = &MODELS[0];
        assert_eq!(v3.gemm_flops(2), 2.0 * 2.0 * 7168.0 * 256.0);
    }
}

//! Asking cargo what it built: the executables in its `--message-format=json` messages.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::json::{self, Value};

/// The cargo that runs xtask (`$CARGO`), else the one on the `PATH`.
pub fn program() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

/// Runs `cargo ARGS` (which must ask for `--message-format=json...`) in `root`, showing cargo's
/// progress on stderr, and returns the executables it reports.
pub fn build(root: &Path, args: &[&str]) -> Result<Vec<Executable>, String> {
    let output = Command::new(program())
        .args(args)
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("could not start cargo: {e}"))?;
    if !output.status.success() {
        return Err(format!("cargo {} failed ({})", args.join(" "), output.status));
    }
    executables(&String::from_utf8_lossy(&output.stdout))
}

/// One executable cargo reported building.
#[derive(Debug, PartialEq)]
pub struct Executable {
    /// The target's name (`sluice` for the CLI binary).
    pub target_name: String,
    /// Whether it is a test harness (`profile.test`).
    pub test: bool,
    /// Where it is.
    pub path: PathBuf,
}

/// The executables among cargo's JSON messages (one object per line; other messages are skipped).
pub fn executables(messages: &str) -> Result<Vec<Executable>, String> {
    let mut found = Vec::new();
    for (number, line) in messages.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let message = json::parse(line)
            .map_err(|e| format!("cargo message {} is not JSON: {e}", number + 1))?;
        if message.get("reason").and_then(Value::as_str) != Some("compiler-artifact") {
            continue;
        }
        let Some(path) = message.get("executable").and_then(Value::as_str) else {
            continue; // libraries and build scripts have `"executable": null`
        };
        let target_name = message.get("target").and_then(|t| t.get("name")).and_then(Value::as_str);
        let test = message.get("profile").and_then(|p| p.get("test"));
        found.push(Executable {
            target_name: target_name.unwrap_or_default().to_owned(),
            test: test == Some(&Value::Bool(true)),
            path: PathBuf::from(path),
        });
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_binaries_and_tests_and_skips_the_rest() {
        let messages = r#"
{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"half"},"profile":{"test":false},"executable":null}
{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"sluice"},"profile":{"test":false},"executable":"/t/release/sluice"}
{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"sluice_tensor"},"profile":{"test":true},"executable":"/t/debug/deps/sluice_tensor-1a2b"}
{"reason":"build-finished","success":true}
"#;
        let found = executables(messages).expect("valid messages");
        assert_eq!(
            found,
            [
                Executable {
                    target_name: "sluice".into(),
                    test: false,
                    path: "/t/release/sluice".into()
                },
                Executable {
                    target_name: "sluice_tensor".into(),
                    test: true,
                    path: "/t/debug/deps/sluice_tensor-1a2b".into()
                },
            ]
        );
    }

    #[test]
    fn a_line_that_is_not_json_is_an_error() {
        let error = executables("{\"reason\":\"build-finished\"}\nwarning: x\n").unwrap_err();
        assert!(error.starts_with("cargo message 2 is not JSON"), "{error}");
    }
}

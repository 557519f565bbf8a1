//! Running the programs a task is made of, and showing them as the command lines that ran.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

/// Runs `command`, inheriting stdout/stderr; an error names `what` and the exit status.
pub fn run_to_success(command: &mut Command, what: &str) -> Result<(), String> {
    let program = command.get_program().to_string_lossy().into_owned();
    let status = command.status().map_err(|e| format!("could not start {program}: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("{what} failed ({status})")) }
}

/// `command` as a line to paste into a shell: program and arguments, quoted where needed, paths
/// under `root` written relative to it (the commands run with `root` as working directory).
pub fn command_line(command: &Command, root: &Path) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|word| shell_quote(&relative_to(word, root)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `path` relative to `root` when it lies under it, else unchanged.
pub fn relative_to(path: &OsStr, root: &Path) -> String {
    let path = Path::new(path);
    path.strip_prefix(root).unwrap_or(path).to_string_lossy().into_owned()
}

/// Single-quotes `word` unless it consists only of characters no shell treats specially.
fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./,=:+@%".contains(&b));
    if plain { word.to_owned() } else { format!("'{}'", word.replace('\'', r"'\''")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_is_relative_and_quoted() {
        let root = Path::new("/repo");
        let mut command = Command::new("/repo/target/release/sluice");
        command.args(["bench", "--tokens", "1,8", "--json", "/repo/target/bench/a b.json"]);
        command.arg("/elsewhere/it's");
        assert_eq!(
            command_line(&command, root),
            "target/release/sluice bench --tokens 1,8 --json 'target/bench/a b.json' \
             '/elsewhere/it'\\''s'"
        );
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn failing_and_missing_programs_are_errors() {
        let error = run_to_success(&mut Command::new("false"), "the false step").unwrap_err();
        assert!(error.starts_with("the false step failed"), "{error}");
        let error = run_to_success(&mut Command::new("./no-such-program-here"), "x").unwrap_err();
        assert!(error.starts_with("could not start ./no-such-program-here"), "{error}");
        assert_eq!(run_to_success(&mut Command::new("true"), "true"), Ok(()));
    }
}

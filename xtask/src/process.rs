//! Running the programs a task is made of.

use std::process::Command;

/// Runs `command`, inheriting stdout/stderr; an error names `what` and the exit status.
pub fn run_to_success(command: &mut Command, what: &str) -> Result<(), String> {
    let program = command.get_program().to_string_lossy().into_owned();
    let status = command.status().map_err(|e| format!("could not start {program}: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("{what} failed ({status})")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_and_missing_programs_are_errors() {
        let error = run_to_success(&mut Command::new("false"), "the false step").unwrap_err();
        assert!(error.starts_with("the false step failed"), "{error}");
        let error = run_to_success(&mut Command::new("./no-such-program-here"), "x").unwrap_err();
        assert!(error.starts_with("could not start ./no-such-program-here"), "{error}");
        assert_eq!(run_to_success(&mut Command::new("true"), "true"), Ok(()));
    }
}

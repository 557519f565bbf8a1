//! `sluice selftest`: a verdict on every backend, and a clean failure where one cannot start.

use std::process::{Command, Output};

fn selftest(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice")).arg("selftest").args(args).output().unwrap()
}

#[test]
fn the_cpu_backend_passes_every_config() {
    let output = selftest(&["--backend", "cpu", "--tokens", "8"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    let ok = stdout.lines().filter(|line| line.trim_start().starts_with("ok ")).count();
    assert!(
        stdout.contains(&format!("selftest: PASS, {ok} configs on the cpu backend")),
        "{stdout}"
    );
    for family in ["v3", "kimi-k2", "v2", "v2-lite", "v4", "v4-hash", "generic E=1024"] {
        assert!(stdout.contains(&format!("ok    {family}")), "{family} missing: {stdout}");
    }
}

#[test]
fn a_gpu_backend_that_cannot_start_fails_cleanly_and_says_what_to_send_back() {
    for backend in ["rocm", "cuda"] {
        let output = selftest(&["--backend", backend, "--tokens", "8"]);
        let (stdout, stderr) =
            (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        if output.status.success() {
            // A machine with that GPU: the verdict is a pass.
            assert!(stdout.contains("selftest: PASS"), "{stdout}");
            continue;
        }
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert!(stdout.contains("send back:"), "{stdout}");
        assert_eq!(stderr.lines().count(), 1, "one line on stderr: {stderr}");
        assert!(stderr.starts_with(&format!("sluice: {backend} backend: ")), "{stderr}");
    }
}

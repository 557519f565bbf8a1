//! Tracing output on stderr: off by default, `-v` for sluice's own events, `RUST_LOG` to choose.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the subscriber. `RUST_LOG`, when set, wins over `-v`.
pub fn init(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "warn,sluice=info,sluice_cli=info,sluice_models=info,sluice_backend_cpu=info",
        2 => {
            "info,sluice_cli=debug,sluice_models=debug,sluice_tensor=debug,sluice_backend_cpu=debug"
        }
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // Another subscriber may already be installed (tests); then keep it.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: redirected logs stay plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// Logs the process's peak resident memory (Linux `VmHWM`), at info level so `-v` shows it.
pub fn report_peak_memory() {
    if let Some(kib) = peak_resident_kib() {
        let mib = (kib as f64 / 1024.0 * 10.0).round() / 10.0;
        tracing::info!(peak_rss_mib = mib, "peak memory");
    }
}

fn peak_resident_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

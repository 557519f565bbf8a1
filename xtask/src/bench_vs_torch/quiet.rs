//! Waiting for a quiet machine before a round, so both sides are timed without other work.
//!
//! Same rule as the anchor's own wait: other processes must use less than 5% of the CPUs for two
//! consecutive 2-second windows. While waiting xtask itself sleeps, so everything counted in
//! `/proc/stat` is somebody else's.

use std::time::{Duration, Instant};

/// The busy share of all CPUs that still counts as quiet.
const QUIET_SHARE: f64 = 0.05;
const WINDOW: Duration = Duration::from_secs(2);
const QUIET_WINDOWS_NEEDED: u32 = 2;

/// How the wait ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Quiet {
    /// Two quiet windows in a row.
    Reached,
    /// `max_wait` passed first.
    GaveUp,
    /// Not checked: `max_wait` is zero, or there is no `/proc/stat` (not Linux).
    NotChecked,
}

impl Quiet {
    /// A word for the report.
    pub fn describe(self) -> &'static str {
        match self {
            Quiet::Reached => "quiet",
            Quiet::GaveUp => "gave up waiting (busy)",
            Quiet::NotChecked => "not checked",
        }
    }
}

/// Waits up to `max_wait` for the machine to be quiet.
pub fn wait(max_wait: Duration) -> Quiet {
    if max_wait.is_zero() || cpu_jiffies().is_none() {
        return Quiet::NotChecked;
    }
    let started = Instant::now();
    let mut quiet_windows = 0;
    while started.elapsed() < max_wait {
        let Some(busy) = busy_share_over(WINDOW) else { return Quiet::NotChecked };
        if busy < QUIET_SHARE {
            quiet_windows += 1;
            if quiet_windows >= QUIET_WINDOWS_NEEDED {
                return Quiet::Reached;
            }
        } else {
            quiet_windows = 0;
            println!(
                "bench-vs-torch: waiting for a quiet machine (CPUs {:.0}% busy)",
                busy * 100.0
            );
        }
    }
    Quiet::GaveUp
}

/// The share of all CPU time that was busy during the next `window`.
fn busy_share_over(window: Duration) -> Option<f64> {
    let (busy_before, total_before) = cpu_jiffies()?;
    std::thread::sleep(window);
    let (busy_after, total_after) = cpu_jiffies()?;
    let total = total_after.saturating_sub(total_before);
    (total > 0).then(|| busy_after.saturating_sub(busy_before) as f64 / total as f64)
}

/// (busy, total) jiffies of all CPUs since boot, from the first line of `/proc/stat`.
fn cpu_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_cpu_line(stat.lines().next()?)
}

/// `cpu  user nice system idle iowait irq softirq steal ...`: busy = user + nice + system + irq +
/// softirq (as the anchor counts it), total = those + idle + iowait + steal.
fn parse_cpu_line(line: &str) -> Option<(u64, u64)> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let values: Vec<u64> = fields.map(|f| f.parse().ok()).collect::<Option<_>>()?;
    let field = |i: usize| values.get(i).copied();
    let busy = field(0)? + field(1)? + field(2)? + field(5)? + field(6)?;
    let total = busy + field(3)? + field(4)? + field(7).unwrap_or(0);
    Some((busy, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_line_sums_busy_and_total() {
        let line = "cpu  100 2 30 1000 4 5 6 7 0 0";
        assert_eq!(parse_cpu_line(line), Some((100 + 2 + 30 + 5 + 6, 143 + 1000 + 4 + 7)));
        // Old kernels stop before `steal`.
        assert_eq!(parse_cpu_line("cpu 1 1 1 10 1 1 1"), Some((5, 16)));
        assert_eq!(parse_cpu_line("cpu0 1 1 1 10 1 1 1 1"), None);
        assert_eq!(parse_cpu_line("cpu 1 1 x 10 1 1 1"), None);
        assert_eq!(parse_cpu_line("cpu 1 1 1"), None);
    }

    #[test]
    fn zero_wait_is_not_checked() {
        assert_eq!(wait(Duration::ZERO), Quiet::NotChecked);
    }
}

//! Timing a call: warm-up, then the median of many calls.

use std::time::{Duration, Instant};

/// How long to measure.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Untimed calls first (caches, page faults, thread pool start-up).
    pub warmup_calls: usize,
    /// At least this many timed calls...
    pub min_calls: usize,
    /// ...and at least this much time spent in them.
    pub min_time: Duration,
    /// Never more than this many calls.
    pub max_calls: usize,
}

/// The timed calls' durations, sorted.
#[derive(Debug, Clone)]
pub struct Samples(Vec<Duration>);

impl Samples {
    /// The median call time.
    pub fn median(&self) -> Duration {
        let n = self.0.len();
        if n == 0 {
            return Duration::ZERO;
        }
        if n % 2 == 1 { self.0[n / 2] } else { (self.0[n / 2 - 1] + self.0[n / 2]) / 2 }
    }

    /// The fastest call.
    pub fn min(&self) -> Duration {
        self.0.first().copied().unwrap_or_default()
    }

    /// How many calls were timed.
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// Calls `f` as `budget` says and returns the timed samples; stops at the first error.
pub fn measure<E>(budget: Budget, mut f: impl FnMut() -> Result<(), E>) -> Result<Samples, E> {
    for _ in 0..budget.warmup_calls {
        f()?;
    }
    // Capped: `--min-calls` comes from the command line.
    let mut samples = Vec::with_capacity(budget.min_calls.min(1 << 16));
    let started = Instant::now();
    while samples.len() < budget.max_calls
        && (samples.len() < budget.min_calls || started.elapsed() < budget.min_time)
    {
        let call = Instant::now();
        f()?;
        samples.push(call.elapsed());
    }
    samples.sort();
    Ok(Samples(samples))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_and_even_counts() {
        let ms = |v: &[u64]| Samples(v.iter().map(|&m| Duration::from_millis(m)).collect());
        assert_eq!(ms(&[1, 2, 9]).median(), Duration::from_millis(2));
        assert_eq!(ms(&[1, 2, 4, 9]).median(), Duration::from_millis(3));
        assert_eq!(ms(&[]).median(), Duration::ZERO);
    }

    #[test]
    fn the_budget_bounds_the_calls() {
        let budget =
            Budget { warmup_calls: 2, min_calls: 5, min_time: Duration::ZERO, max_calls: 7 };
        let mut calls = 0;
        let samples = measure(budget, || -> Result<(), ()> {
            calls += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!((samples.len(), calls), (5, 7));
        let failing = measure(budget, || Err::<(), _>("boom"));
        assert_eq!(failing.unwrap_err(), "boom");
    }
}

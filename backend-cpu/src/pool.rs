//! Worker threads that stay hot between calls.
//!
//! An engine calls the gate once per MoE layer per decoding step: many short calls back to back. A
//! worker that parks after every call has to be woken by the next one, and on a virtual machine that
//! wake-up costs tens of microseconds, as much as a whole one-token gate. So, like OpenMP runtimes,
//! the workers can spin for a while after their last job before they park. Spinning takes cores
//! from whatever the caller does between two gates (the experts, its own thread pool), so how long
//! is the caller's choice: [`CpuBackendBuilder::idle_spin`](crate::CpuBackendBuilder::idle_spin).
//!
//! One call dispatches at a time. A caller that finds the workers busy (another thread is routing
//! through the same backend) runs all its shares itself instead of waiting.

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A job: `work(share)` for every share `0..shares`; thread `i` of `threads` (the caller is
/// thread 0) runs shares `i, i + threads, ...`.
#[derive(Clone, Copy)]
struct Job {
    /// The caller's closure, with its lifetime erased; see [`Pool::run`] for why that is sound.
    work: &'static (dyn Fn(usize) + Sync),
    shares: usize,
}

/// State shared by the caller and the workers.
struct Shared {
    /// Bumped once per job; a worker runs a job when it sees a new epoch.
    epoch: AtomicU64,
    /// The current job, written before the epoch is bumped.
    job: Mutex<Option<Job>>,
    /// Workers that have not finished the current job yet.
    pending: AtomicUsize,
    /// Whether a worker's share panicked during the current job.
    panicked: AtomicBool,
    shutdown: AtomicBool,
    /// Parked workers (changed under `sleep`), so a dispatch only locks when someone sleeps.
    sleepers: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
}

/// `threads - 1` workers; the calling thread is always the first.
pub(crate) struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Held while a job is out, so that concurrent callers do not wait on each other.
    dispatch: Mutex<()>,
    idle_spin: Duration,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("workers", &self.workers.len())
            .field("idle_spin", &self.idle_spin)
            .finish()
    }
}

impl Pool {
    /// Starts `workers` threads, which spin for `idle_spin` after each job before they park.
    pub(crate) fn new(workers: usize, idle_spin: Duration) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: Mutex::new(None),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut pool = Pool {
            shared,
            workers: Vec::with_capacity(workers),
            dispatch: Mutex::new(()),
            idle_spin,
        };
        for index in 0..workers {
            let shared = Arc::clone(&pool.shared);
            let handle = std::thread::Builder::new()
                .name(format!("sluice-cpu-{index}"))
                .spawn(move || worker(&shared, index + 1, workers + 1, idle_spin))?;
            pool.workers.push(handle);
        }
        Ok(pool)
    }

    /// Runs `work(share)` for every share `0..shares`, spread over the calling thread (share 0
    /// first) and the workers, or all on the caller if another call holds the workers. Returns when
    /// every share has finished; a panic in any share is re-raised here.
    pub(crate) fn run(&self, shares: usize, work: &(dyn Fn(usize) + Sync)) {
        let guard = match self.dispatch.try_lock() {
            Ok(guard) if shares > 1 => guard,
            _ => return (0..shares).for_each(work),
        };
        let shared = &*self.shared;
        // SAFETY: only the lifetime is erased. The reference is used by workers only between the
        // epoch bump below and their `pending` decrement, and this function does not return (nor
        // unwind) before `pending` is back to zero, so `work` outlives every use.
        let work_static: &'static (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(work) };
        *shared.job.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(Job { work: work_static, shares });
        shared.panicked.store(false, Ordering::Relaxed);
        shared.pending.store(self.workers.len(), Ordering::SeqCst);
        shared.epoch.fetch_add(1, Ordering::SeqCst);
        if shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _sleep = shared.sleep.lock().unwrap_or_else(PoisonError::into_inner);
            shared.wake.notify_all();
        }
        let threads = self.workers.len() + 1;
        let mine = panic::catch_unwind(AssertUnwindSafe(|| {
            (0..shares).step_by(threads).for_each(work);
        }));
        let mut spins = 0u32;
        while shared.pending.load(Ordering::Acquire) > 0 {
            spins = spins.saturating_add(1);
            if spins < 1 << 16 { std::hint::spin_loop() } else { std::thread::yield_now() }
        }
        *shared.job.lock().unwrap_or_else(PoisonError::into_inner) = None;
        drop(guard);
        if let Err(payload) = mine {
            panic::resume_unwind(payload);
        }
        assert!(!shared.panicked.load(Ordering::Relaxed), "a CPU backend worker panicked");
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _sleep = self.shared.sleep.lock().unwrap_or_else(PoisonError::into_inner);
            self.shared.wake.notify_all();
        }
        for handle in self.workers.drain(..) {
            // A worker never panics itself (shares are caught), so the join result carries nothing.
            let _ = handle.join();
        }
    }
}

/// A worker's life: wait for a new epoch (spinning, then parked), run its shares, report back.
fn worker(shared: &Shared, thread: usize, threads: usize, idle_spin: Duration) {
    let mut seen = 0u64;
    loop {
        let Some(epoch) = wait_for_job(shared, seen, idle_spin) else { return };
        seen = epoch;
        let job = *shared.job.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(job) = job
            && panic::catch_unwind(AssertUnwindSafe(|| {
                (thread..job.shares).step_by(threads).for_each(job.work);
            }))
            .is_err()
        {
            shared.panicked.store(true, Ordering::Relaxed);
        }
        shared.pending.fetch_sub(1, Ordering::Release);
    }
}

/// The next epoch after `seen`, or `None` at shutdown; spins for `idle_spin`, then parks.
fn wait_for_job(shared: &Shared, seen: u64, idle_spin: Duration) -> Option<u64> {
    let started = Instant::now();
    let mut spins = 0u32;
    loop {
        if shared.shutdown.load(Ordering::Acquire) {
            return None;
        }
        let epoch = shared.epoch.load(Ordering::Acquire);
        if epoch != seen {
            return Some(epoch);
        }
        spins = spins.wrapping_add(1);
        if !spins.is_multiple_of(64) || started.elapsed() < idle_spin {
            std::hint::spin_loop();
            continue;
        }
        let mut sleep = shared.sleep.lock().unwrap_or_else(PoisonError::into_inner);
        shared.sleepers.fetch_add(1, Ordering::SeqCst);
        while shared.epoch.load(Ordering::SeqCst) == seen && !shared.shutdown.load(Ordering::SeqCst)
        {
            sleep = shared.wake.wait(sleep).unwrap_or_else(PoisonError::into_inner);
        }
        shared.sleepers.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_share_runs_exactly_once() {
        let pool = Pool::new(3, Duration::ZERO).unwrap();
        for shares in [0, 1, 2, 4, 6, 9] {
            let counts: Vec<AtomicUsize> = (0..shares).map(|_| AtomicUsize::new(0)).collect();
            pool.run(shares, &|share| {
                counts[share].fetch_add(1, Ordering::Relaxed);
            });
            for (share, count) in counts.iter().enumerate() {
                assert_eq!(count.load(Ordering::Relaxed), 1, "{shares} shares, share {share}");
            }
        }
    }

    #[test]
    fn parked_workers_wake_up_for_the_next_job() {
        let idle_spin = Duration::from_millis(2);
        let pool = Pool::new(1, idle_spin).unwrap();
        std::thread::sleep(idle_spin * 3);
        let ran = AtomicUsize::new(0);
        pool.run(2, &|_| {
            ran.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(ran.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn concurrent_callers_do_not_wait_for_each_other() {
        let pool = Pool::new(1, Duration::from_millis(1)).unwrap();
        let total = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..200 {
                        pool.run(2, &|_| {
                            total.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 200 * 2);
    }

    #[test]
    fn a_panicking_share_is_reraised_on_the_caller_and_the_pool_survives() {
        let pool = Pool::new(1, Duration::from_millis(1)).unwrap();
        let result = panic::catch_unwind(AssertUnwindSafe(|| {
            pool.run(2, &|share| assert_ne!(share, 1, "worker share fails"));
        }));
        assert!(result.is_err());
        let ran = AtomicUsize::new(0);
        pool.run(2, &|_| {
            ran.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(ran.load(Ordering::Relaxed), 2);
    }
}

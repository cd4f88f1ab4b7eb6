//! StallWatch: tells the rest of the node that this process itself stood still.
//!
//! A node can stop without dying: SIGSTOP, a paused VM, a machine that swapped, a runtime
//! starved of CPU. Its connection stays up, so nothing outside tells it; but everything it
//! observed before is stale when it resumes: peers' heartbeats look old, requests buffered in
//! its socket were given up by their clients long ago, and its running jobs may have been
//! handed to another node. (An outside storm found each of these: a node resumed after 8 s,
//! declared its two healthy peers lost and answered the submits it had buffered.)
//!
//! A dedicated OS thread ticks every [`TICK`]; a gap between two ticks longer than the
//! threshold is a stall. Users compare [`StallWatch::generation`] with the value they saw last:
//! a different value means "you stood still since you last looked; re-check what you know".
//! The generation already counts a stall that is still being observed (no tick for longer than
//! the threshold), so a task that runs before the watch thread after a resume sees it too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the watch thread ticks.
pub const TICK: Duration = Duration::from_millis(50);

/// The stall generation as seen at `now_ns`: stalls counted so far, plus one while the last tick
/// is older than the threshold (a stall under way, or just over and not yet counted by the
/// watch thread). The watch thread's tick stores the same value as its new count, so readers
/// and the thread agree. Pure, so the rule is tested for every interleaving.
pub fn observed_generation(counted: u64, last_tick_ns: u64, now_ns: u64, threshold_ns: u64) -> u64 {
    counted + u64::from(now_ns.saturating_sub(last_tick_ns) > threshold_ns)
}

/// A cheap, cloneable handle on the process's stall watch.
#[derive(Clone)]
pub struct StallWatch {
    inner: Arc<Inner>,
}

struct Inner {
    base: Instant,
    threshold_ns: u64,
    /// Nanoseconds since `base` at the watch thread's last tick.
    last_tick_ns: AtomicU64,
    /// Stalls counted by the watch thread.
    counted: AtomicU64,
    /// Length of the last stall, for logs.
    last_stall_ms: AtomicU64,
}

impl StallWatch {
    /// Starts the watch thread; a gap longer than `threshold` between ticks is a stall. The
    /// thread lives as long as the process (it holds only a weak reference).
    pub fn start(threshold: Duration) -> StallWatch {
        let watch = StallWatch::unstarted(threshold);
        let weak = Arc::downgrade(&watch.inner);
        std::thread::Builder::new()
            .name("kiln-stall-watch".into())
            .spawn(move || loop {
                std::thread::sleep(TICK);
                let Some(inner) = weak.upgrade() else { return };
                let now = inner.now_ns();
                let last = inner.last_tick_ns.load(Ordering::Acquire);
                let counted = inner.counted.load(Ordering::Acquire);
                let next = observed_generation(counted, last, now, inner.threshold_ns);
                if next != counted {
                    let gap_ms = now.saturating_sub(last) / 1_000_000;
                    inner.last_stall_ms.store(gap_ms, Ordering::Release);
                    tracing::warn!(stalled_ms = gap_ms, "this process stood still (stopped, paused or starved); re-checking what it knew");
                    inner.counted.store(next, Ordering::Release);
                }
                inner.last_tick_ns.store(now, Ordering::Release);
            })
            .expect("spawn the stall watch thread");
        watch
    }

    /// A watch whose thread never runs: for tests that drive [`StallWatch::tick_at`].
    pub fn unstarted(threshold: Duration) -> StallWatch {
        StallWatch {
            inner: Arc::new(Inner {
                base: Instant::now(),
                threshold_ns: threshold.as_nanos() as u64,
                last_tick_ns: AtomicU64::new(0),
                counted: AtomicU64::new(0),
                last_stall_ms: AtomicU64::new(0),
            }),
        }
    }

    /// Changes whenever this process stood still for longer than the threshold.
    pub fn generation(&self) -> u64 {
        let inner = &self.inner;
        // Read the count before the tick: a tick in between can only make the result larger
        // than the truth by the stall it is counting, never hide one.
        let counted = inner.counted.load(Ordering::Acquire);
        let last = inner.last_tick_ns.load(Ordering::Acquire);
        observed_generation(counted, last, inner.now_ns(), inner.threshold_ns)
    }

    /// How long the last counted stall was, in milliseconds.
    pub fn last_stall_ms(&self) -> u64 {
        self.inner.last_stall_ms.load(Ordering::Acquire)
    }

    pub fn threshold(&self) -> Duration {
        Duration::from_nanos(self.inner.threshold_ns)
    }
}

impl Inner {
    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the tick times, a reader never sees the generation go back, and it changes
        /// exactly when some gap exceeded the threshold.
        #[test]
        fn the_generation_never_goes_back_and_counts_every_stall(gaps in proptest::collection::vec(0u64..5_000, 1..60), threshold in 100u64..3_000) {
            let (mut counted, mut last, mut now) = (0u64, 0u64, 0u64);
            let mut seen = 0u64;
            let mut stalls = 0u64;
            for gap in gaps {
                // A reader looks half-way through the gap, then at its end (before the tick).
                for t in [now + gap / 2, now + gap] {
                    let g = observed_generation(counted, last, t, threshold);
                    prop_assert!(g >= seen);
                    seen = g;
                }
                now += gap;
                stalls += u64::from(gap > threshold);
                counted = observed_generation(counted, last, now, threshold);
                last = now;
                let g = observed_generation(counted, last, now, threshold);
                prop_assert!(g >= seen);
                seen = g;
                prop_assert_eq!(counted, stalls);
            }
        }
    }

    #[test]
    fn a_thread_that_ticks_on_time_sees_no_stall() {
        let watch = StallWatch::start(Duration::from_millis(500));
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(watch.generation(), 0);
    }
}

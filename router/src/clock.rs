//! A cheap monotonic clock for timing statements: a CPU timestamp counter read
//! (calibrated once against the OS clock) where the CPU has an invariant one,
//! the OS clock otherwise. Reading the OS clock costs more than routing a
//! statement takes on some virtual machines, and each statement is timed.
//!
//! This clock measures durations only. Times written into the directory
//! (deadlines, heartbeats, `at_ms`) are wall-clock milliseconds from
//! [`shardgate_directory::clock::now_ms`], the one clock every node compares.

use std::sync::OnceLock;
use std::time::Duration;

fn clock() -> &'static quanta::Clock {
    static CLOCK: OnceLock<quanta::Clock> = OnceLock::new();
    CLOCK.get_or_init(quanta::Clock::new)
}

/// A point in time, to measure what happened since.
#[derive(Debug, Clone, Copy)]
pub struct Stamp(u64);

impl Stamp {
    pub fn now() -> Stamp {
        Stamp(clock().raw())
    }

    pub fn elapsed(self) -> Duration {
        Stamp::now().since(self)
    }

    /// The time from `earlier` to this stamp (zero if `earlier` is later): one
    /// reading of the clock serves several measures.
    pub fn since(self, earlier: Stamp) -> Duration {
        clock().delta(earlier.0, self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_measure_what_the_os_clock_measures() {
        // OS clock readings on both sides of each stamp reading bound what the
        // stamp may measure, however the thread is scheduled in between.
        let before = std::time::Instant::now();
        let stamp = Stamp::now();
        let after = std::time::Instant::now();
        while after.elapsed() < Duration::from_millis(20) {
            std::hint::spin_loop();
        }
        let (lo_end, measured, hi_end) = (std::time::Instant::now(), stamp.elapsed(), std::time::Instant::now());
        let (lo, hi) = (lo_end - after, hi_end - before);
        // Calibration against the OS clock is good to well under 1 %.
        assert!(measured >= lo.mul_f64(0.99), "{measured:?} < {lo:?}");
        assert!(measured <= hi.mul_f64(1.01) + Duration::from_micros(50), "{measured:?} > {hi:?}");
    }
}

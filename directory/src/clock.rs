//! The wall clock that directory commands are stamped with.
//!
//! The state machine never reads a clock (see [`crate::state`]): a time arrives
//! inside a command (`at_ms`, `deadline_ms`, a heartbeat's time), read by whoever
//! proposes it, so that every replica applies the same value. This is that
//! proposer's clock, for every crate that proposes those times or compares with
//! them. To time how long something took, use a monotonic clock instead
//! (`std::time::Instant`, or the router's `clock::Stamp` on its hot path).

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch; 0 if the system clock is set before it.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_is_after_this_code_was_written_and_does_not_go_back() {
        let a = now_ms();
        let b = now_ms();
        assert!(a > 1_700_000_000_000, "{a}");
        assert!(b >= a);
    }
}

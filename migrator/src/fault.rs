//! A move's fault points: places where a test makes the driving process die or
//! the step fail, to prove that every phase resumes or rolls back cleanly. How
//! they are armed: [`shardgate_directory::fault`].

use crate::Error;

/// Every fault point, so tests can iterate over them.
pub const POINTS: &[&str] = &[
    "prepare.after_fence_install",
    "prepare.after_publication",
    "prepare.after_reverse_stream",
    "copy.after_slot",
    "copy.after_first_table",
    "cutover.after_hold",
    "cutover.after_fence",
    "cutover.after_catch_up",
    "cutover.after_slot_advance",
    "cutover.after_flip",
    "cleanup.after_drop_subscriptions",
];

pub use shardgate_directory::fault::{set, Action};

/// Passes a fault point: does nothing unless a test armed it. An `error` fault
/// fires once and disarms itself, so the retry that follows can succeed.
pub fn point(name: &'static str) -> Result<(), Error> {
    debug_assert!(POINTS.contains(&name), "unlisted fault point {name}");
    shardgate_directory::fault::pass(name).map_err(Error::Other)
}

//! Clients that go quiet: `client_idle_timeout` and `idle_transaction_timeout`;
//! and, in the same once-a-second sweep, pooled server connections past
//! `server_idle_timeout` or `server_lifetime`.
//!
//! Session threads have no timer wheel (see [`crate::timer`]), and arming a
//! timer on another thread for every statement a client sends would cost more
//! than routing it. So a session only notes, in its [`IdleWatch`], when it
//! started waiting for its client and whether a transaction is open (a clock
//! read and two atomic stores per message); a janitor on the router's main
//! runtime looks at every watch once a second and wakes the sessions whose
//! client has been quiet too long. A timeout therefore fires up to a second
//! late, as pgbouncer's do.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Why a session's client was found idle too long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleTimeout {
    /// Outside a transaction: `client_idle_timeout`.
    Session,
    /// Inside a transaction: `idle_transaction_timeout`.
    Transaction,
}

/// One session's idle state, shared with the janitor.
#[derive(Default)]
pub struct IdleWatch {
    /// When the session started waiting for its client, in ms since the
    /// router started, plus one (0: it is not waiting).
    waiting_since: AtomicU64,
    in_transaction: AtomicBool,
    /// What the janitor found (0: nothing; 1 + [`IdleTimeout`] as u8).
    expired: AtomicU8,
    wake: Notify,
}

impl IdleWatch {
    /// The session waits for its client from now on.
    pub fn waiting(&self, epoch: Instant, in_transaction: bool) {
        self.in_transaction.store(in_transaction, Ordering::Relaxed);
        let ms = epoch.elapsed().as_millis() as u64 + 1;
        self.waiting_since.store(ms, Ordering::Release);
    }

    /// The client sent something.
    pub fn busy(&self) {
        self.waiting_since.store(0, Ordering::Release);
    }

    /// Resolves once the janitor found the client idle too long (the session
    /// must be registered and waiting).
    pub async fn expired(&self) -> IdleTimeout {
        loop {
            let notified = self.wake.notified();
            if let Some(why) = self.take_expired() {
                return why;
            }
            notified.await;
        }
    }

    fn take_expired(&self) -> Option<IdleTimeout> {
        match self.expired.swap(0, Ordering::AcqRel) {
            1 => Some(IdleTimeout::Session),
            2 => Some(IdleTimeout::Transaction),
            _ => None,
        }
    }
}

/// Every session's watch, for the janitor.
pub struct IdleWatches {
    /// When the router started: the watches' clock.
    pub epoch: Instant,
    watches: Mutex<Vec<Weak<IdleWatch>>>,
}

impl Default for IdleWatches {
    fn default() -> Self {
        IdleWatches { epoch: Instant::now(), watches: Mutex::new(Vec::new()) }
    }
}

impl IdleWatches {
    /// A new session's watch; it leaves the list when the session drops it.
    pub fn register(&self) -> Arc<IdleWatch> {
        let watch = Arc::new(IdleWatch::default());
        self.watches.lock().unwrap_or_else(|p| p.into_inner()).push(Arc::downgrade(&watch));
        watch
    }

    /// Wakes the sessions whose client has been quiet longer than its timeout
    /// allows (a zero timeout is off), and forgets ended sessions.
    pub fn sweep(&self, idle: Duration, in_transaction: Duration) {
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        watches.retain(|w| {
            let Some(w) = w.upgrade() else { return false };
            let since = w.waiting_since.load(Ordering::Acquire);
            if since == 0 {
                return true;
            }
            let (limit, why) = if w.in_transaction.load(Ordering::Relaxed) {
                (in_transaction, IdleTimeout::Transaction)
            } else {
                (idle, IdleTimeout::Session)
            };
            if !limit.is_zero() && now.saturating_sub(since) >= limit.as_millis() as u64 {
                w.expired.store(1 + why as u8, Ordering::Release);
                w.wake.notify_waiters();
            }
            true
        });
    }
}

/// The janitor: sweeps once a second until the router stops.
pub async fn janitor(ctx: Arc<crate::context::RouterContext>, mut stopped: tokio::sync::watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stopped.changed() => return,
            _ = ticker.tick() => {}
        }
        let (idle, in_transaction) = {
            let config = ctx.config.load();
            (config.client_idle_timeout, config.idle_transaction_timeout)
        };
        ctx.idle.sweep(idle, in_transaction);
        // Server connections past server_idle_timeout or server_lifetime.
        for pool in ctx.all_pools() {
            let closed = pool.close_expired();
            if closed > 0 {
                tracing::debug!(shard = %pool.name, closed, "closed idle server connections past their timeout");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_quiet_client_is_found_by_the_timeout_of_its_state_only() {
        let watches = IdleWatches { epoch: Instant::now() - Duration::from_secs(100), ..Default::default() };
        let in_txn = watches.register();
        let outside = watches.register();
        let busy = watches.register();
        // Waiting since the registry's start, 100 s ago.
        for (w, in_transaction) in [(&in_txn, true), (&outside, false), (&busy, true)] {
            w.waiting(Instant::now(), in_transaction);
        }
        busy.busy();
        // Only the transaction timeout is on.
        watches.sweep(Duration::ZERO, Duration::from_secs(5));
        assert_eq!(in_txn.take_expired(), Some(IdleTimeout::Transaction));
        assert_eq!(outside.take_expired(), None);
        assert_eq!(busy.take_expired(), None);
        // Only the session timeout is on.
        watches.sweep(Duration::from_secs(5), Duration::ZERO);
        assert_eq!(outside.take_expired(), Some(IdleTimeout::Session));
        assert_eq!(in_txn.take_expired(), None);
    }

    #[tokio::test]
    async fn a_client_quiet_for_less_than_the_timeout_is_left_alone_and_ended_sessions_are_forgotten() {
        let watches = IdleWatches::default();
        let w = watches.register();
        w.waiting(watches.epoch, true);
        watches.sweep(Duration::from_secs(60), Duration::from_secs(60));
        assert_eq!(w.take_expired(), None);
        drop(w);
        watches.sweep(Duration::from_secs(60), Duration::from_secs(60));
        assert!(watches.watches.lock().unwrap_or_else(|p| p.into_inner()).is_empty());
    }

    #[tokio::test]
    async fn a_waiting_session_is_woken_when_found_idle() {
        let watches = Arc::new(IdleWatches { epoch: Instant::now() - Duration::from_secs(10), ..Default::default() });
        let w = watches.register();
        // Waiting since the registry's start, 10 s ago.
        w.waiting(Instant::now(), false);
        let sweeper = watches.clone();
        let woken = tokio::spawn({
            let w = w.clone();
            async move { w.expired().await }
        });
        tokio::task::yield_now().await;
        sweeper.sweep(Duration::from_secs(1), Duration::ZERO);
        assert_eq!(woken.await.ok(), Some(IdleTimeout::Session));
    }
}

//! Per-shard pools of server connections (transaction pooling).
//!
//! A session borrows a connection for one transaction (or one statement outside a
//! transaction) and gives it back when the server reports it idle. The number of
//! connections per shard is capped by a semaphore; a borrower waits in FIFO order
//! up to `queue_timeout`, then gets SQLSTATE 53300 rather than hanging.
//!
//! Idle connections are kept per session thread ([`crate::server`]): a socket
//! belongs to the event loop of the thread that opened it, and a session that
//! uses one from another thread is woken through that thread on every reply.
//! A borrower takes from its own thread's list first; it opens a connection of
//! its own while the pool has fewer than `size` open, and takes another thread's
//! idle one only when it has that many (so the size holds for the whole router).
//! A connection goes back to the idle list of the thread it was opened on.
//!
//! A configuration reload ([`crate::reload`]) changes a pool's size and
//! timeouts in place ([`ShardPool::configure`]): each is an atomic the pool
//! reads where it needs it, so a borrow costs what it did. A larger size
//! admits waiting borrowers at once. A smaller one takes free slots away at
//! once and the others as their connections come back; connections beyond
//! the size are closed as they come back, and idle ones at once.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::backend::{Backend, BackendError, ShardAddress};

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("timed out after {waited:?} waiting for a connection to shard {shard}; raise pool.size or pool.queue_timeout, or lower the load")]
    QueueTimeout { shard: String, waited: Duration },
    #[error("shard {shard} is unavailable: {source}")]
    Unavailable { shard: String, source: BackendError },
}

impl PoolError {
    pub fn sqlstate(&self) -> &'static str {
        match self {
            PoolError::QueueTimeout { .. } => "53300",
            PoolError::Unavailable { source: BackendError::Login { code, .. }, .. } if code.starts_with("28") => {
                "08004"
            }
            PoolError::Unavailable { .. } => "08006",
        }
    }
}

thread_local! {
    static THREAD_LIST: Cell<usize> = const { Cell::new(0) };
}

/// Marks the current thread as session thread `n` (1-based; 0, the default,
/// is every other thread).
pub fn set_thread_list(n: usize) {
    THREAD_LIST.with(|h| h.set(n));
}

/// The current thread's idle list.
pub fn thread_list() -> usize {
    THREAD_LIST.with(|h| h.get())
}

/// The pool of one shard.
pub struct ShardPool {
    pub name: String,
    pub address: ShardAddress,
    /// Idle connections by session thread (index 0: threads that serve no sessions).
    idle: Vec<Mutex<Vec<Backend>>>,
    /// Connections open, idle or in use (at most `size`, until a smaller
    /// size has closed the extras).
    open: AtomicUsize,
    /// `[router.pool] size`: connections open at most, borrowers at once.
    size: AtomicUsize,
    /// One permit per borrower; `size` of them, plus those still `owed`.
    slots: Arc<Semaphore>,
    /// Permits a smaller size took away while borrowers held them: forgotten
    /// as they come back instead of returned.
    owed: AtomicUsize,
    /// One resize at a time (a reload), so that `owed` and the permits agree.
    resizing: Mutex<()>,
    /// Statement latency on this shard (the `shardgate_shard_statement_seconds` metric).
    pub latency: Arc<crate::metrics::Histogram>,
    queue_timeout: AtomicDuration,
    connect_timeout: AtomicDuration,
    /// Idle connections older than this are closed (zero: never).
    idle_timeout: AtomicDuration,
    /// Connections open longer than this are closed on their return (zero: never).
    lifetime: AtomicDuration,
    /// TCP keepalives on the connections it opens.
    keepalive: crate::config::KeepaliveConfig,
    /// The client role its connections log in as (`crate::roles`); None: the
    /// shard URL's user.
    login: Option<Arc<crate::roles::RoleLogin>>,
}

impl ShardPool {
    /// `threads`: the router's session threads (each gets an idle list).
    pub fn new(
        name: String,
        address: ShardAddress,
        config: &crate::config::PoolConfig,
        keepalive: &crate::config::KeepaliveConfig,
        threads: usize,
    ) -> Arc<ShardPool> {
        Self::new_as(name, address, None, config, keepalive, threads)
    }

    /// A pool whose connections log in as a client's role (`crate::roles`).
    pub fn new_as(
        name: String,
        address: ShardAddress,
        login: Option<Arc<crate::roles::RoleLogin>>,
        config: &crate::config::PoolConfig,
        keepalive: &crate::config::KeepaliveConfig,
        threads: usize,
    ) -> Arc<ShardPool> {
        let size = config.size.max(1);
        Arc::new(ShardPool {
            latency: crate::metrics::global().shard_latency(&name),
            name,
            address,
            idle: (0..=threads).map(|_| Mutex::new(Vec::new())).collect(),
            open: AtomicUsize::new(0),
            size: AtomicUsize::new(size),
            slots: Arc::new(Semaphore::new(size)),
            owed: AtomicUsize::new(0),
            resizing: Mutex::new(()),
            queue_timeout: AtomicDuration::new(config.queue_timeout),
            connect_timeout: AtomicDuration::new(config.connect_timeout),
            idle_timeout: AtomicDuration::new(config.server_idle_timeout),
            lifetime: AtomicDuration::new(config.server_lifetime),
            keepalive: keepalive.clone(),
            login,
        })
    }

    /// Puts `config` in force (a reload): the timeouts for the next borrow,
    /// connect and return, the size at once (see the module's doc).
    pub fn configure(&self, config: &crate::config::PoolConfig) {
        self.queue_timeout.set(config.queue_timeout);
        self.connect_timeout.set(config.connect_timeout);
        self.idle_timeout.set(config.server_idle_timeout);
        self.lifetime.set(config.server_lifetime);
        self.resize(config.size.max(1));
    }

    /// The size in force.
    pub fn size(&self) -> usize {
        self.size.load(Ordering::Relaxed)
    }

    fn resize(&self, size: usize) {
        let _one = self.resizing.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.size.swap(size, Ordering::Relaxed);
        if size > old {
            // Permits still owed from a smaller size are kept rather than
            // forgotten; the rest are new, and wake waiting borrowers.
            let more = size - old;
            let owed = self.owed.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(more)));
            let kept = owed.unwrap_or(0).min(more);
            self.slots.add_permits(more - kept);
        } else if size < old {
            let fewer = old - size;
            let taken = self.slots.forget_permits(fewer);
            self.owed.fetch_add(fewer - taken, Ordering::Relaxed);
            let closed = self.close_extra_idle();
            if closed > 0 {
                tracing::debug!(shard = %self.name, closed, size, "closed idle server connections beyond the new pool size");
            }
        }
    }

    /// Gives a borrower's permit back, or forgets it when a smaller size is
    /// owed one.
    fn give_back(&self, permit: OwnedSemaphorePermit) {
        let owed = self.owed.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        if owed.is_ok() {
            permit.forget();
        }
    }

    /// Closes idle connections while more are open than the size allows.
    fn close_extra_idle(&self) -> usize {
        let mut closed = 0;
        for list in 0..self.idle.len() {
            while self.open.load(Ordering::Relaxed) > self.size() {
                let Some(b) = self.lock_idle(list).pop() else { break };
                self.open.fetch_sub(1, Ordering::Relaxed);
                closed += 1;
                drop(b);
            }
        }
        closed
    }

    /// Closes the idle connections that have been idle longer than
    /// `server_idle_timeout` or open longer than `server_lifetime`, and those
    /// beyond the size (the idle timeouts' janitor calls it once a second).
    /// Returns how many it closed.
    pub fn close_expired(&self) -> usize {
        let mut closed = self.close_extra_idle();
        for list in 0..self.idle.len() {
            let expired: Vec<Backend> = {
                let mut idle = self.lock_idle(list);
                let (keep, expired) = std::mem::take(&mut *idle).into_iter().partition(|b| !self.expired(b));
                *idle = keep;
                expired
            };
            closed += expired.len();
            self.open.fetch_sub(expired.len(), Ordering::Relaxed);
            // Dropped outside the lock: each closes its socket.
            drop(expired);
        }
        closed
    }

    /// Closes every idle connection (the server behind them restarted: they
    /// are all dead). Returns how many it closed.
    pub fn close_idle(&self) -> usize {
        let mut closed = 0;
        for list in 0..self.idle.len() {
            let gone = std::mem::take(&mut *self.lock_idle(list));
            closed += gone.len();
            self.open.fetch_sub(gone.len(), Ordering::Relaxed);
        }
        closed
    }

    fn expired(&self, b: &Backend) -> bool {
        let (idle_timeout, lifetime) = (self.idle_timeout.get(), self.lifetime.get());
        if idle_timeout.is_zero() && lifetime.is_zero() {
            return false;
        }
        let now = crate::clock::Stamp::now();
        (!idle_timeout.is_zero() && now.since(b.idle_since) >= idle_timeout)
            || (!lifetime.is_zero() && now.since(b.opened) >= lifetime)
    }

    /// Borrows a connection: an idle one if there is one, else a new one.
    pub async fn get(self: &Arc<Self>) -> Result<Pooled, PoolError> {
        // A free slot is taken without arming the queue timer (no clock read, no
        // timer entry): the common case when the pool is not exhausted. Only
        // waits for a full pool are timed (shardgate_pool_wait_seconds).
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let started = std::time::Instant::now();
                let queue_timeout = self.queue_timeout.get();
                match crate::timer::timeout(queue_timeout, self.slots.clone().acquire_owned()).await {
                    Ok(Ok(p)) => {
                        crate::metrics::global().pool_wait(started.elapsed());
                        p
                    }
                    _ => return Err(PoolError::QueueTimeout { shard: self.name.clone(), waited: queue_timeout }),
                }
            }
        };
        let backend = match self.take_live_idle() {
            Some(b) => b,
            None => {
                // take_idle counted the connection about to open.
                let connect_timeout = self.connect_timeout.get();
                let connected = match &self.login {
                    None => Backend::connect(&self.address, connect_timeout).await,
                    Some(login) => Backend::connect(&login.address(&self.address), connect_timeout).await,
                };
                match connected {
                    Ok(b) => {
                        let keepalive = b.conn.get_ref().tcp().map(|tcp| self.keepalive.apply(tcp));
                        if let Some(Err(e)) = keepalive {
                            tracing::debug!(shard = %self.name, error = %e, "could not turn on TCP keepalives");
                        }
                        b
                    }
                    Err(source) => {
                        self.open.fetch_sub(1, Ordering::Relaxed);
                        self.give_back(permit);
                        if let (Some(login), BackendError::Login { code, .. }) = (&self.login, &source) {
                            if code.starts_with("28") {
                                login.refused();
                            }
                        }
                        return Err(PoolError::Unavailable { shard: self.name.clone(), source });
                    }
                }
            }
        };
        Ok(Pooled { backend: Some(backend), pool: self.clone(), permit: Some(permit), kept: None })
    }

    /// Borrows a connection for a client in session pooling: the one it kept
    /// from this pool if any, else one from [`Self::get`]. Either goes back to
    /// `kept` when dropped, not to the pool.
    pub async fn get_kept(self: &Arc<Self>, kept: &Arc<Kept>) -> Result<Pooled, PoolError> {
        if let Some(p) = kept.take(self) {
            return Ok(p);
        }
        let mut p = self.get().await?;
        p.kept = Some(kept.clone());
        Ok(p)
    }

    /// A connection with this pool's login that the pool does not count, for
    /// the router's own rare work that must not queue behind clients: the
    /// client waiting for it may be the one holding the pool's last connection
    /// (a catalog refresh in the middle of its transaction, or in session
    /// pooling). Closed when dropped.
    pub async fn connect_outside(&self) -> Result<Backend, PoolError> {
        let connected = match &self.login {
            None => Backend::connect(&self.address, self.connect_timeout.get()).await,
            Some(login) => Backend::connect(&login.address(&self.address), self.connect_timeout.get()).await,
        };
        connected.map_err(|source| PoolError::Unavailable { shard: self.name.clone(), source })
    }

    /// An idle connection whose server has not closed it (a restart, an
    /// administrator's `pg_terminate_backend`); the dead ones are dropped.
    fn take_live_idle(&self) -> Option<Backend> {
        loop {
            let b = self.take_idle()?;
            if !b.closed_by_server() {
                return Some(b);
            }
            tracing::debug!(shard = %self.name, "an idle connection was closed by the server; dropped");
            self.open.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn lock_idle(&self, list: usize) -> std::sync::MutexGuard<'_, Vec<Backend>> {
        self.idle[list % self.idle.len()].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An idle connection of this thread's; else, when the pool is at its size,
    /// one of another thread's. None: open a new one here (already counted in
    /// `open`).
    fn take_idle(&self) -> Option<Backend> {
        let me = thread_list() % self.idle.len();
        if let Some(b) = self.lock_idle(me).pop() {
            return Some(b);
        }
        let size = self.size();
        let below_size = |n: usize| (n < size).then_some(n + 1);
        if self.open.fetch_update(Ordering::Relaxed, Ordering::Relaxed, below_size).is_ok() {
            return None;
        }
        let other = (1..self.idle.len()).find_map(|i| self.lock_idle((me + i) % self.idle.len()).pop());
        if other.is_none() {
            // Taken by others meanwhile: open one (the borrower holds a slot).
            self.open.fetch_add(1, Ordering::Relaxed);
        }
        other
    }

    pub fn idle_count(&self) -> usize {
        (0..self.idle.len()).map(|i| self.lock_idle(i).len()).sum()
    }

    /// Connections in use right now.
    pub fn active_count(&self) -> usize {
        // Permits owed to a smaller size are still held by borrowers.
        (self.size() + self.owed.load(Ordering::Relaxed)).saturating_sub(self.slots.available_permits())
    }
}

/// A borrowed connection. Dropping it returns the connection to its pool, unless it
/// was marked broken or is mid-response, in which case it is closed; a client's
/// in session pooling goes back to that client ([`Kept`]).
pub struct Pooled {
    backend: Option<Backend>,
    pool: Arc<ShardPool>,
    /// Given back on drop, after the connection (see [`ShardPool::give_back`]).
    permit: Option<OwnedSemaphorePermit>,
    kept: Option<Arc<Kept>>,
}

/// The server connections one client keeps for its whole session
/// (`pool_mode = "session"`), at most one per pool. A connection it used
/// comes back here with its pool slot, not to the pool, so its next statement
/// on that shard finds the session state it left there (temporary tables,
/// LISTEN, advisory locks, cursors WITH HOLD). [`Kept::release`] hands them
/// back to their pools when the client leaves.
#[derive(Default)]
pub struct Kept {
    conns: Mutex<Vec<(Arc<ShardPool>, Backend, OwnedSemaphorePermit)>>,
}

impl Kept {
    /// The connection kept from `pool`, borrowed (it comes back here when dropped).
    pub fn take(self: &Arc<Self>, pool: &Arc<ShardPool>) -> Option<Pooled> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let i = conns.iter().position(|(p, ..)| Arc::ptr_eq(p, pool))?;
        let (pool, backend, permit) = conns.swap_remove(i);
        Some(Pooled { backend: Some(backend), pool, permit: Some(permit), kept: Some(self.clone()) })
    }

    /// Every kept connection, each returning to its pool when dropped. The
    /// caller resets their session state first (or marks them broken).
    pub fn release(&self) -> Vec<Pooled> {
        let conns = std::mem::take(&mut *self.conns.lock().unwrap_or_else(|p| p.into_inner()));
        conns
            .into_iter()
            .map(|(pool, backend, permit)| Pooled { backend: Some(backend), pool, permit: Some(permit), kept: None })
            .collect()
    }
}

impl Pooled {
    pub fn shard_name(&self) -> &str {
        &self.pool.name
    }

    pub fn address(&self) -> &ShardAddress {
        &self.pool.address
    }

    /// The role this connection runs as on its shard.
    pub fn role(&self) -> &str {
        self.pool.login.as_ref().map_or(&self.pool.address.user, |l| &l.role)
    }

    pub fn latency(&self) -> &crate::metrics::Histogram {
        &self.pool.latency
    }
}

impl std::ops::Deref for Pooled {
    type Target = Backend;
    fn deref(&self) -> &Backend {
        self.backend.as_ref().expect("backend present until drop")
    }
}

impl std::ops::DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut Backend {
        self.backend.as_mut().expect("backend present until drop")
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        // Kept by its client, with whatever is buffered (a notification that
        // came after the last reply is the client's to read).
        if self.kept.is_some() && self.backend.as_ref().is_some_and(|b| !b.broken) {
            if let (Some(kept), Some(b), Some(permit)) = (self.kept.take(), self.backend.take(), self.permit.take()) {
                kept.conns.lock().unwrap_or_else(|p| p.into_inner()).push((self.pool.clone(), b, permit));
                return;
            }
        }
        if let Some(mut b) = self.backend.take() {
            let pool = &self.pool;
            let lifetime = pool.lifetime.get();
            let now = crate::clock::Stamp::now();
            let lived = !lifetime.is_zero() && now.since(b.opened) >= lifetime;
            // More open than the size allows: a smaller size was put in force.
            let extra = pool.open.load(Ordering::Relaxed) > pool.size();
            if !b.broken && !b.conn.has_buffered() && !lived && !extra {
                b.idle_since = now;
                pool.lock_idle(b.thread_list).push(b);
            } else {
                pool.open.fetch_sub(1, Ordering::Relaxed);
            }
        }
        if let Some(permit) = self.permit.take() {
            self.pool.give_back(permit);
        }
    }
}

/// A duration that a reload may change while others read it: nanoseconds in
/// an atomic, read with a plain load.
struct AtomicDuration(AtomicU64);

impl AtomicDuration {
    fn new(d: Duration) -> AtomicDuration {
        AtomicDuration(AtomicU64::new(Self::nanos(d)))
    }

    fn get(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }

    fn set(&self, d: Duration) {
        self.0.store(Self::nanos(d), Ordering::Relaxed);
    }

    /// Saturates at about 584 years.
    fn nanos(d: Duration) -> u64 {
        u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
    }
}

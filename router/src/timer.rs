//! Timeouts and background work for code that runs on the session threads.
//!
//! The session threads' event loops are built without tokio's timer wheel: a
//! loop with one looks at the wheel (a lock, a scan of its levels, a clock
//! read) every time it goes to sleep and every time it wakes, which for a
//! client that waits for each answer is twice per statement, and measurably
//! slower than the routing itself (docs/benchmarks.md). Sessions almost never
//! need a timer: only when a pool is full, a server connection is being
//! opened, or a cutover holds a statement. Those few timers are armed on one
//! background thread whose event loop has a wheel, and fire a oneshot.
//!
//! Everywhere else (the router's main runtime, tests), [`timeout`] and
//! [`sleep`] are tokio's own.

use std::cell::Cell;
use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

thread_local! {
    static NO_WHEEL: Cell<bool> = const { Cell::new(false) };
}

/// Marks the current thread as one whose event loop has no timer wheel.
pub fn mark_no_wheel() {
    NO_WHEEL.with(|w| w.set(true));
}

fn no_wheel() -> bool {
    NO_WHEEL.with(|w| w.get())
}

/// The background thread's event loop (timers and I/O), started on first use
/// and kept for the life of the process.
fn background() -> &'static tokio::runtime::Handle {
    static HANDLE: OnceLock<tokio::runtime::Handle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let (send, recv) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("shardgate-timers".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("cannot start the timer thread's event loop");
                let _ = send.send(rt.handle().clone());
                rt.block_on(std::future::pending::<()>());
            })
            .expect("cannot start the timer thread");
        recv.recv().expect("the timer thread started")
    })
}

/// A timeout passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// `f`, unless `d` passes first.
pub async fn timeout<F: Future>(d: Duration, f: F) -> Result<F::Output, Elapsed> {
    if !no_wheel() {
        return tokio::time::timeout(d, f).await.map_err(|_| Elapsed);
    }
    let fired = arm(d);
    tokio::select! {
        biased;
        out = f => Ok(out),
        _ = fired.wait() => Err(Elapsed),
    }
}

/// Waits for `d`.
pub async fn sleep(d: Duration) {
    if !no_wheel() {
        return tokio::time::sleep(d).await;
    }
    arm(d).wait().await
}

/// Runs `f` on the background thread (its event loop has timers), for work a
/// session starts and does not wait for.
pub fn spawn_background<F>(f: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    if no_wheel() {
        background().spawn(f);
    } else {
        tokio::spawn(f);
    }
}

/// A timer on the background thread; dropping it cancels it.
struct Armed {
    fired: tokio::sync::oneshot::Receiver<()>,
    task: tokio::task::JoinHandle<()>,
}

fn arm(d: Duration) -> Armed {
    let (send, fired) = tokio::sync::oneshot::channel();
    let task = background().spawn(async move {
        tokio::time::sleep(d).await;
        let _ = send.send(());
    });
    Armed { fired, task }
}

impl Armed {
    async fn wait(mut self) {
        if (&mut self.fired).await.is_err() {
            // The timer went away without firing (the process is exiting): a
            // timeout that never fires, as if `d` were forever.
            std::future::pending::<()>().await
        }
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread whose event loop has no timer wheel, as a session thread's.
    fn on_session_like_thread<T: Send + 'static>(f: impl Future<Output = T> + Send + 'static) -> T {
        std::thread::spawn(move || {
            mark_no_wheel();
            tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap().block_on(f)
        })
        .join()
        .unwrap()
    }

    #[test]
    fn timeouts_fire_and_futures_win_without_a_wheel() {
        let (timed_out, finished, slept) = on_session_like_thread(async {
            let timed_out = timeout(Duration::from_millis(20), std::future::pending::<()>()).await;
            let finished = timeout(Duration::from_secs(60), async { 7 }).await;
            let started = std::time::Instant::now();
            sleep(Duration::from_millis(10)).await;
            (timed_out, finished, started.elapsed())
        });
        assert_eq!(timed_out, Err(Elapsed));
        assert_eq!(finished, Ok(7));
        assert!(slept >= Duration::from_millis(10), "slept {slept:?}");
    }

    #[test]
    fn the_timeout_waits_at_least_its_duration() {
        let waited = on_session_like_thread(async {
            let started = std::time::Instant::now();
            let r = timeout(Duration::from_millis(30), std::future::pending::<()>()).await;
            assert_eq!(r, Err(Elapsed));
            started.elapsed()
        });
        assert!(waited >= Duration::from_millis(30), "gave up after {waited:?}");
    }

    #[test]
    fn background_work_runs_where_timers_exist() {
        let done = on_session_like_thread(async {
            let (send, recv) = tokio::sync::oneshot::channel();
            spawn_background(async move {
                // tokio's own timer: it would panic on a thread without a wheel.
                tokio::time::sleep(Duration::from_millis(1)).await;
                let _ = send.send(true);
            });
            recv.await.unwrap_or(false)
        });
        assert!(done);
    }
}

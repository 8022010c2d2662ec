//! `GET /events`: the status (what `GET /status` answers) as server-sent events,
//! for the web page.
//!
//! Each event is `data: <status as one line of JSON>\n\n`. One goes out as soon as
//! the directory changes (a move's phase or counters, a placement, a heartbeat),
//! at most every [`MIN_GAP`] so that a burst of changes costs one event, and at
//! least every [`EVERY`] otherwise: the status also holds things the directory
//! does not (the lease, the client count), and the steady beat is the stream's
//! keep-alive, which tells the page (and any proxy) that the stream is alive.
//!
//! The stream ends when the client goes away (its side of the socket closes, or
//! it stops reading for [`WRITE_TIMEOUT`]) or when the admin server stops.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Bytes, Frame};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::context::RouterContext;

/// Event streams open at once per admin server; more are refused with 503.
pub const MAX_STREAMS: usize = 64;
/// The least time between two events: changes in between are coalesced.
pub const MIN_GAP: Duration = Duration::from_millis(200);
/// The most time between two events.
pub const EVERY: Duration = Duration::from_secs(1);
/// A client that takes longer than this to accept an event is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The headers of the answer, besides its content type.
pub const HEADERS: &[(&str, &str)] = &[("cache-control", "no-store"), ("x-accel-buffering", "no")];
/// The content type of the answer.
pub const CONTENT_TYPE: &str = "text/event-stream; charset=utf-8";

/// The body of a `GET /events` answer: the events as a task of their own writes
/// them. hyper pulls the next one when it has written the last; when it drops
/// the body (the client went away) the task sees its channel closed and ends.
pub struct EventBody {
    events: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for EventBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.events.poll_recv(cx).map(|event| event.map(|bytes| Ok(Frame::data(bytes))))
    }
}

/// Starts the events of one stream; they go on until the client goes away, the
/// admin server stops (`running` closes) or the client stops reading, when
/// `drop_connection` is cancelled so that its connection is closed rather than
/// left waiting on a socket nobody reads. `open` is the stream's place among
/// the [`MAX_STREAMS`], given back when the events end.
pub fn stream(
    ctx: Arc<RouterContext>,
    running: tokio::sync::watch::Receiver<()>,
    open: OwnedSemaphorePermit,
    drop_connection: CancellationToken,
) -> EventBody {
    // One event waits while hyper writes the one before: a client that reads
    // slowly holds up only its own stream.
    let (tx, events) = mpsc::channel(1);
    tokio::spawn(async move {
        let _open = open;
        if let End::TooSlow = produce(&tx, &ctx, running).await {
            drop_connection.cancel();
        }
    });
    EventBody { events }
}

/// Why a stream ended. Either way is its normal outcome, not an error.
enum End {
    /// The client went away, or the admin server or the router stopped.
    Done,
    /// The client did not take an event within [`WRITE_TIMEOUT`].
    TooSlow,
}

/// Sends events on `tx` until the stream ends.
async fn produce(
    tx: &mpsc::Sender<Bytes>,
    ctx: &Arc<RouterContext>,
    mut running: tokio::sync::watch::Receiver<()>,
) -> End {
    let mut changes = ctx.directory.subscribe();
    if let Err(end) = send(tx, Bytes::from_static(b"retry: 2000\n\n")).await {
        return end;
    }
    loop {
        // Seen before the snapshot is read: a change after this wakes the loop.
        changes.borrow_and_update();
        // Someone is watching: keep the shards' sizes fresh for the page.
        crate::sizes::SizeCache::refresh_if_stale(ctx);
        let status = serde_json::to_string(&crate::admin::status(ctx)).unwrap_or_else(|_| "{}".into());
        if let Err(end) = send(tx, format!("data: {status}\n\n").into()).await {
            return end;
        }
        let sent = Instant::now();
        let mut changed = false;
        loop {
            let next = sent + if changed { MIN_GAP } else { EVERY };
            tokio::select! {
                // hyper dropped the body: the client is gone.
                _ = tx.closed() => return End::Done,
                change = changes.changed(), if !changed => match change {
                    Ok(()) => changed = true,
                    // The directory handle is gone: the router is shutting down.
                    Err(_) => return End::Done,
                },
                _ = running.changed() => return End::Done,
                _ = tokio::time::sleep_until(next) => break,
            }
        }
    }
}

/// Hands `event` to hyper, which writes it when it has written the ones before.
async fn send(tx: &mpsc::Sender<Bytes>, event: Bytes) -> Result<(), End> {
    match tokio::time::timeout(WRITE_TIMEOUT, tx.send(event)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(End::Done),
        Err(_) => Err(End::TooSlow),
    }
}

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

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::context::RouterContext;

/// Event streams open at once per admin server; more are refused with 503.
pub const MAX_STREAMS: usize = 64;
/// The least time between two events: changes in between are coalesced.
pub const MIN_GAP: Duration = Duration::from_millis(200);
/// The most time between two events.
pub const EVERY: Duration = Duration::from_secs(1);
/// A client that takes longer than this to accept an event is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

const HEAD: &str = "HTTP/1.1 200 OK\r\n\
    content-type: text/event-stream; charset=utf-8\r\n\
    cache-control: no-store\r\n\
    x-accel-buffering: no\r\n\
    connection: close\r\n\
    \r\n\
    retry: 2000\n\n";

/// Streams events on `stream` until the client goes away or `running` closes.
/// The end of a stream is its normal outcome, not an error.
pub async fn stream(
    mut stream: TcpStream,
    ctx: &Arc<RouterContext>,
    mut running: tokio::sync::watch::Receiver<()>,
) -> std::io::Result<()> {
    let mut changes = ctx.directory.subscribe();
    let (mut rd, mut wr) = stream.split();
    if !send(&mut wr, HEAD.as_bytes()).await {
        return Ok(());
    }
    let mut scratch = [0u8; 512];
    loop {
        // Seen before the snapshot is read: a change after this wakes the loop.
        changes.borrow_and_update();
        // Someone is watching: keep the shards' sizes fresh for the page.
        crate::sizes::SizeCache::refresh_if_stale(ctx);
        let status = serde_json::to_string(&crate::admin::status(ctx)).unwrap_or_else(|_| "{}".into());
        if !send(&mut wr, format!("data: {status}\n\n").as_bytes()).await {
            return Ok(());
        }
        let sent = Instant::now();
        let mut changed = false;
        loop {
            let next = sent + if changed { MIN_GAP } else { EVERY };
            tokio::select! {
                read = rd.read(&mut scratch) => match read {
                    // Closed by the client. Anything it sends is ignored.
                    Ok(0) | Err(_) => return Ok(()),
                    Ok(_) => {}
                },
                change = changes.changed(), if !changed => match change {
                    Ok(()) => changed = true,
                    // The directory handle is gone: the router is shutting down.
                    Err(_) => return Ok(()),
                },
                _ = running.changed() => return Ok(()),
                _ = tokio::time::sleep_until(next) => break,
            }
        }
    }
}

/// Writes `bytes`; false when the client is gone or too slow.
async fn send(wr: &mut tokio::net::tcp::WriteHalf<'_>, bytes: &[u8]) -> bool {
    matches!(tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(bytes)).await, Ok(Ok(())))
}

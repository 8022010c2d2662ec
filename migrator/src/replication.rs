//! Watching the change stream: lag, exact catch-up waits, slot states.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::pg::{rows, scalar};
use crate::{Endpoint, Error, MoveSpec};
use shardgate_router::moves::quote::literal;

/// How far a subscriber is behind its publisher.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lag {
    /// WAL the subscriber has not confirmed yet.
    pub bytes: u64,
    /// Time since the last change it applied was committed, if it is streaming.
    pub ms: Option<u64>,
}

/// Lag of the stream whose slot `slot` lives on `publisher`.
pub async fn lag(publisher: &Endpoint, client: &Client, slot: &str) -> Result<Lag, Error> {
    let r = rows(
        client,
        &format!(
            "SELECT greatest(pg_current_wal_lsn() - confirmed_flush_lsn, 0)::bigint, \
                    (SELECT (extract(epoch FROM replay_lag) * 1000)::bigint FROM pg_stat_replication WHERE application_name = {0} LIMIT 1) \
             FROM pg_replication_slots WHERE slot_name = {0}",
            literal(slot)
        ),
    )
    .await
    .map_err(|e| Error::pg(&publisher.name, "read replication lag", e))?;
    let Some(r) = r.first() else {
        return Err(Error::Other(format!("replication slot {slot} is missing on shard {}", publisher.name)));
    };
    Ok(Lag {
        bytes: r[0].as_deref().and_then(|v| v.parse().ok()).unwrap_or(0),
        ms: r[1].as_deref().and_then(|v| v.parse().ok()),
    })
}

/// Waits until everything committed on `from` before this call has been applied on
/// `to`: commits a marker row on `from` (its table is in the move's publication) and
/// waits for it to appear on `to`. Logical replication applies in commit order, so
/// the marker's arrival proves every earlier commit arrived. Returns the wait.
pub async fn catch_up(
    spec: &MoveSpec,
    (from, from_client): (&Endpoint, &Client),
    (to, to_client): (&Endpoint, &Client),
    timeout: Duration,
) -> Result<Duration, Error> {
    let started = Instant::now();
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let token = format!("{}-{}-{seq}", std::process::id(), shardgate_directory::clock::now_ms());
    from_client
        .batch_execute(&format!(
            "INSERT INTO shardgate.marks (move_id, token) VALUES ({}, {})",
            spec.id,
            literal(&token)
        ))
        .await
        .map_err(|e| Error::pg(&from.name, "write a catch-up marker", e))?;
    let probe =
        format!("SELECT count(*) FROM shardgate.marks WHERE move_id = {} AND token = {}", spec.id, literal(&token));
    let mut pause = Duration::from_micros(200);
    loop {
        let n = scalar(to_client, &probe).await.map_err(|e| Error::pg(&to.name, "look for the catch-up marker", e))?;
        if n.as_deref() != Some("0") {
            return Ok(started.elapsed());
        }
        if started.elapsed() >= timeout {
            return Err(Error::Timeout(format!(
                "shard {} did not catch up with shard {} within {:?}; check the subscription \
                 (pg_stat_subscription on {}) and the server logs",
                to.name, from.name, timeout, to.name
            )));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(5));
    }
}

/// Moves an idle (disabled) stream's slot to the publisher's current WAL position,
/// so that enabling it later streams only what happens after this point, and so it
/// does not pin WAL meanwhile. Safe only while nothing that stream should carry is
/// being written on the publisher — which is true of the direction not in use: its
/// rows are fenced there or only arrive through the other stream.
pub async fn advance_idle_slot(publisher: &Endpoint, client: &Client, slot: &str) -> Result<(), Error> {
    let err = |e| Error::pg(&publisher.name, "advance the idle replication slot", e);
    let active =
        scalar(client, &format!("SELECT active FROM pg_replication_slots WHERE slot_name = {}", literal(slot)))
            .await
            .map_err(err)?;
    match active.as_deref() {
        Some("f") => {}
        Some(_) => {
            return Err(Error::Other(format!(
                "replication slot {slot} on shard {} is in use; its subscription should be disabled",
                publisher.name
            )))
        }
        None => return Err(Error::Other(format!("replication slot {slot} is missing on shard {}", publisher.name))),
    }
    // Commits applied by a subscription are asynchronous (its synchronous_commit
    // is off), so the WAL of a change already visible here may not be flushed yet,
    // and a slot cannot move past the flushed WAL: a synchronous commit first
    // flushes everything before it, and the slot then moves to the flush point.
    // (`pg_current_wal_lsn()` is the write position, which can stop short of such
    // a commit: the stream would then carry it back where it came from.)
    client
        .batch_execute(&format!(
            "BEGIN; SET LOCAL synchronous_commit = on; SELECT pg_logical_emit_message(true, 'shardgate', 'flush'); COMMIT; \
             SELECT pg_replication_slot_advance({}, pg_current_wal_flush_lsn())",
            literal(slot)
        ))
        .await
        .map_err(err)
}

/// Waits until a slot has no walsender attached (its subscription was disabled).
pub async fn wait_slot_inactive(
    publisher: &Endpoint,
    client: &Client,
    slot: &str,
    timeout: Duration,
) -> Result<(), Error> {
    let started = Instant::now();
    let sql = format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = {} AND active", literal(slot));
    loop {
        let n = scalar(client, &sql).await.map_err(|e| Error::pg(&publisher.name, "read slot state", e))?;
        if n.as_deref() == Some("0") {
            return Ok(());
        }
        if started.elapsed() >= timeout {
            return Err(Error::Timeout(format!(
                "replication slot {slot} on shard {} is still in use after {timeout:?}",
                publisher.name
            )));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits until a slot has a walsender attached (its subscription is streaming).
pub async fn wait_slot_active(
    publisher: &Endpoint,
    client: &Client,
    slot: &str,
    timeout: Duration,
) -> Result<(), Error> {
    let started = Instant::now();
    let sql = format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = {} AND active", literal(slot));
    loop {
        let n = scalar(client, &sql).await.map_err(|e| Error::pg(&publisher.name, "read slot state", e))?;
        if n.as_deref() == Some("1") {
            return Ok(());
        }
        if started.elapsed() >= timeout {
            return Err(Error::Timeout(format!(
                "the stream from shard {} (slot {slot}) has not started after {timeout:?}; check its subscription \
                 and the subscriber's server log",
                publisher.name
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

//! The admin console: connect to database `shardgate` on any router and ask
//! `SHOW SHARDS`, `SHOW BUCKETS`, `SHOW ROUTERS`, `SHOW DIRECTORY`, `SHOW
//! TRANSACTIONS` (in-doubt prepared transactions) (simple query
//! protocol), the way PgBouncer's `pgbouncer` database works.

use tokio::io::{AsyncRead, AsyncWrite};

use crate::context::RouterContext;
use crate::protocol::messages::{self, query_text, Column, Severity};
use crate::protocol::{Connection, ProtocolError};

/// The database name that opens the console (for users in `[router] admins`).
pub const DATABASE: &str = "shardgate";

const TEXT: i32 = 25;
const INT8: i32 = 20;

pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &RouterContext,
    conn: &mut Connection<S>,
) -> Result<(), ProtocolError> {
    loop {
        let m = match conn.read().await {
            Ok(m) => m,
            Err(ProtocolError::Closed) => return Ok(()),
            Err(e) => return Err(e),
        };
        match m.tag() {
            b'X' => return Ok(()),
            b'Q' => {
                let sql = query_text(&m).unwrap_or("").trim().trim_end_matches(';').trim().to_ascii_uppercase();
                let words: Vec<&str> = sql.split_whitespace().collect();
                match words.as_slice() {
                    [] => conn.queue(&messages::empty_query_response()),
                    ["SHOW", what] => show(ctx, conn, what),
                    _ => conn.queue(&messages::error_response(
                        Severity::Error,
                        "42601",
                        &format!("the shardgate console does not understand {sql:?}"),
                        Some("try SHOW SHARDS, SHOW BUCKETS, SHOW ROUTERS, SHOW DIRECTORY or SHOW TRANSACTIONS"),
                    )),
                }
                conn.queue(&messages::ready_for_query(b'I'));
                conn.flush().await?;
            }
            _ => {
                conn.queue(&messages::error_response(
                    Severity::Error,
                    "0A000",
                    "the shardgate console takes simple queries only",
                    None,
                ));
                conn.queue(&messages::ready_for_query(b'I'));
                conn.flush().await?;
            }
        }
    }
}

fn table<S: AsyncRead + AsyncWrite + Unpin>(conn: &mut Connection<S>, columns: &[(&str, i32)], rows: Vec<Vec<String>>) {
    let cols: Vec<Column<'_>> = columns
        .iter()
        .map(|(name, oid)| Column { name, type_oid: *oid, type_size: if *oid == INT8 { 8 } else { -1 } })
        .collect();
    conn.queue(&messages::row_description(&cols));
    let n = rows.len();
    for r in rows {
        conn.queue(&messages::data_row(r.iter().map(|v| Some(v.as_bytes()))));
    }
    conn.queue(&messages::command_complete(&format!("SHOW {n}")));
}

fn show<S: AsyncRead + AsyncWrite + Unpin>(ctx: &RouterContext, conn: &mut Connection<S>, what: &str) {
    let dir = ctx.directory.load();
    let counts = dir.bucket_counts();
    match what {
        "SHARDS" => {
            let rows = dir
                .shards
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    vec![s.name.clone(), s.url.clone(), format!("{:?}", s.state).to_lowercase(), counts[i].to_string()]
                })
                .collect();
            table(conn, &[("name", TEXT), ("url", TEXT), ("state", TEXT), ("buckets", INT8)], rows);
        }
        "BUCKETS" => {
            let rows = dir
                .placements
                .iter()
                .enumerate()
                .map(|(b, &s)| vec![b.to_string(), dir.shards.get(s).map(|x| x.name.clone()).unwrap_or_default()])
                .collect();
            table(conn, &[("bucket", INT8), ("shard", TEXT)], rows);
        }
        "ROUTERS" => {
            let rows = dir
                .routers
                .values()
                .map(|r| {
                    vec![r.id.clone(), r.address.clone(), r.applied_epoch.to_string(), r.last_heartbeat_ms.to_string()]
                })
                .collect();
            table(conn, &[("id", TEXT), ("address", TEXT), ("applied_epoch", INT8), ("last_heartbeat_ms", INT8)], rows);
        }
        "DIRECTORY" => {
            let (node, leader, term, lease) = match &ctx.replica {
                Some((n, lease)) => {
                    let s = n.status();
                    (
                        s.id.to_string(),
                        s.leader.map(|l| l.to_string()).unwrap_or_default(),
                        s.term.to_string(),
                        if n.lease_valid(*lease) { "valid" } else { "expired" }.to_string(),
                    )
                }
                None => ("static".into(), String::new(), String::new(), "n/a".into()),
            };
            let rows = vec![vec![
                dir.epoch.to_string(),
                dir.bucket_count.to_string(),
                dir.key_column.clone(),
                dir.key_type.sql_name().to_string(),
                dir.shards.len().to_string(),
                dir.pins.len().to_string(),
                dir.moves.len().to_string(),
                node,
                leader,
                term,
                lease,
            ]];
            table(
                conn,
                &[
                    ("epoch", INT8),
                    ("buckets", INT8),
                    ("key_column", TEXT),
                    ("key_type", TEXT),
                    ("shards", INT8),
                    ("pins", INT8),
                    ("moves", INT8),
                    ("node", TEXT),
                    ("leader", TEXT),
                    ("term", TEXT),
                    ("lease", TEXT),
                ],
                rows,
            );
        }
        "TRANSACTIONS" => {
            let list = crate::twophase::recover::state().in_doubt.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let rows = list.into_iter().map(|t| vec![t.shard, t.gid, format!("{:.1}", t.age_secs)]).collect();
            table(conn, &[("shard", TEXT), ("gid", TEXT), ("age_seconds", TEXT)], rows);
        }
        other => conn.queue(&messages::error_response(
            Severity::Error,
            "42704",
            &format!("unknown console view {other:?}"),
            Some("try SHOW SHARDS, SHOW BUCKETS, SHOW ROUTERS, SHOW DIRECTORY or SHOW TRANSACTIONS"),
        )),
    }
}

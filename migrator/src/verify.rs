//! Verify: the moving rows compared on both shards at one consistent point.
//!
//! The cut: the routers hold the rows' statements for a moment (the cutover's hold),
//! the target catches up with the source through a marker row, and each side opens
//! a repeatable-read snapshot; then the statements go again. Both snapshots show
//! the same committed history, so the comparison that follows, as slow as it needs
//! to be, sees no false differences. Rows are compared per chunk of the primary key
//! (count and an order-independent sum of row hashes), so a difference is reported
//! as the key range that holds it.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::cutover::Coordinator;
use crate::pg::rows;
use crate::schema::{self, Table};
use crate::{replication, Endpoint, Error, MoveSpec};
use shardgate_router::moves::quote::ident;

#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Rows per chunk (by the source's primary key order).
    pub chunk_rows: u64,
    /// Time allowed for the cut (hold + catch-up + snapshots).
    pub cut_timeout: Duration,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions { chunk_rows: 10_000, cut_timeout: Duration::from_secs(5) }
    }
}

/// A chunk whose rows differ: its key range (`from` inclusive, `to` exclusive, as
/// SQL row literals; `None` is open-ended) and what each side holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub table: String,
    pub from: Option<String>,
    pub to: Option<String>,
    pub source_rows: u64,
    pub target_rows: u64,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: rows with key from {} to {} differ ({} rows on the source, {} on the target)",
            self.table,
            self.from.as_deref().unwrap_or("the start"),
            self.to.as_deref().unwrap_or("the end"),
            self.source_rows,
            self.target_rows
        )
    }
}

#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub tables: usize,
    pub chunks: u64,
    pub rows_source: u64,
    pub rows_target: u64,
    pub mismatches: Vec<Mismatch>,
    /// How long statements were held for the cut.
    pub pause: Duration,
}

impl VerifyReport {
    pub fn clean(&self) -> bool {
        self.mismatches.is_empty() && self.rows_source == self.rows_target
    }
}

/// Compares the moving rows on the source and the target (forward stream running).
pub async fn verify<C: Coordinator>(spec: &MoveSpec, coord: &C, opts: &VerifyOptions) -> Result<VerifyReport, Error> {
    let src = spec.source.connect(&format!("move {} verify (source)", spec.id)).await?;
    let dst = spec.target.connect(&format!("move {} verify (target)", spec.id)).await?;
    let tables = schema::sharded_tables(&src, &spec.key_column)
        .await
        .map_err(|e| Error::pg(&spec.source.name, "list tables", e))?;
    for (shard, c) in [(&spec.source, &src), (&spec.target, &dst)] {
        // Rows are hashed through their text form: make it the same on both sides.
        c.batch_execute("SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; SET extra_float_digits = 3")
            .await
            .map_err(|e| Error::pg(&shard.name, "set up the session", e))?;
    }

    let started = Instant::now();
    let deadline = started + opts.cut_timeout;
    coord.hold(deadline).await?;
    let cut = async {
        let left = deadline.saturating_duration_since(Instant::now());
        replication::catch_up(spec, (&spec.source, &src), (&spec.target, &dst), left).await?;
        for (shard, c) in [(&spec.source, &src), (&spec.target, &dst)] {
            c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SELECT 1")
                .await
                .map_err(|e| Error::pg(&shard.name, "take a snapshot", e))?;
        }
        Ok::<_, Error>(())
    }
    .await;
    coord.release().await;
    cut?;
    let mut report = VerifyReport { tables: tables.len(), pause: started.elapsed(), ..Default::default() };

    for t in &tables {
        compare_table(spec, t, (&spec.source, &src), (&spec.target, &dst), opts, &mut report).await?;
    }
    for (shard, c) in [(&spec.source, &src), (&spec.target, &dst)] {
        c.batch_execute("COMMIT").await.map_err(|e| Error::pg(&shard.name, "end the snapshot", e))?;
    }
    Ok(report)
}

async fn compare_table(
    spec: &MoveSpec,
    t: &Table,
    (source, src): (&Endpoint, &Client),
    (target, dst): (&Endpoint, &Client),
    opts: &VerifyOptions,
    report: &mut VerifyReport,
) -> Result<(), Error> {
    let filter = spec.row_filter();
    let key: Vec<String> = t.order_columns().iter().map(|c| ident(c)).collect();
    let key_list = key.join(", ");
    // Chunk boundaries: every chunk_rows-th key on the source, as a row literal
    // with each value cast back to its type.
    let literal_expr: Vec<String> =
        key.iter().map(|c| format!("quote_nullable({c}::text) || '::' || pg_typeof({c})::text")).collect();
    let bounds_sql = format!(
        "SELECT '(' || {} || ')' FROM (SELECT {key_list}, row_number() OVER (ORDER BY {key_list}) AS n \
         FROM {} WHERE {filter}) s WHERE n % {} = 1 AND n > 1 ORDER BY n",
        literal_expr.join(" || ', ' || "),
        t.qualified(),
        opts.chunk_rows.max(1)
    );
    let bounds: Vec<String> = rows(src, &bounds_sql)
        .await
        .map_err(|e| Error::pg(&source.name, format!("chunk {}", t.qualified()), e))?
        .into_iter()
        .filter_map(|r| r.into_iter().next().flatten())
        .collect();
    let cols: Vec<String> = t.columns.iter().map(|c| ident(c)).collect();
    let digest = format!(
        "SELECT count(*), coalesce(sum(hashtextextended(ROW({})::text, 0)::numeric), 0)::text FROM {} WHERE {filter}",
        cols.join(", "),
        t.qualified()
    );
    let row_key = format!("ROW({key_list})");
    for i in 0..=bounds.len() {
        let from = i.checked_sub(1).map(|j| bounds[j].clone());
        let to = bounds.get(i).cloned();
        let mut sql = digest.clone();
        if let Some(f) = &from {
            sql.push_str(&format!(" AND {row_key} >= {f}"));
        }
        if let Some(u) = &to {
            sql.push_str(&format!(" AND {row_key} < {u}"));
        }
        let a = one_digest(source, src, &sql).await?;
        let b = one_digest(target, dst, &sql).await?;
        report.chunks += 1;
        report.rows_source += a.0;
        report.rows_target += b.0;
        if a != b {
            report.mismatches.push(Mismatch { table: t.qualified(), from, to, source_rows: a.0, target_rows: b.0 });
        }
    }
    Ok(())
}

async fn one_digest(shard: &Endpoint, client: &Client, sql: &str) -> Result<(u64, String), Error> {
    let r = rows(client, sql).await.map_err(|e| Error::pg(&shard.name, "checksum a chunk", e))?;
    let r = r.into_iter().next().unwrap_or_default();
    let n = r.first().cloned().flatten().and_then(|v| v.parse().ok()).unwrap_or(0);
    let sum = r.get(1).cloned().flatten().unwrap_or_default();
    Ok((n, sum))
}

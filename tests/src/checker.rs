//! The move checker: writers that insert and update rows of many tenants through
//! one or more routers, each write with a unique sequence number, remembering every
//! write the router acknowledged. Afterwards [`Report::check`] proves, against the
//! shards themselves, that every acknowledged write is on its tenant's current shard
//! exactly once with its last acknowledged value, and nothing is where it should
//! not be. Writers also read back their own rows after each write: a count that
//! goes backwards is a failure. Any error a client sees is a failure.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

pub const TABLE_SQL: &str = "CREATE TABLE IF NOT EXISTS checker_items (
    tenant_id bigint NOT NULL,
    seq bigint NOT NULL,
    writer int NOT NULL,
    val int NOT NULL,
    PRIMARY KEY (tenant_id, seq))";

/// One acknowledged row: its tenant, writer and last acknowledged value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    pub tenant: i64,
    pub writer: i32,
    pub val: i32,
}

#[derive(Default)]
struct Shared {
    rows: Mutex<BTreeMap<i64, Row>>,
    errors: Mutex<Vec<String>>,
    latencies_us: Mutex<Vec<u64>>,
}

pub struct Checker {
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Operations done so far, for progress.
    pub ops: Arc<AtomicI64>,
}

/// A checker dropped without `stop` (a test that failed part-way) stops its
/// writers at once: their open connections would otherwise keep the cluster
/// under test from shutting down while the test unwinds.
impl Drop for Checker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[derive(Debug)]
pub struct Report {
    pub rows: BTreeMap<i64, Row>,
    pub errors: Vec<String>,
    pub ops: i64,
    /// Per-operation latency, sorted (µs).
    pub latencies_us: Vec<u64>,
}

impl Checker {
    /// Starts `writers` writers, writer `w` on router `urls[w % urls.len()]`, over
    /// the given tenants.
    pub async fn start(urls: &[String], writers: usize, tenants: &[i64]) -> Checker {
        Checker::start_run(urls, writers, tenants, 0).await
    }

    /// [`Checker::start`] for the `run`-th checker on the same table: its
    /// sequence numbers (from `run` × 10⁹) and writer ids (from `run` × 100) are
    /// its own, so several checkers can write one after another (merge their
    /// reports' `rows` before checking).
    pub async fn start_run(urls: &[String], writers: usize, tenants: &[i64], run: u32) -> Checker {
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared::default());
        let seq = Arc::new(AtomicI64::new(run as i64 * 1_000_000_000 + 1));
        let ops = Arc::new(AtomicI64::new(0));
        let mut tasks = Vec::new();
        for w in 0..writers {
            let client = crate::connect(&urls[w % urls.len()]).await;
            let (stop, shared, seq, ops) = (stop.clone(), shared.clone(), seq.clone(), ops.clone());
            let tenants = tenants.to_vec();
            tasks.push(tokio::spawn(async move {
                writer(run as i32 * 100 + w as i32, client, tenants, stop, shared, seq, ops).await;
            }));
        }
        Checker { stop, shared, tasks, ops }
    }

    pub fn errors(&self) -> usize {
        self.shared.errors.lock().unwrap().len()
    }

    pub async fn stop(mut self) -> Report {
        self.stop.store(true, Ordering::SeqCst);
        for t in std::mem::take(&mut self.tasks) {
            t.await.expect("writer task");
        }
        let mut latencies_us = std::mem::take(&mut *self.shared.latencies_us.lock().unwrap());
        latencies_us.sort_unstable();
        Report {
            rows: std::mem::take(&mut *self.shared.rows.lock().unwrap()),
            errors: std::mem::take(&mut *self.shared.errors.lock().unwrap()),
            ops: self.ops.load(Ordering::SeqCst),
            latencies_us,
        }
    }
}

async fn writer(
    w: i32,
    client: Client,
    tenants: Vec<i64>,
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
    seq: Arc<AtomicI64>,
    ops: Arc<AtomicI64>,
) {
    // This writer's rows per tenant: (seq, val), in insert order.
    let mut mine: BTreeMap<i64, Vec<(i64, i32)>> = BTreeMap::new();
    let mut i: u64 = w as u64 * 7919;
    // Errors are kept up to a bound: a writer whose router is gone fails fast,
    // over and over, and the first errors are the ones that explain.
    let fail = |what: String| {
        let mut e = shared.errors.lock().unwrap();
        if e.len() < 1000 {
            e.push(what);
        }
    };
    while !stop.load(Ordering::SeqCst) {
        i += 1;
        let t = tenants[(i as usize * 31 + w as usize) % tenants.len()];
        let started = Instant::now();
        let own = mine.entry(t).or_default();
        let result: Result<(), String> = match i % 6 {
            // Update one of this writer's rows of the tenant (extended protocol).
            0 | 1 if !own.is_empty() => {
                let k = (i as usize) % own.len();
                let (s, v) = own[k];
                match client
                    .execute("UPDATE checker_items SET val = $3 WHERE tenant_id = $1 AND seq = $2", &[&t, &s, &(v + 1)])
                    .await
                {
                    Ok(1) => {
                        own[k].1 = v + 1;
                        shared.rows.lock().unwrap().insert(s, Row { tenant: t, writer: w, val: v + 1 });
                        Ok(())
                    }
                    Ok(n) => Err(format!("update of tenant {t} seq {s} changed {n} rows")),
                    Err(e) => Err(format!("update tenant {t}: {e:?}")),
                }
            }
            // Two inserts in one transaction (simple protocol).
            2 => {
                let (a, b) = (seq.fetch_add(1, Ordering::SeqCst), seq.fetch_add(1, Ordering::SeqCst));
                let sql = format!(
                    "BEGIN; INSERT INTO checker_items VALUES ({t}, {a}, {w}, 0); \
                     INSERT INTO checker_items VALUES ({t}, {b}, {w}, 0); COMMIT"
                );
                match client.batch_execute(&sql).await {
                    Ok(()) => {
                        own.push((a, 0));
                        own.push((b, 0));
                        let mut rows = shared.rows.lock().unwrap();
                        rows.insert(a, Row { tenant: t, writer: w, val: 0 });
                        rows.insert(b, Row { tenant: t, writer: w, val: 0 });
                        Ok(())
                    }
                    Err(e) => Err(format!("transaction for tenant {t}: {e:?}")),
                }
            }
            // One insert (extended protocol).
            _ => {
                let s = seq.fetch_add(1, Ordering::SeqCst);
                match client.execute("INSERT INTO checker_items VALUES ($1, $2, $3, 0)", &[&t, &s, &w]).await {
                    Ok(_) => {
                        own.push((s, 0));
                        shared.rows.lock().unwrap().insert(s, Row { tenant: t, writer: w, val: 0 });
                        Ok(())
                    }
                    Err(e) => Err(format!("insert tenant {t}: {e:?}")),
                }
            }
        };
        shared.latencies_us.lock().unwrap().push(started.elapsed().as_micros() as u64);
        if let Err(e) = result {
            fail(e);
            continue;
        }
        // Read back: this writer's rows of the tenant, all of them, with their
        // values (a read that goes backwards shows fewer or older ones).
        if i.is_multiple_of(3) {
            let expect: i64 = own.iter().map(|(_, v)| *v as i64 + 1).sum();
            match client
                .query_one(
                    "SELECT coalesce(sum(val + 1), 0)::bigint FROM checker_items WHERE tenant_id = $1 AND writer = $2",
                    &[&t, &w],
                )
                .await
            {
                Ok(r) => {
                    let got: i64 = r.get(0);
                    if got != expect {
                        fail(format!("read of tenant {t} writer {w}: {got}, expected {expect}"));
                    }
                }
                Err(e) => fail(format!("read tenant {t}: {e:?}")),
            }
        }
        ops.fetch_add(1, Ordering::Relaxed);
    }
}

impl Report {
    pub fn percentile_us(&self, p: f64) -> u64 {
        if self.latencies_us.is_empty() {
            return 0;
        }
        let i = ((self.latencies_us.len() - 1) as f64 * p).round() as usize;
        self.latencies_us[i]
    }

    /// Checks the shards: `owner(tenant)` is the shard index that must hold the
    /// tenant's rows now; `exclusive(tenant)` says whether no other shard may hold
    /// them (false while a move keeps a copy on its old shard).
    pub async fn check(&self, shards: &[Client], owner: impl Fn(i64) -> usize, exclusive: impl Fn(i64) -> bool) {
        assert!(self.errors.is_empty(), "clients saw {} errors, first: {:?}", self.errors.len(), &self.errors[..1]);
        let mut on: Vec<BTreeMap<i64, (i64, i32, i32)>> = Vec::new();
        for c in shards {
            let rows = c.query("SELECT seq, tenant_id, writer, val FROM checker_items", &[]).await.expect("read shard");
            on.push(rows.iter().map(|r| (r.get::<_, i64>(0), (r.get(1), r.get(2), r.get(3)))).collect());
        }
        for (seq, row) in &self.rows {
            let o = owner(row.tenant);
            match on[o].get(seq) {
                None => panic!("acknowledged write {seq} of tenant {} is missing on shard {o}", row.tenant),
                Some(&(t, w, v)) => {
                    assert_eq!((t, w, v), (row.tenant, row.writer, row.val), "row {seq} on shard {o}");
                }
            }
            if exclusive(row.tenant) {
                for (i, s) in on.iter().enumerate() {
                    assert!(i == o || !s.contains_key(seq), "row {seq} of tenant {} is also on shard {i}", row.tenant);
                }
            }
        }
        // Nothing the clients did not write (or were not told about).
        for (i, s) in on.iter().enumerate() {
            for (seq, (t, _, _)) in s {
                assert!(
                    self.rows.contains_key(seq) || !exclusive(*t) && owner(*t) != i,
                    "shard {i} holds row {seq} of tenant {t} that no client saw acknowledged"
                );
            }
        }
    }
}

/// Waits (polling a condition, not sleeping blindly) up to `timeout`.
pub async fn wait_for<F: FnMut() -> bool>(what: &str, timeout: Duration, mut f: F) {
    let started = Instant::now();
    while !f() {
        assert!(started.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

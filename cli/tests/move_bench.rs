//! The move benchmark (not a timed test: it prints numbers and asserts nothing
//! about time). Run it with `bench/move.sh`.
//!
//! 1. Copy rate: the copy phase of a bucket move beside a plain
//!    `COPY (…) TO STDOUT | COPY … FROM STDIN` pipe of the same rows between the
//!    same two servers, measured in the same run.
//! 2. Cutover pause as clients feel it: three `shardgate serve` nodes, about 1,000
//!    writes/s on the moving bucket through all three routers, several cutovers
//!    and rollbacks; latency of the writes that started during each cutover beside
//!    the latency of all other writes.
//! 3. A hot tenant (about 1,000 writes/s on one tenant through the three routers)
//!    moved with an automatic cutover: whether it completes, the statements the
//!    routers held (p50, p99, max), and the writes' latency during the move
//!    beside the same writes before it.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use shardgate_directory::hash::bucket_of;
use shardgate_directory::TenantKey;
use shardgate_localpg::TestCluster;

const BUCKETS: u32 = 32;

fn pct(v: &mut [u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run bench/move.sh"]
async fn move_benchmark() {
    let rows: i64 = std::env::var("MOVE_BENCH_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(400_000);
    let pg = TestCluster::start(2).await.unwrap();
    let (dir, _logs, ports) = three_nodes("move-bench");
    let urls = pg.urls();
    let configs: Vec<_> = (1..=3u64).map(|id| write_config(&dir, id, &ports, &urls)).collect();
    let mut nodes = Vec::new();
    for c in &configs {
        nodes.push(spawn(c));
    }
    for n in &mut nodes {
        ready(n);
    }
    let routers: Vec<String> =
        ports.iter().map(|p| format!("postgres://postgres@127.0.0.1:{}/app", p.router)).collect();
    let c = shardgate_tests::connect(&routers[0]).await;
    c.batch_execute(
        "CREATE TABLE events (tenant_id bigint NOT NULL, id bigint NOT NULL, at timestamptz NOT NULL DEFAULT now(), \
         kind text NOT NULL, payload text NOT NULL, PRIMARY KEY (tenant_id, id))",
    )
    .await
    .unwrap();
    // Two buckets on shard_0 of the same size: one for the COPY pipe baseline and
    // one to move. Rows are loaded straight into shard_0.
    let bucket_a = 3;
    let bucket_b = 5;
    let src = pg.servers()[0].connect("app").await.unwrap();
    let tenants_of = |b: u32, n: usize| -> Vec<i64> {
        (1..).filter(|t| bucket_of(&TenantKey::Int(*t), BUCKETS) == b).take(n).collect()
    };
    for b in [bucket_a, bucket_b] {
        let ts = tenants_of(b, 100);
        let list = ts.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",");
        src.batch_execute(&format!(
            "INSERT INTO events (tenant_id, id, kind, payload) \
             SELECT (ARRAY[{list}])[1 + g % 100], g, 'kind' || (g % 7), repeat(md5(g::text), 2) \
             FROM generate_series(1, {rows}) g"
        ))
        .await
        .unwrap();
    }
    let bytes: i64 = src
        .query_one(&format!("SELECT sum(pg_column_size(e.*))::bigint FROM events e WHERE {}", filter(bucket_b)), &[])
        .await
        .unwrap()
        .get(0);

    // Baseline: a plain COPY pipe of bucket A between the same servers.
    let u = |i: usize| pg.servers()[i].url("app");
    let started = Instant::now();
    let pipe = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "psql '{}' -X -q -c \"COPY (SELECT * FROM events WHERE {}) TO STDOUT\" | psql '{}' -X -q -c \"COPY events FROM STDIN\"",
            u(0),
            filter(bucket_a),
            u(1)
        ))
        .status()
        .unwrap();
    assert!(pipe.success());
    let pipe_secs = started.elapsed().as_secs_f64();
    // Back out the baseline's rows so the target holds no rows of the moved bucket.
    let dst = pg.servers()[1].connect("app").await.unwrap();
    dst.batch_execute(&format!("DELETE FROM events WHERE {}", filter(bucket_a))).await.unwrap();

    let admin = ports[0].admin;
    let move_of = |id: u64| -> Value {
        admin_get(admin, "/moves")
            .and_then(|m| m.as_array()?.iter().find(|m| m["id"].as_u64() == Some(id)).cloned())
            .unwrap_or(Value::Null)
    };
    let wait = |id: u64, what: &str, cond: &dyn Fn(&Value) -> bool| -> Value {
        let started = Instant::now();
        loop {
            let m = move_of(id);
            assert_ne!(m["phase"], "failed", "{m}");
            if cond(&m) {
                return m;
            }
            assert!(started.elapsed() < Duration::from_secs(600), "timed out waiting for {what}: {m}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let started = Instant::now();
    let id = admin_post(admin, "/moves", &json!({ "bucket": bucket_b, "to": "shard_1" }))["id"].as_u64().unwrap();
    wait(id, "the copy", &|m| m["phase"] == "shadow");
    let copy_secs = started.elapsed().as_secs_f64();

    // Load: 8 writers, 125 writes/s each, on the moving bucket's tenants, through
    // the three routers; each write's start time and latency are kept.
    let moving = tenants_of(bucket_b, 100);
    let samples: Arc<Mutex<Vec<(Instant, u64, bool)>>> = Default::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..8usize {
        let client = shardgate_tests::connect(&routers[w % 3]).await;
        let (samples, stop, moving) = (samples.clone(), stop.clone(), moving.clone());
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(8));
            let mut i = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                i += 1;
                let t = moving[(i as usize * 7 + w) % moving.len()];
                let id = 10_000_000 + (w as i64) * 10_000_000 + i;
                let at = Instant::now();
                let ok = client
                    .execute("INSERT INTO events (tenant_id, id, kind, payload) VALUES ($1, $2, 'w', 'x')", &[&t, &id])
                    .await
                    .is_ok();
                samples.lock().unwrap().push((at, at.elapsed().as_micros() as u64, ok));
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    admin_post(admin, "/moves/request", &json!({ "id": id, "request": "verify" }));
    wait(id, "verify", &|m| m["counters"]["verified_at_ms"].is_u64() && m["phase"] == "shadow");
    let mut windows = Vec::new();
    let mut pauses = Vec::new();
    for round in 0..6 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = move_of(id)["counters"]["cutovers"].as_u64().unwrap_or(0);
        let req = if round % 2 == 0 { "cutover" } else { "rollback" };
        let t0 = Instant::now();
        admin_post(admin, "/moves/request", &json!({ "id": id, "request": req, "force": true }));
        let m = wait(id, req, &|m| m["counters"]["cutovers"].as_u64().unwrap_or(0) > before);
        windows.push((t0, Instant::now()));
        pauses.push(m["counters"]["pause_us"].as_u64().unwrap_or(0));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let samples = samples.lock().unwrap().clone();
    let errors = samples.iter().filter(|s| !s.2).count();
    let (mut during, mut outside): (Vec<u64>, Vec<u64>) = (Vec::new(), Vec::new());
    for (at, us, _) in &samples {
        if windows.iter().any(|(a, b)| at >= a && at <= b) {
            during.push(*us);
        } else {
            outside.push(*us);
        }
    }
    let secs = samples.last().map(|s| s.0.duration_since(samples[0].0).as_secs_f64()).unwrap_or(1.0);
    let mb = bytes as f64 / 1e6;
    println!();
    println!("MOVE BENCH  rows per bucket {rows}, {mb:.1} MB of row data");
    println!(
        "copy        shardgate move {:.1} MB/s   COPY pipe {:.1} MB/s   ratio {:.2}",
        mb / copy_secs,
        mb / pipe_secs,
        pipe_secs / copy_secs
    );
    println!(
        "load        {} writes in {:.0} s ({:.0}/s) through 3 routers, {} errors",
        samples.len(),
        secs,
        samples.len() as f64 / secs,
        errors
    );
    let base = pct(&mut outside.clone(), 0.5);
    println!(
        "cutovers    {} (alternating cutover and rollback); statements held by the migrator: {} µs each",
        windows.len(),
        pauses.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")
    );
    println!(
        "writes      outside cutovers p50 {} µs p99 {} µs | during cutovers ({}) p50 {} µs p99 {} µs max {} µs",
        base,
        pct(&mut outside, 0.99),
        during.len(),
        pct(&mut during, 0.5),
        pct(&mut during, 0.99),
        pct(&mut during, 1.0)
    );
    println!(
        "extra       during - outside p50: p50 {} µs, p99 {} µs, max {} µs",
        pct(&mut during, 0.5).saturating_sub(base),
        pct(&mut during, 0.99).saturating_sub(base),
        pct(&mut during, 1.0).saturating_sub(base)
    );

    // 3. A hot tenant moves on its own: 8 writers at 125 writes/s each on one
    //    tenant through the three routers, then `move tenant … --cutover auto`.
    let hot = tenants_of(7, 1)[0];
    let samples: Arc<Mutex<Vec<(Instant, u64, bool)>>> = Default::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..8usize {
        let client = shardgate_tests::connect(&routers[w % 3]).await;
        let (samples, stop) = (samples.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(8));
            let mut i = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                i += 1;
                let id = 500_000_000 + (w as i64) * 10_000_000 + i;
                let at = Instant::now();
                let ok = client
                    .execute(
                        "INSERT INTO events (tenant_id, id, kind, payload) VALUES ($1, $2, 'w', 'x')",
                        &[&hot, &id],
                    )
                    .await
                    .is_ok();
                samples.lock().unwrap().push((at, at.elapsed().as_micros() as u64, ok));
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let move_started = Instant::now();
    let hid = admin_post(admin, "/moves", &json!({ "tenant": hot.to_string(), "to": "shard_1", "cutover_auto": true }))
        ["id"]
        .as_u64()
        .unwrap();
    wait(hid, "the hot tenant's automatic cutover", &|m| m["phase"] == "reverse");
    let move_ended = Instant::now();
    // The routers' heartbeats bring their held statements within a second.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let m = move_of(hid);
    let samples = samples.lock().unwrap().clone();
    let hot_errors = samples.iter().filter(|s| !s.2).count();
    let mut before: Vec<u64> = samples.iter().filter(|s| s.0 < move_started).map(|s| s.1).collect();
    let mut during: Vec<u64> =
        samples.iter().filter(|s| s.0 >= move_started && s.0 <= move_ended).map(|s| s.1).collect();
    let rate = before.len() as f64 / 5.0;
    let held =
        m["pauses"].as_array().and_then(|p| p.iter().find(|p| p["kind"] == "cutover")).map(|p| p["held"].clone());
    let held = held.unwrap_or(Value::Null);
    println!(
        "hot         tenant {hot} at {rate:.0} writes/s through 3 routers: automatic cutover {} after {:.1} s; {} errors",
        if m["phase"] == "reverse" { "completed" } else { "DID NOT complete" },
        (move_ended - move_started).as_secs_f64(),
        hot_errors
    );
    println!(
        "hot held    {} statements held by the cutover (all routers): p50 {} µs p99 {} µs max {} µs",
        held["statements"], held["p50_us"], held["p99_us"], held["max_us"]
    );
    println!(
        "hot writes  before the move p50 {} µs p99 {} µs max {} µs | during the move ({}) p50 {} µs p99 {} µs max {} µs",
        pct(&mut before, 0.5),
        pct(&mut before, 0.99),
        pct(&mut before, 1.0),
        during.len(),
        pct(&mut during, 0.5),
        pct(&mut during, 0.99),
        pct(&mut during, 1.0)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn filter(bucket: u32) -> String {
    format!("((hashint8extended(tenant_id, 0) & 9223372036854775807) % {BUCKETS}) = {bucket}")
}

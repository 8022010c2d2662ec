//! A move whose driving process is killed at every named fault point, while
//! writers keep writing through two other routers of a three-node cluster.
//!
//! Node 1 drives moves (`[router.moves] drive = "always"`) and crashes — abort,
//! like `kill -9` — the first time it reaches each fault point; the test restarts
//! it each time and it picks the move up from the directory. The move goes
//! through copy, verify, cutover, rollback, cutover again and completion. Then the
//! checker proves every acknowledged write is on its tenant's current shard once,
//! and no client saw an error.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use shardgate_directory::hash::bucket_of;
use shardgate_directory::TenantKey;
use shardgate_localpg::TestCluster;
use shardgate_tests::checker::{self, Checker};

const BUCKETS: u32 = 32;

struct Driver {
    proc: Option<Proc>,
    config: std::path::PathBuf,
    env: Vec<(String, String)>,
    restarts: usize,
}

impl Driver {
    fn start(&mut self) {
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut p = spawn_with(&self.config, &env);
        ready(&mut p);
        self.proc = Some(p);
    }

    /// Restarts the driving node if it died (a fault point fired).
    fn revive(&mut self) {
        let dead = match &mut self.proc {
            Some(p) => p.child.try_wait().unwrap().is_some(),
            None => true,
        };
        if dead {
            self.restarts += 1;
            self.start();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_resumes_after_its_driver_is_killed_at_every_fault_point() {
    let pg = TestCluster::start(2).await.unwrap();
    let (dir, _logs, ports) = three_nodes("move-faults");
    let urls = pg.urls();
    let mut configs = Vec::new();
    for id in 1..=3u64 {
        let path = write_config(&dir, id, &ports, &urls);
        let drive = if id == 1 { "always" } else { "never" };
        let mut text = std::fs::read_to_string(&path).unwrap();
        text = text.replacen("[router.moves]\n", &format!("[router.moves]\ndrive = \"{drive}\"\n"), 1);
        std::fs::write(&path, text).unwrap();
        configs.push(path);
    }
    let once = dir.join("faults-fired");
    std::fs::create_dir_all(&once).unwrap();
    let faults: Vec<String> = shardgate_migrator::fault::POINTS.iter().map(|p| format!("{p}=crash")).collect();
    let mut driver = Driver {
        proc: None,
        config: configs[0].clone(),
        env: vec![
            ("SHARDGATE_FAULTS".into(), faults.join(",")),
            ("SHARDGATE_FAULTS_ONCE_DIR".into(), once.display().to_string()),
        ],
        restarts: 0,
    };
    driver.start();
    let _n2 = start(&configs[1]);
    let _n3 = start(&configs[2]);
    let routers: Vec<String> =
        ports[1..].iter().map(|p| format!("postgres://postgres@127.0.0.1:{}/app", p.router)).collect();
    let c = shardgate_tests::connect(&routers[0]).await;
    c.batch_execute(checker::TABLE_SQL).await.unwrap();

    // The bucket of tenant 1, on shard_0 (buckets are placed in ranges).
    let bucket = (0..BUCKETS / 2).find(|b| (1..).any(|t| bucket_of(&TenantKey::Int(t), BUCKETS) == *b)).unwrap();
    let moving: Vec<i64> = (1..).filter(|t| bucket_of(&TenantKey::Int(*t), BUCKETS) == bucket).take(20).collect();
    let mut tenants = moving.clone();
    tenants.extend((1..).filter(|t| bucket_of(&TenantKey::Int(*t), BUCKETS) != bucket).take(10));
    let load = Checker::start(&routers, 8, &tenants).await;

    let admin = ports[1].admin;
    let out = admin_post(admin, "/moves", &json!({ "bucket": bucket, "to": "shard_1", "cutover_auto": true }));
    let id = out["id"].as_u64().unwrap();
    let move_of = || -> Value {
        admin_get(admin, "/moves")
            .and_then(|m| m.as_array()?.iter().find(|m| m["id"].as_u64() == Some(id)).cloned())
            .unwrap_or(Value::Null)
    };
    let counter = |m: &Value, k: &str| m["counters"][k].as_u64().unwrap_or(0);
    let wait = |what: &str, cond: &dyn Fn(&Value) -> bool, driver: &mut Driver| {
        let started = Instant::now();
        loop {
            driver.revive();
            let m = move_of();
            assert_ne!(m["phase"], "failed", "{m}");
            if cond(&m) {
                return m;
            }
            assert!(started.elapsed() < Duration::from_secs(240), "timed out waiting for {what}: {m}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let m = wait("the automatic cutover", &|m| m["phase"] == "reverse", &mut driver);
    assert_eq!(m["owner"], "shard_1", "{m}");
    admin_post(admin, "/moves/request", &json!({ "id": id, "request": "rollback" }));
    let n = counter(&m, "cutovers");
    wait("the rollback", &|m| m["phase"] == "shadow" && counter(m, "cutovers") > n, &mut driver);
    admin_post(admin, "/moves/request", &json!({ "id": id, "request": "cutover", "force": true }));
    wait("the second cutover", &|m| m["phase"] == "reverse", &mut driver);
    admin_post(admin, "/moves/request", &json!({ "id": id, "request": "complete" }));
    let m = wait("completion", &|m| m["phase"] == "done", &mut driver);

    let report = load.stop().await;
    eprintln!(
        "{} ops through 2 routers, {} driver restarts; latency p50 {} µs, p99 {} µs, max {} µs; move: {m}",
        report.ops,
        driver.restarts,
        report.percentile_us(0.5),
        report.percentile_us(0.99),
        report.percentile_us(1.0)
    );
    let fired = std::fs::read_dir(&once).unwrap().count();
    assert_eq!(fired, shardgate_migrator::fault::POINTS.len(), "every fault point fired once");
    assert_eq!(driver.restarts, fired, "the driver died at each fault point and came back");
    let shards = [pg.servers()[0].connect("app").await.unwrap(), pg.servers()[1].connect("app").await.unwrap()];
    let owner = |t: i64| {
        if moving.contains(&t) {
            1
        } else if bucket_of(&TenantKey::Int(t), BUCKETS) < BUCKETS / 2 {
            0
        } else {
            1
        }
    };
    report.check(&shards, owner, |_| true).await;
    // Nothing left behind: a completed move, however often its driver died on
    // the way, leaves no slot, publication or subscription on either shard.
    for (i, s) in shards.iter().enumerate() {
        let left: Vec<String> = s
            .query(
                "SELECT 'slot ' || slot_name FROM pg_replication_slots \
                 UNION ALL SELECT 'publication ' || pubname FROM pg_publication \
                 UNION ALL SELECT 'subscription ' || subname FROM pg_subscription",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(left.is_empty(), "shard_{i} keeps replication objects after the move: {left:?}");
    }
    // Kept on failure, for the nodes' logs.
    let _ = std::fs::remove_dir_all(&dir);
}

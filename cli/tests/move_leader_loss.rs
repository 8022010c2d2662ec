//! A move under writes through three routers, and the directory leader — the node
//! that drives the move — lost in the middle of two cutovers.
//!
//! First 8 writers on 50 tenants (20 of them in the moving bucket) write through
//! all three routers while the bucket is copied, shadowed, verified, cut over,
//! rolled back and cut over again. Then the leader dies (abort, like `kill -9`)
//! once after fencing the old shard, before the flip, and once right after the
//! flip, each time while writers keep writing through the two other routers; the
//! test restarts it. A new leader takes the move over: it undoes the first cutover
//! and finishes the second. In the end every acknowledged write is on its tenant's
//! shard exactly once, and no client saw an error.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use shardgate_directory::hash::bucket_of;
use shardgate_directory::TenantKey;
use shardgate_localpg::TestCluster;
use shardgate_tests::checker::{self, Checker, Report};

const BUCKETS: u32 = 32;

struct Node {
    proc: Option<Proc>,
    config: PathBuf,
    env: Vec<(String, String)>,
}

impl Node {
    fn start(&mut self) {
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut p = spawn_with(&self.config, &env);
        ready(&mut p);
        self.proc = Some(p);
    }

    fn dead(&mut self) -> bool {
        match &mut self.proc {
            Some(p) => p.child.try_wait().ok().flatten().is_some(),
            None => true,
        }
    }
}

struct Cluster {
    nodes: Vec<Node>,
    ports: Vec<NodePorts>,
}

impl Cluster {
    fn router(&self, i: usize) -> String {
        format!("postgres://postgres@127.0.0.1:{}/app", self.ports[i].router)
    }

    /// The index of the node leading the directory, as a live node reports it.
    fn leader(&mut self) -> usize {
        let started = Instant::now();
        loop {
            for i in 0..self.nodes.len() {
                if self.nodes[i].dead() {
                    continue;
                }
                let leader = admin_get(self.ports[i].admin, "/status").and_then(|s| s["replica"]["leader"].as_u64());
                if let Some(id) = leader.filter(|id| *id >= 1) {
                    return id as usize - 1;
                }
            }
            assert!(started.elapsed() < Duration::from_secs(30), "no directory leader");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn admin(&mut self, not: usize) -> u16 {
        let i = (0..self.nodes.len()).find(|i| *i != not && !self.nodes[*i].dead()).unwrap();
        self.ports[i].admin
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_survives_losing_the_directory_leader_in_the_middle_of_cutovers() {
    let pg = TestCluster::start(2).await.unwrap();
    let (dir, _logs, ports) = three_nodes("move-leader");
    let urls = pg.urls();
    // Both fault points are armed on every node, and disarmed by the files that
    // say they fired: a test arms one by deleting its file.
    let once = dir.join("faults-fired");
    std::fs::create_dir_all(&once).unwrap();
    let points = ["cutover.after_fence", "cutover.after_flip"];
    for p in points {
        std::fs::write(once.join(p), "").unwrap();
    }
    let env = vec![
        ("SHARDGATE_FAULTS".to_string(), points.map(|p| format!("{p}=crash")).join(",")),
        ("SHARDGATE_FAULTS_ONCE_DIR".to_string(), once.display().to_string()),
    ];
    let nodes = (1..=3u64)
        .map(|id| Node { proc: None, config: write_config(&dir, id, &ports, &urls), env: env.clone() })
        .collect();
    let mut cluster = Cluster { nodes, ports };
    for n in &mut cluster.nodes {
        n.start();
    }
    let all: Vec<String> = (0..3).map(|i| cluster.router(i)).collect();
    let c = shardgate_tests::connect(&all[0]).await;
    c.batch_execute(checker::TABLE_SQL).await.unwrap();

    // A bucket on shard_0 (buckets are placed in ranges), 20 of its tenants, and
    // 30 tenants of other buckets.
    let bucket = (0..BUCKETS / 2).find(|b| (1..200).any(|t| bucket_of(&TenantKey::Int(t), BUCKETS) == *b)).unwrap();
    let moving: Vec<i64> = (1..).filter(|t| bucket_of(&TenantKey::Int(*t), BUCKETS) == bucket).take(20).collect();
    let mut tenants = moving.clone();
    tenants.extend((1..).filter(|t| bucket_of(&TenantKey::Int(*t), BUCKETS) != bucket).take(30));

    let load = Checker::start(&all, 8, &tenants).await;
    let admin = cluster.ports[0].admin;
    let id = admin_post(admin, "/moves", &json!({ "bucket": bucket, "to": "shard_1" }))["id"].as_u64().unwrap();
    let request = |admin: u16, what: &str| {
        admin_post(admin, "/moves/request", &json!({ "id": id, "request": what, "force": true }));
    };
    let counter = |m: &Value, k: &str| m["counters"][k].as_u64().unwrap_or(0);

    wait(&mut cluster, id, "shadow reads from every router", |m| {
        m["phase"] == "shadow" && counter(m, "shadow_compared") >= 30
    });
    request(admin, "verify");
    let m = wait(&mut cluster, id, "verify", |m| m["counters"]["verified_at_ms"].is_u64() && m["phase"] == "shadow");
    assert_eq!(m["verified_clean"], true, "{m}");
    request(admin, "cutover");
    wait(&mut cluster, id, "the cutover", |m| m["phase"] == "reverse" && counter(m, "cutovers") == 1);
    request(admin, "rollback");
    wait(&mut cluster, id, "the rollback", |m| m["phase"] == "shadow" && counter(m, "cutovers") == 2);
    request(admin, "cutover");
    let m = wait(&mut cluster, id, "the second cutover", |m| m["phase"] == "reverse" && counter(m, "cutovers") == 3);
    assert_eq!(counter(&m, "shadow_mismatched"), 0, "{m}");
    let mut report = load.stop().await;
    eprintln!("three routers: {} ops, latency p99 {} µs", report.ops, report.percentile_us(0.99));

    // The leader dies after fencing, before the flip: the next leader undoes the
    // cutover (the rows stay on shard_1) and nothing fails for the writers on
    // the other two routers.
    let (more, leader) = lose_leader(&mut cluster, &once, points[0], &tenants, 1, |c, admin| {
        request(admin, "rollback");
        wait(c, id, "the undone rollback", |m| {
            m["phase"] == "reverse" && m["note"].as_str().is_some_and(|n| n.contains("undone"))
        })
    })
    .await;
    assert_eq!(more["owner"], "shard_1", "{more}");
    report.rows.extend(leader.rows);
    report.errors.extend(leader.errors);

    // The leader dies right after the flip: the next leader finishes the
    // rollback (the rows are on shard_0 again).
    let (more, leader) = lose_leader(&mut cluster, &once, points[1], &tenants, 2, |c, admin| {
        request(admin, "rollback");
        wait(c, id, "the finished rollback", |m| {
            m["phase"] == "shadow" && m["note"].as_str().is_some_and(|n| n.contains("finished"))
        })
    })
    .await;
    assert_eq!(more["owner"], "shard_0", "{more}");
    report.rows.extend(leader.rows);
    report.errors.extend(leader.errors);

    // And the move still completes.
    let admin = cluster.admin(usize::MAX);
    request(admin, "cutover");
    wait(&mut cluster, id, "the last cutover", |m| m["phase"] == "reverse");
    request(admin, "complete");
    wait(&mut cluster, id, "completion", |m| m["phase"] == "done");
    let shards = [pg.servers()[0].connect("app").await.unwrap(), pg.servers()[1].connect("app").await.unwrap()];
    let owner = |t: i64| {
        if moving.contains(&t) || bucket_of(&TenantKey::Int(t), BUCKETS) >= BUCKETS / 2 {
            1
        } else {
            0
        }
    };
    report.check(&shards, owner, |_| true).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Arms fault point `point`, runs `act` (which makes the leader cut over) with
/// writers on the two routers that are not the leader, restarts the leader once
/// it died there, and returns the move as `act` left it and the writers' report.
async fn lose_leader(
    cluster: &mut Cluster,
    once: &std::path::Path,
    point: &str,
    tenants: &[i64],
    run: u32,
    act: impl FnOnce(&mut Cluster, u16) -> Value,
) -> (Value, Report) {
    let leader = cluster.leader();
    let others: Vec<String> = (0..3).filter(|i| *i != leader).map(|i| cluster.router(i)).collect();
    let load = Checker::start_run(&others, 8, tenants, run).await;
    std::fs::remove_file(once.join(point)).unwrap();
    let admin = cluster.admin(leader);
    let m = act(cluster, admin);
    assert!(once.join(point).exists(), "the leader passed {point} without dying: {m}");
    assert!(cluster.nodes[leader].dead(), "node {} led and should have died at {point}", leader + 1);
    cluster.nodes[leader].start();
    let report = load.stop().await;
    eprintln!("leader lost at {point}: {} ops, latency max {} µs", report.ops, report.percentile_us(1.0));
    (m, report)
}

/// Waits for a condition of the move, as the live nodes report it (a fault point
/// may have made the leader abort on the way).
fn wait(cluster: &mut Cluster, id: u64, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let m = (0..3)
            .filter(|i| !cluster.nodes[*i].dead())
            .find_map(|i| {
                admin_get(cluster.ports[i].admin, "/moves")?
                    .as_array()?
                    .iter()
                    .find(|m| m["id"].as_u64() == Some(id))
                    .cloned()
            })
            .unwrap_or(Value::Null);
        assert_ne!(m["phase"], "failed", "{m}");
        if cond(&m) {
            return m;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "timed out waiting for {what}: {m}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

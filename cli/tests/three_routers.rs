//! A whole rebalance under load, through three routers in three processes: a
//! cluster of three nodes (router and directory replica each) on two shards,
//! writers on 50 tenants spread over all three routers and a hot tenant with
//! writers of its own, then `shard add` and `rebalance --apply`. Every move must
//! finish without a hand (automatic cutover and completion), no client may see
//! an error, no read may go backwards (each writer reads its rows back), and the
//! checker must find every acknowledged write once, on its tenant's shard.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use shardgate_localpg::TestCluster;
use shardgate_tests::checker::{self, Checker};

fn shardgate(args: &[&str], admin: u16) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shardgate"))
        .args(args)
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        .env("SHARDGATE_ADMIN_TOKEN", "adm")
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_through_three_routers_finishes_every_move_under_load_with_a_hot_tenant() {
    let started = Instant::now();
    let pg = TestCluster::start(3).await.unwrap();
    let urls = pg.urls();
    let (dir, _logs, ports) = three_nodes("three-routers");
    let configs: Vec<_> = (1..=3u64).map(|id| write_config(&dir, id, &ports, &urls[..2])).collect();
    let _nodes: Vec<Proc> = configs.iter().map(|c| start(c)).collect();
    let routers: Vec<String> =
        ports.iter().map(|p| format!("postgres://postgres@127.0.0.1:{}/app", p.router)).collect();
    let c = shardgate_tests::connect(&routers[0]).await;
    c.batch_execute(checker::TABLE_SQL).await.unwrap();

    let hot = 1i64;
    let tenants: Vec<i64> = (2..=51).collect();
    let load = Checker::start(&routers, 6, &tenants).await;
    let hot_load = Checker::start_run(&routers, 3, &[hot], 1).await;
    let ops = load.ops.load(std::sync::atomic::Ordering::SeqCst);
    checker::wait_for("load on every router", Duration::from_secs(60), || {
        load.ops.load(std::sync::atomic::Ordering::SeqCst) > ops + 1000
    })
    .await;

    let admin = ports[0].admin;
    let (ok, out, err) = tokio::task::block_in_place(|| shardgate(&["shard", "add", "shard_2", &urls[2]], admin));
    assert!(ok, "shard add: {out}\n{err}");
    let (ok, out, err) = tokio::task::block_in_place(|| {
        shardgate(&["rebalance", "--apply", "--strategy", "count", "--concurrency", "2"], admin)
    });
    assert!(ok, "rebalance --apply: {out}\n{err}");

    let status: Value = admin_get(ports[1].admin, "/status").expect("status from another node");
    let moves = status["moves"].as_array().unwrap();
    assert!(!moves.is_empty(), "the rebalance moved buckets: {out}");
    for m in moves {
        assert_eq!(m["phase"], "done", "every move finished on its own: {m}");
    }
    let on_new = status["placements"].as_array().unwrap().iter().filter(|p| *p == "shard_2").count();
    assert!(on_new >= 32 / 3 - 1, "shard_2 took its share of the 32 buckets ({on_new}): {status}");

    let report = load.stop().await;
    let hot_report = hot_load.stop().await;
    assert!(report.errors.is_empty(), "client errors: {:?}", &report.errors[..report.errors.len().min(5)]);
    assert!(
        hot_report.errors.is_empty(),
        "hot tenant errors: {:?}",
        &hot_report.errors[..hot_report.errors.len().min(5)]
    );
    let holds: Vec<String> = moves
        .iter()
        .filter_map(|m| {
            let p = m["pauses"].as_array()?.iter().find(|p| p["kind"] == "cutover")?;
            Some(format!("{} p99 {} µs max {} µs", p["held"]["statements"], p["held"]["p99_us"], p["held"]["max_us"]))
        })
        .collect();
    eprintln!(
        "{} moves in {:.0} s; {} ops (hot tenant {}); write latency p99 {} µs, max {} µs; cutover holds: {holds:?}",
        moves.len(),
        started.elapsed().as_secs_f64(),
        report.ops,
        hot_report.ops,
        report.percentile_us(0.99),
        report.percentile_us(1.0)
    );

    let mut all = report;
    all.rows.extend(hot_report.rows);
    let placements: Vec<String> =
        status["placements"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect();
    // Pins are `[tenant, shard]` pairs (a whale tenant may be placed on its own).
    let pins: Vec<(String, String)> = serde_json::from_value(status["pins"].clone()).unwrap();
    let owner = |t: i64| {
        let name = match pins.iter().find(|(k, _)| *k == t.to_string()) {
            Some((_, s)) => s.clone(),
            None => placements
                [shardgate_directory::hash::bucket_of(&shardgate_directory::TenantKey::Int(t), 32) as usize]
                .clone(),
        };
        name.trim_start_matches("shard_").parse::<usize>().unwrap()
    };
    let mut shards = Vec::new();
    for s in pg.servers() {
        shards.push(s.connect("app").await.unwrap());
    }
    all.check(&shards, owner, |_| true).await;
    let _ = std::fs::remove_dir_all(&dir);
}

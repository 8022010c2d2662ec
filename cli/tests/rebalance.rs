//! Rebalancing as an operator runs it, against `shardgate up --shards 4`: skewed
//! data with one whale tenant; `rebalance --dry-run` prints the plan, `--apply`
//! runs it while writers keep writing, then `shard drain` empties a shard, still
//! under load. The checker then finds every acknowledged write exactly once on
//! its tenant's shard, and no client error.

mod common;

use common::*;
use serde_json::Value;
use shardgate_directory::hash::bucket_of;
use shardgate_directory::TenantKey;
use shardgate_tests::checker::{self, Checker};

const BUCKETS: u32 = 16;

fn plan(up: &Up) -> Value {
    let (ok, out, err) = tokio::task::block_in_place(|| cli(up, &["rebalance", "--json"]));
    assert!(ok, "{out}\n{err}");
    serde_json::from_str(&out).unwrap()
}

fn status(up: &Up) -> Value {
    let (ok, out, err) = cli(up, &["status", "--json"]);
    assert!(ok, "{err}");
    serde_json::from_str(&out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_evens_out_skewed_shards_and_drain_empties_one_under_load() {
    let up = up(&["--shards", "4", "--buckets", &BUCKETS.to_string(), "--shadow-for", "500ms"]);
    psql(&up.url, "CREATE TABLE events (tenant_id bigint, id bigint, body text, PRIMARY KEY (tenant_id, id))");
    psql(&up.url, checker::TABLE_SQL);
    // Every bucket holds a little; shard_0's buckets (0-3, placed in ranges) hold
    // much more, and one tenant there, the whale, holds more than all the rest.
    let on_shard0 = |t: i64| bucket_of(&TenantKey::Int(t), BUCKETS) < BUCKETS / 4;
    let whale = (1..).find(|t| on_shard0(*t)).unwrap();
    let mut sql = String::new();
    let mut rows = 0;
    for t in 1..=200i64 {
        let n = if t == whale {
            20_000
        } else if on_shard0(t) {
            300
        } else {
            10
        };
        rows += n;
        sql.push_str(&format!(
            "/* tenant_id={t} */ INSERT INTO events SELECT {t}, g, repeat('x', 100) FROM generate_series(1, {n}) g;\n"
        ));
    }
    let file = up.base.join("load.sql");
    std::fs::write(&file, sql).unwrap();
    let out = std::process::Command::new("psql")
        .args([&up.url, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let tenants: Vec<i64> = (1000..1040).collect();
    let load = Checker::start(std::slice::from_ref(&up.url), 4, &tenants).await;

    // The plan: it lowers the spread and isolates the whale.
    let (ok, out, err) = tokio::task::block_in_place(|| cli(&up, &["rebalance", "--dry-run"]));
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("spread by size") && out.contains("dry run"), "{out}");
    assert!(out.contains(&format!("tenant {whale}")) && out.contains("whale"), "{out}");
    let planned = plan(&up);
    let before = planned["before"]["cv"].as_f64().unwrap();
    let target = planned["after"]["cv"].as_f64().unwrap();
    assert!(target < before, "{planned}");
    assert!(status(&up)["moves"].as_array().unwrap().is_empty(), "a dry run moves nothing");

    let (ok, out, err) = tokio::task::block_in_place(|| cli(&up, &["rebalance", "--apply"]));
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("move(s) done"), "{out}");
    let now = plan(&up);
    let cv = now["before"]["cv"].as_f64().unwrap();
    assert!(cv <= target + 0.05, "spread after the rebalance: cv {cv}, planned {target}: {now}");
    let s = status(&up);
    assert!(
        s["pins"].as_array().unwrap().iter().any(|p| p[0] == whale.to_string().as_str()),
        "the whale is on a shard of its own: {}",
        s["pins"]
    );
    assert!(s["moves"].as_array().unwrap().iter().all(|m| m["phase"] == "done"), "{}", s["moves"]);

    // The routers count what each bucket costs and tell the directory: the load
    // strategy plans with it.
    let bucket = bucket_of(&TenantKey::Int(tenants[0]), BUCKETS) as usize;
    let started = std::time::Instant::now();
    loop {
        let load: Value = serde_json::from_str(&admin_text(up.admin, &up.token(), "/load").unwrap()).unwrap();
        if load["buckets"][bucket]["statements"].as_u64().unwrap_or(0) > 0 {
            assert!(load["buckets"][bucket]["micros"].as_u64().unwrap() > 0, "{load}");
            assert!(load["tenants"].as_array().is_some_and(|t| !t.is_empty()), "{load}");
            break;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "no load counted: {load}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (ok, out, err) = tokio::task::block_in_place(|| cli(&up, &["rebalance", "--strategy", "load", "--json"]));
    assert!(ok, "{out}\n{err}");
    let by_load: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(by_load["strategy"], "load");
    assert!(by_load["before"]["max"].as_u64().unwrap() > 0, "{by_load}");

    // Drain shard_3 under the same load.
    let (ok, out, err) = tokio::task::block_in_place(|| cli(&up, &["shard", "drain", "shard_3"]));
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("drained and removed"), "{out}");
    let s = status(&up);
    let shard3 = &s["shards"][3];
    assert_eq!((shard3["state"].as_str(), shard3["buckets"].as_u64()), (Some("removed"), Some(0)), "{shard3}");
    assert!(s["pins"].as_array().unwrap().iter().all(|p| p[1] != "shard_3"), "{}", s["pins"]);

    let report = load.stop().await;
    eprintln!("{} ops during the rebalance and the drain; latency p99 {} µs", report.ops, report.percentile_us(0.99));
    let names: Vec<String> =
        s["shards"].as_array().unwrap().iter().map(|x| x["name"].as_str().unwrap().to_string()).collect();
    let mut shards = Vec::new();
    for x in s["shards"].as_array().unwrap() {
        shards.push(shardgate_tests::connect(x["url"].as_str().unwrap()).await);
    }
    let owner = |t: i64| {
        let pinned = s["pins"].as_array().unwrap().iter().find(|p| p[0] == t.to_string().as_str());
        let name = match pinned {
            Some(p) => p[1].as_str().unwrap(),
            None => s["placements"][bucket_of(&TenantKey::Int(t), BUCKETS) as usize].as_str().unwrap(),
        };
        names.iter().position(|n| n == name).unwrap()
    };
    report.check(&shards, owner, |_| true).await;
    // The events are all there, once.
    assert_eq!(psql(&up.url, "SELECT count(*) FROM events"), rows.to_string());
}

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

/// Runs a script of many statements through the router with psql.
fn run_file(up: &Up, sql: &str) {
    let file = up.base.join("load.sql");
    std::fs::write(&file, sql).unwrap();
    let out = std::process::Command::new("psql")
        .args([&up.url, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
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
    run_file(&up, &sql);

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

/// The runbook's "add a shard" in one step (`shard add NAME URL --rebalance`), a
/// tenant put on a shard by hand (`move tenant … --cutover auto --wait`, then
/// `complete`), and a drain of the new shard interrupted and run again, all under
/// load; nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_shard_takes_its_share_and_a_tenant_moves_by_hand() {
    let up = up(&["--shards", "2", "--buckets", "8", "--shadow-for", "300ms"]);
    let extra = shardgate_localpg::TestCluster::start(1).await.unwrap();
    psql(&up.url, "CREATE TABLE events (tenant_id bigint, id bigint, body text, PRIMARY KEY (tenant_id, id))");
    psql(&up.url, checker::TABLE_SQL);
    // A reference table (no tenant_id): its rows are on the shards the cluster
    // started with.
    psql(&up.url, "CREATE TABLE plans (name text PRIMARY KEY, price int)");
    psql(&up.url, "INSERT INTO plans VALUES ('free', 0), ('pro', 10), ('team', 30)");
    let mut sql = String::new();
    for t in 1..=60i64 {
        sql.push_str(&format!(
            "/* tenant_id={t} */ INSERT INTO events SELECT {t}, g, repeat('x', 50) FROM generate_series(1, 40) g;\n"
        ));
    }
    run_file(&up, &sql);
    let tenants: Vec<i64> = (1000..1020).collect();
    let load = Checker::start(std::slice::from_ref(&up.url), 2, &tenants).await;

    let url = extra.urls()[0].clone();
    let (ok, out, err) = tokio::task::block_in_place(|| cli(&up, &["shard", "add", "shard_2", &url, "--rebalance"]));
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("added shard shard_2") && out.contains("move(s) done"), "{out}");
    let s = status(&up);
    let buckets: Vec<u64> = s["shards"].as_array().unwrap().iter().map(|x| x["buckets"].as_u64().unwrap()).collect();
    assert!(buckets[2] >= 2 && buckets.iter().all(|&b| b >= 2), "every shard holds a share: {buckets:?}");
    assert!(s["moves"].as_array().unwrap().iter().all(|m| m["phase"] == "done"), "{}", s["moves"]);
    // Run again (as after an interruption): the shard is there, the rebalance goes on.
    let (ok, out, err) = tokio::task::block_in_place(|| cli(&up, &["shard", "add", "shard_2", &url, "--rebalance"]));
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("was added already"), "{out}");
    let s = status(&up);
    // The new shard got the schema with its first move, not the reference rows:
    // reference reads and writes stay on the shards that have them.
    assert_eq!(s["shards"][2]["reference"], false, "{}", s["shards"][2]);
    psql(&up.url, "INSERT INTO plans VALUES ('enterprise', 99)");
    for _ in 0..6 {
        assert_eq!(psql(&up.url, "SELECT count(*) FROM plans"), "4", "every reference read sees every row");
    }

    // One tenant, by hand, to the shard its bucket is not on.
    let tenant = 7i64;
    let bucket = bucket_of(&TenantKey::Int(tenant), 8) as usize;
    let from = s["placements"][bucket].as_str().unwrap().to_string();
    let to = if from == "shard_2" { "shard_0" } else { "shard_2" };
    let (ok, out, err) = tokio::task::block_in_place(|| {
        cli(&up, &["move", "tenant", &tenant.to_string(), "--to", to, "--cutover", "auto", "--wait"])
    });
    assert!(ok, "{out}\n{err}");
    let id = out
        .split_whitespace()
        .skip_while(|w| *w != "move")
        .nth(1)
        .and_then(|w| w.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no move id in: {out}"));
    assert!(out.contains("reverse"), "{out}");
    let (ok, out, err) = tokio::task::block_in_place(|| cli(&up, &["complete", &id.to_string()]));
    assert!(ok, "{out}\n{err}");
    let s = status(&up);
    assert!(
        s["pins"].as_array().unwrap().iter().any(|p| p[0] == tenant.to_string().as_str() && p[1] == to),
        "tenant {tenant} is pinned to {to}: {}",
        s["pins"]
    );
    let shard_url = |name: &str| {
        s["shards"].as_array().unwrap().iter().find(|x| x["name"] == name).unwrap()["url"].as_str().unwrap().to_string()
    };
    let count = format!("SELECT count(*) FROM events WHERE tenant_id = {tenant}");
    assert_eq!(psql(&shard_url(to), &count), "40", "the tenant's rows are on {to}");
    assert_eq!(psql(&shard_url(&from), &count), "0", "and gone from {from}");

    // Drain the new shard again, interrupted: the CLI is killed while a move is
    // under way, and the same command run again finishes the job.
    let mut drain = std::process::Command::new(env!("CARGO_BIN_EXE_shardgate"))
        .arg("--data-dir")
        .arg(&up.base)
        .args(["shard", "drain", "shard_2"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(up.base.join("drain.err")).unwrap())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let busy = |s: &Value| {
        s["moves"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| !matches!(m["phase"].as_str(), Some("done" | "cancelled" | "failed")))
    };
    while !busy(&status(&up)) {
        assert!(started.elapsed() < std::time::Duration::from_secs(60), "the drain started no move");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        drain.try_wait().unwrap().is_none(),
        "the drain ended before it could be interrupted: {}",
        std::fs::read_to_string(up.base.join("drain.err")).unwrap_or_default()
    );
    drain.kill().unwrap();
    drain.wait().unwrap();
    let (ok, out, err) = tokio::task::block_in_place(|| cli(&up, &["shard", "drain", "shard_2"]));
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("drained and removed"), "{out}");
    let s = status(&up);
    assert!(s["moves"].as_array().unwrap().iter().all(|m| m["phase"] == "done"), "{}", s["moves"]);
    let shard2 = &s["shards"][2];
    assert_eq!((shard2["state"].as_str(), shard2["buckets"].as_u64()), (Some("removed"), Some(0)), "{shard2}");
    assert!(s["pins"].as_array().unwrap().iter().all(|p| p[1] != "shard_2"), "{}", s["pins"]);

    let report = load.stop().await;
    let names: Vec<String> =
        s["shards"].as_array().unwrap().iter().map(|x| x["name"].as_str().unwrap().to_string()).collect();
    let mut shards = Vec::new();
    for name in &names {
        shards.push(shardgate_tests::connect(&shard_url(name)).await);
    }
    let owner = |t: i64| {
        let pinned = s["pins"].as_array().unwrap().iter().find(|p| p[0] == t.to_string().as_str());
        let name = match pinned {
            Some(p) => p[1].as_str().unwrap(),
            None => s["placements"][bucket_of(&TenantKey::Int(t), 8) as usize].as_str().unwrap(),
        };
        names.iter().position(|n| n == name).unwrap()
    };
    report.check(&shards, owner, |_| true).await;
    assert_eq!(psql(&up.url, "SELECT count(*) FROM events"), (60 * 40).to_string());
}

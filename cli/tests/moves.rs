//! Moves as an operator runs them: `shardgate move … --cutover auto --wait`,
//! `status`, `rollback`, `cutover`, `complete`, against `shardgate up`.

mod common;

use common::*;

fn status(up: &Up) -> serde_json::Value {
    let (ok, out, err) = cli(up, &["status", "--json"]);
    assert!(ok, "{err}");
    serde_json::from_str(&out).unwrap()
}

#[test]
fn an_operator_moves_a_bucket_rolls_it_back_cuts_over_again_and_completes() {
    let up = up(&["--buckets", "16"]);
    psql(&up.url, "CREATE TABLE orders (tenant_id bigint, id bigint, total int, PRIMARY KEY (tenant_id, id))");
    let rows: Vec<String> = (1..=200).flat_map(|t| (1..=5).map(move |i| format!("({t}, {i}, {})", t * i))).collect();
    psql(&up.url, &format!("INSERT INTO orders VALUES {}", rows.join(", ")));
    let total = psql(&up.url, "SELECT sum(total) FROM orders");
    let s = status(&up);
    let bucket = (0..16).find(|b| s["placements"][*b] == "shard_0").unwrap();

    // Checks first: a target that does not exist, a bucket that is not there.
    let (ok, _, err) = cli(&up, &["move", "bucket", &bucket.to_string(), "--to", "nowhere"]);
    assert!(!ok && err.contains("no shard named"), "{err}");

    // An admin watches, through a pipe (no escape codes there).
    let watcher = std::process::Command::new(env!("CARGO_BIN_EXE_shardgate"))
        .arg("--data-dir")
        .arg(&up.base)
        .args(["status", "--watch", "--interval", "100ms"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (ok, out, err) =
        cli(&up, &["move", "bucket", &bucket.to_string(), "--to", "shard_1", "--cutover", "auto", "--wait"]);
    assert!(ok, "{out}\n{err}");
    // (A quick copy may pass between two progress lines: the watch view's
    // timeline below shows every phase.)
    assert!(out.contains("move 1 planned") && out.contains("reverse"), "{out}");
    let s = status(&up);
    let m = &s["moves"][0];
    assert_eq!(m["phase"], "reverse", "{m}");
    assert_eq!(m["owner"], "shard_1");
    assert_eq!(m["verified_clean"], true, "{m}");
    assert!(m["counters"]["pause_us"].as_u64().unwrap() > 0, "{m}");
    assert_eq!(s["placements"][bucket], "shard_1");
    assert_eq!(psql(&up.url, "SELECT sum(total) FROM orders"), total, "a cross-shard read counts the rows once");
    let (_, table, _) = cli(&up, &["status"]);
    assert!(table.contains("moves:") && table.contains("reverse"), "{table}");
    let watched = Watched(watcher).output_until("REVERSE");
    assert!(!watched.contains('\x1b'), "no escape codes into a pipe");
    for want in ["SHARD", "shard_1", "SHADOW", "timeline: plan → copy", "verify clean", "last paused statements"] {
        assert!(watched.contains(want), "{want:?} not in the watch view:\n{watched}");
    }

    // Writes after the cutover survive the rollback (the reverse stream).
    psql(&up.url, "UPDATE orders SET total = total + 1 WHERE tenant_id = 1 AND id = 1");
    let (ok, out, err) = cli(&up, &["rollback", "1"]);
    assert!(ok, "{out}\n{err}");
    assert_eq!(status(&up)["placements"][bucket], "shard_0");
    let (ok, out, err) = cli(&up, &["cutover", "1"]);
    assert!(ok, "{out}\n{err}");
    assert_eq!(status(&up)["placements"][bucket], "shard_1");
    let (ok, out, err) = cli(&up, &["complete", "1"]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("done"), "{out}");
    let expected: i64 = total.parse::<i64>().unwrap() + 1;
    assert_eq!(psql(&up.url, "SELECT sum(total) FROM orders"), expected.to_string());
    // A request that does not apply says why.
    let (ok, _, err) = cli(&up, &["rollback", "1"]);
    assert!(!ok && err.contains("ended"), "{err}");

    // At most [router.moves] max_concurrent (2) moves at once; a second move of
    // the same bucket is refused; cancel drops the new copies.
    let s = status(&up);
    let on0: Vec<usize> = (0..16).filter(|b| s["placements"][*b] == "shard_0").take(3).collect();
    let start = |b: usize| cli(&up, &["move", "bucket", &b.to_string(), "--to", "shard_1"]);
    let (ok, out, err) = start(on0[0]);
    assert!(ok, "{out}\n{err}");
    let (ok, _, err) = start(on0[0]);
    assert!(!ok && err.contains("already moving"), "{err}");
    let (ok, out, err) = start(on0[1]);
    assert!(ok, "{out}\n{err}");
    let (ok, _, err) = start(on0[2]);
    assert!(!ok && err.contains("max_concurrent"), "{err}");

    // Commands say what they did: verify exits 0 when the copies are equal and 1
    // when they differ, naming the rows; a cutover is refused only for a
    // difference its own verify found, naming the way on; a request that does
    // not apply names the ones that do.
    let (ok, out, err) = cli(&up, &["verify", "2"]);
    assert!(ok && out.contains("verified clean"), "{out}\n{err}");
    let (ok, out, err) = cli(&up, &["rollback", "2"]);
    assert!(
        !ok && err.contains("does not apply before a cutover") && err.contains("shardgate cancel 2"),
        "{out}\n{err}"
    );
    let target = s["shards"].as_array().unwrap().iter().find(|x| x["name"] == "shard_1").unwrap()["url"]
        .as_str()
        .unwrap()
        .to_string();
    let planted = (1..=200)
        .find(|t| shardgate_directory::hash::bucket_of(&shardgate_directory::TenantKey::Int(*t), 16) == on0[0] as u32)
        .unwrap();
    psql(&target, &format!("SET session_replication_role = replica; UPDATE orders SET total = -1 WHERE tenant_id = {planted} AND id = 1"));
    let (ok, out, err) = cli(&up, &["verify", "2"]);
    assert!(!ok && out.contains("chunk(s) differ") && out.contains("rows with key from"), "{out}\n{err}");
    let (ok, out, err) = cli(&up, &["cutover", "2"]);
    assert!(
        !ok && err.contains("cutover refused: verify found a difference") && err.contains("--force"),
        "{out}\n{err}"
    );
    assert_eq!(status(&up)["placements"][on0[0]], "shard_0", "nothing was cut over");
    for id in ["2", "3"] {
        let (ok, out, err) = cli(&up, &["cancel", id]);
        assert!(ok && out.contains("cancelled"), "{out}\n{err}");
    }
    assert_eq!(psql(&up.url, "SELECT sum(total) FROM orders"), expected.to_string());

    // What Prometheus sees: routed statements, a shard's error by SQLSTATE, the
    // cutovers' pause, the shards' latency, the directory.
    let out = std::process::Command::new("psql").args([&up.url, "-X", "-c", "SELECT * FROM no_such_table"]).output();
    assert!(!out.unwrap().status.success());
    let m = admin_text(up.admin, &up.token(), "/metrics").unwrap();
    let value = |line: &str| -> f64 {
        let l = m.lines().find(|l| l.starts_with(line)).unwrap_or_else(|| panic!("no {line} in:\n{m}"));
        l.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!(value("shardgate_queries_total{route=\"shard\"}") >= 1.0);
    assert!(value("shardgate_queries_total{route=\"fanout\"}") >= 1.0);
    assert_eq!(value("shardgate_errors_total{sqlstate=\"42P01\"}"), 1.0);
    assert!(value("shardgate_cutover_pause_seconds_count") >= 3.0, "three cutovers happened");
    assert!(value("shardgate_shard_statement_seconds_count{shard=\"shard_0\"}") >= 1.0);
    assert!(value("shardgate_directory_epoch") >= 1.0);
    // `up` runs three directory replicas; any of them may lead.
    assert!(value("shardgate_directory_leader") >= 1.0);
    assert!(m.contains("shardgate_directory_is_leader "), "{m}");
    assert!(m.contains("# TYPE shardgate_pool_wait_seconds histogram"), "{m}");
}

/// A `status --watch` process; killed on drop.
struct Watched(std::process::Child);

impl Watched {
    /// Its output so far, once it has shown `text` (the move already got there,
    /// so the next frame has it).
    /// The output up to the end of the first frame that shows `text` (frames
    /// end with a blank line; pipe reads may split them anywhere).
    fn output_until(mut self, text: &str) -> String {
        use std::io::Read;
        let mut out = self.0.stdout.take().unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let done = |seen: &[u8]| {
            let s = String::from_utf8_lossy(seen);
            s.find(text).is_some_and(|at| s[at..].contains("\n\n"))
        };
        while !done(&seen) {
            let n = out.read(&mut buf).unwrap();
            assert!(n > 0, "the watch ended without showing {text:?}:\n{}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&seen).to_string()
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

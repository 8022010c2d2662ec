//! Three `shardgate serve` processes with replicated directory replicas, on real
//! Postgres servers: kill -9 the directory leader while clients write through the
//! other routers; a new leader is elected, changes commit, and nothing stops.

use std::time::{Duration, Instant};

use shardgate_localpg::TestCluster;
use std::process::Command;

mod common;
use common::*;

/// The directory's epoch as a linearizable read on a node, retried while the
/// cluster settles (a read needs a leader and a quorum).
async fn epoch_of_directory(port: u16) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(e) = admin_get(port, "/directory").and_then(|d| d["epoch"].as_u64()) {
            return e;
        }
        assert!(Instant::now() < deadline, "no linearizable directory read from the node on admin port {port}");
        tokio::task::yield_now().await;
    }
}

fn leader_seen_by(port: u16) -> Option<u64> {
    admin_get(port, "/status")?["replica"]["leader"].as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_directory_leader_elects_another_and_routing_never_stops() {
    let pg = TestCluster::start(2).await.unwrap();
    let urls: Vec<String> = pg.servers().iter().map(|s| s.url("app")).collect();
    let tmp = tempfile::tempdir().unwrap();
    let ports: Vec<NodePorts> =
        (0..3).map(|_| NodePorts { router: free_port(), admin: free_port(), raft: free_port() }).collect();
    let configs: Vec<_> = (1..=3).map(|id| write_config(tmp.path(), id, &ports, &urls)).collect();
    let _logs = LogsOnFailure(tmp.path().to_path_buf());
    // All three at once: a node waits for the directory to elect a leader, which
    // needs a majority running.
    let mut procs: Vec<Option<Proc>> = configs.iter().map(|c| Some(spawn(c))).collect();
    for p in procs.iter_mut().flatten() {
        ready(p);
    }

    let leader = leader_seen_by(ports[0].admin).expect("a leader after start");
    let router_url = |i: usize| format!("postgres://postgres@127.0.0.1:{}/app", ports[i].router);
    let (setup, conn) = tokio_postgres::connect(&router_url(0), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    setup.batch_execute("CREATE TABLE t (tenant_id bigint, seq bigint, PRIMARY KEY (tenant_id, seq))").await.unwrap();

    // Writers on the two routers whose replicas are not the leader.
    let survivors: Vec<usize> = (0..3).filter(|i| *i as u64 + 1 != leader).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for (w, &i) in survivors.iter().enumerate() {
        let (c, conn) = tokio_postgres::connect(&router_url(i), tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut seq = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && seq < 5000 {
                seq += 1;
                let tenant = (seq % 20) + 100 * w as i64;
                c.execute("INSERT INTO t VALUES ($1, $2)", &[&tenant, &seq])
                    .await
                    .expect("a write failed during failover");
                acked.push((tenant, seq));
            }
            Ok::<_, String>(acked)
        }));
    }
    // kill -9 the leader.
    let killed_at = Instant::now();
    let mut dead = procs[leader as usize - 1].take().unwrap();
    unsafe { libc::kill(dead.child.id() as i32, libc::SIGKILL) };
    let _ = dead.child.wait();
    drop(dead);
    let watcher = ports[survivors[0]].admin;
    let new_leader = loop {
        if let Some(l) = leader_seen_by(watcher).filter(|l| *l != leader) {
            break l;
        }
        assert!(killed_at.elapsed() < Duration::from_secs(10), "no new leader");
        tokio::task::yield_now().await;
    };
    let failover = killed_at.elapsed();
    println!("directory failover: new leader {new_leader} after {failover:?}");
    assert!(failover < Duration::from_secs(2), "failover took {failover:?}");
    // Directory changes keep committing.
    let pin = |port: u16| {
        use std::io::{Read, Write};
        let body = r#"{"tenant":"999999","shard":"shard_1"}"#;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            s,
            "POST /tenants/pin HTTP/1.1\r\nauthorization: Bearer adm\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    };
    let answer = pin(ports[survivors[1]].admin);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked = Vec::new();
    for w in writers {
        match w.await.unwrap() {
            Ok(a) => acked.extend(a),
            Err(e) => {
                panic!("{e}");
            }
        }
    }
    // Every acknowledged write is on its tenant's shard, exactly once.
    let (s0, c0) = tokio_postgres::connect(&urls[0], tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(c0);
    let (s1, c1) = tokio_postgres::connect(&urls[1], tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(c1);
    let n0: i64 = s0.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    let n1: i64 = s1.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!((n0 + n1) as usize, acked.len());

    // The killed node comes back and catches up.
    procs[leader as usize - 1] = Some(start(&configs[leader as usize - 1]));
    let target = epoch_of_directory(ports[survivors[0]].admin).await;
    let back = ports[leader as usize - 1].admin;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let epoch = admin_get(back, "/directory").and_then(|d| d["epoch"].as_u64());
        if epoch == Some(target) {
            break;
        }
        assert!(Instant::now() < deadline, "the restarted node never caught up ({epoch:?} vs {target})");
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_as_a_learner_catches_up_and_is_promoted() {
    let pg = TestCluster::start(2).await.unwrap();
    let urls: Vec<String> = pg.servers().iter().map(|s| s.url("app")).collect();
    let tmp = tempfile::tempdir().unwrap();
    let _logs = LogsOnFailure(tmp.path().to_path_buf());
    let ports: Vec<NodePorts> =
        (0..4).map(|_| NodePorts { router: free_port(), admin: free_port(), raft: free_port() }).collect();
    let configs: Vec<_> = (1..=3).map(|id| write_config(tmp.path(), id, &ports[..3], &urls)).collect();
    let mut procs: Vec<Proc> = configs.iter().map(|c| spawn(c)).collect();
    for p in procs.iter_mut() {
        ready(p);
    }
    // Node 4 starts empty, knowing the others; it is not a member yet.
    let c4 = write_node_config(tmp.path(), 4, &ports, &urls, false);
    let mut four = spawn(&c4);
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_shardgate"))
            .args(args)
            .args(["--admin", &format!("127.0.0.1:{}", ports[0].admin)])
            .env("SHARDGATE_ADMIN_TOKEN", "adm")
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let raft4 = format!("127.0.0.1:{}", ports[3].raft);
    assert!(cli(&["node", "add", "4", &raft4, "--learner"]).contains("learner"));
    ready(&mut four);
    let target = epoch_of_directory(ports[0].admin).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = admin_get(ports[3].admin, "/status");
        let caught_up = s.as_ref().is_some_and(|s| {
            s["epoch"].as_u64() == Some(target) && s["replica"]["applied_index"].as_u64().unwrap_or(0) > 0
        });
        if caught_up {
            break;
        }
        assert!(Instant::now() < deadline, "node 4 never caught up: {s:?}");
        tokio::task::yield_now().await;
    }
    // Its router serves.
    let (c, conn) = tokio_postgres::connect(
        &format!("postgres://postgres@127.0.0.1:{}/app", ports[3].router),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    c.simple_query("SELECT 1").await.unwrap();
    // Promoted to voter.
    cli(&["node", "add", "4", &raft4]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let voters = admin_get(ports[3].admin, "/status").map(|s| s["replica"]["voters"].clone());
        if voters.as_ref().and_then(|v| v.as_array()).is_some_and(|v| v.iter().any(|x| x.as_u64() == Some(4))) {
            break;
        }
        assert!(Instant::now() < deadline, "node 4 never became a voter: {voters:?}");
        tokio::task::yield_now().await;
    }
    // Node 4 replaces node 3: the runbook removes the old one, then stops it.
    let out = cli(&["node", "remove", "3"]);
    assert!(out.contains('3'), "{out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let voters = admin_get(ports[3].admin, "/status").map(|s| s["replica"]["voters"].clone());
        let ids: Option<Vec<u64>> = voters.as_ref().and_then(|v| v.as_array()).map(|v| {
            let mut ids: Vec<u64> = v.iter().filter_map(|x| x.as_u64()).collect();
            ids.sort();
            ids
        });
        if ids.as_deref() == Some(&[1, 2, 4][..]) {
            break;
        }
        assert!(Instant::now() < deadline, "node 3 is still a voter: {voters:?}");
        tokio::task::yield_now().await;
    }
    drop(procs.remove(2));
    // The directory commits with nodes 1, 2 and 4 (after an election if node 3 led).
    let deadline = Instant::now() + Duration::from_secs(15);
    while !leader_seen_by(ports[0].admin).is_some_and(|l| [1, 2, 4].contains(&l)) {
        assert!(Instant::now() < deadline, "no leader among nodes 1, 2 and 4");
        tokio::task::yield_now().await;
    }
    let before = epoch_of_directory(ports[3].admin).await;
    cli(&["tenant", "pin", "4242", "--to", "shard_1"]);
    assert!(epoch_of_directory(ports[3].admin).await > before, "a change commits without node 3");
    drop(four);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_past_compaction_rejoins_by_snapshot_and_a_full_restart_keeps_the_directory() {
    let pg = TestCluster::start(2).await.unwrap();
    let urls: Vec<String> = pg.servers().iter().map(|s| s.url("app")).collect();
    let tmp = tempfile::tempdir().unwrap();
    let _logs = LogsOnFailure(tmp.path().to_path_buf());
    let ports: Vec<NodePorts> =
        (0..3).map(|_| NodePorts { router: free_port(), admin: free_port(), raft: free_port() }).collect();
    let configs: Vec<_> = (1..=3).map(|id| write_config(tmp.path(), id, &ports, &urls)).collect();
    let mut procs: Vec<Option<Proc>> = configs.iter().map(|c| Some(spawn(c))).collect();
    for p in procs.iter_mut().flatten() {
        ready(p);
    }
    // Node 3 stops (kill -9) while the others commit more changes than the log
    // keeps (compaction every 1,000 entries): it can only come back by snapshot.
    procs[2] = None;
    // A commit can time out on a loaded machine (503, nothing applied): try again.
    let pin = |t: u64| {
        let body = serde_json::json!({ "tenant": (1_000_000 + t).to_string(), "shard": "shard_1" });
        for _ in 0..20 {
            if let Some(v) = admin_try_post(ports[0].admin, "/tenants/pin", &body) {
                return v;
            }
        }
        panic!("pinning tenant {t} kept failing");
    };
    for t in 0..1_100 {
        pin(t);
    }
    let want = epoch_of_directory(ports[0].admin).await;
    procs[2] = Some(spawn(&configs[2]));
    ready(procs[2].as_mut().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    while admin_get(ports[2].admin, "/status").and_then(|s| s["epoch"].as_u64()) != Some(want) {
        assert!(Instant::now() < deadline, "node 3 did not catch up to epoch {want}");
        tokio::task::yield_now().await;
    }
    let log = std::fs::read_to_string(tmp.path().join("node3.log")).unwrap();
    assert!(log.contains("installed a directory snapshot"), "node 3 caught up without a snapshot");
    let before = admin_get(ports[2].admin, "/directory").unwrap();
    assert_eq!(before["pins"].as_array().map(|p| p.len()), Some(1_100));

    // All three stop at once (kill -9) and start again: the same directory.
    for p in procs.iter_mut() {
        *p = None;
    }
    let mut procs: Vec<Proc> = configs.iter().map(|c| spawn(c)).collect();
    for p in procs.iter_mut() {
        ready(p);
    }
    for (node, p) in ports.iter().enumerate() {
        let after = epoch_of_directory(p.admin).await;
        assert_eq!(after, want, "node {} after the restart", node + 1);
        let d = admin_get(p.admin, "/directory").unwrap();
        assert_eq!((&d["pins"], &d["placements"]), (&before["pins"], &before["placements"]), "node {}", node + 1);
    }
    // And it still takes changes.
    pin(5_000);
    assert!(epoch_of_directory(ports[0].admin).await > want);
}

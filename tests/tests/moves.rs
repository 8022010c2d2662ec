//! Online moves through a router: the move driver takes a bucket through copy,
//! verify, cutover, rollback, cutover again and completion while writers keep
//! writing through the router, and the checker proves nothing acknowledged was
//! lost, doubled or misplaced and no client saw an error.

use std::sync::Arc;
use std::time::Duration;

use shardgate_directory::state::{Command, MovePhase, MoveRequest, MoveSubject, Outcome};
use shardgate_directory::{Directory, TenantKey};
use shardgate_migrator::driver::{Driver, DriverConfig};
use shardgate_migrator::Endpoint;
use shardgate_router::backend::ShardAddress;
use shardgate_router::hold::LocalWriter;
use shardgate_tests::checker::{self, Checker};
use shardgate_tests::Harness;

fn start_driver(h: &Harness) -> tokio::sync::watch::Sender<bool> {
    let urls = h.cluster.urls();
    let resolve = Arc::new(move |_: &Directory, i: usize| {
        let url = urls.get(i)?;
        Some(Endpoint::new(format!("shard_{i}"), ShardAddress::from_url(url).ok()?))
    });
    let driver = Driver::new(
        h.directory.clone(),
        Arc::new(LocalWriter(h.directory.clone())),
        resolve,
        DriverConfig { progress_every: Duration::from_millis(100), ..Default::default() },
        Arc::new(|| true),
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(driver.run(stopped));
    stop
}

fn phase(h: &Harness, id: u64) -> MovePhase {
    h.directory.load().moves[&id].phase
}

fn counter(h: &Harness, id: u64, name: &str) -> u64 {
    h.directory.load().moves[&id].counters.get(name).copied().unwrap_or(0)
}

async fn wait_phase(h: &Harness, id: u64, want: MovePhase, what: &str) {
    let timeout = Duration::from_secs(90);
    checker::wait_for(what, timeout, || {
        let p = phase(h, id);
        assert!(p != MovePhase::Failed, "move failed: {:?}", h.directory.load().moves[&id].note);
        p == want
    })
    .await;
}

fn request(h: &Harness, id: u64, r: MoveRequest) {
    let out = h.directory.apply_local(&Command::RequestMove { id, request: Some(r) });
    assert!(!matches!(out, Outcome::Rejected { .. }), "{out:?}");
}

#[tokio::test]
async fn a_bucket_moves_under_write_load_and_back_and_again_without_a_client_error() {
    let h = Harness::start(2).await;
    let stop_driver = start_driver(&h);
    let c = h.client().await;
    c.batch_execute(checker::TABLE_SQL).await.unwrap();

    // A bucket on shard 0 with 20 tenants; 10 tenants elsewhere on both shards.
    let dir = h.directory.load();
    let bucket = dir.bucket_of(&TenantKey::Int(h.tenants_on(0, 1)[0]));
    let moving: Vec<i64> = (1..).filter(|t| dir.bucket_of(&TenantKey::Int(*t)) == bucket).take(20).collect();
    let mut tenants = moving.clone();
    tenants.extend(h.tenants_on(0, 40).into_iter().filter(|t| !moving.contains(t)).take(5));
    tenants.extend(h.tenants_on(1, 5));
    drop(dir);

    let load = Checker::start(&[h.url()], 8, &tenants).await;
    let out = h.directory.apply_local(&Command::CreateMove {
        subject: MoveSubject::Bucket(bucket),
        target: "shard_1".into(),
        options: Default::default(),
        at_ms: shardgate_migrator::now_ms(),
    });
    let Outcome::MoveCreated { id, .. } = out else { panic!("{out:?}") };

    wait_phase(&h, id, MovePhase::DualWrite, "the copy").await;
    request(&h, id, MoveRequest::Cutover { force: false });
    checker::wait_for("the unverified cutover to be refused", Duration::from_secs(30), || {
        h.directory.load().moves[&id].note.as_deref().is_some_and(|n| n.contains("not verified"))
    })
    .await;
    assert_eq!(h.shard_of(moving[0]), 0);

    request(&h, id, MoveRequest::Verify);
    checker::wait_for("verify", Duration::from_secs(60), || counter(&h, id, "verified_at_ms") > 0).await;
    assert_eq!(counter(&h, id, "verified_clean"), 1, "{:?}", h.directory.load().moves[&id]);

    request(&h, id, MoveRequest::Cutover { force: false });
    wait_phase(&h, id, MovePhase::Reverse, "the cutover").await;
    assert_eq!(h.shard_of(moving[0]), 1);
    let first_pause = counter(&h, id, "pause_us");

    // Let writes land on the new shard, then roll back: the reverse stream kept the
    // old shard current, so nothing is lost.
    let ops = load.ops.load(std::sync::atomic::Ordering::SeqCst);
    checker::wait_for("writes after the cutover", Duration::from_secs(30), || {
        load.ops.load(std::sync::atomic::Ordering::SeqCst) > ops + 200
    })
    .await;
    request(&h, id, MoveRequest::Rollback);
    checker::wait_for("the rollback", Duration::from_secs(60), || counter(&h, id, "cutovers") == 2).await;
    wait_phase(&h, id, MovePhase::DualWrite, "dual-write after the rollback").await;
    assert_eq!(h.shard_of(moving[0]), 0);

    let ops = load.ops.load(std::sync::atomic::Ordering::SeqCst);
    checker::wait_for("writes after the rollback", Duration::from_secs(30), || {
        load.ops.load(std::sync::atomic::Ordering::SeqCst) > ops + 200
    })
    .await;
    request(&h, id, MoveRequest::Cutover { force: true });
    wait_phase(&h, id, MovePhase::Reverse, "the second cutover").await;
    assert_eq!(counter(&h, id, "cutovers"), 3);

    let report = load.stop().await;
    eprintln!(
        "checker: {} ops, {} rows; latency p50 {} µs, p99 {} µs, max {} µs; first cutover held statements {} µs",
        report.ops,
        report.rows.len(),
        report.percentile_us(0.5),
        report.percentile_us(0.99),
        report.percentile_us(1.0),
        first_pause
    );
    let shards = [h.shard(0).await, h.shard(1).await];
    let dir = h.directory.load();
    let owner = |t: i64| dir.shard_for(&TenantKey::Int(t));
    // The old shard keeps a current copy until the move completes.
    report.check(&shards, owner, |t| !moving.contains(&t)).await;

    request(&h, id, MoveRequest::Complete);
    wait_phase(&h, id, MovePhase::Done, "completion").await;
    report.check(&shards, owner, |_| true).await;
    let _ = stop_driver.send(true);
}

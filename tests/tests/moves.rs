//! Online moves through a router: the move driver takes a bucket through copy,
//! verify, cutover, rollback, cutover again and completion while writers keep
//! writing through the router, and the checker proves nothing acknowledged was
//! lost, doubled or misplaced and no client saw an error.

use std::sync::Arc;
use std::time::Duration;

use shardgate_directory::pause::HoldKind;
use shardgate_directory::state::{Command, MovePhase, MoveRequest, MoveSubject, Outcome};
use shardgate_directory::{Directory, TenantKey};
use shardgate_migrator::driver::DriverConfig;
use shardgate_router::backend::ShardAddress;
use shardgate_tests::checker::{self, Checker};
use shardgate_tests::Harness;

fn start_driver(h: &Harness) -> tokio::sync::watch::Sender<bool> {
    start_driver_with(h, DriverConfig { progress_every: Duration::from_millis(100), ..Default::default() })
}

fn start_driver_with(h: &Harness, config: DriverConfig) -> tokio::sync::watch::Sender<bool> {
    start_driver_over(h, h.cluster.urls(), config)
}

/// A driver that reaches the shards at `urls` (TLS parameters, say).
fn start_driver_over(h: &Harness, urls: Vec<String>, config: DriverConfig) -> tokio::sync::watch::Sender<bool> {
    shardgate_tests::start_move_driver(h, urls, config)
}

fn phase_of(h: &Harness, id: u64) -> MovePhase {
    phase(h, id)
}

fn phase(h: &Harness, id: u64) -> MovePhase {
    h.directory.load().moves[&id].phase
}

fn counter(h: &Harness, id: u64, name: &str) -> u64 {
    h.directory.load().moves[&id].counters.get(name).copied().unwrap_or(0)
}

async fn wait_phase(h: &Harness, id: u64, want: MovePhase, what: &str) {
    wait(h, id, what, || phase(h, id) == want).await
}

/// Waits for a condition of the move; on timeout, keeps the shards' server logs
/// and shows their errors, which is where a stuck stream explains itself.
async fn wait(h: &Harness, id: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    loop {
        assert!(phase(h, id) != MovePhase::Failed, "move failed: {:?}", h.directory.load().moves[&id].note);
        if cond() {
            return;
        }
        if started.elapsed() > Duration::from_secs(90) {
            for i in 0..2 {
                let log = std::fs::read_to_string(h.shard_server(i).log_path()).unwrap_or_default();
                let keep = std::env::temp_dir().join(format!("shardgate-move-test-shard{i}.log"));
                let _ = std::fs::write(&keep, &log);
                eprintln!("--- shard {i} server log errors (whole log kept in {}) ---", keep.display());
                let errors: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("ERROR") || l.contains("FATAL") || l.contains("DETAIL:  Key"))
                    .take(10)
                    .collect();
                for l in errors {
                    eprintln!("{l}");
                }
                eprintln!("--- shard {i} replication and waits ---");
                for line in replication_state(&h.shard(i).await).await {
                    eprintln!("{line}");
                }
            }
            panic!("timed out waiting for {what}; the move: {:?}", h.directory.load().moves[&id]);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What a shard says about its slots, its senders and who waits on what: the
/// state a stuck stream is explained by.
async fn replication_state(c: &tokio_postgres::Client) -> Vec<String> {
    let queries = [
        "SELECT 'wal ' || pg_current_wal_lsn()::text",
        "SELECT 'slot ' || slot_name || ' active=' || active || ' confirmed=' || coalesce(confirmed_flush_lsn::text, '-') \
         || ' restart=' || coalesce(restart_lsn::text, '-') FROM pg_replication_slots",
        "SELECT 'sender ' || application_name || ' ' || state || ' sent=' || coalesce(sent_lsn::text, '-') \
         || ' flush=' || coalesce(flush_lsn::text, '-') FROM pg_stat_replication",
        "SELECT 'subscription ' || subname || ' received=' || coalesce(received_lsn::text, '-') \
         || ' reported=' || coalesce(latest_end_lsn::text, '-') FROM pg_stat_subscription",
        "SELECT 'backend ' || pid || ' ' || coalesce(backend_type, '') || ' ' || coalesce(state, '') || ' wait=' \
         || coalesce(wait_event_type || '/' || wait_event, '-') || ' ' || left(coalesce(query, ''), 120) \
         FROM pg_stat_activity WHERE pid <> pg_backend_pid()",
    ];
    let mut out = Vec::new();
    for q in queries {
        match c.simple_query(q).await {
            Ok(rows) => out.extend(rows.iter().filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })),
            Err(e) => out.push(format!("{q}: {e}")),
        }
    }
    out
}

/// A bucket on shard 0 and its first `n` tenants.
fn bucket_on_shard_0(dir: &Directory, h: &Harness, n: usize) -> (u32, Vec<i64>) {
    let bucket = dir.bucket_of(&TenantKey::Int(h.tenants_on(0, 1)[0]));
    (bucket, (1..).filter(|t| dir.bucket_of(&TenantKey::Int(*t)) == bucket).take(n).collect())
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
    let (bucket, moving) = bucket_on_shard_0(&dir, &h, 20);
    let mut tenants = moving.clone();
    tenants.extend(h.tenants_on(0, 40).into_iter().filter(|t| !moving.contains(t)).take(5));
    tenants.extend(h.tenants_on(1, 5));
    drop(dir);

    let load = Checker::start(&[h.url()], 8, &tenants).await;
    let id = create_move(&h, bucket);

    wait_phase(&h, id, MovePhase::Shadow, "the copy").await;
    assert_eq!(h.shard_of(moving[0]), 0);

    // The checker's writers read their rows back after every write: in the shadow
    // phase those reads are compared on both shards, and the lag right after a
    // write must not count as a difference.
    wait(&h, id, "shadow reads", || h.router.context.shadow.counts(id).compared >= 50).await;
    let shadow = h.router.context.shadow.counts(id);
    assert_eq!(shadow.mismatched, 0, "no shadow read differed: {shadow:?}");

    // A cutover with no verify on record verifies first, then cuts over.
    assert_eq!(counter(&h, id, "verified_at_ms"), 0);
    request(&h, id, MoveRequest::Cutover { force: false });
    wait_phase(&h, id, MovePhase::Reverse, "the cutover").await;
    assert!(counter(&h, id, "verified_at_ms") > 0);
    assert!(h.directory.load().moves[&id].verified_clean, "{:?}", h.directory.load().moves[&id]);
    assert_eq!(h.shard_of(moving[0]), 1);
    let first_pause = counter(&h, id, "pause_us");

    // Let writes land on the new shard, then roll back: the reverse stream kept the
    // old shard current, so nothing is lost.
    let ops = load.ops.load(std::sync::atomic::Ordering::SeqCst);
    wait(&h, id, "writes after the cutover", || load.ops.load(std::sync::atomic::Ordering::SeqCst) > ops + 200).await;
    request(&h, id, MoveRequest::Rollback);
    wait(&h, id, "the rollback", || counter(&h, id, "cutovers") == 2).await;
    wait_phase(&h, id, MovePhase::Shadow, "dual-write after the rollback").await;
    assert_eq!(h.shard_of(moving[0]), 0);

    let ops = load.ops.load(std::sync::atomic::Ordering::SeqCst);
    wait(&h, id, "writes after the rollback", || load.ops.load(std::sync::atomic::Ordering::SeqCst) > ops + 200).await;
    request(&h, id, MoveRequest::Cutover { force: true });
    wait_phase(&h, id, MovePhase::Reverse, "the second cutover").await;
    assert_eq!(counter(&h, id, "cutovers"), 3);

    // The long form (scripts/move-checker.sh): more rollbacks and cutovers.
    let rounds: u64 = std::env::var("SHARDGATE_MOVE_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    for round in 0..rounds {
        for (req, phase, owner) in [
            (MoveRequest::Rollback, MovePhase::Shadow, 0),
            (MoveRequest::Cutover { force: true }, MovePhase::Reverse, 1),
        ] {
            let ops = load.ops.load(std::sync::atomic::Ordering::SeqCst);
            wait(&h, id, "more writes", || load.ops.load(std::sync::atomic::Ordering::SeqCst) > ops + 200).await;
            let n = counter(&h, id, "cutovers");
            request(&h, id, req);
            wait(&h, id, "the next switch", || counter(&h, id, "cutovers") == n + 1 && phase_of(&h, id) == phase).await;
            assert_eq!(h.shard_of(moving[0]), owner, "round {round}");
            assert_eq!(load.errors(), 0, "round {round}");
        }
        eprintln!("round {} of {rounds}: {} ops", round + 1, load.ops.load(std::sync::atomic::Ordering::SeqCst));
    }

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

#[tokio::test]
async fn cross_shard_reads_count_moving_rows_once_and_a_stale_router_is_fenced() {
    let h = Harness::start(2).await;
    let stop_driver = start_driver(&h);
    let c = h.client().await;
    c.batch_execute(checker::TABLE_SQL).await.unwrap();
    let dir = h.directory.load();
    let (bucket, moving) = bucket_on_shard_0(&dir, &h, 10);
    let mut all = moving.clone();
    all.extend(h.tenants_on(1, 10));
    drop(dir);
    for (i, t) in all.iter().enumerate() {
        c.batch_execute(&format!("/* tenant_id={t} */ INSERT INTO checker_items SELECT {t}, {i} * 1000 + g, 0, g FROM generate_series(1, 100) g"))
            .await
            .unwrap();
    }
    let total = 100 * all.len() as i64;
    // A router that will not hear of the cutover: its own copy of the directory.
    let stale_dir = shardgate_directory::DirectoryHandle::new((*h.directory.load()).clone());
    let addrs: Vec<ShardAddress> = h.cluster.urls().iter().map(|u| ShardAddress::from_url(u).unwrap()).collect();
    let cfg = shardgate_router::config::RouterConfig { listen: "127.0.0.1:0".into(), ..Default::default() };
    let stale = shardgate_router::server::start(cfg, stale_dir, addrs).await.unwrap();
    let stale_client = shardgate_tests::connect(&format!("postgres://postgres@{}/app", stale.local_addr)).await;

    let id = create_move(&h, bucket);
    wait_phase(&h, id, MovePhase::Shadow, "the copy").await;
    let on_shards: i64 = {
        let mut n = 0;
        for i in 0..2 {
            n += h.shard(i).await.query_one("SELECT count(*) FROM checker_items", &[]).await.unwrap().get::<_, i64>(0);
        }
        n
    };
    assert_eq!(on_shards, total + 1000, "the bucket's rows are on both shards now");
    assert_eq!(simple_count(&c).await, total, "a cross-shard read counts the moving rows once");
    // The same through the extended protocol, merged and plain.
    let n: i64 = c.query_one("SELECT count(*) FROM checker_items", &[]).await.unwrap().get(0);
    assert_eq!(n, total, "an extended-protocol count counts the moving rows once");
    let rows = c.query("SELECT seq FROM checker_items WHERE val > $1", &[&50i32]).await.unwrap();
    assert_eq!(rows.len() as i64, total / 2, "… and so does a plain extended-protocol read");

    request(&h, id, MoveRequest::Cutover { force: true });
    wait_phase(&h, id, MovePhase::Reverse, "the cutover").await;
    assert_eq!(simple_count(&c).await, total, "… on the new owner after the cutover too");
    let t = moving[0];
    // The stale router still sends the tenant to the old shard, which refuses.
    let e = stale_client.execute("UPDATE checker_items SET val = -1 WHERE tenant_id = $1", &[&t]).await.unwrap_err();
    assert_eq!(shardgate_tests::sqlstate(&e), "25006", "{e:?}");
    assert!(e.as_db_error().unwrap().message().contains("has moved"), "{e:?}");
    let r = c.query_one("SELECT count(*) FROM checker_items WHERE tenant_id = $1 AND val = -1", &[&t]).await.unwrap();
    assert_eq!(r.get::<_, i64>(0), 0, "nothing of the refused write is anywhere");

    request(&h, id, MoveRequest::Complete);
    wait_phase(&h, id, MovePhase::Done, "completion").await;
    assert_eq!(simple_count(&c).await, total);
    let _ = stop_driver.send(true);
    stale.shutdown().await;
}

#[tokio::test]
async fn shadow_reads_match_under_writes_and_catch_a_row_changed_on_the_target() {
    let h = Harness::start(2).await;
    let stop_driver = start_driver(&h);
    let c = h.client().await;
    c.batch_execute(checker::TABLE_SQL).await.unwrap();
    let dir = h.directory.load();
    let (bucket, moving) = bucket_on_shard_0(&dir, &h, 3);
    drop(dir);
    for t in &moving {
        c.batch_execute(&format!(
            "/* tenant_id={t} */ INSERT INTO checker_items SELECT {t}, g, 0, g FROM generate_series(1, 50) g"
        ))
        .await
        .unwrap();
    }
    let id = create_move(&h, bucket);
    wait_phase(&h, id, MovePhase::Shadow, "the shadow phase").await;
    let shadow = || h.router.context.shadow.counts(id);

    // Writes and reads right behind them, in both protocols: the target may lag
    // behind, but that is not a difference.
    let (a, b) = (moving[0], moving[1]);
    for i in 0..20i64 {
        c.execute("UPDATE checker_items SET val = $2 WHERE tenant_id = $1 AND seq = 1", &[&a, &(i as i32)])
            .await
            .unwrap();
        let rows =
            c.query("SELECT seq, val FROM checker_items WHERE tenant_id = $1 ORDER BY seq", &[&a]).await.unwrap();
        assert_eq!(rows[0].get::<_, i32>(1), i as i32);
        c.simple_query(&format!("SELECT count(*), sum(val) FROM checker_items WHERE tenant_id = {a}")).await.unwrap();
        // One at a time, so that none is skipped for want of a free comparison.
        let want = 2 * (i as u64 + 1);
        shardgate_tests::checker::wait_for("the comparisons", Duration::from_secs(30), || {
            let s = shadow();
            s.compared + s.skipped >= want
        })
        .await;
    }
    let s = shadow();
    assert!(s.compared >= 30, "{s:?}");
    assert_eq!(s.mismatched, 0, "{s:?}");

    // Plant a difference: change a row of tenant b on the target directly, past
    // its fence (the target does not own the rows yet).
    let target = h.shard(1).await;
    target
        .batch_execute(&format!(
            "SET session_replication_role = replica; UPDATE checker_items SET val = 4242 WHERE tenant_id = {b} AND seq = 7; RESET session_replication_role"
        ))
        .await
        .unwrap();
    let sql = format!("SELECT seq, val FROM checker_items WHERE tenant_id = {b}");
    let r = c.simple_query(&sql).await.unwrap();
    let vals: Vec<String> = r
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(1).unwrap().to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(vals.len(), 50);
    assert!(!vals.contains(&"4242".to_string()), "the client gets the source's answer");
    shardgate_tests::checker::wait_for("the mismatch", Duration::from_secs(30), || shadow().mismatched >= 1).await;
    let s = shadow();
    assert_eq!(s.mismatched, 1, "{s:?}");
    assert_eq!(s.samples[0].query, sql);
    assert_eq!(s.samples[0].keys, b.to_string(), "the sample names the tenant");
    assert!(s.samples[0].source.starts_with("50 rows"), "{:?}", s.samples[0]);
    assert_ne!(s.samples[0].source, s.samples[0].target);
    // The heartbeat brings the counts and the sample to the directory.
    wait(&h, id, "the mismatch in the directory", || counter(&h, id, "shadow_mismatched") == 1).await;
    assert!(counter(&h, id, "shadow_compared") >= 31);
    let m = h.directory.load().moves[&id].clone();
    assert!(m.shadow.values().any(|c| c.samples.iter().any(|x| x.query == sql)), "{m:?}");
    // Reads of the other tenants still match.
    let before = shadow();
    c.query("SELECT * FROM checker_items WHERE tenant_id = $1", &[&moving[2]]).await.unwrap();
    shardgate_tests::checker::wait_for("one more comparison", Duration::from_secs(30), || {
        let s = shadow();
        s.compared + s.skipped > before.compared + before.skipped
    })
    .await;
    assert_eq!(shadow().mismatched, 1);
    let _ = stop_driver.send(true);
}

/// Reads of one tenant every 5 ms, in the extended protocol, until stopped: the
/// polling an application's dashboard does.
fn poll_reads(url: String, tenant: i64, stop: Arc<std::sync::atomic::AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let c = shardgate_tests::connect(&url).await;
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        let mut n = 0;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            tick.tick().await;
            c.query_one("SELECT count(*) FROM checker_items WHERE tenant_id = $1", &[&tenant]).await.unwrap();
            n += 1;
        }
        n
    })
}

/// A hot tenant (six writers, each reading its rows back after every write, and
/// a reader polling every 5 ms) shadowed for a minute: its rows change between
/// every two answers, and not one read may count as a mismatch. Then a row of a
/// quiet tenant in the same bucket is changed on the target behind the router's
/// back while the load goes on: that one must be proven within seconds, with
/// the tenant named.
#[tokio::test]
async fn a_hot_tenant_never_counts_as_a_mismatch_and_a_planted_difference_is_named() {
    let h = Harness::start(2).await;
    let stop_driver = start_driver(&h);
    let c = h.client().await;
    c.batch_execute(checker::TABLE_SQL).await.unwrap();
    let dir = h.directory.load();
    let (bucket, moving) = bucket_on_shard_0(&dir, &h, 2);
    drop(dir);
    let (hot, quiet) = (moving[0], moving[1]);
    c.batch_execute(&format!(
        "/* tenant_id={quiet} */ INSERT INTO checker_items SELECT {quiet}, g, 0, g FROM generate_series(1, 50) g"
    ))
    .await
    .unwrap();
    let id = create_move(&h, bucket);
    wait_phase(&h, id, MovePhase::Shadow, "the shadow phase").await;

    let load = Checker::start(&[h.url()], 6, &[hot]).await;
    let stop_reads = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = poll_reads(h.url(), hot, stop_reads.clone());
    let seconds: u64 = std::env::var("SHARDGATE_HOT_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) {
        let s = h.router.context.shadow.counts(id);
        assert_eq!(
            s.mismatched,
            0,
            "a read of the hot tenant counted as a mismatch after {:?}: {s:?}",
            started.elapsed()
        );
        assert_eq!(load.errors(), 0);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let hot_ops = load.ops.load(std::sync::atomic::Ordering::SeqCst);
    let s = h.router.context.shadow.counts(id);
    eprintln!(
        "hot tenant: {:.0} writes/s for {seconds} s; shadow reads {} compared, {} matched ({} after lag), {} unsettled, {} skipped",
        hot_ops as f64 / seconds as f64,
        s.compared,
        s.matched,
        s.lag_explained,
        s.unsettled,
        s.skipped
    );
    assert_eq!(s.mismatched, 0, "{s:?}");
    assert!(s.compared >= 100, "the hot tenant's reads were compared: {s:?}");

    // Plant a difference in the quiet tenant's rows on the target.
    h.shard(1)
        .await
        .batch_execute(&format!(
            "SET session_replication_role = replica; UPDATE checker_items SET val = 4242 WHERE tenant_id = {quiet} AND seq = 7; RESET session_replication_role"
        ))
        .await
        .unwrap();
    let planted = std::time::Instant::now();
    let sql = format!("SELECT seq, val FROM checker_items WHERE tenant_id = {quiet} ORDER BY seq");
    while h.router.context.shadow.counts(id).mismatched == 0 {
        assert!(planted.elapsed() < Duration::from_secs(20), "the planted difference was not proven in 20 s");
        c.simple_query(&sql).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("planted difference proven after {:?}", planted.elapsed());
    let s = h.router.context.shadow.counts(id);
    assert_eq!(s.mismatched, 1, "{s:?}");
    assert_eq!(s.samples[0].keys, quiet.to_string());
    assert_eq!(s.samples[0].query, sql);

    stop_reads.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(reader.await.unwrap() > 100);
    let report = load.stop().await;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let _ = stop_driver.send(true);
}

/// The tenant that most needs moving, the busy one, moves on its own: an
/// automatic cutover of a hot tenant (six writers and a 5 ms poller) completes
/// while the load goes on, and the checker finds every acknowledged write once,
/// on the right shard, with no client error.
#[tokio::test]
async fn a_hot_tenant_cuts_over_on_its_own_under_load() {
    let h = Harness::start(2).await;
    let stop_driver = start_driver_with(
        &h,
        DriverConfig {
            progress_every: Duration::from_millis(100),
            shadow_for: Duration::from_secs(3),
            ..Default::default()
        },
    );
    let c = h.client().await;
    c.batch_execute(checker::TABLE_SQL).await.unwrap();
    let hot = h.tenants_on(0, 1)[0];
    let others: Vec<i64> = h.tenants_on(0, 3).into_iter().filter(|t| *t != hot).take(2).collect();
    let load = Checker::start(&[h.url()], 6, &[hot]).await;
    let background = Checker::start_run(&[h.url()], 2, &others, 1).await;
    let stop_reads = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = poll_reads(h.url(), hot, stop_reads.clone());
    let ops = load.ops.load(std::sync::atomic::Ordering::SeqCst);
    checker::wait_for("load", Duration::from_secs(60), || {
        load.ops.load(std::sync::atomic::Ordering::SeqCst) > ops + 500
    })
    .await;

    let out = h.directory.apply_local(&Command::CreateMove {
        subject: MoveSubject::Tenant(TenantKey::Int(hot)),
        target: "shard_1".into(),
        options: shardgate_directory::state::MoveOptions { cutover_auto: true, complete_auto: false },
        at_ms: shardgate_directory::clock::now_ms(),
    });
    let Outcome::MoveCreated { id, .. } = out else { panic!("{out:?}") };
    wait_phase(&h, id, MovePhase::Reverse, "the automatic cutover of the hot tenant").await;
    assert_eq!(h.shard_of(hot), 1);
    let m = h.directory.load().moves[&id].clone();
    assert!(m.verified_clean, "{m:?}");
    assert_eq!(m.counters.get("shadow_mismatched").copied().unwrap_or(0), 0, "{m:?}");
    // The router's heartbeat brings how long its statements waited on the
    // cutover's hold (none may have, when the hold lasts a few hundred µs):
    // the pause clients felt, recorded with the move.
    let cutover_pause = || {
        let m = h.directory.load().moves[&id].clone();
        m.pauses.iter().rev().find(|p| p.kind == HoldKind::Cutover).cloned()
    };
    wait(&h, id, "the router's report of the cutover's hold", || {
        cutover_pause().is_some_and(|p| !p.routers.is_empty())
    })
    .await;
    let held = cutover_pause().map(|p| p.total()).unwrap_or_default();
    assert!(held.max_us >= held.percentile_us(0.99) && held.percentile_us(0.99) >= held.percentile_us(0.5), "{held:?}");
    let ops = load.ops.load(std::sync::atomic::Ordering::SeqCst);
    wait(&h, id, "writes after the cutover", || load.ops.load(std::sync::atomic::Ordering::SeqCst) > ops + 200).await;

    stop_reads.store(true, std::sync::atomic::Ordering::SeqCst);
    reader.await.unwrap();
    let mut report = load.stop().await;
    let rest = background.stop().await;
    assert!(report.errors.is_empty() && rest.errors.is_empty(), "{:?} {:?}", report.errors, rest.errors);
    eprintln!(
        "hot tenant cut over: hold {} µs; {} statements held p50 {} µs, p99 {} µs, max {} µs; writes p99 {} µs, max {} µs",
        m.counters.get("pause_us").copied().unwrap_or(0),
        held.statements,
        held.percentile_us(0.5),
        held.percentile_us(0.99),
        held.max_us,
        report.percentile_us(0.99),
        report.percentile_us(1.0)
    );
    report.rows.extend(rest.rows);
    let shards = [h.shard(0).await, h.shard(1).await];
    let dir = h.directory.load();
    report.check(&shards, |t| dir.shard_for(&TenantKey::Int(t)), |t| t != hot).await;
    let _ = stop_driver.send(true);
}

/// `SELECT count(*)` over the sharded table as a simple query (a cross-shard read).
async fn simple_count(c: &tokio_postgres::Client) -> i64 {
    let r = c.simple_query("SELECT count(*) FROM checker_items").await.unwrap();
    match &r[1] {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).unwrap().parse::<i64>().unwrap(),
        other => panic!("{other:?}"),
    }
}

/// Runs one simple-query statement and returns the rows its command tag counts.
async fn inserted(c: &tokio_postgres::Client, sql: &str) -> u64 {
    let r = c.simple_query(sql).await.unwrap();
    match r.last() {
        Some(tokio_postgres::SimpleQueryMessage::CommandComplete(n)) => *n,
        other => panic!("{other:?}"),
    }
}

fn create_move(h: &Harness, bucket: u32) -> u64 {
    let out = h.directory.apply_local(&Command::CreateMove {
        subject: MoveSubject::Bucket(bucket),
        target: "shard_1".into(),
        options: Default::default(),
        at_ms: shardgate_directory::clock::now_ms(),
    });
    let Outcome::MoveCreated { id, .. } = out else { panic!("{out:?}") };
    id
}

const EVENTS_SQL: &str = "CREATE TABLE events (tenant_id bigint, id bigint, body text, PRIMARY KEY (tenant_id, id))";

fn note(h: &Harness, id: u64) -> String {
    h.directory.load().moves[&id].note.clone().unwrap_or_default()
}

/// Throttling under real lag: the target's apply is blocked by a lock while
/// writes go on, so the first move's stream falls behind past `max_lag_bytes`.
/// A second move waits in plan, saying why, re-checking as the lag grows, and
/// starts its copy once the lock is gone and the stream has caught up.
#[tokio::test]
async fn a_move_waits_to_start_while_another_streams_lags() {
    let h = Harness::start(2).await;
    const LIMIT: u64 = 64 * 1024;
    let stop_driver = start_driver_with(
        &h,
        DriverConfig { progress_every: Duration::from_millis(100), max_lag_bytes: LIMIT, ..Default::default() },
    );
    let c = h.client().await;
    c.batch_execute(EVENTS_SQL).await.unwrap();
    let dir = h.directory.load();
    let (first, tenants) = bucket_on_shard_0(&dir, &h, 1);
    let tenant = tenants[0];
    let second = (0..dir.bucket_count).find(|&b| b != first && dir.placements[b as usize] == 0).unwrap();
    drop(dir);
    let write = |from: i64, n: i64| {
        format!(
            "/* tenant_id={tenant} */ INSERT INTO events SELECT {tenant}, g, repeat('x', 300) FROM generate_series({from}, {}) g",
            from + n - 1
        )
    };
    c.simple_query(&write(1, 100)).await.unwrap();

    let a = create_move(&h, first);
    wait_phase(&h, a, MovePhase::Shadow, "the first move's copy").await;
    // Hold the target table: the stream's apply waits, the source's WAL grows.
    let target = h.shard(1).await;
    target.batch_execute("BEGIN; LOCK TABLE events IN ACCESS EXCLUSIVE MODE").await.unwrap();
    // Two transactions, not one: while the first is still open on the source the
    // subscriber may confirm WAL past its rows (nothing committed to wait for), so
    // one big write can stall the apply with less than LIMIT counted as lag. The
    // second's WAL comes after the stalled commit and all of it counts.
    assert_eq!(inserted(&c, &write(1_000, 500)).await, 500);
    assert_eq!(inserted(&c, &write(1_500, 500)).await, 500);
    let on_source = h.shard(0).await.query_one("SELECT count(*) FROM events", &[]).await.unwrap().get::<_, i64>(0);
    assert_eq!(on_source, 1_100, "the write went to the source");
    wait(&h, a, "the stream to lag past the limit", || counter(&h, a, "lag_bytes") > LIMIT).await;

    let b = create_move(&h, second);
    let waiting = format!("waiting to start: move {a} lags");
    wait(&h, b, "the second move to wait", || note(&h, b).contains(&waiting)).await;
    assert_eq!(phase(&h, b), MovePhase::Plan);
    // More writes, more lag: the driver looks again and keeps it waiting.
    let seen = note(&h, b);
    assert_eq!(inserted(&c, &write(10_000, 1_000)).await, 1_000);
    wait(&h, b, "the wait to be re-checked", || note(&h, b) != seen).await;
    assert!(note(&h, b).contains(&waiting), "{}", note(&h, b));
    assert_eq!(phase(&h, b), MovePhase::Plan, "no copy starts while the other stream lags");
    assert_eq!(counter(&h, b, "copy_started_ms"), 0);

    // The lock goes, the stream catches up, the second move copies.
    target.batch_execute("COMMIT").await.unwrap();
    wait(&h, a, "the stream to catch up", || counter(&h, a, "lag_bytes") <= LIMIT).await;
    wait_phase(&h, b, MovePhase::Shadow, "the second move's copy").await;
    assert!(counter(&h, b, "copy_started_ms") > 0);
    let rows = h.shard(1).await.query_one("SELECT count(*) FROM events", &[]).await.unwrap().get::<_, i64>(0);
    assert_eq!(rows, 2_100, "the first move's target has every row the stream carried");
    let _ = stop_driver.send(true);
}

/// Moves `subject` to `target` with an automatic cutover and completes it.
async fn move_and_complete(h: &Harness, subject: MoveSubject, target: &str) -> u64 {
    let out = h.directory.apply_local(&Command::CreateMove {
        subject,
        target: target.into(),
        options: shardgate_directory::state::MoveOptions { cutover_auto: true, complete_auto: false },
        at_ms: shardgate_directory::clock::now_ms(),
    });
    let Outcome::MoveCreated { id, .. } = out else { panic!("{out:?}") };
    wait_phase(h, id, MovePhase::Reverse, "the cutover").await;
    request(h, id, MoveRequest::Complete);
    wait_phase(h, id, MovePhase::Done, "completion").await;
    id
}

/// Pins and fences together. A bucket leaves shard 0 (whose fence for it stays
/// armed), one of its tenants is moved back onto shard 0 by hand and must take
/// writes there; the bucket then moves on to shard 2 around the pinned tenant,
/// which stays where it is; a move of the bucket onto the pinned tenant's shard is
/// refused with what to do instead.
#[tokio::test]
async fn a_pinned_tenant_keeps_its_shard_while_its_bucket_moves_around_it() {
    let h = Harness::start(3).await;
    let stop_driver = start_driver_with(
        &h,
        DriverConfig {
            progress_every: Duration::from_millis(100),
            shadow_for: Duration::from_millis(200),
            ..Default::default()
        },
    );
    let c = h.client().await;
    c.batch_execute(EVENTS_SQL).await.unwrap();
    let dir = h.directory.load();
    let (bucket, tenants) = bucket_on_shard_0(&dir, &h, 3);
    drop(dir);
    let (pinned, other, fresh) = (tenants[0], tenants[1], tenants[2]);
    let insert = |t: i64, from: i64| {
        format!(
            "/* tenant_id={t} */ INSERT INTO events SELECT {t}, g, 'x' FROM generate_series({from}, {}) g",
            from + 9
        )
    };
    for t in [pinned, other] {
        c.simple_query(&insert(t, 1)).await.unwrap();
    }
    let count = |t: i64| format!("SELECT count(*) FROM events WHERE tenant_id = {t}");
    async fn on(h: &Harness, shard: usize, sql: &str) -> i64 {
        h.shard(shard).await.query_one(sql, &[]).await.unwrap().get(0)
    }

    move_and_complete(&h, MoveSubject::Bucket(bucket), "shard_1").await;
    move_and_complete(&h, MoveSubject::Tenant(TenantKey::Int(pinned)), "shard_0").await;
    assert_eq!(h.shard_of(pinned), 0);
    c.simple_query(&insert(pinned, 11)).await.expect("the pinned tenant takes writes on its shard");
    assert_eq!(on(&h, 0, &count(pinned)).await, 20);

    move_and_complete(&h, MoveSubject::Bucket(bucket), "shard_2").await;
    assert_eq!((h.shard_of(pinned), h.shard_of(other)), (0, 2));
    for t in [pinned, other] {
        c.simple_query(&insert(t, 21)).await.unwrap();
    }
    assert_eq!([on(&h, 0, &count(pinned)).await, on(&h, 2, &count(other)).await], [30, 20]);
    assert_eq!([on(&h, 1, &count(pinned)).await, on(&h, 1, &count(other)).await], [0, 0], "nothing left behind");
    assert_eq!(on(&h, 2, &count(pinned)).await, 0, "the pinned tenant did not move with its bucket");
    // Through the router, both tenants see exactly their rows.
    for (t, n) in [(pinned, 30), (other, 20)] {
        let sql = format!("/* tenant_id={t} */ {}", count(t));
        let got: i64 = c.query_one(&sql, &[]).await.unwrap().get(0);
        assert_eq!(got, n);
    }

    // `tenant pin` of a tenant without rows onto shard_1, which the bucket left
    // with its fence armed: the pin's home row lets the tenant's writes through.
    // (This directory is static, so the pin itself is applied here; the admin
    // API's POST /tenants/pin writes the same row, then proposes the pin.)
    shardgate_router::admin::write_home_row(&h.router.context, &fresh.to_string(), "shard_1").await.unwrap();
    let out = h.directory.apply_local(&Command::PinTenant { tenant: TenantKey::Int(fresh), shard: "shard_1".into() });
    assert!(!matches!(out, Outcome::Rejected { .. }), "{out:?}");
    assert_eq!(h.shard_of(fresh), 1);
    c.simple_query(&insert(fresh, 1))
        .await
        .expect("the bucket's fence on shard_1 does not refuse a tenant pinned there");
    assert_eq!(on(&h, 1, &count(fresh)).await, 10);

    let out = h.directory.apply_local(&Command::CreateMove {
        subject: MoveSubject::Bucket(bucket),
        target: "shard_0".into(),
        options: Default::default(),
        at_ms: shardgate_directory::clock::now_ms(),
    });
    let Outcome::Rejected { reason } = out else { panic!("{out:?}") };
    assert!(reason.contains(&format!("tenant {pinned}")) && reason.contains("shard_0"), "{reason}");
    let _ = stop_driver.send(true);
}

#[tokio::test]
async fn a_bucket_moves_between_shards_that_admit_tls_logins_only() {
    use shardgate_localpg::{PlainClients, TestCluster};
    let ca = shardgate_tests::tls::TestCa::new();
    let mut cluster = TestCluster::start(2).await.expect("start Postgres");
    let mut urls = Vec::new();
    for server in cluster.servers_mut() {
        // The CA file sits in the server's data directory, which the other
        // server's subscription (the same OS user) can read too.
        let root = server.serve_tls(&ca.ca.cert_pem(), &ca.local_server(), PlainClients::Refused).expect("TLS on");
        urls.push(format!("{}?sslmode=verify-full&sslrootcert={}", server.url("app"), root.display()));
    }
    let config = shardgate_router::config::RouterConfig::default();
    let h = Harness::start_over(cluster, &urls, config, shardgate_directory::KeyType::Int).await;
    let stop_driver =
        start_driver_over(&h, urls, DriverConfig { progress_every: Duration::from_millis(100), ..Default::default() });
    let c = h.client().await;
    c.batch_execute(checker::TABLE_SQL).await.unwrap();
    let dir = h.directory.load();
    let (bucket, moving) = bucket_on_shard_0(&dir, &h, 5);
    drop(dir);
    for (i, t) in moving.iter().enumerate() {
        c.batch_execute(&format!("/* tenant_id={t} */ INSERT INTO checker_items SELECT {t}, {i} * 1000 + g, 0, g FROM generate_series(1, 100) g"))
            .await
            .unwrap();
    }
    let count = "SELECT count(*) FROM checker_items WHERE tenant_id = ANY($1)";

    let id = create_move(&h, bucket);
    wait_phase(&h, id, MovePhase::Shadow, "the copy").await;
    // A write after the copy reaches the target through the change stream,
    // whose subscription logs in to the source under TLS too.
    let t = moving[0];
    c.execute("INSERT INTO checker_items VALUES ($1, 999999, 0, 1)", &[&t]).await.unwrap();
    request(&h, id, MoveRequest::Cutover { force: true });
    wait_phase(&h, id, MovePhase::Reverse, "the cutover").await;
    assert_eq!(h.shard_of(t), 1);
    let n: i64 = c.query_one(count, &[&moving]).await.unwrap().get(0);
    assert_eq!(n, 501, "every row on the new shard, the late one too");

    request(&h, id, MoveRequest::Complete);
    wait_phase(&h, id, MovePhase::Done, "completion").await;
    let n: i64 = c.query_one(count, &[&moving]).await.unwrap().get(0);
    assert_eq!(n, 501);
    let _ = stop_driver.send(true);
}

/// Replication objects and a bucket's rows on one shard, read directly.
async fn leftovers(h: &Harness, shard: usize, bucket_tenants: &[i64]) -> (Vec<String>, i64) {
    let s = h.shard(shard).await;
    let objects = s
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
    let mut rows = 0;
    for table in ["events", "notes"] {
        let sql = format!("SELECT count(*) FROM {table} WHERE tenant_id = ANY($1)");
        rows += s.query_one(&sql, &[&bucket_tenants]).await.unwrap().get::<_, i64>(0);
    }
    (objects, rows)
}

/// Nothing left behind by a move that is cancelled in dual-write, after a
/// cutover and its rollback, and after a failure at each fault point: no
/// replication slot, publication or subscription on either shard, no
/// half-copied rows on the target, every row still on the source and read
/// once through the router.
#[tokio::test]
async fn a_cancelled_or_failed_move_leaves_nothing_behind() {
    let h = Harness::start(2).await;
    let stop_driver = start_driver(&h);
    let c = h.client().await;
    c.batch_execute(EVENTS_SQL).await.unwrap();
    c.batch_execute("CREATE TABLE notes (tenant_id bigint, id bigint, body text, PRIMARY KEY (tenant_id, id))")
        .await
        .unwrap();
    let dir = h.directory.load();
    let (bucket, tenants) = bucket_on_shard_0(&dir, &h, 5);
    drop(dir);
    for t in &tenants {
        for table in ["events", "notes"] {
            let sql = format!(
                "/* tenant_id={t} */ INSERT INTO {table} SELECT {t}, g, repeat('x', 100) FROM generate_series(1, 200) g"
            );
            c.simple_query(&sql).await.unwrap();
        }
    }
    let total = 2 * 200 * tenants.len() as i64;
    let through_router = || async {
        let mut n = 0i64;
        for t in &tenants {
            for table in ["events", "notes"] {
                let sql = format!("SELECT count(*) FROM {table} WHERE tenant_id = $1");
                n += c.query_one(&sql, &[t]).await.unwrap().get::<_, i64>(0);
            }
        }
        n
    };

    // Cancelled in dual-write (shadow), after a cutover and its rollback, and
    // after a failure at each of the migrator's fault points (the step fails
    // once and is retried), the cutover's points with a cutover (undone when
    // it fails, asked again) and its rollback before the cancel.
    let mut cases = vec!["shadow", "reverse"];
    cases.extend(shardgate_migrator::fault::POINTS.iter().copied());
    for case in cases {
        let point = case.contains('.').then_some(case);
        if let Some(p) = point {
            shardgate_directory::fault::set(p, Some(shardgate_directory::fault::Action::Error));
        }
        let id = create_move(&h, bucket);
        wait_phase(&h, id, MovePhase::Shadow, "dual-write").await;
        if case == "reverse" || case.starts_with("cutover.") {
            request(&h, id, MoveRequest::Cutover { force: true });
            let start = std::time::Instant::now();
            while phase(&h, id) != MovePhase::Reverse {
                let m = h.directory.load().moves[&id].clone();
                assert!(m.phase != MovePhase::Failed, "{case}: {m:?}");
                assert!(start.elapsed() < Duration::from_secs(60), "{case}: no cutover: {m:?}");
                if m.request.is_none() && m.phase == MovePhase::Shadow {
                    request(&h, id, MoveRequest::Cutover { force: true });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // After a cutover a move is rolled back before it can be cancelled.
            let n = counter(&h, id, "cutovers");
            request(&h, id, MoveRequest::Rollback);
            wait(&h, id, "the rollback", || counter(&h, id, "cutovers") > n).await;
            wait_phase(&h, id, MovePhase::Shadow, "dual-write after the rollback").await;
        }
        request(&h, id, MoveRequest::Cancel);
        wait_phase(&h, id, MovePhase::Cancelled, "the cancel").await;
        if let Some(p) = point {
            assert!(!shardgate_directory::fault::armed(p), "{p} was never reached");
        }
        assert_eq!(h.directory.load().placements[bucket as usize], 0, "{case}: the bucket is back on its shard");
        let (source_objects, source_rows) = leftovers(&h, 0, &tenants).await;
        let (target_objects, target_rows) = leftovers(&h, 1, &tenants).await;
        assert!(
            source_objects.is_empty() && target_objects.is_empty(),
            "{case}: {source_objects:?} {target_objects:?}"
        );
        assert_eq!((source_rows, target_rows), (total, 0), "{case}: every row on the source, none left on the target");
        assert_eq!(through_router().await, total, "{case}: read once through the router");
    }
    let _ = stop_driver.send(true);
}

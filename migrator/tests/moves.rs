//! A bucket moved between two real Postgres servers by the migrator alone (no
//! router): copy, stream, verify (clean and with a planted difference), the fence,
//! cutover, the reverse stream, rollback, and the end of a move.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use shardgate_directory::hash::bucket_of;
use shardgate_directory::state::MoveSubject;
use shardgate_directory::{KeyType, TenantKey};
use shardgate_localpg::TestCluster;
use shardgate_migrator::cleanup::{self, Keep};
use shardgate_migrator::cutover::{self, Coordinator, CutoverOptions, Direction};
use shardgate_migrator::verify::{self, VerifyOptions};
use shardgate_migrator::{copy, fault, prepare, replication, Endpoint, Error, MoveSpec};
use shardgate_router::moves::ShardAddress;
use tokio_postgres::Client;

const BUCKETS: u32 = 8;
const BUCKET: u32 = 3;

/// A coordinator without routers: the hold is immediate and the flip is recorded.
#[derive(Default)]
struct Recorder {
    owner: Mutex<Vec<String>>,
    holds: Mutex<u32>,
}

impl Coordinator for Recorder {
    async fn hold(&self, _deadline: Instant) -> Result<(), Error> {
        *self.holds.lock().unwrap() += 1;
        Ok(())
    }
    async fn flip(&self, shard: &str) -> Result<(), Error> {
        self.owner.lock().unwrap().push(shard.to_string());
        Ok(())
    }
    async fn release(&self) {}
}

fn tenants_in(bucket: u32, n: usize) -> Vec<i64> {
    (1..).filter(|t| bucket_of(&TenantKey::Int(*t), BUCKETS) == bucket).take(n).collect()
}

async fn setup() -> (TestCluster, MoveSpec, Client, Client) {
    let _ = tracing_subscriber::fmt().with_env_filter("shardgate=debug,warn").with_test_writer().try_init();
    let cluster = TestCluster::start(2).await.expect("start servers");
    let urls = cluster.urls();
    let src = cluster.servers()[0].connect("app").await.unwrap();
    let dst = cluster.servers()[1].connect("app").await.unwrap();
    src.batch_execute(
        "CREATE TABLE accounts (tenant_id bigint NOT NULL, id bigserial, balance int NOT NULL, note text, \
           PRIMARY KEY (tenant_id, id));
         CREATE TABLE events (tenant_id bigint NOT NULL, at timestamptz NOT NULL DEFAULT now(), kind text);
         ALTER TABLE events REPLICA IDENTITY FULL;
         CREATE TABLE plans (code text PRIMARY KEY, price int);
         INSERT INTO plans VALUES ('basic', 10);",
    )
    .await
    .unwrap();
    // 40 tenants in the moving bucket and 40 elsewhere, 50 accounts each.
    let mut all = tenants_in(BUCKET, 40);
    all.extend(tenants_in(BUCKET + 1, 40));
    for t in &all {
        src.batch_execute(&format!(
            "INSERT INTO accounts (tenant_id, balance, note) SELECT {t}, g, 'n' || g FROM generate_series(1, 50) g;
             INSERT INTO events (tenant_id, kind) VALUES ({t}, 'created')"
        ))
        .await
        .unwrap();
    }
    let spec = MoveSpec {
        id: 1,
        subject: MoveSubject::Bucket(BUCKET),
        key_column: "tenant_id".into(),
        key_type: KeyType::Int,
        bucket_count: BUCKETS,
        source: Endpoint::new("shard_0", ShardAddress::from_url(&urls[0]).unwrap()),
        target: Endpoint::new("shard_1", ShardAddress::from_url(&urls[1]).unwrap()),
    };
    (cluster, spec, src, dst)
}

async fn count(c: &Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

/// Runs the copy phase to its end (the forward stream then runs).
async fn copy_all(spec: &MoveSpec, throttle: &copy::Throttle) -> copy::Outcome {
    let (tx, _rx) = tokio::sync::watch::channel(copy::Progress::default());
    copy::copy(spec, throttle, &tx).await.expect("copy")
}

fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_string()).unwrap_or_default()
}

#[tokio::test]
async fn a_bucket_moves_back_and_forth_and_nothing_is_lost() {
    let (_cluster, spec, src, dst) = setup().await;
    let moving = tenants_in(BUCKET, 40);
    let filter = spec.row_filter();
    let on = |c: &'static str| format!("SELECT count(*) FROM {c} WHERE {filter}");

    let prepared = prepare::prepare(&spec).await.expect("prepare");
    assert_eq!(prepared.rows_total, 40 * 50 + 40, "{prepared:?}");
    assert_eq!(prepared.created_tables.len(), 2, "schema copied to the empty target: {prepared:?}");
    assert_eq!(prepared.sequences, vec!["accounts_id_seq".to_string()]);
    // Running it again changes nothing (a restarted migrator does exactly this).
    prepare::prepare(&spec).await.expect("prepare is idempotent");
    // A copy that fails after its first table leaves nothing on the target (one
    // transaction), and the next attempt starts over from a new snapshot.
    fault::set("copy.after_first_table", Some(fault::Action::Error));
    let (tx, rx) = tokio::sync::watch::channel(copy::Progress::default());
    let err = copy::copy(&spec, &copy::Throttle::unlimited(), &tx).await.unwrap_err().to_string();
    fault::set("copy.after_first_table", None);
    assert!(err.contains("copy.after_first_table"), "{err}");
    assert!(rx.borrow().tables[0].done && rx.borrow().rows() > 0, "{:?}", rx.borrow());
    assert_eq!(count(&dst, &on("accounts")).await + count(&dst, &on("events")).await, 0, "rolled back");
    // Capped at 4000 rows/s, the 2040 moving rows take at least half a second.
    let started = Instant::now();
    let outcome = copy_all(&spec, &copy::Throttle::new(4000, 0)).await;
    let copy::Outcome::Copied { rows, .. } = outcome else { panic!("not copied: {outcome:?}") };
    assert_eq!(rows, 40 * 50 + 40);
    assert!(started.elapsed() >= Duration::from_millis(500), "the cap held: {:?}", started.elapsed());
    assert_eq!(copy_all(&spec, &copy::Throttle::unlimited()).await, copy::Outcome::AlreadyCopied);
    assert_eq!(count(&dst, &on("accounts")).await, 40 * 50);
    assert_eq!(count(&dst, "SELECT count(*) FROM accounts").await, 40 * 50, "only the bucket is copied");
    assert_eq!(count(&dst, "SELECT count(*) FROM plans").await, 0, "reference tables are not moved");

    // Changes after the copy stream over, in order.
    let t = moving[0];
    src.batch_execute(&format!(
        "INSERT INTO accounts (tenant_id, balance) VALUES ({t}, 1000);
         UPDATE accounts SET balance = balance + 1 WHERE tenant_id = {t};
         DELETE FROM accounts WHERE tenant_id = {t} AND balance = 2;
         INSERT INTO events (tenant_id, kind) VALUES ({t}, 'updated')"
    ))
    .await
    .unwrap();
    replication::catch_up(&spec, (&spec.source, &src), (&spec.target, &dst), Duration::from_secs(30)).await.unwrap();
    let sum = format!("SELECT coalesce(sum(balance), 0)::bigint FROM accounts WHERE tenant_id = {t}");
    assert_eq!(count(&dst, &sum).await, count(&src, &sum).await);
    assert_eq!(count(&dst, &on("events")).await, 41);

    // Direct writes of the moving rows on the target are refused (it does not own
    // them yet); other rows are not affected.
    let e = dst.batch_execute(&format!("INSERT INTO accounts (tenant_id, balance) VALUES ({t}, 1)")).await.unwrap_err();
    assert_eq!(sqlstate(&e), "25006", "{e:?}");
    let other = tenants_in(BUCKET + 1, 1)[0];
    dst.batch_execute(&format!("INSERT INTO accounts (tenant_id, balance) VALUES ({other}, 1)")).await.unwrap();
    dst.batch_execute(&format!("DELETE FROM accounts WHERE tenant_id = {other}")).await.unwrap();

    // Verify: clean, then a planted difference is named by its chunk.
    let coord = Recorder::default();
    let opts = VerifyOptions { chunk_rows: 300, ..Default::default() };
    let report = verify::verify(&spec, &coord, &opts).await.unwrap();
    assert!(report.clean(), "{report:?}");
    assert!(report.chunks >= 7, "{report:?}");
    let victim = moving[20];
    dst.batch_execute(&format!(
        "SET session_replication_role = replica; UPDATE accounts SET balance = -1 WHERE tenant_id = {victim} AND id = \
         (SELECT min(id) FROM accounts WHERE tenant_id = {victim}); RESET session_replication_role"
    ))
    .await
    .unwrap();
    let report = verify::verify(&spec, &coord, &opts).await.unwrap();
    assert_eq!(report.mismatches.len(), 1, "{report:?}");
    let m = &report.mismatches[0];
    assert_eq!(m.table, "public.accounts");
    let in_range = format!(
        "SELECT count(*) FROM accounts WHERE balance = -1 AND ROW(tenant_id, id) >= {} AND ROW(tenant_id, id) < {}",
        m.from.clone().unwrap_or("ROW(-9223372036854775808::bigint, 0::bigint)".into()),
        m.to.clone().unwrap_or("ROW(9223372036854775807::bigint, 0::bigint)".into())
    );
    assert_eq!(count(&dst, &in_range).await, 1, "the reported chunk holds the planted row: {m}");
    // Repair: copy the source's value back.
    let fix: i32 = src
        .query_one(
            &format!(
                "SELECT balance FROM accounts WHERE tenant_id = {victim} AND id = (SELECT min(id) FROM accounts WHERE tenant_id = {victim})"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    dst.batch_execute(&format!(
        "SET session_replication_role = replica; UPDATE accounts SET balance = {fix} WHERE balance = -1; RESET session_replication_role"
    ))
    .await
    .unwrap();
    assert!(verify::verify(&spec, &coord, &opts).await.unwrap().clean());

    // Cutover.
    let report = cutover::cutover(&spec, Direction::Forward, &coord, &CutoverOptions::default()).await.unwrap();
    assert_eq!(*coord.owner.lock().unwrap(), vec!["shard_1".to_string()]);
    assert!(report.pause < Duration::from_secs(5), "{report:?}");
    // The old shard refuses the moved rows, nothing else.
    let e = src.batch_execute(&format!("UPDATE accounts SET balance = 0 WHERE tenant_id = {t}")).await.unwrap_err();
    assert_eq!(sqlstate(&e), "25006", "{e:?}");
    src.batch_execute(&format!("UPDATE accounts SET balance = balance WHERE tenant_id = {other}")).await.unwrap();
    // The new owner takes writes; sequences were carried, so new ids do not collide.
    let before = count(&src, &sum).await;
    // Read before the insert: the reverse stream may bring the new row to the
    // old shard at any moment after it.
    let max_src = count(&src, "SELECT max(id) FROM accounts").await;
    dst.batch_execute(&format!(
        "INSERT INTO accounts (tenant_id, balance) VALUES ({t}, 7); UPDATE accounts SET balance = balance + 1 WHERE tenant_id = {t}"
    ))
    .await
    .unwrap();
    let new_id = count(&dst, &format!("SELECT max(id) FROM accounts WHERE tenant_id = {t}")).await;
    assert!(new_id > max_src, "new id {new_id} must be past the old shard's {max_src}");
    // … and the reverse stream keeps the old shard current.
    replication::catch_up(&spec, (&spec.target, &dst), (&spec.source, &src), Duration::from_secs(30)).await.unwrap();
    assert_eq!(count(&src, &sum).await, count(&dst, &sum).await);
    assert!(count(&src, &sum).await > before);

    // Rollback: the same backwards, and the forward stream resumes.
    cutover::cutover(&spec, Direction::Back, &coord, &CutoverOptions::default()).await.unwrap();
    assert_eq!(coord.owner.lock().unwrap().last().unwrap(), "shard_0");
    let e = dst.batch_execute(&format!("DELETE FROM accounts WHERE tenant_id = {t}")).await.unwrap_err();
    assert_eq!(sqlstate(&e), "25006");
    src.batch_execute(&format!("UPDATE accounts SET balance = balance * 2 WHERE tenant_id = {t}")).await.unwrap();
    replication::catch_up(&spec, (&spec.source, &src), (&spec.target, &dst), Duration::from_secs(30)).await.unwrap();
    assert_eq!(count(&src, &sum).await, count(&dst, &sum).await);
    assert_eq!(count(&src, &on("accounts")).await, count(&dst, &on("accounts")).await);

    // Cut over again, then complete: the old copy and the streams go.
    cutover::cutover(&spec, Direction::Forward, &coord, &CutoverOptions::default()).await.unwrap();
    let kept = count(&dst, &on("accounts")).await;
    let deleted = cleanup::finish(&spec, Keep::Target, false).await.unwrap();
    assert_eq!(deleted as i64, kept + count(&dst, &on("events")).await);
    assert_eq!(count(&src, &on("accounts")).await, 0);
    assert_eq!(count(&dst, &on("accounts")).await, kept);
    assert_eq!(count(&src, "SELECT count(*) FROM pg_replication_slots").await, 0);
    assert_eq!(count(&dst, "SELECT count(*) FROM pg_replication_slots").await, 0);
    assert_eq!(count(&dst, "SELECT count(*) FROM pg_subscription").await, 0);
    // The old shard still refuses the rows (stale routers, direct clients).
    let e = src.batch_execute(&format!("INSERT INTO accounts (tenant_id, balance) VALUES ({t}, 1)")).await.unwrap_err();
    assert_eq!(sqlstate(&e), "25006");
    dst.batch_execute(&format!("INSERT INTO accounts (tenant_id, balance) VALUES ({t}, 1)")).await.unwrap();
    // Finishing twice is harmless.
    assert_eq!(cleanup::finish(&spec, Keep::Target, false).await.unwrap(), 0);
}

#[tokio::test]
async fn cancel_drops_the_targets_copy_and_checks_refuse_what_cannot_move() {
    let (_cluster, spec, src, dst) = setup().await;
    let filter = spec.row_filter();
    prepare::prepare(&spec).await.unwrap();
    copy_all(&spec, &copy::Throttle::unlimited()).await;
    let deleted = cleanup::finish(&spec, Keep::Source, false).await.unwrap();
    assert_eq!(deleted, 40 * 50 + 40);
    assert_eq!(count(&dst, &format!("SELECT count(*) FROM accounts WHERE {filter}")).await, 0);
    assert_eq!(count(&src, &format!("SELECT count(*) FROM accounts WHERE {filter}")).await, 40 * 50);
    // The source owns the rows again and takes writes.
    let t = tenants_in(BUCKET, 1)[0];
    src.batch_execute(&format!("INSERT INTO accounts (tenant_id, balance) VALUES ({t}, 1)")).await.unwrap();

    // A table whose rows cannot be identified by the key is refused, with the fix.
    src.batch_execute("CREATE TABLE loose (tenant_id bigint, v int)").await.unwrap();
    let spec2 = MoveSpec { id: 2, ..spec.clone() };
    let err = prepare::prepare(&spec2).await.unwrap_err().to_string();
    assert!(err.contains("public.loose has no primary key") && err.contains("REPLICA IDENTITY FULL"), "{err}");
    src.batch_execute("ALTER TABLE loose REPLICA IDENTITY FULL").await.unwrap();
    // Leftover rows on the target are refused too.
    dst.batch_execute(&format!(
        "SET session_replication_role = replica; INSERT INTO accounts (tenant_id, balance) VALUES ({t}, 5); RESET session_replication_role"
    ))
    .await
    .unwrap();
    let err = prepare::prepare(&spec2).await.unwrap_err().to_string();
    assert!(err.contains("left over") && err.contains("DELETE FROM"), "{err}");
    dst.batch_execute(&format!(
        "SET session_replication_role = replica; DELETE FROM accounts WHERE {filter}; RESET session_replication_role"
    ))
    .await
    .unwrap();

    // A target whose replication slots are used up is refused before anything
    // is created on either shard.
    async fn snapshot(c: &Client) -> i64 {
        let sql = "SELECT (SELECT count(*) FROM pg_replication_slots) + (SELECT count(*) FROM pg_publication) \
                   + (SELECT count(*) FROM pg_subscription) + (SELECT count(*) FROM pg_namespace WHERE nspname = 'shardgate')";
        count(c, sql).await
    }
    let limit: i64 = count(&dst, "SELECT current_setting('max_replication_slots')::bigint").await;
    let used = count(&dst, "SELECT count(*) FROM pg_replication_slots").await;
    for i in used..limit {
        dst.batch_execute(&format!("SELECT pg_create_logical_replication_slot('filler_{i}', 'pgoutput')"))
            .await
            .unwrap();
    }
    let before = (snapshot(&src).await, snapshot(&dst).await);
    let spec3 = MoveSpec { id: 3, ..spec.clone() };
    let err = prepare::prepare(&spec3).await.unwrap_err().to_string();
    assert!(
        err.contains("shard shard_1")
            && err.contains("no free replication slots")
            && err.contains("max_replication_slots"),
        "{err}"
    );
    assert_eq!((snapshot(&src).await, snapshot(&dst).await), before, "a refused move created nothing");
    for i in used..limit {
        dst.batch_execute(&format!("SELECT pg_drop_replication_slot('filler_{i}')")).await.unwrap();
    }
    prepare::prepare(&spec3).await.expect("with slots free again, the move prepares");
}

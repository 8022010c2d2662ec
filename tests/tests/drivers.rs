//! Real clients through the router: psql and pgbench in every query mode.

use std::process::Command;

use shardgate_tests::Harness;

fn psql(url: &str, sql: &str) -> std::process::Output {
    Command::new("psql").args([url, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql]).output().expect("run psql")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_creates_writes_and_reads_through_the_router() {
    let h = Harness::start(2).await;
    let url = h.url();
    let out = tokio::task::spawn_blocking(move || {
        let a =
            psql(&url, "CREATE TABLE orders (tenant_id bigint, id bigint, total numeric, PRIMARY KEY (tenant_id, id))");
        let b = psql(&url, "INSERT INTO orders VALUES (7, 1, 12.50)");
        let c = psql(&url, "SELECT total FROM orders WHERE tenant_id = 7");
        let d = psql(&url, "SELECT * FROM orders WHERE tenant_id = 'seven'");
        (a, b, c, d)
    })
    .await
    .unwrap();
    assert!(out.0.status.success(), "{}", String::from_utf8_lossy(&out.0.stderr));
    assert!(out.1.status.success(), "{}", String::from_utf8_lossy(&out.1.stderr));
    assert_eq!(String::from_utf8_lossy(&out.2.stdout).trim(), "12.50");
    // A bad key is a clean error, and psql reports it.
    assert!(!out.3.status.success());
    assert!(
        String::from_utf8_lossy(&out.3.stderr).contains("invalid input syntax"),
        "{}",
        String::from_utf8_lossy(&out.3.stderr)
    );
    let t = 7;
    let on = h.shard_of(t);
    let n: i64 = h.shard(on).await.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get(0);
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_runs_a_tenant_script_in_every_query_mode() {
    let h = Harness::start(2).await;
    let c = h.client().await;
    c.batch_execute("CREATE TABLE accounts (tenant_id bigint, id int, balance bigint, PRIMARY KEY (tenant_id, id))")
        .await
        .unwrap();
    c.batch_execute("CREATE TABLE history (tenant_id bigint, id int, delta bigint)").await.unwrap();
    let mut values = Vec::new();
    for t in 1..=50 {
        for id in 1..=4 {
            values.push(format!("({t}, {id}, 0)"));
        }
    }
    c.batch_execute(&format!("INSERT INTO accounts VALUES {}", values.join(","))).await.unwrap();
    let script = std::env::temp_dir().join(format!("shardgate-pgbench-{}.sql", std::process::id()));
    std::fs::write(
        &script,
        "\\set t random(1, 50)\n\\set a random(1, 4)\n\\set d random(-100, 100)\n\
         BEGIN;\n\
         UPDATE accounts SET balance = balance + :d WHERE tenant_id = :t AND id = :a;\n\
         SELECT balance FROM accounts WHERE tenant_id = :t AND id = :a;\n\
         INSERT INTO history (tenant_id, id, delta) VALUES (:t, :a, :d);\n\
         END;\n",
    )
    .unwrap();
    let mut total_tx = 0;
    for mode in ["simple", "extended", "prepared"] {
        let out = Command::new("pgbench")
            .args(["-n", "-M", mode, "-c", "4", "-j", "2", "-t", "50", "-f"])
            .arg(&script)
            .args(["-h", "127.0.0.1", "-p", &h.port().to_string(), "-U", "postgres", "app"])
            .output()
            .expect("run pgbench");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "pgbench -M {mode} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("number of failed transactions: 0"), "{stdout}");
        total_tx += 200;
    }
    // Every transaction's history row is on its tenant's shard, and the balances
    // add up to the history on each shard (nothing lost, nothing doubled).
    let mut rows = 0;
    for i in 0..2 {
        let s = h.shard(i).await;
        rows += s.query_one("SELECT count(*) FROM history", &[]).await.unwrap().get::<_, i64>(0);
        let misplaced = s.query("SELECT tenant_id FROM history", &[]).await.unwrap();
        assert!(misplaced.iter().all(|r| h.shard_of(r.get::<_, i64>(0)) == i));
        let sums = s
            .query_one("SELECT (SELECT coalesce(sum(balance),0) FROM accounts)::bigint, (SELECT coalesce(sum(delta),0) FROM history)::bigint", &[])
            .await
            .unwrap();
        assert_eq!(sums.get::<_, i64>(0), sums.get::<_, i64>(1));
    }
    assert_eq!(rows, total_tx);
    let _ = std::fs::remove_file(script);
}

//! TLS from the router to its shards: a shard URL's `sslmode`, `sslrootcert`
//! are honoured with libpq's meanings, against Postgres servers with `ssl = on`
//! and a pg_hba.conf that admits TCP logins under TLS only.

use std::time::Duration;

use shardgate_directory::KeyType;
use shardgate_localpg::{Issued, PlainClients, TestCluster};
use shardgate_router::backend::{Backend, ShardAddress};
use shardgate_router::config::RouterConfig;
use shardgate_tests::tls::{self, TestCa};
use shardgate_tests::{rows, sqlstate, Harness};
use tokio_postgres::NoTls;

/// `n` servers with TLS from `certificate`, plain TCP logins refused; and the
/// path of the CA file each holds.
async fn tls_only_servers(ca: &TestCa, n: usize, certificate: impl Fn() -> Issued) -> (TestCluster, Vec<String>) {
    let mut cluster = TestCluster::start(n).await.expect("start Postgres");
    let mut roots = Vec::new();
    for server in cluster.servers_mut() {
        let root = server.serve_tls(&ca.ca.cert_pem(), &certificate(), PlainClients::Refused).expect("TLS on");
        roots.push(root.display().to_string());
    }
    (cluster, roots)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostssl_only_shard_serves_routed_statements_under_verify_full() {
    let ca = TestCa::new();
    let (cluster, roots) = tls_only_servers(&ca, 2, || ca.local_server()).await;
    let plain_urls = cluster.urls();
    let urls: Vec<String> =
        plain_urls.iter().zip(&roots).map(|(u, r)| format!("{u}?sslmode=verify-full&sslrootcert={r}")).collect();
    let h = Harness::start_over(cluster, &urls, RouterConfig::default(), KeyType::Int).await;

    let c = h.client().await;
    c.simple_query("CREATE TABLE orders (tenant_id bigint, id bigint, total int, PRIMARY KEY (tenant_id, id))")
        .await
        .expect("DDL on every shard");
    let tenants = [h.tenants_on(0, 1)[0], h.tenants_on(1, 1)[0]];
    for t in tenants {
        c.execute("INSERT INTO orders VALUES ($1, 1, 10)", &[&t]).await.expect("routed insert");
        let got = rows(c.simple_query(&format!("SELECT total FROM orders WHERE tenant_id = {t}")).await.unwrap());
        assert_eq!(got, vec![vec![Some("10".to_string())]]);
    }

    for (i, url) in plain_urls.iter().enumerate() {
        // The shard really refuses plain logins…
        let Err(err) = tokio_postgres::connect(url, NoTls).await else { panic!("shard {i} let a plain login in") };
        assert_eq!(sqlstate(&err), "28000");
        // …and every connection of the router's is under TLS.
        let shard = tls::connect(&format!("{url}?sslmode=require"), ca.verify_full()).await.expect("TLS to shard");
        let sql = "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_ssl s \
                   JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'shardgate'";
        let row = shard.query_one(sql, &[]).await.expect("pg_stat_ssl");
        let (all, tls): (i64, i64) = (row.get(0), row.get(1));
        assert!(all > 0 && all == tls, "shard {i}: {tls} of {all} router connections under TLS");
    }
}

/// Whether the router's wire client logs in to `url`, and its error if not.
async fn login(url: &str) -> Result<(), String> {
    let addr = ShardAddress::from_url(url)?;
    Backend::connect(&addr, Duration::from_secs(10)).await.map(|_| ()).map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sslmode_checks_what_libpq_checks() {
    let ca = TestCa::new();
    // A certificate the CA signed, but for another host name.
    let (cluster, roots) = tls_only_servers(&ca, 1, || ca.issue(&["db.example.com"])).await;
    let url = &cluster.urls()[0];
    let root = &roots[0];
    let stranger = TestCa::new();
    let stranger_root = stranger.root_cert();
    let stranger_root = stranger_root.display();

    // Host name checked: refused, and the error says why.
    let err = login(&format!("{url}?sslmode=verify-full&sslrootcert={root}")).await.expect_err("wrong host name");
    assert!(err.contains("TLS") && err.contains("not valid for name"), "{err}");
    // Chain checked, name not: in.
    login(&format!("{url}?sslmode=verify-ca&sslrootcert={root}")).await.expect("verify-ca");
    // An untrusted CA fails verify-ca, and require too once a root file is named.
    for mode in ["verify-ca", "require"] {
        let err = login(&format!("{url}?sslmode={mode}&sslrootcert={stranger_root}")).await.expect_err(mode);
        assert!(err.contains("UnknownIssuer"), "{mode}: {err}");
    }
    // Encryption without checks: in.
    for mode in ["require", "prefer"] {
        login(&format!("{url}?sslmode={mode}")).await.unwrap_or_else(|e| panic!("{mode}: {e}"));
    }
    // `allow` starts in the clear, is refused by pg_hba, and retries under TLS.
    login(&format!("{url}?sslmode=allow")).await.expect("allow");
    // `disable` never asks: pg_hba turns it away.
    let err = login(&format!("{url}?sslmode=disable")).await.expect_err("disable");
    assert!(err.contains("no encryption"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_is_refused_by_a_shard_without_tls() {
    let cluster = TestCluster::start(1).await.expect("start Postgres");
    let url = &cluster.urls()[0];
    let err = login(&format!("{url}?sslmode=require")).await.expect_err("no TLS on the server");
    assert!(err.contains("sslmode=require requires TLS"), "{err}");
    login(&format!("{url}?sslmode=prefer")).await.expect("prefer goes on in the clear");
}

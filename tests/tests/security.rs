//! Who may do what through a router. Mostly clients as their own Postgres
//! roles (`[router.auth]`): the router looks a
//! client's password up on the shards through a low-privilege lookup role,
//! checks it, and runs the client's statements on every shard as that role,
//! so GRANTs and row-level security apply through the router as they would on
//! one Postgres. The shards run with `ssl = on`, take TCP logins under TLS
//! only, and ask every one but the router's own for a SCRAM password, so
//! nothing here works unless the pass-through does.

use std::time::Duration;

use shardgate_directory::KeyType;
use shardgate_localpg::{PlainClients, TestCluster};
use shardgate_router::config::{AuthConfig, AuthMethod, RouterConfig, Secret, UserConfig};
use shardgate_tests::tls::TestCa;
use shardgate_tests::{rows, sqlstate, Harness};
use tokio_postgres::{Client, NoTls};

/// TCP logins under TLS only, with a SCRAM password except the router's own user's.
const HBA: &str = "local all all trust\n\
    local replication all trust\n\
    hostssl all postgres 127.0.0.1/32 trust\n\
    hostssl replication postgres 127.0.0.1/32 trust\n\
    hostssl all all 127.0.0.1/32 scram-sha-256\n";

/// A router in front of TLS shards, and the CA of both.
struct Secured {
    h: Harness,
    ca: TestCa,
    /// The shards' URLs, TLS parameters included.
    urls: Vec<String>,
}

impl std::ops::Deref for Secured {
    type Target = Harness;
    fn deref(&self) -> &Harness {
        &self.h
    }
}

impl Secured {
    /// A superuser connection straight to shard `i`, under TLS.
    async fn direct(&self, i: usize) -> Client {
        // The connector checks the chain and the host name, as verify-full.
        let url = format!("{}?sslmode=require", self.cluster.servers()[i].url("app"));
        shardgate_tests::tls::connect(&url, self.ca.verify_full()).await.expect("TLS to the shard")
    }
}

fn config(ca: &TestCa, lookup_password: &str) -> RouterConfig {
    let router = ca.write("router", &ca.local_server());
    RouterConfig {
        tls_cert_file: Some(router.cert),
        tls_key_file: Some(router.key),
        auth: Some(AuthConfig {
            user: Some("shardgate_auth".into()),
            password: Some(Secret(lookup_password.into())),
            query: shardgate_router::roles::LOOKUP_QUERY.into(),
            ..Default::default()
        }),
        // The router's own user logs in without a password, as in `shardgate up`.
        users: vec![UserConfig { name: "postgres".into(), auth: AuthMethod::Trust, password: None }],
        admins: vec!["postgres".into()],
        ..Default::default()
    }
}

async fn login(h: &Harness, user: &str, password: &str, database: &str) -> Result<Client, tokio_postgres::Error> {
    let url = format!("postgres://{user}:{password}@{}/{database}", h.router.local_addr);
    let (client, conn) = tokio_postgres::connect(&url, NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// A cluster of two TLS shards whose logins need SCRAM, with roles alice
/// (reads and writes her rows) and bob (reads his), made through the router.
async fn start() -> Secured {
    start_with("lookup-pw").await
}

/// [`start`], the router knowing the lookup role's password as `lookup_password`.
async fn start_with(lookup_password: &str) -> Secured {
    let ca = TestCa::new();
    let mut cluster = TestCluster::start(2).await.expect("start Postgres");
    let mut urls = Vec::new();
    for server in cluster.servers_mut() {
        // Stopped meanwhile, so that the rules are in force when it is back.
        server.stop().unwrap();
        let root = server.serve_tls(&ca.ca.cert_pem(), &ca.local_server(), PlainClients::Allowed).expect("TLS on");
        server.set_hba(HBA).unwrap();
        server.start_again().unwrap();
        urls.push(format!("{}?sslmode=verify-full&sslrootcert={}", server.url("app"), root.display()));
    }
    let h = Harness::start_over(cluster, &urls, config(&ca, lookup_password), KeyType::Int).await;
    let h = Secured { h, ca, urls };
    for i in 0..2 {
        let lookup = shardgate_router::roles::lookup_setup_sql("shardgate_auth", "lookup-pw");
        h.direct(i).await.batch_execute(&lookup).await.unwrap();
    }
    let admin = h.client().await;
    admin
        .batch_execute(
            "CREATE ROLE alice LOGIN PASSWORD 'alice-pw'; \
             CREATE ROLE bob LOGIN PASSWORD 'bob-pw'; \
             CREATE TABLE orders (tenant_id bigint, id int, owner text, total int, PRIMARY KEY (tenant_id, id)); \
             GRANT SELECT, INSERT ON orders TO alice; \
             GRANT SELECT ON orders TO bob; \
             ALTER TABLE orders ENABLE ROW LEVEL SECURITY; \
             CREATE POLICY own ON orders USING (owner = current_user) WITH CHECK (owner = current_user)",
        )
        .await
        .unwrap();
    let mut values = Vec::new();
    for shard in 0..2 {
        for (i, t) in h.tenants_on(shard, 3).into_iter().enumerate() {
            let owner = if i % 2 == 0 { "alice" } else { "bob" };
            values.push(format!("({t}, 1, '{owner}', {})", 10 * (i + 1)));
        }
    }
    admin.batch_execute(&format!("INSERT INTO orders VALUES {}", values.join(", "))).await.unwrap();
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_runs_on_every_shard_as_its_own_role() {
    let h = start().await;
    // Every shard stores the same verifier, and no shard the password.
    let mut verifiers = Vec::new();
    for i in 0..2 {
        let row = h.direct(i).await.query_one("SELECT rolpassword FROM pg_authid WHERE rolname = 'alice'", &[]).await;
        verifiers.push(row.unwrap().get::<_, String>(0));
    }
    assert!(verifiers[0].starts_with("SCRAM-SHA-256$") && verifiers[0] == verifiers[1], "{verifiers:?}");

    // Under TLS to the router too, the certificate checked as verify-full.
    let url = format!("postgres://alice:alice-pw@{}/app?sslmode=require", h.router.local_addr);
    let tls = shardgate_tests::tls::connect(&url, h.ca.verify_full()).await.expect("alice logs in under TLS");
    let me: String = tls.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(me, "alice");
    let alice = login(&h, "alice", "alice-pw", "app").await.expect("alice logs in");
    for shard in 0..2 {
        let t = h.tenants_on(shard, 1)[0];
        // Simple protocol, then extended.
        let simple = rows(
            alice
                .simple_query(&format!(
                    "SELECT current_user, (SELECT usename FROM pg_stat_activity WHERE pid = pg_backend_pid()) \
                     FROM orders WHERE tenant_id = {t}"
                ))
                .await
                .unwrap(),
        );
        assert_eq!(simple, vec![vec![Some("alice".to_string()), Some("alice".to_string())]], "shard {shard}");
        let extended = alice.query("SELECT current_user::text FROM orders WHERE tenant_id = $1", &[&t]).await.unwrap();
        assert_eq!(extended.len(), 1);
        assert_eq!(extended[0].get::<_, String>(0), "alice");
    }
    // Row-level security on every shard: a read of all shards sees her rows only.
    let owners = alice.query("SELECT DISTINCT owner FROM orders", &[]).await.unwrap();
    assert_eq!(owners.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>(), vec!["alice"]);
    let n: i64 = alice.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get(0);
    assert_eq!(n, 4, "two of each shard's three tenants are alice's");
    // Her policy's WITH CHECK holds on the shard.
    let t0 = h.tenants_on(0, 1)[0];
    let e = alice.execute("INSERT INTO orders VALUES ($1, 2, 'bob', 1)", &[&t0]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{e}");
    // A write on both shards commits with two-phase commit, as her.
    let t1 = h.tenants_on(1, 1)[0];
    alice
        .batch_execute(&format!("INSERT INTO orders VALUES ({t0}, 3, 'alice', 5), ({t1}, 3, 'alice', 5)"))
        .await
        .unwrap();
    let n: i64 = alice.query_one("SELECT count(*) FROM orders WHERE id = 3", &[]).await.unwrap().get(0);
    assert_eq!(n, 2);

    // Bob reads his rows and may not write.
    let bob = login(&h, "bob", "bob-pw", "app").await.expect("bob logs in");
    let owners = bob.query("SELECT DISTINCT owner FROM orders", &[]).await.unwrap();
    assert_eq!(owners.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>(), vec!["bob"]);
    let e = bob.execute("INSERT INTO orders VALUES ($1, 4, 'bob', 1)", &[&t1]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{e}");
    let e = bob.simple_query(&format!("UPDATE orders SET total = 0 WHERE tenant_id = {t1}")).await.unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passwords_databases_and_the_console_are_refused() {
    let h = start().await;
    for (user, password) in [("alice", "wrong"), ("nobody", "x"), ("shardgate_auth", "wrong")] {
        let e = login(&h, user, password, "app").await.expect_err("refused");
        assert_eq!(sqlstate(&e), "28P01", "{user}");
    }
    let e = login(&h, "alice", "alice-pw", "elsewhere").await.expect_err("refused");
    assert_eq!(sqlstate(&e), "3D000", "{e}");
    let e = login(&h, "alice", "alice-pw", "shardgate").await.expect_err("refused");
    assert_eq!(sqlstate(&e), "42501", "{e}");
    let admin = login(&h, "postgres", "", "shardgate").await.expect("an admin opens the console");
    assert!(!admin.simple_query("SHOW SHARDS").await.unwrap().is_empty());

    // A password changed through the router: the old one stops working at
    // once, the new one works, and every shard stores the same new verifier.
    let alice = login(&h, "alice", "alice-pw", "app").await.unwrap();
    h.client().await.batch_execute("ALTER ROLE alice PASSWORD 'new-pw'").await.unwrap();
    let e = login(&h, "alice", "alice-pw", "app").await.expect_err("old password refused");
    assert_eq!(sqlstate(&e), "28P01");
    let again = login(&h, "alice", "new-pw", "app").await.expect("new password");
    for c in [&alice, &again] {
        // The old session's pooled connections stay; new ones log in with the new keys.
        let n: i64 = c.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get(0);
        assert_eq!(n, 4);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_whose_verifiers_differ_is_told_how_to_fix_it() {
    let h = start().await;
    // Set on one shard behind the router's back: another salt there.
    h.direct(1).await.batch_execute("ALTER ROLE bob PASSWORD 'bob-pw'").await.unwrap();
    let bob = login(&h, "bob", "bob-pw", "app").await.expect("the lookup shard still matches");
    let e = bob.query("SELECT count(*) FROM orders", &[]).await.unwrap_err();
    let db = e.as_db_error().expect("a Postgres error");
    // The shard turned the router's login down (08004), and says why.
    assert_eq!(db.code().code(), "08004", "{e}");
    assert!(db.message().contains("ALTER ROLE") && db.message().contains("shard_1"), "{}", db.message());
    // Set again through the router: the same verifier everywhere, and it works.
    h.client().await.batch_execute("ALTER ROLE bob PASSWORD 'bob-pw'").await.unwrap();
    let bob = login(&h, "bob", "bob-pw", "app").await.unwrap();
    let n: i64 = bob.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get(0);
    assert_eq!(n, 2);
}

/// A lookup that cannot run (here the router has a wrong password for the
/// lookup role) refuses the login with 08006 and tells the client nothing of
/// why; the static users still log in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_lookup_refuses_the_login_and_keeps_its_reason_to_the_log() {
    let h = start_with("not-the-lookup-password").await;
    let e = login(&h, "alice", "alice-pw", "app").await.expect_err("refused");
    let db = e.as_db_error().expect("a Postgres error");
    assert_eq!(db.code().code(), "08006", "{e}");
    assert!(!db.message().contains("shardgate_auth") && !db.message().contains("28P01"), "{}", db.message());
    let admin = login(&h, "postgres", "", "app").await.expect("a static user needs no lookup");
    admin.simple_query("SELECT 1").await.unwrap();
}

/// A role without superuser writes its tenant's rows while they move and
/// after: the move's fence trigger runs as the writer, and the writes of a
/// transaction that spans shards record their commit decision as the writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_writes_through_a_move_of_its_tenant() {
    use shardgate_directory::state::{Command, MoveOptions, MovePhase, MoveSubject, Outcome};
    let h = start().await;
    let config = shardgate_migrator::driver::DriverConfig::default();
    let stop = shardgate_tests::start_move_driver(&h, h.urls.clone(), config);
    let alice = login(&h, "alice", "alice-pw", "app").await.unwrap();
    let t = h.tenants_on(0, 1)[0];
    let out = h.directory.apply_local(&Command::CreateMove {
        subject: MoveSubject::Tenant(shardgate_directory::TenantKey::Int(t)),
        target: "shard_1".into(),
        options: MoveOptions { cutover_auto: true, complete_auto: true },
        at_ms: shardgate_directory::clock::now_ms(),
    });
    let Outcome::MoveCreated { id, .. } = out else { panic!("{out:?}") };
    let phase = || h.directory.load().moves[&id].phase;
    let mut written = 0;
    let started = std::time::Instant::now();
    while phase() != MovePhase::Done {
        assert!(phase() != MovePhase::Failed, "{:?}", h.directory.load().moves[&id]);
        assert!(started.elapsed() < Duration::from_secs(60), "the move did not finish: {:?}", phase());
        written += 1;
        alice.execute("INSERT INTO orders VALUES ($1, $2, 'alice', 1)", &[&t, &(100 + written)]).await.unwrap();
    }
    alice.execute("INSERT INTO orders VALUES ($1, 99, 'alice', 1)", &[&t]).await.unwrap();
    let _ = stop.send(true);
    let n: i64 = h
        .direct(1)
        .await
        .query_one("SELECT count(*) FROM orders WHERE tenant_id = $1 AND id >= 99", &[&t])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, written as i64 + 1, "every write of alice's reached the tenant's new shard");
}

#[tokio::test]
async fn the_admin_api_will_not_listen_on_a_network_address_without_a_token() {
    let h = Harness::start(1).await;
    let e = shardgate_router::admin::serve("0.0.0.0:0", h.router.context.clone(), None).await.expect_err("refused");
    assert!(e.to_string().contains("[admin] token"), "{e}");
    let (_, task) =
        shardgate_router::admin::serve("0.0.0.0:0", h.router.context.clone(), Some("t".into())).await.unwrap();
    task.abort();
    let (_, task) = shardgate_router::admin::serve("127.0.0.1:0", h.router.context.clone(), None).await.unwrap();
    task.abort();
}

//! Who may do what through a router. Mostly clients as their own Postgres
//! roles (`[router.auth]`): the router looks a
//! client's password up on the shards through a low-privilege lookup role,
//! checks it, and runs the client's statements on every shard as that role,
//! so GRANTs and row-level security apply through the router as they would on
//! one Postgres. The shards ask every TCP login but the router's own for a
//! SCRAM password, so nothing here works unless the pass-through does.

use std::time::Duration;

use shardgate_router::config::{AuthConfig, AuthMethod, RouterConfig, Secret, UserConfig};
use shardgate_tests::{rows, sqlstate, Harness};
use tokio_postgres::{Client, NoTls};

/// TCP logins need a SCRAM password, except the router's own user's.
const HBA: &str = "local all all trust\n\
    local replication all trust\n\
    host all postgres 127.0.0.1/32 trust\n\
    host replication postgres 127.0.0.1/32 trust\n\
    host all all 127.0.0.1/32 scram-sha-256\n";

fn config() -> RouterConfig {
    RouterConfig {
        auth: Some(AuthConfig {
            user: Some("shardgate_auth".into()),
            password: Some(Secret("lookup-pw".into())),
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

/// A cluster of two shards whose TCP logins need SCRAM, with roles alice
/// (reads and writes her rows) and bob (reads his), made through the router.
async fn start() -> Harness {
    let h = Harness::start_with(2, config()).await;
    for i in 0..2 {
        let lookup = shardgate_router::roles::lookup_setup_sql("shardgate_auth", "lookup-pw");
        h.shard(i).await.batch_execute(&lookup).await.unwrap();
        h.shard_server(i).set_hba(HBA).unwrap();
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
    // The new pg_hba.conf is in force once a TCP login needs the password.
    let port = h.shard_server(1).port();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let direct = format!("postgres://alice:wrong@127.0.0.1:{port}/app");
        match tokio_postgres::connect(&direct, NoTls).await {
            Err(e) if sqlstate(&e) == "28P01" => break,
            _ if std::time::Instant::now() > deadline => panic!("pg_hba.conf not reloaded within 10 s"),
            _ => tokio::task::yield_now().await,
        }
    }
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_runs_on_every_shard_as_its_own_role() {
    let h = start().await;
    // Every shard stores the same verifier, and no shard the password.
    let mut verifiers = Vec::new();
    for i in 0..2 {
        let row = h.shard(i).await.query_one("SELECT rolpassword FROM pg_authid WHERE rolname = 'alice'", &[]).await;
        verifiers.push(row.unwrap().get::<_, String>(0));
    }
    assert!(verifiers[0].starts_with("SCRAM-SHA-256$") && verifiers[0] == verifiers[1], "{verifiers:?}");

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
    h.shard(1).await.batch_execute("ALTER ROLE bob PASSWORD 'bob-pw'").await.unwrap();
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

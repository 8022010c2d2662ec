//! Routers on the replicated directory: placements flip on every router without a
//! network call per query, and a router cut off from the quorum refuses writes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use shardgate_directory::replica::{Node, NodeConfig, TcpTransport};
use shardgate_directory::state::Command;
use shardgate_directory::{Directory, KeyType, Shard, TenantKey};
use shardgate_localpg::TestCluster;
use shardgate_router::backend::ShardAddress;
use shardgate_router::config::RouterConfig;
use shardgate_tests::{connect, sqlstate};

struct Replicated {
    cluster: TestCluster,
    nodes: Vec<Node>,
    transports: Vec<Arc<TcpTransport>>,
    routers: Vec<shardgate_router::server::RouterHandle>,
    _tmp: tempfile::TempDir,
}

/// Three directory nodes founding a cluster from `initial`, each with a
/// transport `transport` makes; their raft addresses by node id.
async fn three_nodes(
    initial: &Directory,
    dir: &std::path::Path,
    transport: impl Fn() -> Arc<TcpTransport>,
) -> (Vec<Node>, Vec<Arc<TcpTransport>>, HashMap<u64, std::net::SocketAddr>) {
    let mut listeners = Vec::new();
    let mut addrs = HashMap::new();
    for id in 1..=3u64 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.insert(id, l.local_addr().unwrap());
        listeners.push((id, l));
    }
    let (mut nodes, mut transports) = (Vec::new(), Vec::new());
    for (id, l) in listeners {
        let t = transport();
        for (&p, &a) in &addrs {
            if p != id {
                t.set_peer(p, a.to_string());
            }
        }
        let mut cfg = NodeConfig::new(id, dir.join(format!("n{id}")), initial.clone());
        cfg.tick = Duration::from_millis(20);
        cfg.founding_voters = Some(vec![1, 2, 3]);
        let node = Node::start(cfg, t.clone()).unwrap();
        t.serve(l, node.clone());
        nodes.push(node);
        transports.push(t);
    }
    (nodes, transports, addrs)
}

/// Three replicas, each with a router whose lease is `lease` and whose writes wait
/// `lease_wait` for an expired lease to come back.
async fn start(lease: Duration, lease_wait: Duration) -> Replicated {
    let cluster = TestCluster::start(2).await.unwrap();
    let mut shards = Vec::new();
    let mut addrs = Vec::new();
    for (i, s) in cluster.servers().iter().enumerate() {
        let a = ShardAddress::from_url(&s.url("app")).unwrap();
        shards.push(Shard::new(format!("shard_{i}"), a.display_url()));
        addrs.push(a);
    }
    let initial = Directory::new("tenant_id", KeyType::Int, 16, shards).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (nodes, transports, _) = three_nodes(&initial, tmp.path(), || TcpTransport::new("t")).await;
    let mut routers = Vec::new();
    for node in &nodes {
        let config = RouterConfig { listen: "127.0.0.1:0".into(), lease_wait, ..Default::default() };
        let router =
            shardgate_router::server::start_replicated(config, node.clone(), lease, addrs.clone()).await.unwrap();
        routers.push(router);
    }
    for n in &nodes {
        let mut rx = n.watch_status();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| s.leader.is_some() && s.last_contact.is_some()))
            .await
            .unwrap()
            .unwrap();
    }
    Replicated { cluster, nodes, transports, routers, _tmp: tmp }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placement_change_reaches_every_router_and_moves_its_traffic() {
    let r = start(Duration::from_secs(2), Duration::from_secs(5)).await;
    let urls: Vec<String> = r.routers.iter().map(|x| format!("postgres://postgres@{}/app", x.local_addr)).collect();
    let c0 = connect(&urls[0]).await;
    c0.batch_execute("CREATE TABLE kv (tenant_id bigint, v int)").await.unwrap();
    let dir = r.nodes[0].directory().load();
    let tenant = 5i64;
    let bucket = dir.bucket_of(&TenantKey::Int(tenant));
    let home = dir.shard_for(&TenantKey::Int(tenant));
    let other = 1 - home;
    // Flip the bucket (as a cutover would, once data is in place) from node 2.
    let out = r.nodes[1]
        .propose(Command::PlaceBucket { bucket, shard: format!("shard_{other}") }, Duration::from_secs(5))
        .await
        .unwrap();
    let epoch = match out {
        shardgate_directory::state::Outcome::Applied { epoch } => epoch,
        o => panic!("{o:?}"),
    };
    for n in &r.nodes {
        let mut rx = n.watch_status();
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.epoch >= epoch)).await.unwrap().unwrap();
    }
    // Every router now sends the tenant's writes to the new shard.
    for (i, url) in urls.iter().enumerate() {
        let c = connect(url).await;
        c.execute("INSERT INTO kv VALUES ($1, $2)", &[&tenant, &(i as i32)]).await.unwrap();
    }
    let direct = connect(&r.cluster.servers()[other].url("app")).await;
    let n: i64 = direct.query_one("SELECT count(*) FROM kv WHERE tenant_id = 5", &[]).await.unwrap().get(0);
    assert_eq!(n, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_cut_off_from_the_directory_refuses_writes_and_recovers() {
    const LEASE: Duration = Duration::from_millis(400);
    const WAIT: Duration = Duration::from_millis(1500);
    let r = start(LEASE, WAIT).await;
    let leader = r.nodes[0].status().leader.unwrap();
    // Cut off a router whose replica is not the leader.
    let idx = r.nodes.iter().position(|n| n.id != leader).unwrap();
    let url = format!("postgres://postgres@{}/app", r.routers[idx].local_addr);
    let c = connect(&url).await;
    c.batch_execute("CREATE TABLE kv (tenant_id bigint, v int)").await.unwrap();
    c.execute("INSERT INTO kv VALUES (1, 1)", &[]).await.unwrap();
    r.transports[idx].set_isolated(true);
    let mut rx = r.nodes[idx].watch_status();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while r.nodes[idx].lease_valid(LEASE) {
        assert!(tokio::time::Instant::now() < deadline, "the lease never ran out");
        let _ = tokio::time::timeout(Duration::from_millis(100), rx.changed()).await;
    }
    // A write waits for the directory, then is refused saying why.
    let started = std::time::Instant::now();
    let err = c.execute("INSERT INTO kv VALUES (1, 2)", &[]).await.unwrap_err();
    assert!(started.elapsed() >= WAIT, "refused after {:?}, before lease_wait", started.elapsed());
    assert_eq!(sqlstate(&err), "57P03");
    assert!(err.as_db_error().unwrap().message().contains("directory unreachable"), "{err:?}");
    // Reads go on from the last known placement.
    let n: i64 = c.query_one("SELECT count(*) FROM kv WHERE tenant_id = 1", &[]).await.unwrap().get(0);
    assert_eq!(n, 1);
    // A write that arrives while the router is cut off waits; contact comes back
    // within lease_wait and the write goes through, without an error.
    let waits = shardgate_router::metrics::global().lease_waits_started();
    let pending = tokio::spawn(async move { c.execute("INSERT INTO kv VALUES (1, 3)", &[]).await.map(|_| c) });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while shardgate_router::metrics::global().lease_waits_started() == waits {
        assert!(tokio::time::Instant::now() < deadline, "the write never waited for the lease");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    r.transports[idx].set_isolated(false);
    let c = pending.await.unwrap().expect("a write waiting for the directory goes through once contact is back");
    assert!(r.nodes[idx].lease_valid(LEASE));
    c.execute("INSERT INTO kv VALUES (1, 4)", &[]).await.unwrap();
    let n: i64 = c.query_one("SELECT count(*) FROM kv WHERE tenant_id = 1", &[]).await.unwrap().get(0);
    assert_eq!(n, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_console_shows_shards_buckets_and_the_directory() {
    let r = start(Duration::from_secs(2), Duration::from_secs(5)).await;
    let c = connect(&format!("postgres://postgres@{}/shardgate", r.routers[0].local_addr)).await;
    let shards = c.simple_query("SHOW SHARDS").await.unwrap();
    let names: Vec<String> = shards
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get("name").map(str::to_string),
            _ => None,
        })
        .collect();
    assert_eq!(names, vec!["shard_0", "shard_1"]);
    let buckets = c.simple_query("show buckets;").await.unwrap();
    let n = buckets.iter().filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))).count();
    assert_eq!(n, 16);
    let d = c.simple_query("SHOW DIRECTORY").await.unwrap();
    let row = d.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
        _ => None,
    });
    assert_eq!(row.unwrap().get("lease"), Some("valid"));
    let err = c.simple_query("DROP TABLE x").await.unwrap_err();
    assert_eq!(sqlstate(&err), "42601");
    // Every router reports itself through the directory.
    let mut rx = r.nodes[0].watch_status();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while r.nodes[0].directory().load().routers.len() < 3 {
        assert!(tokio::time::Instant::now() < deadline, "routers never reported");
        let _ = tokio::time::timeout(Duration::from_millis(200), rx.changed()).await;
    }
    let routers = c.simple_query("SHOW ROUTERS").await.unwrap();
    let n = routers.iter().filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))).count();
    assert_eq!(n, 3);
}

/// Raft between nodes under mutual TLS with the cluster's CA: the nodes elect
/// a leader and replicate, and a peer that does not speak TLS, or whose
/// certificate another CA signed, is turned away even with the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_runs_under_mutual_tls_and_turns_strangers_away() {
    use shardgate_directory::replica::{RaftTls, RaftTlsFiles};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca = shardgate_tests::tls::TestCa::new();
    let node_cert = ca.write("node", &ca.local_server());
    let files = RaftTlsFiles { ca: ca.root_cert(), cert: node_cert.cert.clone(), key: node_cert.key.clone() };
    let tls = RaftTls::from_files(&files).unwrap();
    let shards = vec![Shard::new("shard_0", "postgres://a@h/app"), Shard::new("shard_1", "postgres://b@h/app")];
    let initial = Directory::new("tenant_id", KeyType::Int, 16, shards).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let transport = || TcpTransport::with_tls("cluster-token", Some(tls.clone()));
    let (nodes, _, addrs) = three_nodes(&initial, tmp.path(), transport).await;
    let out = nodes[0]
        .propose(Command::PlaceBucket { bucket: 3, shard: "shard_1".into() }, Duration::from_secs(10))
        .await
        .unwrap();
    let shardgate_directory::state::Outcome::Applied { epoch } = out else { panic!("{out:?}") };
    for n in &nodes {
        let mut rx = n.watch_status();
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.epoch >= epoch)).await.unwrap().unwrap();
    }

    // Strangers who know the token. The node closes on them (a TLS alert at most).
    let mut hello = 13u32.to_le_bytes().to_vec();
    hello.extend_from_slice(b"cluster-token");
    let target = addrs[&1];
    async fn closed(mut s: impl tokio::io::AsyncRead + Unpin) -> bool {
        let mut b = [0u8; 64];
        let until_end = async {
            loop {
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), until_end).await.is_ok()
    }
    let mut plain = tokio::net::TcpStream::connect(target).await.unwrap();
    plain.write_all(&hello).await.unwrap();
    assert!(closed(plain).await, "a plain peer was not turned away");

    let other = shardgate_tests::tls::TestCa::new();
    let stranger = other.local_server();
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca.root_cert()).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(stranger.cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(stranger.key_pem.as_bytes()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(shardgate_router::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(target).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    // TLS 1.3: the server judges the client's certificate after the client's
    // side of the handshake is done, and then closes; TLS 1.2 fails the handshake.
    if let Ok(mut s) = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await {
        let _ = s.write_all(&hello).await;
        assert!(closed(s).await, "a peer of another CA was not turned away");
    }
    // The cluster still works.
    let out = nodes[1]
        .propose(Command::PlaceBucket { bucket: 4, shard: "shard_1".into() }, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(matches!(out, shardgate_directory::state::Outcome::Applied { .. }), "{out:?}");
}

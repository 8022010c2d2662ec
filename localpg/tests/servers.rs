//! Local servers as their users see them: a test server is running, configured for
//! logical replication, and gone after drop; a long-lived server keeps its data.

use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use shardgate_localpg::{Server, TestCluster, TestServer};

fn accepts_connections(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
}

async fn setting(server: &Server, name: &str) -> String {
    let client = server.connect("postgres").await.expect("connect");
    let row = client.query_one("SELECT current_setting($1)", &[&name]).await.expect("read setting");
    row.get(0)
}

#[tokio::test]
async fn test_server_runs_with_logical_wal_level_and_fsync_off() {
    let server = TestServer::start().await.expect("start test server");

    assert_eq!(setting(&server, "wal_level").await, "logical");
    assert_eq!(setting(&server, "fsync").await, "off");
    assert_eq!(setting(&server, "max_connections").await, "200");
    assert_eq!(setting(&server, "listen_addresses").await, "127.0.0.1");
    assert_eq!(server.url("app"), format!("postgres://postgres@127.0.0.1:{}/app", server.port()));
}

#[tokio::test]
async fn two_test_servers_get_different_ports_and_directories() {
    let (first, second) = tokio::try_join!(TestServer::start(), TestServer::start()).expect("start two test servers");

    assert_ne!(first.port(), second.port());
    assert_ne!(first.data_dir(), second.data_dir());
    assert!(first.is_running().expect("status") && second.is_running().expect("status"));
}

#[tokio::test]
async fn dropping_a_test_server_stops_it_and_deletes_its_directory() {
    let server = TestServer::start().await.expect("start test server");
    let port = server.port();
    let data_dir = server.data_dir().to_path_buf();
    assert!(accepts_connections(port));
    assert!(data_dir.join("PG_VERSION").is_file());

    drop(server);

    assert!(!data_dir.exists(), "{} still exists", data_dir.display());
    assert!(!accepts_connections(port), "port {port} still accepts connections");
}

#[tokio::test]
async fn cluster_servers_each_have_the_app_database() {
    let cluster = TestCluster::start(3).await.expect("start cluster");

    assert_eq!(cluster.servers().len(), 3);
    for (server, url) in cluster.servers().iter().zip(cluster.urls()) {
        assert!(url.ends_with(&format!(":{}/app", server.port())));
        let client = server.connect(TestCluster::DATABASE).await.expect("connect to app");
        let row = client.query_one("SELECT current_database()", &[]).await.expect("query");
        assert_eq!(row.get::<_, String>(0), "app");
    }
}

/// A long-lived server's directory, stopped and deleted when the test ends.
struct Kept {
    root: PathBuf,
}

impl Kept {
    fn new() -> Kept {
        let root = std::env::temp_dir().join(format!("shardgate-localpg-kept-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        // 0755: when tests run as root, the `postgres` OS user must get through.
        std::fs::DirBuilder::new().mode(0o755).create(&root).expect("create test root");
        Kept { root }
    }

    fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        if let Ok(server) = Server::init(self.data_dir(), None) {
            let _ = server.stop();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

async fn count_rows(server: &Server) -> i64 {
    let client = server.connect("keep").await.expect("connect to keep");
    client.query_one("SELECT count(*) FROM kept", &[]).await.expect("count rows").get(0)
}

#[tokio::test]
async fn init_twice_on_the_same_directory_keeps_the_data() {
    let kept = Kept::new();
    let data_dir = kept.data_dir();

    let mut server = Server::init(&data_dir, None).expect("init");
    assert!(!server.is_running().expect("status"));
    server.start().expect("start");
    assert!(server.create_database("keep").await.expect("create database"));
    let client = server.connect("keep").await.expect("connect to keep");
    client.batch_execute("CREATE TABLE kept (id int); INSERT INTO kept VALUES (1), (2);").await.expect("write rows");
    assert_eq!(setting(&server, "fsync").await, "on");
    let port = server.port();

    // While it runs, init finds it and keeps its port; start does nothing.
    let mut running = Server::init(&data_dir, None).expect("init while running");
    assert_eq!(running.port(), port);
    running.start().expect("start while running");

    server.stop().expect("stop");
    assert!(!server.is_running().expect("status"));
    assert!(!accepts_connections(port));

    let mut again = Server::init(&data_dir, None).expect("init again");
    assert_eq!(again.port(), port, "the port is kept between runs");
    again.start().expect("start again");
    assert!(!again.create_database("keep").await.expect("create database again"));
    assert_eq!(count_rows(&again).await, 2);
    assert!(again.log_path().starts_with(Path::new(&data_dir)));
    again.stop().expect("stop again");
}

#[tokio::test]
async fn a_directory_holding_other_files_is_refused() {
    let kept = Kept::new();
    let data_dir = kept.data_dir();
    std::fs::create_dir(&data_dir).expect("create dir");
    std::fs::write(data_dir.join("notes.txt"), "not a database").expect("write file");

    let err = Server::init(&data_dir, None).expect_err("init must refuse");

    assert!(err.to_string().contains("choose a new or empty directory"), "{err}");
}

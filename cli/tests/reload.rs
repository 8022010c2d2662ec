//! Reloading a running `shardgate serve` as an operator does: rewrite its
//! file, then SIGHUP or `shardgate reload`. The new users, pool size and
//! timeouts are in force; open client connections (TLS ones too) keep working;
//! a file that cannot be used is refused with the reason and the old
//! configuration stays whole; the admin API wants its token for it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use shardgate_localpg::TestCluster;
use shardgate_tests::tls::{self, TestCa};
use tokio_postgres::NoTls;

mod common;
use common::*;

const TOKEN: &str = "adm";

/// One `shardgate serve` and the file it reads.
struct Node {
    proc: Proc,
    file: File,
    _logs: LogsOnFailure,
    _dir: tempfile::TempDir,
}

/// The configuration file of a [`Node`], and what stays the same in it.
struct File {
    path: PathBuf,
    router: u16,
    admin: u16,
    shard_url: String,
}

impl File {
    /// Writes `[router]` lines `router`, and `rest` after the other sections.
    fn write(&self, router: &str, rest: &str) {
        let text = format!(
            "[router]\nlisten = \"127.0.0.1:{}\"\n{router}\n\n[admin]\nlisten = \"127.0.0.1:{}\"\ntoken = \"{TOKEN}\"\n\n\
             [[shards]]\nname = \"shard_0\"\nurl = \"{}\"\n\n{rest}\n",
            self.router, self.admin, self.shard_url
        );
        std::fs::write(&self.path, text).unwrap();
    }
}

impl Node {
    /// Starts `serve` with `[router]` lines `router` and the file's other `rest`.
    fn start(shard_url: &str, router: &str, rest: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let file = File {
            path: dir.path().join("node1.toml"),
            router: free_port(),
            admin: free_port(),
            shard_url: shard_url.to_string(),
        };
        file.write(router, rest);
        // Its log, node1.log, is shown if the test fails.
        let logs = LogsOnFailure(dir.path().to_path_buf());
        Node { proc: common::start(&file.path), file, _logs: logs, _dir: dir }
    }

    fn write(&self, router: &str, rest: &str) {
        self.file.write(router, rest);
    }

    fn sighup(&self) {
        let pid = self.proc.child.id() as i32;
        assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0, "SIGHUP to shardgate serve");
    }

    fn metrics(&self) -> String {
        admin_text(self.file.admin, TOKEN, "/metrics").unwrap_or_default()
    }

    /// The value of one metric line (name and labels as written), if present.
    fn metric(&self, line: &str) -> Option<f64> {
        let text = self.metrics();
        text.lines().find_map(|l| l.strip_prefix(line)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// Waits until `line` reads `value` in /metrics.
    fn wait_for_metric(&self, line: &str, value: f64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.metric(line) != Some(value) {
            assert!(Instant::now() < deadline, "{line} never read {value}; it reads {:?}", self.metric(line));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.file.path.with_extension("log")).unwrap_or_default()
    }

    fn url(&self, user: &str, password: &str) -> String {
        format!("postgres://{user}:{password}@127.0.0.1:{}/app", self.file.router)
    }

    /// `shardgate reload` with the admin token, or without any.
    fn reload_cli(&self, token: Option<&str>) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardgate"));
        cmd.args(["reload", "--admin", &format!("127.0.0.1:{}", self.file.admin)]).env_remove("SHARDGATE_ADMIN_TOKEN");
        if let Some(t) = token {
            cmd.env("SHARDGATE_ADMIN_TOKEN", t);
        }
        cmd.output().unwrap()
    }
}

const APPLIED: &str = "shardgate_config_reloads_total{result=\"applied\"}";
const REFUSED: &str = "shardgate_config_reloads_total{result=\"refused\"}";
const POOL_SIZE: &str = "shardgate_pool_size{shard=\"shard_0\"}";

fn users(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("[[users]]\nname = \"{n}\"\nauth = \"scram-sha-256\"\npassword = \"{n}-pw\"\n"))
        .collect::<Vec<_>>()
        .join("\n")
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

fn text(out: &Output) -> String {
    format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_shardgate_reload_put_the_rewritten_file_in_force_and_keep_open_clients() {
    let pg = TestCluster::start(1).await.unwrap();
    let shard_url = pg.servers()[0].url("app");
    let node = Node::start(&shard_url, "[router.pool]\nsize = 2", &users(&["alice"]));
    node.wait_for_metric(POOL_SIZE, 2.0);
    let alice = connect(&node.url("alice", "alice-pw")).await.expect("alice logs in");
    alice.simple_query("SELECT 1").await.expect("alice's first statement");
    let e = connect(&node.url("bob", "bob-pw")).await.expect_err("bob is not a user yet");
    assert_eq!(e.code().map(|c| c.code()), Some("28P01"), "{e}");

    // A new user, a larger pool, an idle-in-transaction timeout: SIGHUP.
    node.write("idle_transaction_timeout = \"1s\"\n[router.pool]\nsize = 5", &users(&["alice", "bob"]));
    node.sighup();
    node.wait_for_metric(APPLIED, 1.0);
    assert_eq!(node.metric(POOL_SIZE), Some(5.0));
    let bob = connect(&node.url("bob", "bob-pw")).await.expect("bob logs in after the reload");
    alice.simple_query("SELECT 2").await.expect("alice's open connection still works");
    // The new timeout: bob idles inside a transaction and is disconnected.
    bob.batch_execute("BEGIN").await.expect("BEGIN");
    bob.simple_query("SELECT 1").await.expect("in the transaction");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !bob.is_closed() {
        assert!(Instant::now() < deadline, "idle_transaction_timeout did not disconnect bob");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    alice.simple_query("SELECT 3").await.expect("alice was idle outside a transaction: kept");
    assert!(node.log().contains("configuration reloaded"), "{}", node.log());

    // A file with a key that does not exist: refused, the reason logged, the
    // previous configuration whole in force.
    node.write("idle_transaction_timeout = \"1s\"\npool_sise = 1\n[router.pool]\nsize = 1", &users(&["alice"]));
    node.sighup();
    node.wait_for_metric(REFUSED, 1.0);
    assert!(node.log().contains("configuration reload refused"), "{}", node.log());
    assert!(node.log().contains("pool_sise"), "{}", node.log());
    assert_eq!(node.metric(POOL_SIZE), Some(5.0));
    assert_eq!(node.metric(APPLIED), Some(1.0));
    let bob = connect(&node.url("bob", "bob-pw")).await.expect("bob is still a user");
    bob.simple_query("SELECT 1").await.expect("bob's statement");
    alice.simple_query("SELECT 4").await.expect("alice's open connection still works");

    // `shardgate reload`: the admin token is required, and a refusal says why
    // and exits non-zero.
    let out = node.reload_cli(None);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("missing or wrong admin token"), "{}", text(&out));
    assert_eq!(node.metric(REFUSED), Some(1.0), "without the token nothing was read");
    let out = node.reload_cli(Some(TOKEN));
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("refused") && text(&out).contains("pool_sise"), "{}", text(&out));
    assert_eq!(node.metric(REFUSED), Some(2.0));

    // Fixed: bob removed, the pool down to one, the timeout off, and a key
    // that needs a restart. The reload says which is which.
    node.write("statement_cache_size = 77\n[router.pool]\nsize = 1", &users(&["alice"]));
    let out = node.reload_cli(Some(TOKEN));
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    let applied = said.lines().find(|l| l.starts_with("applied: ")).unwrap_or_else(|| panic!("{said}"));
    for key in ["users", "router.pool.size", "router.idle_transaction_timeout"] {
        assert!(applied.contains(key), "{key} not applied: {said}");
    }
    let restart = said.lines().find(|l| l.starts_with("needs a restart")).unwrap_or_else(|| panic!("{said}"));
    assert!(restart.contains("router.statement_cache_size") && !restart.contains("users"), "{said}");
    assert_eq!(node.metric(POOL_SIZE), Some(1.0));
    assert_eq!(node.metric(APPLIED), Some(2.0));
    let e = connect(&node.url("bob", "bob-pw")).await.expect_err("bob was removed");
    assert_eq!(e.code().map(|c| c.code()), Some("28P01"), "{e}");
    alice.simple_query("SELECT 5").await.expect("alice's open connection still works");
}

/// Writes `issued` over the router's certificate and key files.
fn install(cert: &Path, key: &Path, issued: &shardgate_localpg::Issued) {
    std::fs::write(cert, &issued.cert_pem).unwrap();
    std::fs::write(key, &issued.key_pem).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_serves_new_handshakes_and_open_tls_connections_keep_going() {
    let pg = TestCluster::start(1).await.unwrap();
    let (old_ca, new_ca) = (TestCa::new(), TestCa::new());
    let tmp = tempfile::tempdir().unwrap();
    let (cert, key) = (tmp.path().join("router.crt"), tmp.path().join("router.key"));
    install(&cert, &key, &old_ca.local_server());
    let tls_lines = format!("tls_cert_file = \"{}\"\ntls_key_file = \"{}\"", cert.display(), key.display());
    let node = Node::start(&pg.servers()[0].url("app"), &tls_lines, "");
    let url = format!("postgres://postgres@127.0.0.1:{}/app?sslmode=require", node.file.router);
    let open = tls::connect(&url, old_ca.verify_full()).await.expect("TLS with the first certificate");
    open.simple_query("SELECT 1").await.expect("a statement under TLS");

    // The renewed certificate, at the same paths.
    install(&cert, &key, &new_ca.local_server());
    let out = node.reload_cli(Some(TOKEN));
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("router.tls_cert_file"), "{}", text(&out));
    let fresh = tls::connect(&url, new_ca.verify_full()).await.expect("a new handshake gets the new certificate");
    fresh.simple_query("SELECT 1").await.expect("a statement under the new certificate");
    let e = tls::connect(&url, old_ca.verify_full()).await.expect_err("the old certificate is gone");
    assert!(format!("{e:?}").contains("UnknownIssuer"), "{e:?}");
    open.simple_query("SELECT 2").await.expect("the connection opened before the reload keeps working");

    // A certificate file that cannot be read: refused, the renewed one stays.
    std::fs::write(&cert, "not a certificate").unwrap();
    node.sighup();
    node.wait_for_metric(REFUSED, 1.0);
    assert!(node.log().contains("tls_cert_file"), "{}", node.log());
    let again = tls::connect(&url, new_ca.verify_full()).await.expect("still the renewed certificate");
    again.simple_query("SELECT 1").await.expect("a statement");
    open.simple_query("SELECT 3").await.expect("the first connection still works");
}

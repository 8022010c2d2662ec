//! `shardgate up` as a user runs it: the binary, its output, psql, status, Ctrl-C,
//! and a second `up` that finds the data again.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

mod common;

use common::free_port;

struct Up {
    child: Child,
    url: String,
    /// The same router under TLS: `sslmode=verify-full` and the local CA.
    tls_url: String,
}

impl Up {
    fn start(data_dir: &std::path::Path, port: u16, admin: u16) -> Up {
        Self::start_logging(data_dir, port, admin, Stdio::null())
    }

    /// `up` with its log (at debug level) going to `log`.
    fn start_logging(data_dir: &std::path::Path, port: u16, admin: u16, log: impl Into<Stdio>) -> Up {
        let mut child = Command::new(env!("CARGO_BIN_EXE_shardgate"))
            .arg("--data-dir")
            .arg(data_dir)
            .args(["up", "--port", &port.to_string(), "--admin-port", &admin.to_string()])
            .env("SHARDGATE_LOG", "debug")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("run shardgate up");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = lines.next().expect("a line from up").expect("read stdout");
        let url =
            ready.strip_prefix("ready: ").unwrap_or_else(|| panic!("unexpected first line {ready:?}")).to_string();
        let web_line = lines.next().unwrap().unwrap();
        assert!(web_line.starts_with(&format!("web: http://127.0.0.1:{admin}/?token=")), "{web_line}");
        let admin_line = lines.next().unwrap().unwrap();
        assert!(admin_line.starts_with("admin: http://"), "{admin_line}");
        let tls_line = lines.next().unwrap().unwrap();
        let tls_url = tls_line.strip_prefix("tls: ").unwrap_or_else(|| panic!("no tls line: {tls_line:?}")).to_string();
        assert!(tls_url.starts_with(&format!("{url}?sslmode=verify-full&sslrootcert=")), "{tls_url}");
        Up { child, url, tls_url }
    }

    fn stop(mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "up exited with {status}");
    }
}

fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql").args([url, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql]).output().unwrap();
    assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn up_serves_psql_reports_status_stops_cleanly_and_keeps_its_data() {
    let base = std::env::temp_dir().join(format!("shardgate-up-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let (port, admin) = (free_port(), free_port());

    let up = Up::start(&base, port, admin);
    assert_eq!(up.url, format!("postgres://postgres@127.0.0.1:{port}/app"));
    psql(&up.url, "CREATE TABLE orders (tenant_id bigint, id bigint, total numeric, PRIMARY KEY (tenant_id, id))");
    psql(&up.url, "INSERT INTO orders VALUES (42, 1, 9.99), (7, 1, 1)");
    assert_eq!(psql(&up.url, "SELECT total FROM orders WHERE tenant_id = 42"), "9.99");
    // The printed TLS URL works as printed: psql checks the certificate
    // against the local CA and the host name.
    assert_eq!(psql(&up.tls_url, "SELECT total FROM orders WHERE tenant_id = 42"), "9.99");
    let root_cert = std::fs::read(base.join("tls/root.crt")).expect("the local CA is in the data dir");

    let out = Command::new(env!("CARGO_BIN_EXE_shardgate"))
        .arg("--data-dir")
        .arg(&base)
        .args(["status", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["bucket_count"], 256);
    assert_eq!(status["shards"].as_array().unwrap().len(), 2);
    assert_eq!(status["placements"].as_array().unwrap().len(), 256);
    assert!(status["shards"][0]["url"].as_str().unwrap().starts_with("postgres://"));
    let table =
        Command::new(env!("CARGO_BIN_EXE_shardgate")).arg("--data-dir").arg(&base).arg("status").output().unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("shard_0") && table.contains("orders"), "{table}");
    assert!(!table.contains('\x1b'), "no escape codes when piped");
    // Directory changes through the CLI, committed through the raft replicas.
    let cli = |args: &[&str]| {
        let out =
            Command::new(env!("CARGO_BIN_EXE_shardgate")).arg("--data-dir").arg(&base).args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, _, err) = cli(&["tenant", "pin", "42", "--to", "shard_1"]);
    assert!(!ok, "a tenant with rows must not be pinned");
    assert!(err.contains("has rows"), "{err}");
    let (ok, out, err) = cli(&["tenant", "pin", "777", "--to", "shard_1"]);
    assert!(ok, "{err}");
    assert!(out.contains("pinned"), "{out}");
    let url0 = status["shards"][0]["url"].as_str().unwrap().to_string();
    let port0 = url0.rsplit(':').next().unwrap().split('/').next().unwrap().to_string();
    let extra_url = format!("postgres://postgres@127.0.0.1:{port0}/postgres");
    let (ok, out, err) = cli(&["shard", "add", "extra", &extra_url]);
    assert!(ok, "{err}");
    // The new shard gets the schema at once, so DDL through the router reaches it
    // before any move does.
    assert!(out.contains("schema copied from shard"), "{out}\n{err}");
    assert_eq!(psql(&extra_url, "SELECT count(*) FROM orders"), "0");
    psql(&up.url, "ALTER TABLE orders ADD COLUMN note text");
    assert_eq!(
        psql(
            &extra_url,
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'orders' AND column_name = 'note'"
        ),
        "1"
    );
    // An empty shard drains at once: nothing to move, then it is removed.
    let (ok, out, err) = cli(&["shard", "drain", "extra"]);
    assert!(ok && out.contains("0 bucket(s)") && out.contains("removed"), "{out}\n{err}");
    let (ok, out, _) = cli(&["shard", "list"]);
    assert!(ok && out.contains("extra") && out.contains("removed"), "{out}");
    let (ok, out, _) = cli(&["directory", "show", "--json"]);
    assert!(ok);
    let dir: serde_json::Value = serde_json::from_str(&out).unwrap();
    let epoch_before_restart = dir["epoch"].as_u64().unwrap();
    assert_eq!(dir["shards"].as_array().unwrap().len(), 3);
    assert_eq!(dir["pins"].as_array().unwrap().len(), 1);
    psql(&up.url, "INSERT INTO orders VALUES (777, 1, 5)");
    // The admin API wants its token.
    let cluster: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("cluster.json")).unwrap()).unwrap();
    let mut s = std::net::TcpStream::connect(cluster["admin"].as_str().unwrap()).unwrap();
    use std::io::{Read, Write};
    write!(s, "GET /status HTTP/1.1\r\nconnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    up.stop();

    // The router and the shards are gone…
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    // …and a second `up` finds the data again.
    let up = Up::start(&base, port, admin);
    assert_eq!(psql(&up.url, "SELECT count(*) FROM orders WHERE tenant_id IN (42, 7)"), "2");
    // …and the same CA, so a client that trusted it still does.
    assert_eq!(std::fs::read(base.join("tls/root.crt")).unwrap(), root_cert);
    assert_eq!(psql(&up.tls_url, "SELECT count(*) FROM orders WHERE tenant_id IN (42, 7)"), "2");
    // …and the directory its replicas agreed on.
    let (ok, out, _) = cli(&["directory", "show", "--json"]);
    assert!(ok);
    let dir: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(dir["epoch"].as_u64().unwrap(), epoch_before_restart);
    assert_eq!(psql(&up.url, "SELECT count(*) FROM orders WHERE tenant_id = 777"), "1");
    up.stop();
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn status_without_a_cluster_says_what_to_do() {
    let dir = std::env::temp_dir().join(format!("shardgate-empty-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_shardgate")).arg("--data-dir").arg(&dir).arg("status").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("shardgate up"), "{err}");
}

#[test]
fn up_with_require_tls_turns_plain_clients_away() {
    let up = common::up(&["--require-tls"]);
    // psql's default, sslmode=prefer, would ask for TLS and get it: say no.
    let plain_url = format!("{}?sslmode=disable", up.url);
    let plain = Command::new("psql").args([&plain_url, "-X", "-A", "-t", "-c", "SELECT 1"]).output().unwrap();
    assert!(!plain.status.success());
    let err = String::from_utf8_lossy(&plain.stderr);
    assert!(err.contains("ssl_mode = require"), "{err}");
    let root = up.base.join("tls/root.crt");
    let tls_url = format!("{}?sslmode=verify-full&sslrootcert={}", up.url, root.display());
    assert_eq!(psql(&tls_url, "SELECT 1"), "1");
}

/// The demo passes roles through: a role created through the router logs in
/// with its password and is itself on every shard; and no password, verifier
/// or hash reaches the log of a run that used them.
#[test]
fn up_runs_each_client_as_its_own_role_and_logs_no_secret() {
    let base = std::env::temp_dir().join(format!("shardgate-up-roles-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let (port, admin) = (free_port(), free_port());
    let log_path = base.join("up.log");
    let up = Up::start_logging(&base, port, admin, std::fs::File::create(&log_path).unwrap());
    const PASSWORD: &str = "Alice-Secret-7f3a";
    psql(&up.url, &format!("CREATE ROLE alice LOGIN PASSWORD '{PASSWORD}'"));
    psql(&up.url, "CREATE TABLE notes (tenant_id bigint, id int, body text, PRIMARY KEY (tenant_id, id))");
    psql(&up.url, "GRANT SELECT, INSERT ON notes TO alice");
    let alice = format!("postgres://alice:{PASSWORD}@127.0.0.1:{port}/app");
    let alice_tls = up.tls_url.replace("postgres://postgres@", &format!("postgres://alice:{PASSWORD}@"));
    // Rows on both shards, written by alice (two-phase commit, as her).
    let rows: Vec<String> = (1..=20).map(|t| format!("({t}, 1, 'x')")).collect();
    psql(&alice_tls, &format!("INSERT INTO notes VALUES {}", rows.join(", ")));
    // Every shard answers as alice: one distinct current_user across them.
    assert_eq!(psql(&alice, "SELECT DISTINCT current_user FROM notes"), "alice");
    assert_eq!(psql(&alice, "SELECT count(*) FROM notes"), "20");
    let wrong = Command::new("psql")
        .args([&format!("postgres://alice:wrong@127.0.0.1:{port}/app"), "-X", "-c", "SELECT 1"])
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("password authentication failed"));
    let status =
        Command::new(env!("CARGO_BIN_EXE_shardgate")).arg("--data-dir").arg(&base).arg("status").output().unwrap();
    up.stop();

    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("client authenticated"), "the log is at debug level: {log}");
    let status = String::from_utf8_lossy(&status.stdout);
    for text in [&log, &status.to_string()] {
        for secret in [PASSWORD, "SCRAM-SHA-256$"] {
            assert!(!text.contains(secret), "{secret:?} in:\n{text}");
        }
    }
    let _ = std::fs::remove_dir_all(&base);
}

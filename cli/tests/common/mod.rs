//! Helpers shared by the tests that run several `shardgate serve` processes.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// A port on 127.0.0.1 for a server a test starts.
///
/// Not one the kernel picks for a listener bound to port 0: those come from the
/// ephemeral range, the same range every outgoing connection takes its local port
/// from, so between the test closing such a listener and the server binding the
/// port, any client connection on the machine may take it. Ports below the
/// ephemeral range are never handed out by the kernel; each test process walks its
/// own stretch of them (its offset comes from its pid) and skips any port that
/// something already listens on.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse::<u32>().ok()))
        .unwrap_or(32768);
    const SPAN: u32 = 12_000;
    if ephemeral_low < SPAN + 1024 {
        // No room below the ephemeral range: fall back to the kernel's pick.
        return std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    }
    let low = ephemeral_low - SPAN;
    let start = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
    for _ in 0..SPAN {
        let port = (low + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 127.0.0.1:{low}-{ephemeral_low}");
}

pub struct NodePorts {
    pub router: u16,
    pub admin: u16,
    pub raft: u16,
}

pub struct Proc {
    pub child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn write_config(dir: &Path, id: u64, ports: &[NodePorts], shard_urls: &[String]) -> std::path::PathBuf {
    write_node_config(dir, id, ports, shard_urls, true)
}

pub fn write_node_config(
    dir: &Path,
    id: u64,
    ports: &[NodePorts],
    shard_urls: &[String],
    bootstrap: bool,
) -> std::path::PathBuf {
    let me = &ports[id as usize - 1];
    let mut toml = format!(
        "[router]\nlisten = \"127.0.0.1:{}\"\n\n[router.moves]\nshadow_for = \"1s\"\n\n[admin]\nlisten = \"127.0.0.1:{}\"\ntoken = \"adm\"\n\n[cluster]\nbuckets = 32\n\n",
        me.router, me.admin
    );
    for (i, url) in shard_urls.iter().enumerate() {
        toml.push_str(&format!("[[shards]]\nname = \"shard_{i}\"\nurl = \"{url}\"\n\n"));
    }
    toml.push_str(&format!(
        "[directory]\nnode_id = {id}\nlisten = \"127.0.0.1:{}\"\ndata_dir = \"{}\"\ntoken = \"raft-secret\"\nbootstrap = {bootstrap}\n",
        me.raft,
        dir.join(format!("node{id}")).display()
    ));
    for (j, p) in ports.iter().enumerate() {
        if j as u64 + 1 != id {
            toml.push_str(&format!("\n[[directory.peers]]\nid = {}\naddress = \"127.0.0.1:{}\"\n", j + 1, p.raft));
        }
    }
    let path = dir.join(format!("node{id}.toml"));
    std::fs::write(&path, toml).unwrap();
    path
}

/// Spawns a node; `ready` waits for its ready line.
pub fn spawn(config: &Path) -> Proc {
    spawn_with(config, &[])
}

/// [`spawn`] with extra environment variables.
pub fn spawn_with(config: &Path, env: &[(&str, &str)]) -> Proc {
    // The node's log goes beside its config, and is printed if the test fails.
    let log = std::fs::OpenOptions::new().create(true).append(true).open(config.with_extension("log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_shardgate"))
        .args(["serve", "--config"])
        .arg(config)
        .env("SHARDGATE_LOG", "info")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    Proc { child }
}

pub fn ready(p: &mut Proc) {
    let mut lines = BufReader::new(p.child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("serve prints a line").unwrap();
    assert!(first.starts_with("ready: "), "{first}");
}

pub fn start(config: &Path) -> Proc {
    let mut p = spawn(config);
    ready(&mut p);
    p
}

/// A fresh folder for three nodes' configurations and logs (printed if the test
/// fails), and free ports for them.
pub fn three_nodes(name: &str) -> (std::path::PathBuf, LogsOnFailure, Vec<NodePorts>) {
    let dir = std::env::temp_dir().join(format!("shardgate-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ports = (0..3).map(|_| NodePorts { router: free_port(), admin: free_port(), raft: free_port() }).collect();
    (dir.clone(), LogsOnFailure(dir), ports)
}

/// Prints the nodes' logs if the test fails.
pub struct LogsOnFailure(pub std::path::PathBuf);

impl Drop for LogsOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for id in 1..=3 {
                let log = std::fs::read_to_string(self.0.join(format!("node{id}.log"))).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let mut shown = Vec::new();
                for (i, l) in lines.iter().enumerate() {
                    if l.contains("panicked") || l.contains("WARN") || l.contains("ERROR") || i + 8 >= lines.len() {
                        shown.extend(lines[i..(i + 3).min(lines.len())].iter().copied());
                    }
                }
                eprintln!("--- node{id} log ---\n{}", shown.join("\n"));
            }
        }
    }
}

/// The body of a GET on a node's admin API, as text, with the admin token.
pub fn admin_text(port: u16, token: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nauthorization: Bearer {token}\r\nconnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    Some(text.split_once("\r\n\r\n")?.1.to_string())
}

pub fn admin_get(port: u16, path: &str) -> Option<Value> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nauthorization: Bearer adm\r\nconnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    serde_json::from_str(text.split_once("\r\n\r\n")?.1).ok()
}

/// [`admin_post`] that answers None on a 503 (the directory could not commit in
/// time; nothing was applied) instead of failing.
pub fn admin_try_post(port: u16, path: &str, body: &Value) -> Option<Value> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let body = body.to_string();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nauthorization: Bearer adm\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    if text.starts_with("HTTP/1.1 503") {
        return None;
    }
    assert!(text.starts_with("HTTP/1.1 200"), "{path}: {text}");
    Some(serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap())
}

pub fn admin_post(port: u16, path: &str, body: &Value) -> Value {
    admin_try_post(port, path, body).unwrap_or_else(|| panic!("{path}: 503, the directory did not commit in time"))
}

/// Runs one statement with psql and returns its unaligned output.
pub fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql").args([url, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql]).output().unwrap();
    assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A `shardgate up` cluster in a data directory of its own; Ctrl-C'd and removed
/// on drop.
pub struct Up {
    pub child: Child,
    pub url: String,
    pub base: std::path::PathBuf,
    pub admin: u16,
}

impl Up {
    /// The admin token `up` made for its cluster.
    pub fn token(&self) -> String {
        let c: Value = serde_json::from_str(&std::fs::read_to_string(self.base.join("cluster.json")).unwrap()).unwrap();
        c["admin_token"].as_str().unwrap_or("").to_string()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        // A cluster that does not stop within a minute is killed: a failing test
        // must fail, not hang until the test runner's timeout.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            eprintln!("`shardgate up` did not stop within 60 s of SIGINT; killing it");
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if std::thread::panicking() {
            // A failed test shows what the cluster logged last.
            eprintln!("--- the last lines `shardgate up` logged ---\n{}", log_tail(&self.base, 80));
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// The last `n` lines of what `shardgate up` logged in `base`.
fn log_tail(base: &Path, n: usize) -> String {
    let log = std::fs::read_to_string(base.join("up.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Starts `shardgate up` on free ports with extra arguments (`--shards 4` …) and
/// waits for its ready line.
pub fn up(args: &[&str]) -> Up {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let base = std::env::temp_dir().join(format!("shardgate-up-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let admin = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardgate"))
        .arg("--data-dir")
        .arg(&base)
        .args(["up", "--port", &free_port().to_string(), "--admin-port", &admin.to_string()])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(base.join("up.log")).expect("create up.log"))
        .spawn()
        .expect("run shardgate up");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().and_then(|l| l.ok());
    match first.as_deref().and_then(|l| l.strip_prefix("ready: ")) {
        Some(url) => Up { child, url: url.to_string(), base, admin },
        None => {
            // `up` exited (or printed something else) before it was ready: say why,
            // from what it logged, instead of a bare "no line".
            // Still running after an unexpected line: stop it rather than wait.
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let status = child.wait();
            let tail = log_tail(&base, 60);
            let _ = std::fs::remove_dir_all(&base);
            panic!(
                "`shardgate up {}` was not ready (first line {first:?}, exit {status:?}); it logged:\n{tail}",
                args.join(" ")
            );
        }
    }
}

/// Runs the CLI against an `up` cluster: (success, stdout, stderr).
pub fn cli(up: &Up, args: &[&str]) -> (bool, String, String) {
    let out =
        Command::new(env!("CARGO_BIN_EXE_shardgate")).arg("--data-dir").arg(&up.base).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

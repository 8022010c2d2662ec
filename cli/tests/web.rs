//! The admin web page in a browser, as an admin on call would watch it: headless
//! Chromium (Debian's package) driven by playwright-core (`tests/browser`) opens
//! the address `shardgate up` prints, and follows a move that this test runs
//! through the CLI, from copy to shadow to reverse, without a reload.
//!
//! Needs node, npm and /usr/bin/chromium (`scripts/install-deps.sh` installs them);
//! `npm ci` runs here when `tests/browser/node_modules` is missing.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;

fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql").args([url, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql]).output().unwrap();
    assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A process stopped when the test ends, however it ends: `signal` first (both
/// `up` and the browser script clean up on it), SIGKILL if it lingers.
struct Stopping {
    child: Child,
    signal: i32,
}

impl Drop for Stopping {
    fn drop(&mut self) {
        // A process already reaped is not signalled: its pid may be another's now.
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        unsafe { libc::kill(self.child.id() as i32, self.signal) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `shardgate up` in a data directory of its own. Fields drop in order: the
/// process stops (SIGINT: it stops its Postgres servers first), then its data goes.
struct Up {
    _process: Stopping,
    _data: RemovedOnDrop,
    url: String,
    web: String,
    base: PathBuf,
}

struct RemovedOnDrop(PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn up() -> Up {
    let base = std::env::temp_dir().join(format!("shardgate-web-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let (port, admin) = (common::free_port(), common::free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardgate"))
        .arg("--data-dir")
        .arg(&base)
        .args(["up", "--port", &port.to_string(), "--admin-port", &admin.to_string(), "--buckets", "16"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run shardgate up");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut line = || lines.next().expect("a line from up").expect("read stdout");
    let ready = line();
    let url = ready.strip_prefix("ready: ").unwrap_or_else(|| panic!("unexpected first line {ready:?}")).to_string();
    let web = line();
    let web = web.strip_prefix("web: ").unwrap_or_else(|| panic!("the second line is the page's: {web:?}")).to_string();
    assert!(web.starts_with(&format!("http://127.0.0.1:{admin}/?token=")), "{web}");
    let admin_line = line();
    assert!(admin_line.starts_with("admin: http://"), "{admin_line}");
    Up { _process: Stopping { child, signal: libc::SIGINT }, _data: RemovedOnDrop(base.clone()), url, web, base }
}

fn cli(up: &Up, args: &[&str]) -> String {
    let out =
        Command::new(env!("CARGO_BIN_EXE_shardgate")).arg("--data-dir").arg(&up.base).args(args).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "shardgate {}: {stdout}\n{stderr}", args.join(" "));
    stdout.to_string()
}

fn status(up: &Up) -> serde_json::Value {
    serde_json::from_str(&cli(up, &["status", "--json"])).unwrap()
}

/// tests/browser, with its node modules installed.
fn browser_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/browser");
    for (tool, what) in [("node", "node"), ("npm", "npm"), ("/usr/bin/chromium", "Debian's chromium")] {
        let found = Command::new(tool).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
        assert!(
            found.is_ok_and(|s| s.success()),
            "this test needs {what}: run scripts/install-deps.sh (it installs nodejs, npm and chromium)"
        );
    }
    if !dir.join("node_modules/playwright-core/package.json").exists() {
        let out = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .output()
            .expect("run npm ci in tests/browser");
        assert!(
            out.status.success(),
            "npm ci in {}: {}\n{}",
            dir.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    dir
}

/// Where the screenshots go: `<target dir>/web-test`.
fn output_dir() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_shardgate"));
    let target = bin.parent().and_then(Path::parent).expect("the binary is in <target>/<profile>/");
    let out = target.join("web-test");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    out
}

/// The browser script's progress lines, read on a thread of their own.
struct Page {
    lines: mpsc::Receiver<String>,
    process: Stopping,
    stderr: PathBuf,
}

impl Page {
    fn start(browser: &Path, web: &str, out: &Path) -> Page {
        let stderr = out.join("browser.log");
        let mut child = Command::new("node")
            .arg(browser.join("follow-move.mjs"))
            .arg(web)
            .arg(out)
            .current_dir(browser)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("run node");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Page { lines, process: Stopping { child, signal: libc::SIGTERM }, stderr }
    }

    /// Waits for `page: <step>`; on a timeout or the script's end, fails with its
    /// stderr (which says which check did not hold).
    fn expect(&mut self, step: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line == format!("page: {step}") => return,
                Ok(_) => {}
                Err(e) => {
                    let _ = self.process.child.try_wait();
                    let log = std::fs::read_to_string(&self.stderr).unwrap_or_default();
                    panic!("the page did not report {step:?} ({e:?}); the browser script said:\n{log}");
                }
            }
        }
    }

    fn finish(mut self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.process.child.try_wait().unwrap() {
                let log = std::fs::read_to_string(&self.stderr).unwrap_or_default();
                assert!(status.success(), "the browser script failed ({status}):\n{log}");
                return;
            }
            assert!(Instant::now() < deadline, "the browser script did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Polls the status until `done` holds for move 1.
fn wait_for_move(up: &Up, within: Duration, what: &str, done: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + within;
    loop {
        let s = status(up);
        let m = &s["moves"][0];
        if done(m) {
            return;
        }
        assert!(Instant::now() < deadline, "move 1 did not {what}: {m}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_web_page_follows_a_move_live_from_copy_to_reverse() {
    let started = Instant::now();
    let browser = browser_dir();
    let out = output_dir();
    let up = up();
    psql(&up.url, "CREATE TABLE orders (tenant_id bigint, id bigint, total int, PRIMARY KEY (tenant_id, id))");
    let rows: Vec<String> = (1..=200).flat_map(|t| (1..=5).map(move |i| format!("({t}, {i}, {})", t * i))).collect();
    psql(&up.url, &format!("INSERT INTO orders VALUES {}", rows.join(", ")));
    let s = status(&up);
    let bucket = (0..16).find(|b| s["placements"][*b] == "shard_0").expect("a bucket on shard_0");

    let mut page = Page::start(&browser, &up.web, &out);
    page.expect("ready", Duration::from_secs(30));

    let planned = cli(&up, &["move", "bucket", &bucket.to_string(), "--to", "shard_1"]);
    assert!(planned.contains("move 1 planned"), "{planned}");
    // `up` runs shadow reads: the move rests in shadow until the cutover.
    wait_for_move(&up, Duration::from_secs(40), "reach shadow", |m| m["phase"] == "shadow");
    page.expect("shadow", Duration::from_secs(15));

    let verified = cli(&up, &["verify", "1"]);
    assert!(verified.contains("verified clean"), "{verified}");
    cli(&up, &["cutover", "1"]);
    assert_eq!(status(&up)["moves"][0]["phase"], "reverse");
    page.expect("reverse", Duration::from_secs(15));
    page.finish(Duration::from_secs(15));

    let png = std::fs::read(out.join("move.png")).expect("the script saved move.png");
    assert!(png.starts_with(b"\x89PNG"), "move.png is a PNG");
    eprintln!("web page test took {:.1} s; screenshots in {}", started.elapsed().as_secs_f64(), out.display());
}

//! The admin API over HTTPS as an operator uses it: `shardgate serve` with
//! `[admin] tls = true` and the router's certificate, and the CLI reaching it as
//! `--admin https://…` with the CA to trust from SHARDGATE_ADMIN_CA or `--admin-ca`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use shardgate_localpg::TestCluster;
use shardgate_tests::tls::TestCa;

mod common;
use common::*;

const TOKEN: &str = "adm1n";

fn write_config(dir: &Path, router: u16, admin: u16, shard_url: &str, tls: &str) -> std::path::PathBuf {
    let path = dir.join("node.toml");
    let toml = format!(
        "[router]\nlisten = \"127.0.0.1:{router}\"\n{tls}\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\ntoken = \"{TOKEN}\"\ntls = true\n\n\
         [[shards]]\nname = \"shard_0\"\nurl = \"{shard_url}\"\n"
    );
    std::fs::write(&path, toml).unwrap();
    path
}

/// `shardgate <args>` with `env`, and no admin settings from the test's own environment.
fn shardgate(args: &[&str], env: &[(&str, &Path)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shardgate"))
        .args(args)
        .env_remove("SHARDGATE_ADMIN_CA")
        .env("SHARDGATE_ADMIN_TOKEN", TOKEN)
        .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[tokio::test]
async fn the_cli_reaches_an_https_admin_api_with_the_ca_and_says_what_is_missing_without() {
    let pg = TestCluster::start(1).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let files = ca.write("router", &ca.local_server());
    let (router, admin) = (free_port(), free_port());
    let certs = format!("tls_cert_file = \"{}\"\ntls_key_file = \"{}\"", files.cert.display(), files.key.display());
    let config = write_config(tmp.path(), router, admin, &pg.servers()[0].url("app"), &certs);
    let mut node = spawn(&config);
    let mut lines = BufReader::new(node.child.stdout.take().unwrap()).lines();
    let mut line = || lines.next().expect("a line from serve").unwrap();
    assert!(line().starts_with("ready: "));
    assert_eq!(line(), format!("web: https://127.0.0.1:{admin}/"));
    assert_eq!(line(), format!("admin: https://127.0.0.1:{admin}/status"));

    let https = format!("https://127.0.0.1:{admin}");
    let root = ca.root_cert();
    let out = shardgate(&["status", "--admin", &https], &[("SHARDGATE_ADMIN_CA", &root)]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("shard_0"), "{}", text(&out));
    // The flag does what the variable does.
    let out = shardgate(&["status", "--json", "--admin", &https, "--admin-ca", root.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["shards"][0]["name"], "shard_0");

    // `status --watch` over HTTPS: its first frame, one JSON status a line.
    let mut watcher = Command::new(env!("CARGO_BIN_EXE_shardgate"))
        .args(["status", "--watch", "--json", "--interval", "200ms", "--admin", &https])
        .env("SHARDGATE_ADMIN_CA", &root)
        .env("SHARDGATE_ADMIN_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let first = BufReader::new(watcher.stdout.take().unwrap()).lines().next().expect("a frame").unwrap();
    let _ = watcher.kill();
    let _ = watcher.wait();
    let frame: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!(frame["shards"][0]["name"], "shard_0", "{first}");

    // Without the CA: refused before anything is sent, naming what to set.
    let out = shardgate(&["status", "--admin", &https], &[]);
    assert!(!out.status.success());
    assert!(text(&out).contains("is an HTTPS address: set SHARDGATE_ADMIN_CA"), "{}", text(&out));
    // With another CA: the certificate is not trusted.
    let other = TestCa::new();
    let out = shardgate(&["status", "--admin", &https], &[("SHARDGATE_ADMIN_CA", &other.root_cert())]);
    assert!(!out.status.success());
    assert!(text(&out).contains("TLS with the admin API") && text(&out).contains("UnknownIssuer"), "{}", text(&out));
    // In the clear: no HTTP answer, and the hint to name it https://.
    let out = shardgate(&["status", "--admin", &format!("127.0.0.1:{admin}")], &[]);
    assert!(!out.status.success());
    assert!(text(&out).contains(&format!("name it as --admin {https}")), "{}", text(&out));
}

#[test]
fn serve_refuses_admin_tls_without_the_routers_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path(), free_port(), free_port(), "postgres://postgres@127.0.0.1:1/app", "");
    for args in [vec!["serve", "--check", "--config"], vec!["serve", "--config"]] {
        let mut args = args.clone();
        args.push(config.to_str().unwrap());
        let out = shardgate(&args, &[]);
        assert!(!out.status.success(), "{}", text(&out));
        assert!(text(&out).contains("set [router] tls_cert_file and tls_key_file"), "{}", text(&out));
    }
}

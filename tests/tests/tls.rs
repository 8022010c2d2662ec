//! TLS between clients and the router: a client that asks gets TLS with the
//! router's certificate, which verifies against the CA that signed it;
//! `ssl_mode = require` turns plain clients away with 28000; cancelling works
//! from a plain connection and from a TLS one.

use std::process::Command;
use std::time::Duration;

use shardgate_router::config::RouterConfig;
use shardgate_router::tls::ClientSslMode;
use shardgate_tests::tls::{self, TestCa};
use shardgate_tests::{sqlstate, Harness};
use tokio_postgres::NoTls;

/// A router whose certificate `ca` signed, in the given mode.
async fn router_with_tls(ca: &TestCa, mode: Option<ClientSslMode>) -> Harness {
    let files = ca.write("router", &ca.local_server());
    let config = RouterConfig {
        tls_cert_file: Some(files.cert),
        tls_key_file: Some(files.key),
        ssl_mode: mode,
        ..Default::default()
    };
    Harness::start_with(1, config).await
}

fn psql(conninfo: &str, sql: &str) -> std::process::Output {
    Command::new("psql")
        .args([conninfo, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("run psql")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_ask_get_tls_and_the_others_may_stay_plain() {
    let ca = TestCa::new();
    let h = router_with_tls(&ca, None).await;
    let port = h.port();

    for host in ["127.0.0.1", "localhost"] {
        let url = format!("postgres://postgres@{host}:{port}/app?sslmode=require");
        let client = tls::connect(&url, ca.verify_full()).await.unwrap_or_else(|e| panic!("TLS to {host}: {e}"));
        let row = client.query_one("SELECT 1 + $1::int", &[&1i32]).await.expect("query under TLS");
        assert_eq!(row.get::<_, i32>(0), 2);
    }
    // `allow` is the default with a certificate: plain clients still get in.
    let plain = h.client().await;
    assert_eq!(plain.query_one("SELECT 1", &[]).await.expect("plain query").get::<_, i32>(0), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_with_verify_full_checks_the_router_certificate() {
    let ca = TestCa::new();
    let h = router_with_tls(&ca, Some(ClientSslMode::Require)).await;
    let root = ca.root_cert();
    for host in ["127.0.0.1", "localhost"] {
        let conninfo = format!(
            "host={host} port={} dbname=app user=postgres sslmode=verify-full sslrootcert={}",
            h.port(),
            root.display()
        );
        let out = psql(&conninfo, "SELECT 1");
        assert!(out.status.success(), "psql to {host}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    }
    // A CA that did not sign the router's certificate: psql gives up.
    let stranger = TestCa::new();
    let conninfo = format!(
        "host=127.0.0.1 port={} dbname=app user=postgres sslmode=verify-full sslrootcert={}",
        h.port(),
        stranger.root_cert().display()
    );
    let out = psql(&conninfo, "SELECT 1");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("certificate verify failed"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_turns_plain_clients_away_with_28000() {
    let ca = TestCa::new();
    let h = router_with_tls(&ca, Some(ClientSslMode::Require)).await;

    let err = match tokio_postgres::connect(&h.url(), NoTls).await {
        Ok(_) => panic!("a plain client got in under ssl_mode = require"),
        Err(e) => e,
    };
    assert_eq!(sqlstate(&err), "28000");
    let db = err.as_db_error().expect("an ErrorResponse");
    assert!(db.message().contains("ssl_mode = require"), "{}", db.message());

    let url = format!("{}?sslmode=require", h.url());
    let client = tls::connect(&url, ca.verify_full()).await.expect("TLS client");
    assert_eq!(client.query_one("SELECT 1", &[]).await.expect("query").get::<_, i32>(0), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_trust_the_router_certificate_fails_at_once() {
    let ca = TestCa::new();
    let h = router_with_tls(&ca, None).await;
    let stranger = TestCa::new();
    let url = format!("{}?sslmode=require", h.url());
    let attempt = tokio::time::timeout(Duration::from_secs(10), tls::connect(&url, stranger.verify_full())).await;
    let Err(err) = attempt.expect("no hang") else { panic!("an untrusted certificate was accepted") };
    assert!(format!("{err:?}").contains("UnknownIssuer"), "{err:?}");
    // The router is not hurt: a client that trusts the right CA gets in.
    let client = tls::connect(&url, ca.verify_full()).await.expect("TLS client");
    assert_eq!(client.query_one("SELECT 1", &[]).await.expect("query").get::<_, i32>(0), 1);
}

/// Cancels `SELECT pg_sleep(30)` with `cancel` once it runs on the shard, and
/// checks the statement was cancelled.
async fn cancel_running_sleep<F, Fut>(h: &Harness, client: tokio_postgres::Client, cancel: F)
where
    F: FnOnce(tokio_postgres::CancelToken) -> Fut,
    Fut: std::future::Future<Output = Result<(), tokio_postgres::Error>>,
{
    let token = client.cancel_token();
    let slow = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await });
    let shard = h.shard(0).await;
    // As text the first time, as its shape's prepared statement (`pg_sleep($1)`) after.
    let running = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(%' AND state = 'active'";
    while shard.query_one(running, &[]).await.expect("pg_stat_activity").get::<_, i64>(0) == 0 {
        tokio::task::yield_now().await;
    }
    cancel(token).await.expect("send the cancel request");
    let err =
        tokio::time::timeout(Duration::from_secs(10), slow).await.expect("cancelled in time").unwrap().unwrap_err();
    assert_eq!(sqlstate(&err), "57014");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_requests_work_in_the_clear_and_under_tls_when_tls_is_required() {
    let ca = TestCa::new();
    let h = router_with_tls(&ca, Some(ClientSslMode::Require)).await;
    // `prefer`: the session runs under TLS, and a cancel without a TLS
    // connector goes in the clear, on a new connection, as libpq's does.
    let url = format!("{}?sslmode=prefer", h.url());
    let client = tls::connect(&url, ca.verify_full()).await.expect("TLS client");
    cancel_running_sleep(&h, client, |token| async move { token.cancel_query(NoTls).await }).await;

    let url = format!("{}?sslmode=require", h.url());
    let client = tls::connect(&url, ca.verify_full()).await.expect("TLS client");
    let connector = ca.verify_full();
    cancel_running_sleep(&h, client, |token| async move { token.cancel_query(connector).await }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_without_a_certificate_declines_tls() {
    let h = Harness::start(1).await;
    let ca = TestCa::new();
    let url = format!("{}?sslmode=require", h.url());
    let Err(err) = tls::connect(&url, ca.verify_full()).await else { panic!("TLS required but declined, yet in") };
    assert!(err.to_string().contains("TLS"), "{err}");
    // prefer goes on in the clear.
    let url = format!("{}?sslmode=prefer", h.url());
    let client = tls::connect(&url, ca.verify_full()).await.expect("prefer falls back to plain");
    assert_eq!(client.query_one("SELECT 1", &[]).await.expect("query").get::<_, i32>(0), 1);
}

#[tokio::test]
async fn tls_settings_that_cannot_work_stop_the_router_with_a_reason() {
    let no_cert = RouterConfig { ssl_mode: Some(ClientSslMode::Require), ..Default::default() };
    let err = no_cert.client_tls().expect_err("require without a certificate");
    assert!(err.to_string().contains("tls_cert_file"), "{err}");

    let missing = RouterConfig {
        tls_cert_file: Some("/nonexistent/router.crt".into()),
        tls_key_file: Some("/nonexistent/router.key".into()),
        ..Default::default()
    };
    let err = missing.client_tls().expect_err("missing files");
    assert!(err.to_string().contains("/nonexistent/router.crt"), "{err}");

    // A key that is not the certificate's.
    let ca = TestCa::new();
    let a = ca.write("a", &ca.local_server());
    let b = ca.write("b", &ca.local_server());
    let mismatched = RouterConfig { tls_cert_file: Some(a.cert), tls_key_file: Some(b.key), ..Default::default() };
    let err = mismatched.client_tls().expect_err("mismatched pair");
    assert!(err.to_string().contains("usable pair"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_sent_behind_an_ssl_request_end_the_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca = TestCa::new();
    let h = router_with_tls(&ca, None).await;
    let mut socket = tokio::net::TcpStream::connect(h.router.local_addr).await.expect("connect");
    // An SSLRequest and, before any answer, a startup packet in the clear:
    // those bytes would otherwise pass for bytes sent under TLS.
    let mut packet = 80_877_103i32.to_be_bytes().to_vec();
    packet.splice(0..0, 8i32.to_be_bytes());
    packet.extend_from_slice(&[0, 0, 0, 8, 0, 3, 0, 0]);
    socket.write_all(&packet).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut answer))
        .await
        .expect("the router closes the connection")
        .expect("read");
    assert_eq!(answer.first(), Some(&b'E'), "{answer:?}");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.contains("08P01") && text.contains("unencrypted data after SSL request"), "{text}");
}

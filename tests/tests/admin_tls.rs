//! The admin API over HTTPS, with the certificate clients' TLS uses: a client
//! that trusts the CA gets the status with the token, and the event stream; one
//! that speaks plain HTTP to the port, or trusts another CA, gets nothing.

use std::sync::Arc;
use std::time::Duration;

use shardgate_tests::tls::TestCa;
use shardgate_tests::Harness;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::timeout;

const TOKEN: &str = "adm1n";

/// Writes `request` and reads the answer to its end (the server closes).
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, request: &str) -> String {
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    // A TLS server that was spoken to in the clear may reset the connection:
    // whatever came before that is the answer.
    let _ = timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await.expect("an answer in time");
    String::from_utf8_lossy(&answer).into_owned()
}

fn get(path: &str, token: Option<&str>) -> String {
    let auth = token.map(|t| format!("authorization: Bearer {t}\r\n")).unwrap_or_default();
    format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n{auth}\r\n")
}

async fn tls_to(
    addr: std::net::SocketAddr,
    ca: &TestCa,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut config = ca.client_config();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    connector.connect(name, TcpStream::connect(addr).await?).await
}

#[tokio::test]
async fn the_admin_api_serves_https_with_the_routers_certificate_and_nothing_in_the_clear() {
    let h = Harness::start(1).await;
    let ca = TestCa::new();
    let files = ca.write("router", &ca.local_server());
    let tls = shardgate_router::tls::https_acceptor(&files.cert, &files.key).unwrap();
    let (addr, _task) =
        shardgate_router::admin::serve_with("127.0.0.1:0", h.router.context.clone(), Some(TOKEN.into()), Some(tls))
            .await
            .unwrap();

    // With the CA and the token: the status, over HTTP/1.1 as ALPN agreed.
    let stream = tls_to(addr, &ca).await.expect("a TLS handshake with a client that trusts the CA");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let answer = exchange(stream, &get("/status", Some(TOKEN))).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"now_ms\"") && answer.contains("shard_0"), "{answer}");

    // TLS is no substitute for the token.
    let answer = exchange(tls_to(addr, &ca).await.unwrap(), &get("/status", None)).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");

    // The event stream, over TLS too.
    let stream = tls_to(addr, &ca).await.unwrap();
    let mut events = BufReader::new(stream);
    events.get_mut().write_all(get(&format!("/events?token={TOKEN}"), None).as_bytes()).await.unwrap();
    let mut seen = String::new();
    while !seen.contains("data: {") {
        let mut line = String::new();
        let n = timeout(Duration::from_secs(5), events.read_line(&mut line)).await.expect("an event in time").unwrap();
        assert!(n > 0, "the stream ended: {seen}");
        seen.push_str(&line);
    }
    assert!(seen.starts_with("HTTP/1.1 200") && seen.contains("text/event-stream"), "{seen}");
    drop(events);

    // The same request in the clear gets no HTTP answer, let alone the status.
    let answer = exchange(TcpStream::connect(addr).await.unwrap(), &get("/status", Some(TOKEN))).await;
    assert!(!answer.contains("HTTP/1.1") && !answer.contains("now_ms"), "{answer}");

    // A client that trusts another CA does not finish the handshake.
    let other = TestCa::new();
    let refused = tls_to(addr, &other).await.expect_err("a certificate of an unknown CA is refused");
    assert!(refused.to_string().contains("UnknownIssuer"), "{refused}");

    // The web page over HTTPS: its own files need no token.
    let page = exchange(tls_to(addr, &ca).await.unwrap(), &get("/", None)).await;
    assert!(page.starts_with("HTTP/1.1 200") && page.contains("<html"), "{page}");

    // And the API still answers afterwards.
    let answer = exchange(tls_to(addr, &ca).await.unwrap(), &get("/health", None)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn a_reload_gives_the_admin_api_the_renewed_certificate() {
    let (old_ca, new_ca) = (TestCa::new(), TestCa::new());
    let files = old_ca.write("router", &old_ca.local_server());
    let config = shardgate_router::config::RouterConfig {
        tls_cert_file: Some(files.cert.clone()),
        tls_key_file: Some(files.key.clone()),
        ..Default::default()
    };
    let h = Harness::start_with(1, config.clone()).await;
    let tls = shardgate_router::tls::https_acceptor(&files.cert, &files.key).unwrap();
    let (addr, _task) =
        shardgate_router::admin::serve_with("127.0.0.1:0", h.router.context.clone(), Some(TOKEN.into()), Some(tls))
            .await
            .unwrap();
    tls_to(addr, &old_ca).await.expect("the first certificate");

    // Renewed over the same files, then reloaded.
    let renewed = new_ca.local_server();
    std::fs::write(&files.cert, &renewed.cert_pem).unwrap();
    std::fs::write(&files.key, &renewed.key_pem).unwrap();
    let reloaded = h.router.context.reload(config).expect("reloaded");
    assert!(reloaded.changed.contains(&"router.tls_cert_file".to_string()), "{reloaded:?}");
    let stream = tls_to(addr, &new_ca).await.expect("a handshake with the renewed certificate");
    let answer = exchange(stream, &get("/status", Some(TOKEN))).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(tls_to(addr, &old_ca).await.is_err(), "the old certificate is still served");
}

//! The admin API's web page and event stream, over real sockets, with a router
//! context of its own (no Postgres needed: the status comes from the directory).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use shardgate_directory::{Directory, DirectoryHandle, KeyType, Shard};
use shardgate_router::config::RouterConfig;
use shardgate_router::context::RouterContext;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::timeout;

const TOKEN: &str = "s3cret/+=";

struct Admin {
    addr: std::net::SocketAddr,
    directory: DirectoryHandle,
    task: tokio::task::JoinHandle<()>,
}

async fn admin(token: Option<&str>) -> Admin {
    let shards = (0..2)
        .map(|i| Shard::new(format!("shard_{i}"), format!("postgres://postgres@127.0.0.1:{}/app", 5432 + i)))
        .collect();
    let directory = DirectoryHandle::new(Directory::new("tenant_id", KeyType::Int, 16, shards).unwrap());
    let ctx = Arc::new(RouterContext::new(
        RouterConfig::default(),
        directory.clone(),
        Vec::new(),
        HashMap::new(),
        HashMap::new(),
        None,
    ));
    let (addr, task) = shardgate_router::admin::serve("127.0.0.1:0", ctx, token.map(str::to_string)).await.unwrap();
    Admin { addr, directory, task }
}

/// One request; the status code and the whole answer.
async fn get(admin: &Admin, target: &str, auth: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(admin.addr).await.unwrap();
    let auth = auth.map(|t| format!("authorization: Bearer {t}\r\n")).unwrap_or_default();
    s.write_all(format!("GET {target} HTTP/1.1\r\nhost: x\r\n{auth}\r\n").as_bytes()).await.unwrap();
    let mut text = String::new();
    timeout(Duration::from_secs(5), s.read_to_string(&mut text)).await.expect("an answer in time").unwrap();
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, text)
}

/// An open event stream.
struct Events {
    lines: BufReader<TcpStream>,
}

impl Events {
    async fn open(admin: &Admin, target: &str) -> Events {
        Events::open_with(admin, target, None).await
    }

    async fn open_with(admin: &Admin, target: &str, auth: Option<&str>) -> Events {
        let mut s = TcpStream::connect(admin.addr).await.unwrap();
        let auth = auth.map(|t| format!("authorization: Bearer {t}\r\n")).unwrap_or_default();
        s.write_all(format!("GET {target} HTTP/1.1\r\nhost: x\r\naccept: text/event-stream\r\n{auth}\r\n").as_bytes())
            .await
            .unwrap();
        let mut lines = BufReader::new(s);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            timeout(Duration::from_secs(5), lines.read_line(&mut line)).await.expect("headers in time").unwrap();
            head.push_str(&line);
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.contains("content-type: text/event-stream"), "{head}");
        Events { lines }
    }

    /// The next event's status.
    async fn next(&mut self) -> serde_json::Value {
        loop {
            let mut line = String::new();
            let n = timeout(Duration::from_secs(5), self.lines.read_line(&mut line))
                .await
                .expect("an event within 5 s")
                .unwrap();
            assert!(n > 0, "the stream ended");
            if let Some(data) = line.strip_prefix("data: ") {
                let mut blank = String::new();
                self.lines.read_line(&mut blank).await.unwrap();
                assert_eq!(blank, "\n", "an event is one data line");
                return serde_json::from_str(data.trim_end()).expect("the data is the status as JSON");
            }
        }
    }
}

#[tokio::test]
async fn the_page_is_served_to_anyone_and_the_data_only_with_the_token() {
    let admin = admin(Some(TOKEN)).await;
    let (code, page) = get(&admin, "/", None).await;
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("content-type: text/html") && page.contains("<title>shardgate</title>"), "{page}");
    assert!(page.contains("content-security-policy: default-src 'none'"), "{page}");
    assert!(page.contains("referrer-policy: no-referrer"), "{page}");
    let (code, js) = get(&admin, "/web/app.js", None).await;
    assert!(code == 200 && js.contains("text/javascript") && js.contains("EventSource"), "{js}");
    let (code, css) = get(&admin, "/web/style.css", None).await;
    assert!(code == 200 && css.contains("text/css"), "{css}");

    assert_eq!(get(&admin, "/status", None).await.0, 401);
    assert_eq!(get(&admin, "/events", None).await.0, 401);
    assert_eq!(get(&admin, "/events?token=wrong", None).await.0, 401);
    assert_eq!(get(&admin, "/events?token=", None).await.0, 401);
    // The query token opens the event stream only, not the API.
    assert_eq!(get(&admin, "/status?token=s3cret%2F%2B%3D", None).await.0, 401);
    let (code, body) = get(&admin, "/events?token=%zz", None).await;
    assert!(code == 400 && body.contains("malformed query string"), "{body}");
    let (code, body) = get(&admin, "/status?anything", Some(TOKEN)).await;
    assert!(code == 200 && body.contains("\"now_ms\""), "{body}");

    let mut events = Events::open(&admin, "/events?other=1&token=s3cret%2F%2B%3D").await;
    assert_eq!(events.next().await["bucket_count"], 16);
    drop(events);
    let mut events = Events::open_with(&admin, "/events?x=%41", Some(TOKEN)).await;
    assert_eq!(events.next().await["shards"][1]["name"], "shard_1");
}

#[tokio::test]
async fn events_follow_every_change_and_beat_every_second_while_the_api_answers() {
    let admin = admin(None).await;
    let mut events = Events::open(&admin, "/events").await;
    let first = events.next().await;
    assert_eq!(first["shards"].as_array().unwrap().len(), 2);
    let epoch = first["epoch"].as_u64().unwrap();

    // No change: the next event comes anyway, within about a second.
    let started = std::time::Instant::now();
    let beat = events.next().await;
    assert_eq!(beat["epoch"].as_u64(), Some(epoch));
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());

    // The open stream holds up no other request.
    let (code, body) = get(&admin, "/health", None).await;
    assert_eq!(code, 200, "{body}");

    // A change shows in the next events.
    let out = admin.directory.apply_local(&shardgate_directory::state::Command::AddShard {
        name: "shard_2".into(),
        url: "postgres://postgres@127.0.0.1:5434/app".into(),
    });
    assert!(!matches!(out, shardgate_directory::state::Outcome::Rejected { .. }), "{out:?}");
    let mut seen = events.next().await;
    for _ in 0..3 {
        if seen["shards"].as_array().unwrap().len() == 3 {
            break;
        }
        seen = events.next().await;
    }
    assert_eq!(seen["shards"][2]["name"], "shard_2", "{seen}");
    assert!(seen["epoch"].as_u64().unwrap() > epoch);
}

#[tokio::test]
async fn event_streams_end_when_their_clients_go_away_and_when_the_server_stops() {
    let admin = admin(None).await;
    // Twice as many streams as may be open at once, one after another: each
    // must end when its client closes, or the later ones would be refused.
    for i in 0..2 * shardgate_router::events::MAX_STREAMS {
        let mut events = Events::open(&admin, "/events").await;
        assert!(events.next().await["epoch"].is_u64(), "stream {i}");
    }
    // The limit holds: streams beyond it are refused, not queued.
    let mut open = Vec::new();
    for _ in 0..shardgate_router::events::MAX_STREAMS {
        open.push(Events::open(&admin, "/events").await);
    }
    let (code, body) = get(&admin, "/events", None).await;
    assert!(code == 503 && body.contains("event streams are open"), "{body}");
    drop(open.pop());
    let mut again = None;
    for _ in 0..50 {
        let (code, _) = get(&admin, "/health", None).await;
        assert_eq!(code, 200);
        // A freed place is found within a moment (the server sees the close).
        let mut s = TcpStream::connect(admin.addr).await.unwrap();
        s.write_all(b"GET /events HTTP/1.1\r\n\r\n").await.unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await.unwrap();
        if &head == b"HTTP/1.1 200" {
            again = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(again.is_some(), "a place freed by a closed stream is given to the next client");

    // Stopping the server ends the streams still open.
    admin.task.abort();
    let mut last = open.pop().unwrap();
    let mut rest = Vec::new();
    let ended = timeout(Duration::from_secs(5), last.lines.read_to_end(&mut rest)).await;
    assert!(matches!(ended, Ok(Ok(_))), "the stream ends when the server stops: {ended:?}");
}

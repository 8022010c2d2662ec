//! The extended-protocol pipelines drivers send for a statement they prepared
//! (libpq: Bind, Describe portal, Execute, Sync; most others: Bind, Execute,
//! Sync), sent byte for byte to the router and straight to the shard: the
//! client sees the same replies, errors and transaction states from both.

use shardgate_tests::Harness;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut f = vec![tag];
    f.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    f.extend_from_slice(body);
    f
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

fn parse(name: &str, sql: &str, types: &[i32]) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, name);
    cstr(&mut b, sql);
    b.extend_from_slice(&(types.len() as i16).to_be_bytes());
    for t in types {
        b.extend_from_slice(&t.to_be_bytes());
    }
    frame(b'P', &b)
}

/// A Bind of `statement` to the unnamed portal; `binary` sends the parameters
/// as int8 in binary, else as text.
fn bind(statement: &str, params: &[i64], binary: bool) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, "");
    cstr(&mut b, statement);
    b.extend_from_slice(&1i16.to_be_bytes());
    b.extend_from_slice(&(binary as i16).to_be_bytes());
    b.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for p in params {
        let v = if binary { p.to_be_bytes().to_vec() } else { p.to_string().into_bytes() };
        b.extend_from_slice(&(v.len() as i32).to_be_bytes());
        b.extend_from_slice(&v);
    }
    b.extend_from_slice(&0i16.to_be_bytes());
    frame(b'B', &b)
}

fn describe_portal() -> Vec<u8> {
    frame(b'D', b"P\0")
}

fn execute() -> Vec<u8> {
    frame(b'E', b"\0\0\0\0\0")
}

fn sync() -> Vec<u8> {
    frame(b'S', b"")
}

fn query(sql: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, sql);
    frame(b'Q', &b)
}

struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn login(port: u16) -> Raw {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let body = b"\x00\x03\x00\x00user\0postgres\0database\0app\0\0";
        let mut startup = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        startup.extend_from_slice(body);
        s.write_all(&startup).await.unwrap();
        let mut raw = Raw { s, buf: Vec::new() };
        raw.replies().await;
        raw
    }

    async fn next(&mut self) -> (u8, Vec<u8>) {
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
                if self.buf.len() > len {
                    let m: Vec<u8> = self.buf.drain(..1 + len).collect();
                    return (m[0], m[5..].to_vec());
                }
            }
            let mut chunk = [0u8; 8192];
            let n = tokio::time::timeout(std::time::Duration::from_secs(10), self.s.read(&mut chunk))
                .await
                .expect("an answer, not a hang")
                .unwrap();
            assert!(n > 0, "connection closed");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The replies up to ReadyForQuery, as lines a test can compare: what
    /// each message says, without what legitimately differs (notices,
    /// parameter status, backend keys, error texts and positions).
    async fn replies(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let (tag, body) = self.next().await;
            match tag {
                b'S' | b'N' | b'K' | b'R' => {}
                b'E' => {
                    let code = body
                        .split(|&b| b == 0)
                        .find(|f| f.first() == Some(&b'C'))
                        .map(|f| String::from_utf8_lossy(&f[1..]).to_string())
                        .unwrap_or_default();
                    out.push(format!("error {code}"));
                }
                b'Z' => {
                    out.push(format!("ready {}", body[0] as char));
                    return out;
                }
                b'D' | b'C' | b'T' => out.push(format!("{} {:?}", tag as char, body)),
                other => out.push(format!("{}", other as char)),
            }
        }
    }

    async fn run(&mut self, messages: &[Vec<u8>]) -> Vec<String> {
        self.s.write_all(&messages.concat()).await.unwrap();
        self.replies().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_pipelines_answer_through_the_router_as_postgres_does() {
    let h = Harness::start(1).await;
    let c = h.client().await;
    c.batch_execute(
        "CREATE TABLE t (tenant_id bigint, id bigint, v int, PRIMARY KEY (tenant_id, id));
         INSERT INTO t VALUES (1, 1, 10), (1, 2, 20), (2, 1, 30);",
    )
    .await
    .unwrap();
    let select = "SELECT v FROM t WHERE tenant_id = $1 AND id = $2";
    let insert = "INSERT INTO t VALUES ($1, $2, $3)";
    // The same bytes, in the same order, to each side; the rows an insert
    // leaves behind are rolled back, so both sides see the same data.
    let steps: Vec<Vec<Vec<u8>>> = vec![
        vec![parse("s1", select, &[20, 20]), parse("s2", insert, &[20, 20, 23]), sync()],
        // libpq's shape, then the shorter one, in text and in binary.
        vec![bind("s1", &[1, 1], false), describe_portal(), execute(), sync()],
        vec![bind("s1", &[1, 2], false), execute(), sync()],
        vec![bind("s1", &[2, 1], true), describe_portal(), execute(), sync()],
        vec![bind("s1", &[9, 9], true), execute(), sync()],
        // In a transaction: a write, a failing write, a read refused in the
        // failed transaction, the rollback.
        vec![query("BEGIN")],
        vec![bind("s2", &[1, 100, 5], false), execute(), sync()],
        vec![bind("s2", &[1, 100, 5], false), describe_portal(), execute(), sync()],
        vec![bind("s1", &[1, 100], false), execute(), sync()],
        vec![query("ROLLBACK")],
        vec![bind("s1", &[1, 100], false), describe_portal(), execute(), sync()],
        // A statement never prepared.
        vec![bind("nope", &[1], false), execute(), sync()],
        vec![bind("s1", &[1, 1], false), execute(), sync()],
    ];
    // One side after the other: the transactions insert the same key.
    let mut direct = Raw::login(h.shard_server(0).port()).await;
    let mut want = Vec::new();
    for step in &steps {
        want.push(direct.run(step).await);
    }
    let mut routed = Raw::login(h.port()).await;
    for (i, step) in steps.iter().enumerate() {
        let got = routed.run(step).await;
        assert_eq!(got, want[i], "step {i}: the router answered otherwise than Postgres");
    }
    assert!(want[1].iter().any(|l| l.starts_with("T ")), "libpq's Describe of the portal answers a RowDescription");
    assert_eq!(want[7].last().map(String::as_str), Some("ready E"), "the duplicate failed the transaction");
    // The rolled-back row is nowhere.
    let n: i64 = c.query_one("SELECT count(*) FROM t WHERE tenant_id = 1", &[]).await.unwrap().get(0);
    assert_eq!(n, 2);
}

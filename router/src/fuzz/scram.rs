//! Both sides of the SCRAM-SHA-256 exchange.

use std::sync::OnceLock;

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio_util::codec::Decoder;

use super::Input;
use crate::auth::{authenticate_backend, authenticate_client, Credential, ScramSecret};
use crate::protocol::messages::{self, Builder};
use crate::protocol::{Connection, FrameCodec, Message};

const PASSWORD: &str = "secret";

/// The client-facing side's credential (deriving one takes thousands of hashes).
fn credential() -> &'static Credential {
    static CRED: OnceLock<Credential> = OnceLock::new();
    CRED.get_or_init(|| Credential::Scram(ScramSecret::from_password(PASSWORD)))
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    thread_local! {
        static RT: tokio::runtime::Runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    }
    RT.with(|rt| rt.block_on(f))
}

fn pair() -> (Connection<DuplexStream>, DuplexStream) {
    let (a, b) = tokio::io::duplex(1 << 16);
    let mut server = Connection::accepting(a, 1 << 16);
    server.end_startup_phase();
    (server, b)
}

/// By the input's first byte, one of:
/// - a client that sends whatever the input holds (split at `|` into
///   messages): the router's side ends in an error, never in a login;
/// - a real SCRAM client with the right password whose message at one step is
///   changed by the input: the login succeeds only if nothing was changed;
/// - a shard that sends whatever the input holds: once it has asked for SASL,
///   the router's shard-facing side never takes it for logged in without the
///   server's proof, which no such input has.
pub fn scram(data: &[u8]) {
    let mut input = Input::new(data);
    match input.u8() % 3 {
        0 => random_client(input.rest()),
        1 => mutated_client(input),
        _ => random_shard(input.rest()),
    }
}

fn random_client(data: &[u8]) {
    let (mut server, mut client) = pair();
    let outcome = block_on(async move {
        for part in data.split(|&b| b == b'|') {
            let frame = match part.first() {
                // A part starting with `!` goes as it is: any frame, or none.
                Some(b'!') => part[1..].to_vec(),
                _ => messages::password_message(part).to_vec(),
            };
            if client.write_all(&frame).await.is_err() {
                break;
            }
        }
        drop(client);
        authenticate_client(&mut server, "alice", credential()).await
    });
    assert!(outcome.is_err(), "a login from random client messages");
}

fn mutated_client(mut input: Input<'_>) {
    let step = input.below(3);
    let at = input.below(256);
    let how = input.u8();
    let with = input.rest().to_vec();
    let (mut server, client) = pair();
    let mut client = Connection::connecting(client, 1 << 16);
    let mutate = move |msg: &mut Vec<u8>| {
        let before = msg.clone();
        match how % 4 {
            0 if !msg.is_empty() => {
                let i = at % msg.len();
                msg[i] = with.first().copied().unwrap_or(b'x');
            }
            1 => msg.truncate(at % (msg.len() + 1)),
            2 => {
                let i = at % (msg.len() + 1);
                msg.splice(i..i, with.iter().copied());
            }
            _ => msg.extend_from_slice(&with),
        }
        *msg != before
    };
    let (server_outcome, changed) = block_on(async move {
        // Each side owns its end, so that the other sees it close when it stops.
        let serve = async move { authenticate_client(&mut server, "alice", credential()).await };
        let connect = async move {
            let mut changed = false;
            let mut scram = ScramSha256::new(PASSWORD.as_bytes(), ChannelBinding::unsupported());
            let read = |m: Result<Message, _>| m.ok().filter(|m: &Message| m.tag() == b'R');
            // SASL offered.
            read(client.read().await)?;
            let mut first = scram.message().to_vec();
            if step == 0 {
                changed = mutate(&mut first);
            }
            let mut b = Builder::new(b'p');
            b.cstr("SCRAM-SHA-256").i32(first.len() as i32).bytes(&first);
            client.send(&b.finish()).await.ok()?;
            let m = read(client.read().await)?;
            if m.body().get(..4) != Some(&11i32.to_be_bytes()[..]) || scram.update(&m.body()[4..]).is_err() {
                return Some(changed);
            }
            let mut last = scram.message().to_vec();
            if step >= 1 {
                changed = mutate(&mut last);
            }
            client.send(&messages::password_message(&last)).await.ok()?;
            // The server's last word, before this end closes.
            let _ = client.read().await;
            Some(changed)
        };
        let (outcome, changed) = tokio::join!(serve, connect);
        (outcome, changed.unwrap_or(true))
    });
    match server_outcome {
        Ok(()) => assert!(!changed, "a login with a changed SCRAM message"),
        Err(e) => assert!(changed, "the right password was refused: {e}"),
    }
}

fn random_shard(data: &[u8]) {
    let (mut router_end, mut shard) = {
        let (a, b) = tokio::io::duplex(1 << 16);
        (Connection::connecting(a, 1 << 16), b)
    };
    let outcome = block_on(async move {
        let _ = shard.write_all(data).await;
        drop(shard);
        authenticate_backend(&mut router_end, "alice", Some(PASSWORD)).await
    });
    if outcome.is_ok() {
        // The frames up to the AuthenticationOk it stopped at: no SASL request
        // among them, since a SASL exchange cannot finish without the shard's
        // proof of a nonce it never saw.
        let mut codec = FrameCodec { max_message: 1 << 16, startup_phase: false };
        let mut buf = BytesMut::from(data);
        let code = |m: &Message| m.body().get(..4).map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        while let Ok(Some(m)) = codec.decode(&mut buf) {
            if m.tag() != b'R' {
                continue;
            }
            match code(&m) {
                Some(0) => return,
                Some(10) => panic!("logged in to a shard that asked for SASL, without its proof"),
                _ => {}
            }
        }
        panic!("logged in without an AuthenticationOk");
    }
}

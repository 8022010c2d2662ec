//! The frame decoder, the message parsers and the startup packet.

use bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder};

use super::{chunks, Input};
use crate::protocol::messages::{self, Bind, Parse, Reader, Startup};
use crate::protocol::{FrameCodec, Message, ProtocolError};

/// Limits the decoder is run with: small ones reach `TooLarge`, the default
/// one (1 MiB here) the ordinary path.
const LIMITS: [usize; 4] = [16, 300, 4096, 1 << 20];

/// What decoding a byte stream gave: the frames, then how it stopped.
#[derive(Debug, PartialEq)]
struct Decoded {
    frames: Vec<Vec<u8>>,
    /// The error's text, or None when the stream ran out (mid-frame or not).
    error: Option<String>,
}

/// Decodes `chunks` as they arrive, checking as it goes that the buffer never
/// grows past what the limit allows.
fn decode(codec: &mut FrameCodec, chunks: &[&[u8]]) -> Decoded {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let arrived: usize = chunks.iter().map(|c| c.len()).sum();
    // A reserve never asks for more than the frame being waited for, which is at
    // most the limit; BytesMut may round up to twice what it holds.
    let cap_limit = 2 * (codec.max_message + arrived) + 64;
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(m)) => {
                    assert!(m.len() <= codec.max_message, "frame of {} over the limit {}", m.len(), codec.max_message);
                    frames.push(m.raw().to_vec());
                }
                Ok(None) => break,
                Err(e) => return Decoded { frames, error: Some(e.to_string()) },
            }
            assert!(buf.capacity() <= cap_limit, "buffer of {} bytes for {arrived} bytes in", buf.capacity());
        }
        assert!(buf.capacity() <= cap_limit, "buffer of {} bytes for {arrived} bytes in", buf.capacity());
    }
    Decoded { frames, error: None }
}

/// The decoder on a stream cut into chunks by the input: frames are exactly
/// the stream's bytes in order (nothing lost, duplicated or reordered), each
/// within the limit, the same whatever the chunking; a bad length is an error;
/// encoding a frame gives it back. Then every message parser on every frame:
/// errors, not panics, and the messages the router rewrites or rebuilds
/// (Bind, Parse, Query, Describe/Close, Execute) round-trip.
pub fn frames(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.u8();
    let startup_phase = flags & 1 == 1;
    let max_message = LIMITS[(flags as usize >> 1) % LIMITS.len()];
    let sizes = input.bytes(3).to_vec();
    let stream = input.rest();
    let mut codec = FrameCodec { max_message, startup_phase };
    let whole = decode(&mut codec.clone(), &[stream]);
    let chunked = decode(&mut codec, &chunks(stream, &sizes));
    assert_eq!(whole, chunked, "decoding depends on how the bytes arrive");

    let taken: Vec<u8> = whole.frames.concat();
    assert_eq!(&stream[..taken.len()], &taken[..], "frames are not the stream's bytes in order");
    let header = if startup_phase { 4 } else { 5 };
    for f in &whole.frames {
        let off = header - 4;
        let len = i32::from_be_bytes([f[off], f[off + 1], f[off + 2], f[off + 3]]);
        assert_eq!(len as usize + off, f.len(), "a frame's length is not its header's");
        let mut out = BytesMut::new();
        codec.encode(&f[..], &mut out).unwrap();
        assert_eq!(&out[..], &f[..]);
        if startup_phase {
            startup_round_trip(&Message::startup(f.clone().into()));
        } else {
            messages_round_trip(&Message::from_raw(f.clone().into()));
        }
    }
    if let Some(error) = &whole.error {
        // The stream stopped at the frame after the last one taken.
        let rest = &stream[taken.len()..];
        assert!(rest.len() >= header, "an error before a whole header arrived: {error}");
    }
}

/// Every parser on one message, and re-encoding what parses.
fn messages_round_trip(m: &Message) {
    let _ = messages::error_fields(m);
    let _ = messages::error_summary(m);
    match m.tag() {
        b'Q' => {
            if let Ok(sql) = messages::query_text(m) {
                if m.body() == [sql.as_bytes(), b"\0"].concat() {
                    assert_eq!(&messages::query(sql)[..], &m.raw()[..]);
                }
            }
        }
        b'P' => {
            let mut r = Reader::new(m.body(), "Parse");
            let count = r.cstr().and_then(|_| r.cstr()).and_then(|_| r.i16());
            if let (Ok(p), Ok(0..)) = (Parse::parse(m), count) {
                let rebuilt = messages::parse(p.name, p.query, &p.param_types);
                // What follows the parameter types is ignored; the rest is kept.
                assert!(m.raw()[5..].starts_with(&rebuilt[5..]), "Parse does not round-trip");
            }
        }
        b'B' => {
            if let Ok(b) = Bind::parse(m) {
                assert_eq!(&b.with_statement(b.statement)[..], &m.raw()[..], "Bind does not round-trip");
                for i in 0..b.params.len() + 2 {
                    let _ = b.format_of(i);
                }
                let renamed = b.with_statement("sg_0123456789abcdef");
                let again = Message::from_raw(renamed);
                let b2 = Bind::parse(&again).expect("a renamed Bind parses");
                assert_eq!((b2.portal, b2.statement), (b.portal, "sg_0123456789abcdef"));
                // Compared as text: the two borrow from different frames.
                assert_eq!(format!("{:?}", b2.params), format!("{:?}", b.params));
                assert_eq!(b2.param_formats, b.param_formats);
                assert_eq!(b2.tail.to_vec(), b.tail.to_vec());
            }
        }
        b'D' | b'C' => {
            if let Ok((kind, name)) = messages::target_and_name(m) {
                let rebuilt =
                    if m.tag() == b'D' { messages::describe(kind, name) } else { messages::close(kind, name) };
                assert!(m.raw()[5..].starts_with(&rebuilt[5..]));
            }
        }
        b'E' => {
            let _ = messages::execute_portal(m);
        }
        _ => {}
    }
    // A DataRow's values, as the fan-out reads them.
    let mut r = Reader::new(m.body(), "DataRow");
    if let Ok(n @ 0..) = r.i16() {
        let mut values = Vec::new();
        for _ in 0..n {
            match r.value() {
                Ok(v) => values.push(v),
                Err(_) => return,
            }
        }
        if r.remaining().is_empty() {
            let rebuilt = messages::data_row(values.iter().copied());
            assert_eq!(&rebuilt[5..], m.body(), "DataRow does not round-trip");
        }
    }
}

fn startup_round_trip(m: &Message) {
    match Startup::parse(m) {
        Ok(Startup::Params(params)) => {
            let pairs: Vec<(&str, &str)> = params.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let rebuilt = messages::startup_message(&pairs);
            let again = Startup::parse(&Message::startup(rebuilt.clone())).expect("a rebuilt startup packet parses");
            let Startup::Params(again) = again else { panic!("a rebuilt startup packet is another kind") };
            assert_eq!(again, params);
            assert!(m.raw()[4..].starts_with(&rebuilt[4..]), "startup parameters do not round-trip");
        }
        Ok(Startup::Cancel { pid, key }) => {
            assert_eq!(&messages::cancel_request(pid, key)[4..], &m.raw()[4..16]);
        }
        Ok(Startup::Ssl | Startup::GssEnc | Startup::Unsupported(_)) => {}
        Err(ProtocolError::Malformed { .. }) => {}
        Err(e) => panic!("startup parsing failed with {e}"),
    }
}

/// One startup packet as the router reads it first on a connection: decoded
/// in the startup phase at the router's default limit, then parsed.
pub fn startup(data: &[u8]) {
    let mut codec = FrameCodec { max_message: 1 << 20, startup_phase: true };
    let mut buf = BytesMut::from(data);
    while let Ok(Some(m)) = codec.decode(&mut buf) {
        assert!(m.len() >= 4);
        startup_round_trip(&m);
    }
}

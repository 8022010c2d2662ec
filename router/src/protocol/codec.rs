//! The frame codec: a `tokio_util` [`Decoder`]/[`Encoder`] for Postgres protocol
//! frames that never looks past the header.
//!
//! Decoding first *checks* (is the whole frame in the buffer? is its length sane?)
//! and only then splits the frame off as one `Bytes` that still carries its
//! header, so forwarding it is a copy into the other side's write buffer.

use bytes::{BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::{Message, ProtocolError};

/// Frames of one direction of one connection.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    /// Largest frame accepted, header included.
    pub max_message: usize,
    /// Before the startup packet, frames have no type byte.
    pub startup_phase: bool,
}

impl Decoder for FrameCodec {
    type Item = Message;
    type Error = ProtocolError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, ProtocolError> {
        let header = if self.startup_phase { 4 } else { 5 };
        if src.len() < header {
            return Ok(None);
        }
        let off = header - 4;
        let len = i32::from_be_bytes([src[off], src[off + 1], src[off + 2], src[off + 3]]) as i64;
        if len < 4 {
            return Err(ProtocolError::BadLength(len));
        }
        let total = off + len as usize;
        if total > self.max_message {
            return Err(ProtocolError::TooLarge { size: total, limit: self.max_message });
        }
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        let raw = src.split_to(total).freeze();
        Ok(Some(if self.startup_phase { Message::startup(raw) } else { Message::from_raw(raw) }))
    }
}

/// Whole frames, already encoded (forwarded or built by `messages`).
impl Encoder<&[u8]> for FrameCodec {
    type Error = ProtocolError;

    fn encode(&mut self, frame: &[u8], dst: &mut BytesMut) -> Result<(), ProtocolError> {
        dst.put_slice(frame);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_frames_wait_and_bad_lengths_fail() {
        let mut c = FrameCodec { max_message: 64, startup_phase: false };
        let mut buf = BytesMut::from(&b"Q\0\0\0\x09sel"[..]);
        assert!(c.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(b"e\0");
        let m = c.decode(&mut buf).unwrap().unwrap();
        assert_eq!((m.tag(), m.body()), (b'Q', &b"sele\0"[..]));
        assert!(buf.is_empty());
        let mut bad = BytesMut::from(&b"Q\0\0\0\x02"[..]);
        assert!(matches!(c.decode(&mut bad), Err(ProtocolError::BadLength(2))));
        let mut big = BytesMut::from(&b"Q\0\0\x10\0"[..]);
        assert!(matches!(c.decode(&mut big), Err(ProtocolError::TooLarge { .. })));
    }
}

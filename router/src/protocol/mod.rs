//! The Postgres wire protocol, version 3: framing and the few messages the router
//! has to look inside. Everything else travels as raw bytes.

mod codec;
mod connection;
pub mod messages;

pub use codec::FrameCodec;
pub use connection::{Connection, ProtocolError};
pub use messages::Message;

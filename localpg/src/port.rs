//! Picking a free TCP port for a new server.

use std::net::TcpListener;

use crate::{Error, HOST};

/// Returns a port on 127.0.0.1 that nothing listens on right now: the kernel picks
/// one for a listener we then close. Another process may take it before the server
/// binds it; [`crate::Server::start`] moves to another port once if that happens.
pub fn free_port() -> Result<u16, Error> {
    let listener = TcpListener::bind((HOST, 0)).map_err(|source| Error::NoFreePort { source })?;
    let addr = listener.local_addr().map_err(|source| Error::NoFreePort { source })?;
    Ok(addr.port())
}

//! Authentication: clients to the router, and the router to its backends.
//! (Interface stub: being filled in; signatures are fixed.)

use tokio::io::{AsyncRead, AsyncWrite};

use crate::protocol::Connection;

pub enum Credential {
    Trust,
    Md5 { password: String },
    Scram(ScramSecret),
}

pub struct ScramSecret {
    _private: (),
}

impl ScramSecret {
    pub fn from_password(_password: &str) -> ScramSecret {
        ScramSecret { _private: () }
    }
    pub fn parse(_verifier: &str) -> Result<ScramSecret, AuthError> {
        Err(AuthError::Unsupported)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("unsupported")]
    Unsupported,
}

impl AuthError {
    pub fn sqlstate(&self) -> &'static str {
        "28000"
    }
}

pub async fn authenticate_client<S: AsyncRead + AsyncWrite + Unpin>(
    _conn: &mut Connection<S>,
    _user: &str,
    cred: &Credential,
) -> Result<(), AuthError> {
    match cred {
        Credential::Trust => Ok(()),
        _ => Err(AuthError::Unsupported),
    }
}

pub async fn authenticate_backend<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    _user: &str,
    _password: Option<&str>,
) -> Result<(), AuthError> {
    use crate::protocol::messages::Reader;
    loop {
        let m = conn.read().await.map_err(|_| AuthError::Unsupported)?;
        if m.tag() == b'R' && Reader::new(m.body(), "auth").i32().ok() == Some(0) {
            return Ok(());
        }
        return Err(AuthError::Unsupported);
    }
}

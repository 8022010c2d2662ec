//! Errors that reach a client as a Postgres `ErrorResponse`.

use bytes::Bytes;

use crate::protocol::messages::{error_response, Severity};

/// An error with a SQLSTATE, a message and maybe a hint: what the client sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlError {
    pub code: &'static str,
    pub message: String,
    pub hint: Option<String>,
}

impl SqlError {
    pub fn new(code: &'static str, message: String) -> SqlError {
        SqlError { code, message, hint: None }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> SqlError {
        self.hint = Some(hint.into());
        self
    }

    pub fn to_message(&self, severity: Severity) -> Bytes {
        error_response(severity, self.code, &self.message, self.hint.as_deref())
    }
}

impl std::fmt::Display for SqlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

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

    /// An error a shard reported, its SQLSTATE kept (interned: there are a
    /// few hundred; anything not shaped like one becomes XX000).
    pub fn from_server(code: &str, message: String) -> SqlError {
        static CODES: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
        let valid = code.len() == 5 && code.bytes().all(|b| b.is_ascii_alphanumeric());
        let mut codes = CODES.lock().unwrap_or_else(|p| p.into_inner());
        let code: &'static str = match codes.iter().find(|c| **c == code) {
            Some(c) => c,
            None if valid && codes.len() < 512 => {
                let c: &'static str = Box::leak(code.to_string().into_boxed_str());
                codes.push(c);
                c
            }
            None => "XX000",
        };
        SqlError::new(code, message)
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

//! What an endpoint returns: a typed answer, or a [`Refusal`] (a status code and
//! what to tell the operator); and how either becomes a JSON body.

use serde::Serialize;

use super::api::ApiError;

/// A request the API turns down, or could not carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Refusal {
    pub code: u16,
    pub error: String,
}

impl Refusal {
    pub fn new(code: u16, error: impl Into<String>) -> Refusal {
        Refusal { code, error: error.into() }
    }

    /// 400: the request itself is wrong.
    pub fn bad_request(error: impl Into<String>) -> Refusal {
        Refusal::new(400, error)
    }

    /// 409: the request conflicts with the cluster's state.
    pub fn conflict(error: impl Into<String>) -> Refusal {
        Refusal::new(409, error)
    }

    /// 503: the directory or a shard could not be reached.
    pub fn unavailable(error: impl Into<String>) -> Refusal {
        Refusal::new(503, error)
    }
}

pub(super) type Answer<T> = Result<T, Refusal>;

/// How an answer's JSON is laid out: reads for people (status, directory …) are
/// pretty-printed, the answers to changes fit on a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Layout {
    Pretty,
    Compact,
}

/// The status code and JSON body of an answer.
pub(super) fn to_http<T: Serialize>(answer: Answer<T>, layout: Layout) -> (u16, String) {
    let json = match &answer {
        Ok(v) if layout == Layout::Pretty => serde_json::to_string_pretty(v),
        Ok(v) => serde_json::to_string(v),
        Err(r) => return (r.code, error_json(&r.error)),
    };
    match json {
        Ok(body) => (200, body),
        Err(e) => (500, error_json(&format!("could not write the answer: {e}"))),
    }
}

/// The body of an error answer: `{"error": "…"}`.
pub(super) fn error_json(error: &str) -> String {
    serde_json::to_string(&ApiError { error: error.to_string() })
        .unwrap_or_else(|_| r#"{"error":"unknown error"}"#.to_string())
}

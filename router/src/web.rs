//! The web page of the admin API: shards, placements and moves, live.
//!
//! Plain HTML, CSS and JavaScript in `router/web/`, compiled into the binary, so
//! every node serves the page on its admin port with no build step, no framework
//! and nothing fetched from elsewhere. The page holds no data: it reads the status
//! from `GET /events` (see [`crate::events`]), which needs the admin token when
//! one is configured, so the page and its files are served to anyone.

/// `GET /`.
pub const PAGE: &str = include_str!("../web/index.html");

/// Headers of the page: it may load only its own files and talk only to its own
/// origin, and the address it was opened with (which may hold the token) is never
/// sent on.
pub const PAGE_HEADERS: &[(&str, &str)] = &[
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; \
         base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
    ("referrer-policy", "no-referrer"),
    ("x-content-type-options", "nosniff"),
    ("cache-control", "no-cache"),
];

/// Headers of the page's files: revalidated, so a new binary's page is never
/// mixed with an old script.
pub const ASSET_HEADERS: &[(&str, &str)] = &[("x-content-type-options", "nosniff"), ("cache-control", "no-cache")];

/// The page's files by path: (content type, body).
pub fn asset(path: &str) -> Option<(&'static str, &'static str)> {
    match path {
        "/web/app.js" => Some(("text/javascript; charset=utf-8", include_str!("../web/app.js"))),
        "/web/style.css" => Some(("text/css; charset=utf-8", include_str!("../web/style.css"))),
        _ => None,
    }
}

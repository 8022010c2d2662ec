//! Authentication: clients to the router, and the router to its shards.
//!
//! The router is a Postgres server to its clients and a Postgres client to its
//! shards, so it speaks both sides of the login exchange:
//!
//! - [`authenticate_client`] checks a client against the [`Credential`] configured for
//!   its user: trust, the md5 challenge, or SCRAM-SHA-256 (RFC 5802/7677 the way
//!   Postgres implements it, without channel binding for now);
//! - [`authenticate_backend`] answers whatever a shard asks for (cleartext, md5,
//!   SCRAM-SHA-256) with the password from the shard's config.
//!
//! Both stop at the edge of authentication proper: the session sends
//! `AuthenticationOk` and its `ParameterStatus`es to a client itself, and reads a
//! shard's `ParameterStatus`, `BackendKeyData` and `ReadyForQuery` itself.
//! No secret ever reaches a log line, an error message or a `Debug` output.

use std::fmt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, Mac};
use md5::Md5;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use sha2::{Digest, Sha256};
// Secrets are compared with `ct_eq`: its time does not depend on where the
// inputs differ (it may on their lengths, which are no secret here).
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::protocol::messages::{self, Builder, Reader};
use crate::protocol::{Connection, Message, ProtocolError};

const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
/// Random bytes in the server's half of a SCRAM nonce (before base64), as in Postgres.
const SERVER_NONCE_BYTES: usize = 18;

/// How a configured user proves who they are to the router.
#[derive(Clone)]
pub enum Credential {
    /// No password: naming the user is enough.
    Trust,
    /// The md5 challenge. `password` is the plain password or, as Postgres stores
    /// it, `"md5" + md5(password + user)` (35 characters, lowercase hex).
    Md5 { password: String },
    /// SCRAM-SHA-256 against a stored secret.
    Scram(ScramSecret),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Trust => f.write_str("Trust"),
            Credential::Md5 { .. } => f.write_str("Md5 { .. }"),
            Credential::Scram(secret) => f.debug_tuple("Scram").field(secret).finish(),
        }
    }
}

/// What a server keeps of a SCRAM-SHA-256 password: enough to check a client's proof
/// and to prove itself in return, but neither the password nor anything a client
/// could log in with. The same data as a `pg_authid` verifier, so a verifier copied
/// from a Postgres server works unchanged.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramSecret {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl fmt::Debug for ScramSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramSecret").field("iterations", &self.iterations).finish_non_exhaustive()
    }
}

impl ScramSecret {
    /// A secret for `password` with a fresh random 16-byte salt and 4096 iterations,
    /// derived exactly as Postgres does for `ALTER ROLE … PASSWORD` (SASLprep included,
    /// which is why the derivation is left to `postgres-protocol`).
    pub fn from_password(password: &str) -> ScramSecret {
        let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
        match ScramSecret::parse(&verifier) {
            Ok(secret) => secret,
            // The verifier's format is fixed by the library, not by any input.
            Err(e) => unreachable!("postgres-protocol wrote a verifier we cannot read: {e}"),
        }
    }

    /// Reads a verifier in `pg_authid` format:
    /// `SCRAM-SHA-256$<iterations>:<salt b64>$<StoredKey b64>:<ServerKey b64>`.
    pub fn parse(verifier: &str) -> Result<ScramSecret, AuthError> {
        const SHAPE: &str = "expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>";
        let bad = AuthError::InvalidVerifier;
        let rest = verifier.strip_prefix("SCRAM-SHA-256$").ok_or(bad(SHAPE))?;
        let (iterations_and_salt, keys) = rest.split_once('$').ok_or(bad(SHAPE))?;
        let (iterations, salt) = iterations_and_salt.split_once(':').ok_or(bad(SHAPE))?;
        let (stored_key, server_key) = keys.split_once(':').ok_or(bad(SHAPE))?;
        let iterations = iterations
            .parse::<u32>()
            .ok()
            .filter(|&i| i > 0)
            .ok_or(bad("the iteration count is not a positive integer"))?;
        let salt = BASE64.decode(salt).ok().filter(|s| !s.is_empty()).ok_or(bad("the salt is not base64"))?;
        let key = |b64: &str| BASE64.decode(b64).ok().and_then(|k| <[u8; 32]>::try_from(k).ok());
        Ok(ScramSecret {
            iterations,
            salt,
            stored_key: key(stored_key).ok_or(bad("StoredKey is not 32 bytes in base64"))?,
            server_key: key(server_key).ok_or(bad("ServerKey is not 32 bytes in base64"))?,
        })
    }
}

/// What a client's login proved that lets the router log in to a shard as
/// the same role (pass-through: the shard checks the role's own password).
/// Never logged, never shown: its `Debug` names the kind only.
#[derive(Clone, PartialEq, Eq)]
pub enum PassThrough {
    /// A password configured in plain (a `[[users]]` entry): answers any method.
    Password(String),
    /// The role's stored md5 hash (`"md5"` + 32 hex digits): answers a shard's
    /// md5 challenge as the password would.
    Md5(String),
    /// The client's SCRAM ClientKey, recovered from its proof, with the verifier
    /// it was checked against: answers a shard's SCRAM exchange when the shard
    /// stores the same verifier (same salt and iteration count), as pgbouncer's
    /// SCRAM pass-through does.
    Scram { client_key: [u8; 32], secret: ScramSecret },
}

impl fmt::Debug for PassThrough {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PassThrough::Password(_) => "PassThrough::Password(..)",
            PassThrough::Md5(_) => "PassThrough::Md5(..)",
            PassThrough::Scram { .. } => "PassThrough::Scram(..)",
        })
    }
}

impl ScramSecret {
    /// Whether `password` (ASCII: no SASLprep) derives this secret's StoredKey.
    #[cfg(test)]
    pub(crate) fn matches_password(&self, password: &str) -> bool {
        // Hi(): PBKDF2 with HMAC-SHA-256, one block.
        let mut u = hmac_sha256(password.as_bytes(), &[self.salt.as_slice(), &[0, 0, 0, 1]].concat());
        let mut salted = u;
        for _ in 1..self.iterations {
            u = hmac_sha256(password.as_bytes(), &u);
            for (s, x) in salted.iter_mut().zip(u) {
                *s ^= x;
            }
        }
        let client_key = hmac_sha256(&salted, b"Client Key");
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        stored == self.stored_key
    }
}

/// Why a login did not succeed, on either side.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The client's password (md5 answer or SCRAM proof) was wrong.
    #[error("password authentication failed for user \"{user}\"")]
    BadPassword { user: String },
    /// The peer broke the exchange: an unexpected or malformed message.
    #[error("{0}")]
    Violation(String),
    /// The connection broke, or a frame could not be read.
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    /// The peer wants something the router does not implement.
    #[error("{0}")]
    Unsupported(String),
    /// A configured SCRAM verifier could not be read (the verifier is not repeated).
    #[error("invalid SCRAM-SHA-256 verifier: {0}")]
    InvalidVerifier(&'static str),
    /// A shard wants a password and its config has none.
    #[error("shard asks for a password for user {user}: set password in the shard's config")]
    MissingPassword { user: String },
    /// A shard's SCRAM server signature did not verify: it does not know the password.
    #[error("shard failed SCRAM authentication: {0}")]
    ShardSignature(String),
    /// The router cannot answer what the shard asks with what the client's
    /// login proved (a SCRAM verifier with another salt, md5 asked of a SCRAM
    /// login, a cleartext password asked of a hash).
    #[error("cannot log in to the shard as role \"{user}\": {why}")]
    PassThrough { user: String, why: String },
    /// A shard refused the login with an `ErrorResponse`.
    #[error("{message}")]
    Backend { code: String, message: String },
}

impl AuthError {
    /// The SQLSTATE a client is told.
    pub fn sqlstate(&self) -> &'static str {
        /// A shard's SQLSTATEs that mean the same to a client of the router.
        const PASSED_ON: &[&str] = &["28P01", "28000", "3D000", "53300", "57P03", "08P01", "42501"];
        match self {
            AuthError::BadPassword { .. } => "28P01",
            AuthError::Violation(_) | AuthError::Protocol(_) => "08P01",
            AuthError::Unsupported(_)
            | AuthError::MissingPassword { .. }
            | AuthError::ShardSignature(_)
            | AuthError::PassThrough { .. } => "28000",
            AuthError::InvalidVerifier(_) => "F0000",
            AuthError::Backend { code, .. } => {
                PASSED_ON.iter().find(|c| **c == code.as_str()).copied().unwrap_or("08001")
            }
        }
    }
}

/// The server side of a login, run once the client's StartupMessage is read.
/// Checks the client against `cred`; on success the caller sends `AuthenticationOk`,
/// on failure a FATAL error with [`AuthError::sqlstate`]. Like Postgres, SCRAM
/// ignores the user name inside the SCRAM messages: `user` is the startup user.
pub async fn authenticate_client<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    user: &str,
    cred: &Credential,
) -> Result<(), AuthError> {
    authenticate_client_proving(conn, user, cred).await.map(|_| ())
}

/// [`authenticate_client`], returning what the login proved that lets the
/// router log in to the shards as the same role: the md5 hash, or the SCRAM
/// ClientKey (None for trust).
pub async fn authenticate_client_proving<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    user: &str,
    cred: &Credential,
) -> Result<Option<PassThrough>, AuthError> {
    let (method, outcome) = match cred {
        Credential::Trust => return Ok(None),
        Credential::Md5 { password } => {
            let stored = md5_stored(user, password);
            let outcome = md5_challenge(conn, user, &stored).await.map(|()| PassThrough::Md5(stored));
            ("md5", outcome)
        }
        Credential::Scram(secret) => {
            let outcome = scram_exchange(conn, user, secret)
                .await
                .map(|client_key| PassThrough::Scram { client_key, secret: secret.clone() });
            ("scram-sha-256", outcome)
        }
    };
    match &outcome {
        Ok(_) => tracing::debug!(user, method, "client authenticated"),
        Err(e) => tracing::debug!(user, method, error = %e, "client authentication failed"),
    }
    outcome.map(Some)
}

async fn md5_challenge<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    user: &str,
    password: &str,
) -> Result<(), AuthError> {
    let salt: [u8; 4] = rand::random();
    conn.send(&messages::auth_md5(salt)).await?;
    let m = read_response(conn, "password response").await?;
    let answer = Reader::new(m.body(), "PasswordMessage").cstr()?;
    let expected = md5_answer(&md5_stored(user, password), salt);
    if answer.as_bytes().ct_eq(expected.as_bytes()).into() {
        Ok(())
    } else {
        Err(AuthError::BadPassword { user: user.to_string() })
    }
}

/// Whether a configured password is already Postgres's stored md5 hash, by the test
/// Postgres applies: "md5" and 32 lowercase hex digits.
fn is_md5_hash(password: &str) -> bool {
    password.len() == 35
        && password.starts_with("md5")
        && password.bytes().skip(3).all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Whether a password is given in plain, by Postgres's own test: neither a
/// SCRAM-SHA-256 verifier nor an md5 hash.
pub fn is_plain_password(p: &str) -> bool {
    !p.starts_with("SCRAM-SHA-256$") && !is_md5_hash(p)
}

/// `"md5" + md5(password + user)`, the form Postgres stores.
fn md5_stored(user: &str, password: &str) -> String {
    if is_md5_hash(password) {
        return password.to_string();
    }
    let mut h = Md5::new();
    h.update(password.as_bytes());
    h.update(user.as_bytes());
    format!("md5{:x}", h.finalize())
}

/// The answer to an md5 challenge: `"md5" + md5(<hex of the stored hash> + salt)`.
fn md5_answer(stored: &str, salt: [u8; 4]) -> String {
    let mut h = Md5::new();
    h.update(stored.strip_prefix("md5").unwrap_or(stored).as_bytes());
    h.update(salt);
    format!("md5{:x}", h.finalize())
}

/// The server side of SCRAM-SHA-256. Returns the client's ClientKey, which its
/// proof reveals to whoever knows StoredKey (RFC 5802: the proof is ClientKey
/// XOR ClientSignature).
async fn scram_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    user: &str,
    secret: &ScramSecret,
) -> Result<[u8; 32], AuthError> {
    conn.send(&messages::auth_sasl(&[SCRAM_SHA_256])).await?;

    // SASLInitialResponse: mechanism, then the client-first-message with its length,
    // or -1 when the client waits for an (empty) challenge first.
    let m = read_response(conn, "SASL response").await?;
    let mut r = Reader::new(m.body(), "SASLInitialResponse");
    if r.cstr()? != SCRAM_SHA_256 {
        return Err(AuthError::Violation("client selected an invalid SASL authentication mechanism".to_string()));
    }
    let len = r.i32()?;
    let client_first = if len == -1 && r.remaining().is_empty() {
        conn.send(&messages::auth_sasl_continue(b"")).await?;
        let m = read_response(conn, "SASL response").await?;
        scram_text(m.body())?
    } else if usize::try_from(len).ok() == Some(r.remaining().len()) {
        scram_text(r.remaining())?
    } else {
        return Err(malformed("its length does not match the SASLInitialResponse"));
    };
    let first = ClientFirst::parse(&client_first)?;

    let nonce = format!("{}{}", first.nonce, BASE64.encode(rand::random::<[u8; SERVER_NONCE_BYTES]>()));
    let server_first = format!("r={nonce},s={},i={}", BASE64.encode(&secret.salt), secret.iterations);
    conn.send(&messages::auth_sasl_continue(server_first.as_bytes())).await?;

    let m = read_response(conn, "SASL response").await?;
    let client_final = scram_text(m.body())?;
    let last = ClientFinal::parse(&client_final)?;
    // Without channel binding, c= is just the base64 of the gs2 header.
    if last.channel_binding != BASE64.encode(first.gs2_header) {
        return Err(AuthError::Violation(
            "unexpected SCRAM channel-binding attribute in client-final-message".to_string(),
        ));
    }
    if last.nonce != nonce {
        return Err(malformed("the nonce does not match"));
    }

    let auth_message = format!("{},{},{}", first.bare, server_first, last.without_proof);
    let client_signature = hmac_sha256(&secret.stored_key, auth_message.as_bytes());
    let mut client_key = last.proof;
    for (k, s) in client_key.iter_mut().zip(client_signature) {
        *k ^= s;
    }
    let stored_key: [u8; 32] = Sha256::digest(client_key).into();
    if !bool::from(stored_key[..].ct_eq(&secret.stored_key[..])) {
        return Err(AuthError::BadPassword { user: user.to_string() });
    }
    let server_signature = hmac_sha256(&secret.server_key, auth_message.as_bytes());
    let server_final = format!("v={}", BASE64.encode(server_signature));
    conn.send(&messages::auth_sasl_final(server_final.as_bytes())).await?;
    Ok(client_key)
}

/// `gs2-header client-first-message-bare`, e.g. `n,,n=,r=<nonce>`.
struct ClientFirst<'a> {
    gs2_header: &'a str,
    bare: &'a str,
    nonce: &'a str,
}

impl<'a> ClientFirst<'a> {
    fn parse(msg: &'a str) -> Result<ClientFirst<'a>, AuthError> {
        let mut parts = msg.splitn(3, ',');
        let flag = parts.next().unwrap_or_default();
        let (Some(authzid), Some(bare)) = (parts.next(), parts.next()) else {
            return Err(malformed("the gs2 header is incomplete"));
        };
        match flag {
            "n" | "y" => {}
            f if f.starts_with("p=") => {
                return Err(AuthError::Violation(
                    "client asks for SCRAM channel binding, which the router does not offer".to_string(),
                ))
            }
            _ => return Err(malformed("unexpected channel-binding flag")),
        }
        if authzid.starts_with("a=") {
            return Err(AuthError::Unsupported(
                "client uses authorization identity, but it is not supported".to_string(),
            ));
        } else if !authzid.is_empty() {
            return Err(malformed("unexpected attribute in the gs2 header"));
        }
        if bare.starts_with("m=") {
            return Err(AuthError::Unsupported("client requires an unsupported SCRAM extension".to_string()));
        }
        let (_user, rest) = scram_attr(bare, 'n')?;
        let (nonce, _extensions) = scram_attr(rest, 'r')?;
        if nonce.is_empty() || !nonce.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',') {
            return Err(malformed("the client nonce is empty or not printable"));
        }
        let gs2_header = &msg[..flag.len() + authzid.len() + 2];
        Ok(ClientFirst { gs2_header, bare, nonce })
    }
}

/// `c=<channel binding>,r=<nonce>[,extensions],p=<proof>`.
struct ClientFinal<'a> {
    channel_binding: &'a str,
    nonce: &'a str,
    without_proof: &'a str,
    proof: [u8; 32],
}

impl<'a> ClientFinal<'a> {
    fn parse(msg: &'a str) -> Result<ClientFinal<'a>, AuthError> {
        // The proof comes last, and base64 has no commas.
        let (without_proof, proof) = msg.rsplit_once(",p=").ok_or_else(|| malformed("no proof"))?;
        let proof = BASE64
            .decode(proof)
            .ok()
            .and_then(|p| <[u8; 32]>::try_from(p).ok())
            .ok_or_else(|| malformed("the proof is not 32 bytes in base64"))?;
        let (channel_binding, rest) = scram_attr(without_proof, 'c')?;
        let (nonce, _extensions) = scram_attr(rest, 'r')?;
        Ok(ClientFinal { channel_binding, nonce, without_proof, proof })
    }
}

/// Splits the attribute `key=value` off the front of a SCRAM message: its value and
/// whatever follows the comma after it.
fn scram_attr(msg: &str, key: char) -> Result<(&str, &str), AuthError> {
    let value_and_rest = msg
        .strip_prefix(key)
        .and_then(|m| m.strip_prefix('='))
        .ok_or_else(|| malformed(format_args!("expected attribute \"{key}\"")))?;
    Ok(value_and_rest.split_once(',').unwrap_or((value_and_rest, "")))
}

/// A SCRAM message as text: UTF-8, not empty, no NUL.
fn scram_text(data: &[u8]) -> Result<String, AuthError> {
    let text = std::str::from_utf8(data).map_err(|_| malformed("it is not UTF-8"))?;
    if text.is_empty() || text.contains('\0') {
        return Err(malformed("it is empty or contains a NUL byte"));
    }
    Ok(text.to_string())
}

fn malformed(detail: impl fmt::Display) -> AuthError {
    AuthError::Violation(format!("malformed SCRAM message: {detail}"))
}

/// The next message from a client, which must be a `PasswordMessage`-family 'p'.
async fn read_response<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    expected: &str,
) -> Result<Message, AuthError> {
    let m = conn.read().await?;
    if m.tag() != b'p' {
        return Err(AuthError::Violation(format!(
            "expected {expected}, got message type {}",
            char::from(m.tag()).escape_default()
        )));
    }
    Ok(m)
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// The client side of a login to a shard, run after sending it a StartupMessage.
/// Answers cleartext, md5 and SCRAM-SHA-256 requests with `password` and returns at
/// `AuthenticationOk`, leaving the shard's `ParameterStatus`, `BackendKeyData` and
/// `ReadyForQuery` to the caller. An md5 hash (`"md5"` + 32 hex digits) works as the
/// password for md5 logins.
pub async fn authenticate_backend<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    user: &str,
    password: Option<&str>,
) -> Result<(), AuthError> {
    authenticate_backend_as(conn, user, password, None).await
}

/// [`authenticate_backend`] for a client's own role: with `pass` (what the
/// client's login proved) when there is one, else with `password`.
pub async fn authenticate_backend_as<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    user: &str,
    password: Option<&str>,
    pass: Option<&PassThrough>,
) -> Result<(), AuthError> {
    let password = || match pass {
        Some(PassThrough::Password(p)) => Ok(p.as_str()),
        Some(_) => Err(AuthError::PassThrough {
            user: user.to_string(),
            why: "the shard asks for the password in cleartext, and the router holds only the role's hash; \
                  use scram-sha-256 or md5 for this role in the shard's pg_hba.conf"
                .to_string(),
        }),
        None => password.ok_or_else(|| AuthError::MissingPassword { user: user.to_string() }),
    };
    // Some while a SCRAM exchange is under way.
    let mut scram: Option<ClientScram> = None;
    loop {
        let m = conn.read().await?;
        match m.tag() {
            b'R' => {}
            b'E' => {
                let (code, message) = messages::error_summary(&m);
                return Err(AuthError::Backend { code, message });
            }
            b'N' => continue,
            t => {
                return Err(AuthError::Violation(format!(
                    "shard sent message type {} during authentication",
                    char::from(t).escape_default()
                )))
            }
        }
        let mut r = Reader::new(m.body(), "Authentication");
        match r.i32()? {
            0 if scram.is_some() => {
                return Err(AuthError::Violation(
                    "shard sent AuthenticationOk before the SCRAM exchange finished".to_string(),
                ))
            }
            0 => return Ok(()),
            3 => conn.send(&Builder::new(b'p').cstr(password()?).finish()).await?,
            5 => {
                let salt = r.bytes(4)?;
                let salt = [salt[0], salt[1], salt[2], salt[3]];
                let answer = match pass {
                    Some(PassThrough::Md5(stored)) => md5_answer(stored, salt),
                    Some(PassThrough::Scram { .. }) => {
                        return Err(AuthError::PassThrough {
                            user: user.to_string(),
                            why: "the shard asks for md5, and the role's password is stored as SCRAM-SHA-256; \
                                  use scram-sha-256 for this role in the shard's pg_hba.conf"
                                .to_string(),
                        })
                    }
                    _ => {
                        let password = password()?;
                        if is_md5_hash(password) {
                            md5_answer(password, salt)
                        } else {
                            postgres_protocol::authentication::md5_hash(user.as_bytes(), password.as_bytes(), salt)
                        }
                    }
                };
                conn.send(&Builder::new(b'p').cstr(&answer).finish()).await?;
            }
            10 => {
                let mut offered = Vec::new();
                loop {
                    match r.cstr()? {
                        "" => break,
                        mechanism => offered.push(mechanism),
                    }
                }
                if !offered.contains(&SCRAM_SHA_256) {
                    return Err(AuthError::Unsupported(format!(
                        "shard offers SASL mechanisms {offered:?}, and the router speaks only {SCRAM_SHA_256}"
                    )));
                }
                // No channel binding: "n,,".
                let client = match pass {
                    Some(PassThrough::Scram { client_key, secret }) => {
                        ClientScram::Keys(KeyedScram::new(*client_key, secret.clone()))
                    }
                    Some(PassThrough::Md5(_)) => {
                        return Err(AuthError::PassThrough {
                            user: user.to_string(),
                            why: "the shard asks for SCRAM-SHA-256, and the role's password is stored as md5 \
                                  where the router looked it up; set the role's password again with \
                                  password_encryption = scram-sha-256"
                                .to_string(),
                        })
                    }
                    _ => ClientScram::Password(ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported())),
                };
                let first = client.message();
                let mut b = Builder::new(b'p');
                b.cstr(SCRAM_SHA_256).i32(first.len() as i32).bytes(first);
                conn.send(&b.finish()).await?;
                scram = Some(client);
            }
            11 => {
                let client = scram.as_mut().ok_or_else(|| out_of_turn("AuthenticationSASLContinue"))?;
                client.update(r.remaining(), user)?;
                conn.send(&messages::password_message(client.message())).await?;
            }
            12 => {
                let client = scram.take().ok_or_else(|| out_of_turn("AuthenticationSASLFinal"))?;
                client.finish(r.remaining())?;
            }
            code => {
                let method = match code {
                    2 => "Kerberos V5",
                    6 => "SCM credentials",
                    7 | 8 => "GSSAPI",
                    9 => "SSPI",
                    _ => "an unknown method",
                };
                return Err(AuthError::Unsupported(format!(
                    "shard asks for authentication by {method} (request {code}), which the router does not support"
                )));
            }
        }
    }
}

/// The client side of a SCRAM exchange with a shard: from a password, or
/// from a client's ClientKey (pass-through).
enum ClientScram {
    Password(ScramSha256),
    Keys(KeyedScram),
}

impl ClientScram {
    fn message(&self) -> &[u8] {
        match self {
            ClientScram::Password(c) => c.message(),
            ClientScram::Keys(k) => k.message.as_bytes(),
        }
    }

    fn update(&mut self, server_first: &[u8], user: &str) -> Result<(), AuthError> {
        match self {
            ClientScram::Password(c) => c
                .update(server_first)
                .map_err(|e| AuthError::Violation(format!("shard's SCRAM server-first-message: {e}"))),
            ClientScram::Keys(k) => k.update(server_first, user),
        }
    }

    fn finish(self, server_final: &[u8]) -> Result<(), AuthError> {
        match self {
            ClientScram::Password(mut c) => {
                c.finish(server_final).map_err(|e| AuthError::ShardSignature(e.to_string()))
            }
            ClientScram::Keys(k) => k.finish(server_final),
        }
    }
}

/// SCRAM-SHA-256 with the ClientKey instead of the password: the proof is
/// ClientKey XOR HMAC(H(ClientKey), AuthMessage), and the shard's signature is
/// checked with the verifier's ServerKey. The shard's salt and iteration
/// count must be the verifier's, or the keys are not the ones it expects.
struct KeyedScram {
    client_key: [u8; 32],
    secret: ScramSecret,
    nonce: String,
    /// The message to send next.
    message: String,
    auth_message: String,
}

impl KeyedScram {
    fn new(client_key: [u8; 32], secret: ScramSecret) -> KeyedScram {
        let nonce = BASE64.encode(rand::random::<[u8; SERVER_NONCE_BYTES]>());
        // Postgres takes the user from the startup packet: "n=" stays empty.
        let message = format!("n,,n=,r={nonce}");
        KeyedScram { client_key, secret, nonce, message, auth_message: String::new() }
    }

    fn update(&mut self, server_first: &[u8], user: &str) -> Result<(), AuthError> {
        let text = std::str::from_utf8(server_first)
            .map_err(|_| AuthError::Violation("shard's SCRAM server-first-message is not UTF-8".to_string()))?;
        let bad = |what: &str| AuthError::Violation(format!("shard's SCRAM server-first-message: {what}"));
        let (nonce, rest) = scram_attr(text, 'r').map_err(|_| bad("no nonce"))?;
        let (salt, rest) = scram_attr(rest, 's').map_err(|_| bad("no salt"))?;
        let (iterations, _) = scram_attr(rest, 'i').map_err(|_| bad("no iteration count"))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(bad("the nonce does not extend the router's"));
        }
        let salt = BASE64.decode(salt).map_err(|_| bad("the salt is not base64"))?;
        let iterations: u32 = iterations.parse().map_err(|_| bad("the iteration count is not a number"))?;
        if salt != self.secret.salt || iterations != self.secret.iterations {
            return Err(AuthError::PassThrough {
                user: user.to_string(),
                why: "the shard stores another SCRAM verifier for this role (another salt or iteration count) \
                      than the one the client was checked against; set the role's password through the router \
                      (ALTER ROLE … PASSWORD), which stores the same verifier on every shard"
                    .to_string(),
            });
        }
        let bare = &self.message["n,,".len()..];
        let without_proof = format!("c=biws,r={nonce}");
        self.auth_message = format!("{bare},{text},{without_proof}");
        let stored_key: [u8; 32] = Sha256::digest(self.client_key).into();
        let signature = hmac_sha256(&stored_key, self.auth_message.as_bytes());
        let mut proof = self.client_key;
        for (p, s) in proof.iter_mut().zip(signature) {
            *p ^= s;
        }
        self.message = format!("{without_proof},p={}", BASE64.encode(proof));
        Ok(())
    }

    fn finish(self, server_final: &[u8]) -> Result<(), AuthError> {
        let text = std::str::from_utf8(server_final).unwrap_or_default();
        if let Some(e) = text.strip_prefix("e=") {
            return Err(AuthError::ShardSignature(format!("the shard reports {e}")));
        }
        let (verifier, _) = scram_attr(text, 'v')
            .map_err(|_| AuthError::Violation("shard's SCRAM server-final-message has no verifier".to_string()))?;
        let expected = hmac_sha256(&self.secret.server_key, self.auth_message.as_bytes());
        let got = BASE64.decode(verifier).unwrap_or_default();
        if bool::from(got.as_slice().ct_eq(&expected[..])) {
            Ok(())
        } else {
            Err(AuthError::ShardSignature("the shard's signature does not match the role's verifier".to_string()))
        }
    }
}

fn out_of_turn(what: &str) -> AuthError {
    AuthError::Violation(format!("shard sent {what} outside a SCRAM exchange"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use tokio::io::DuplexStream;

    use super::*;
    use crate::protocol::messages::Severity;

    const USER: &str = "alice";

    /// The router's end of a client connection whose startup is done, and the
    /// client's end.
    fn pair() -> (Connection<DuplexStream>, Connection<DuplexStream>) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let mut server = Connection::accepting(a, 1 << 20);
        server.end_startup_phase();
        (server, Connection::connecting(b, 1 << 20))
    }

    async fn within_seconds<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(10), f).await.expect("login exchange hung")
    }

    /// The router's client-facing side against its shard-facing side. The server side
    /// ends as the session edge does: AuthenticationOk, or a FATAL error.
    async fn login(cred: &Credential, password: Option<&str>) -> (Result<(), AuthError>, Result<(), AuthError>) {
        let (mut server, mut client) = pair();
        let serve = async move {
            let outcome = authenticate_client(&mut server, USER, cred).await;
            let reply = match &outcome {
                Ok(()) => messages::auth_ok(),
                Err(e) => messages::error_response(Severity::Fatal, e.sqlstate(), &e.to_string(), None),
            };
            let _ = server.send(&reply).await;
            outcome
        };
        // Owning the client's end closes it when the client gives up, so the server
        // side never waits forever.
        let connect = async move { authenticate_backend(&mut client, USER, password).await };
        within_seconds(async { tokio::join!(serve, connect) }).await
    }

    fn assert_wrong_password(server: Result<(), AuthError>, client: Result<(), AuthError>) {
        let server = server.expect_err("server accepted a wrong password");
        assert!(matches!(server, AuthError::BadPassword { .. }), "{server:?}");
        assert_eq!(server.sqlstate(), "28P01");
        match client.expect_err("client thinks it logged in") {
            AuthError::Backend { code, message } => {
                assert_eq!(code, "28P01");
                assert_eq!(message, "password authentication failed for user \"alice\"");
            }
            other => panic!("expected the server's error, got {other:?}"),
        }
    }

    fn scram_for(password: &str) -> Credential {
        Credential::Scram(ScramSecret::from_password(password))
    }

    #[tokio::test]
    async fn scram_login_with_the_right_password_succeeds() {
        let (server, client) = login(&scram_for("secret"), Some("secret")).await;
        server.unwrap();
        client.unwrap();
    }

    #[tokio::test]
    async fn scram_login_with_a_wrong_password_fails_with_28p01() {
        let (server, client) = login(&scram_for("secret"), Some("Secret")).await;
        assert_wrong_password(server, client);
    }

    #[tokio::test]
    async fn scram_secret_from_a_postgres_verifier_accepts_its_password() {
        let verifier = postgres_protocol::password::scram_sha_256(b"secret");
        let cred = Credential::Scram(ScramSecret::parse(&verifier).unwrap());
        let (server, client) = login(&cred, Some("secret")).await;
        server.unwrap();
        client.unwrap();
        let (server, client) = login(&cred, Some("not the secret")).await;
        assert_wrong_password(server, client);
    }

    #[tokio::test]
    async fn md5_login_with_the_right_password_succeeds() {
        let cred = Credential::Md5 { password: "secret".to_string() };
        let (server, client) = login(&cred, Some("secret")).await;
        server.unwrap();
        client.unwrap();
    }

    #[tokio::test]
    async fn md5_login_with_a_wrong_password_fails_with_28p01() {
        let cred = Credential::Md5 { password: "secret".to_string() };
        let (server, client) = login(&cred, Some("secre")).await;
        assert_wrong_password(server, client);
    }

    #[tokio::test]
    async fn md5_stored_hash_works_as_the_configured_password_on_both_sides() {
        let hash = postgres_protocol::password::md5(b"secret", USER);
        let cred = Credential::Md5 { password: hash.clone() };
        let (server, client) = login(&cred, Some("secret")).await;
        server.unwrap();
        client.unwrap();
        let (server, client) = login(&Credential::Md5 { password: "secret".to_string() }, Some(&hash)).await;
        server.unwrap();
        client.unwrap();
        // The hash is salted with the user name: another user's hash does not fit.
        let bob = postgres_protocol::password::md5(b"secret", "bob");
        let (server, client) = login(&Credential::Md5 { password: bob }, Some("secret")).await;
        assert_wrong_password(server, client);
    }

    #[tokio::test]
    async fn trust_asks_for_nothing() {
        let (server, client) = login(&Credential::Trust, None).await;
        server.unwrap();
        client.unwrap();
    }

    #[tokio::test]
    async fn a_shard_asking_for_a_password_the_config_lacks_says_what_to_set() {
        let cred = Credential::Md5 { password: "secret".to_string() };
        let (server, client) = login(&cred, None).await;
        let client = client.unwrap_err();
        assert!(matches!(client, AuthError::MissingPassword { .. }));
        assert_eq!(client.to_string(), "shard asks for a password for user alice: set password in the shard's config");
        assert!(matches!(server.unwrap_err(), AuthError::Protocol(ProtocolError::Closed)));
    }

    #[tokio::test]
    async fn a_shard_that_cannot_prove_it_knows_the_password_is_refused() {
        let mut secret = ScramSecret::from_password("secret");
        secret.server_key = [7; 32];
        let (server, client) = login(&Credential::Scram(secret), Some("secret")).await;
        server.unwrap();
        let client = client.unwrap_err();
        assert!(matches!(client, AuthError::ShardSignature(_)), "{client:?}");
    }

    /// Reads an Authentication request of the given code; returns its data.
    async fn expect_auth_request(conn: &mut Connection<DuplexStream>, code: i32) -> Vec<u8> {
        let m = conn.read().await.unwrap();
        assert_eq!(m.tag(), b'R', "expected an Authentication request");
        let mut r = m.reader();
        assert_eq!(r.i32().unwrap(), code);
        r.remaining().to_vec()
    }

    #[tokio::test]
    async fn cleartext_request_from_a_shard_gets_the_password() {
        let (mut shard, mut router) = pair();
        let shard_side = async move {
            shard.send(&Builder::new(b'R').i32(3).finish()).await.unwrap();
            let m = shard.read().await.unwrap();
            assert_eq!(m.tag(), b'p');
            assert_eq!(m.body(), b"secret\0");
            shard.send(&messages::auth_ok()).await.unwrap();
            shard
        };
        let (_, outcome) =
            within_seconds(async { tokio::join!(shard_side, authenticate_backend(&mut router, USER, Some("secret"))) })
                .await;
        outcome.unwrap();
    }

    #[tokio::test]
    async fn a_shard_error_during_login_keeps_its_sqlstate() {
        let (mut shard, mut router) = pair();
        let msg = "database \"nope\" does not exist";
        shard.send(&messages::error_response(Severity::Fatal, "3D000", msg, None)).await.unwrap();
        let e = within_seconds(authenticate_backend(&mut router, USER, Some("secret"))).await.unwrap_err();
        assert_eq!(e.sqlstate(), "3D000");
        assert_eq!(e.to_string(), msg);
    }

    #[tokio::test]
    async fn scram_without_an_initial_response_and_with_the_y_flag_succeeds() {
        let (mut server, mut client) = pair();
        let cred = scram_for("secret");
        let serve = async move { authenticate_client(&mut server, USER, &cred).await };
        let by_hand = async move {
            let mut scram = ScramSha256::new(b"secret", ChannelBinding::unrequested());
            expect_auth_request(&mut client, 10).await;
            client.send(&Builder::new(b'p').cstr(SCRAM_SHA_256).i32(-1).finish()).await.unwrap();
            assert!(expect_auth_request(&mut client, 11).await.is_empty());
            assert!(scram.message().starts_with(b"y,,"));
            client.send(&messages::password_message(scram.message())).await.unwrap();
            scram.update(&expect_auth_request(&mut client, 11).await).unwrap();
            client.send(&messages::password_message(scram.message())).await.unwrap();
            scram.finish(&expect_auth_request(&mut client, 12).await).unwrap();
        };
        let (outcome, ()) = within_seconds(async { tokio::join!(serve, by_hand) }).await;
        outcome.unwrap();
    }

    fn sasl_initial(data: &[u8]) -> Bytes {
        Builder::new(b'p').cstr(SCRAM_SHA_256).i32(data.len() as i32).bytes(data).finish()
    }

    /// Starts a SCRAM login and answers AuthenticationSASL with `answer`; the
    /// server side's error.
    async fn server_error_after_sasl_initial(answer: Bytes) -> AuthError {
        let (mut server, mut client) = pair();
        let cred = scram_for("secret");
        let serve = async move { authenticate_client(&mut server, USER, &cred).await };
        let by_hand = async move {
            expect_auth_request(&mut client, 10).await;
            client.send(&answer).await.unwrap();
            client // kept open until the server has answered
        };
        let (outcome, _client) = within_seconds(async { tokio::join!(serve, by_hand) }).await;
        outcome.expect_err("server accepted a malformed SASLInitialResponse")
    }

    #[tokio::test]
    async fn malformed_sasl_initial_response_is_an_error_not_a_panic() {
        let cases: Vec<(&str, Bytes, &str)> = vec![
            (
                "length past the end",
                Builder::new(b'p').cstr(SCRAM_SHA_256).i32(100).bytes(b"n,,n=,r=abc").finish(),
                "08P01",
            ),
            ("negative length", Builder::new(b'p').cstr(SCRAM_SHA_256).i32(-7).finish(), "08P01"),
            ("no mechanism terminator", Builder::new(b'p').bytes(b"SCRAM").finish(), "08P01"),
            ("no length", Builder::new(b'p').cstr(SCRAM_SHA_256).finish(), "08P01"),
            ("PLUS not offered", Builder::new(b'p').cstr("SCRAM-SHA-256-PLUS").i32(3).bytes(b"n,,").finish(), "08P01"),
            ("not a password message", messages::query("select 1"), "08P01"),
            ("empty", sasl_initial(b""), "08P01"),
            ("not UTF-8", sasl_initial(&[0xff, 0xfe, b',', b',']), "08P01"),
            ("NUL inside", sasl_initial(b"n,,n=\0,r=abc"), "08P01"),
            ("channel binding", sasl_initial(b"p=tls-server-end-point,,n=,r=abc"), "08P01"),
            ("unknown flag", sasl_initial(b"x,,n=,r=abc"), "08P01"),
            ("no gs2 header", sasl_initial(b"n=,r=abc"), "08P01"),
            ("gs2 header only", sasl_initial(b"n,,"), "08P01"),
            ("no user attribute", sasl_initial(b"n,,r=abc"), "08P01"),
            ("no nonce", sasl_initial(b"n,,n=alice"), "08P01"),
            ("empty nonce", sasl_initial(b"n,,n=,r="), "08P01"),
            ("unprintable nonce", sasl_initial("n,,n=,r=ab\u{e9}".as_bytes()), "08P01"),
            ("authorization identity", sasl_initial(b"n,a=bob,n=,r=abc"), "28000"),
            ("mandatory extension", sasl_initial(b"n,,m=ext,n=,r=abc"), "28000"),
        ];
        for (case, answer, sqlstate) in cases {
            let e = server_error_after_sasl_initial(answer).await;
            assert_eq!(e.sqlstate(), sqlstate, "{case}: {e}");
        }
    }

    /// Runs a SCRAM login by hand up to the client-final-message, which `last` makes
    /// from the combined nonce; the server side's error.
    async fn server_error_after_client_final(last: impl FnOnce(&str) -> String) -> AuthError {
        let (mut server, mut client) = pair();
        let cred = scram_for("secret");
        let serve = async move { authenticate_client(&mut server, USER, &cred).await };
        let by_hand = async move {
            expect_auth_request(&mut client, 10).await;
            client.send(&sasl_initial(b"n,,n=,r=clientnonce")).await.unwrap();
            let server_first = String::from_utf8(expect_auth_request(&mut client, 11).await).unwrap();
            let nonce = server_first.strip_prefix("r=").unwrap().split(',').next().unwrap();
            assert!(nonce.starts_with("clientnonce") && nonce.len() > "clientnonce".len());
            client.send(&messages::password_message(last(nonce).as_bytes())).await.unwrap();
            client
        };
        let (outcome, _client) = within_seconds(async { tokio::join!(serve, by_hand) }).await;
        outcome.expect_err("server accepted a bad client-final-message")
    }

    #[tokio::test]
    async fn bad_client_final_messages_are_refused() {
        let proof = BASE64.encode([0u8; 32]);
        let e = server_error_after_client_final(|_| format!("c=biws,r=clientnonceXYZ,p={proof}")).await;
        assert_eq!(e.sqlstate(), "08P01", "{e}");
        let e = server_error_after_client_final(|n| format!("c=eSws,r={n},p={proof}")).await;
        assert_eq!(e.sqlstate(), "08P01", "{e}");
        let e = server_error_after_client_final(|n| format!("c=biws,r={n},p=c2hvcnQ=")).await;
        assert_eq!(e.sqlstate(), "08P01", "{e}");
        let e = server_error_after_client_final(|n| format!("c=biws,r={n}")).await;
        assert_eq!(e.sqlstate(), "08P01", "{e}");
        // Well-formed, but the proof is not from the password.
        let e = server_error_after_client_final(|n| format!("c=biws,r={n},p={proof}")).await;
        assert!(matches!(e, AuthError::BadPassword { .. }), "{e:?}");
    }

    #[test]
    fn scram_secret_from_a_password_matches_postgres_defaults() {
        let a = ScramSecret::from_password("secret");
        let b = ScramSecret::from_password("secret");
        assert_eq!(a.iterations, 4096);
        assert_eq!(a.salt.len(), 16);
        assert_ne!(a.salt, b.salt, "salts are random");
    }

    #[test]
    fn malformed_verifiers_are_errors_not_panics() {
        let good = postgres_protocol::password::scram_sha_256(b"secret");
        ScramSecret::parse(&good).unwrap();
        let (head, keys) = good.rsplit_once('$').unwrap();
        let (stored, _server) = keys.split_once(':').unwrap();
        let salt = head.split_once(':').unwrap().1;
        let cases = [
            String::new(),
            "md5a3556571e93b0d20722ba62be61e8c2d".to_string(),
            "SCRAM-SHA-256$".to_string(),
            good.replace("SCRAM-SHA-256$4096", "SCRAM-SHA-256$0"),
            good.replace("SCRAM-SHA-256$4096", "SCRAM-SHA-256$many"),
            good.replace(':', ";"),
            format!("{head}${stored}"),
            format!("{head}${stored}:c2hvcnQ="),
            format!("{head}$!!!:{stored}"),
            format!("SCRAM-SHA-256$4096:${stored}:{stored}"),
            format!("SCRAM-SHA-256$4096:{salt}"),
        ];
        for verifier in cases {
            let e = ScramSecret::parse(&verifier).expect_err(&verifier);
            assert!(!e.to_string().contains(stored), "error repeats the verifier: {e}");
        }
    }

    #[test]
    fn debug_output_shows_no_secrets() {
        let md5 = format!("{:?}", Credential::Md5 { password: "hunter2".to_string() });
        assert!(!md5.contains("hunter2"), "{md5}");
        let scram = format!("{:?}", scram_for("hunter2"));
        assert!(scram.contains("iterations: 4096") && !scram.contains("key"), "{scram}");
    }

    /// A client logs in to the router against `router_side`; the router then
    /// logs in to a shard that checks `shard_side`, with what the client's login
    /// proved. The router's result against the shard.
    async fn pass_through(
        client_password: &str,
        router_side: Credential,
        shard_side: Credential,
    ) -> Result<(), AuthError> {
        let (mut server, mut client) = pair();
        let serve = async move {
            let proved = authenticate_client_proving(&mut server, USER, &router_side).await;
            let _ = server.send(&messages::auth_ok()).await;
            proved
        };
        let password = client_password.to_string();
        let connect = async move { authenticate_backend(&mut client, USER, Some(&password)).await };
        let (proved, logged_in) = within_seconds(async { tokio::join!(serve, connect) }).await;
        logged_in.expect("client login");
        let proved = proved.expect("router side").expect("something proved");
        // The router, now a client of the shard.
        let (mut shard, mut router) = pair();
        let shard_checks = async move {
            let outcome = authenticate_client(&mut shard, USER, &shard_side).await;
            let reply = match &outcome {
                Ok(()) => messages::auth_ok(),
                Err(e) => messages::error_response(Severity::Fatal, e.sqlstate(), &e.to_string(), None),
            };
            let _ = shard.send(&reply).await;
        };
        let router_logs_in = async move { authenticate_backend_as(&mut router, USER, None, Some(&proved)).await };
        within_seconds(async { tokio::join!(shard_checks, router_logs_in) }).await.1
    }

    #[tokio::test]
    async fn a_scram_login_passes_through_to_a_shard_with_the_same_verifier_only() {
        let verifier = ScramSecret::from_password("hunter2");
        let same = pass_through("hunter2", Credential::Scram(verifier.clone()), Credential::Scram(verifier)).await;
        same.expect("the same verifier on the shard takes the client's keys");
        // The same password under another salt: the keys differ, and the router
        // says why instead of sending a proof the shard would refuse.
        let other = pass_through("hunter2", scram_for("hunter2"), scram_for("hunter2")).await.unwrap_err();
        assert!(matches!(other, AuthError::PassThrough { .. }), "{other:?}");
        assert!(other.to_string().contains("ALTER ROLE"), "{other}");
        assert_eq!(other.sqlstate(), "28000");
        // An md5 shard cannot be answered with SCRAM keys.
        let md5 = Credential::Md5 { password: "hunter2".into() };
        let e = pass_through("hunter2", scram_for("hunter2"), md5).await.unwrap_err();
        assert!(e.to_string().contains("md5"), "{e}");
    }

    #[tokio::test]
    async fn an_md5_login_passes_through_with_the_stored_hash() {
        let stored = md5_stored(USER, "hunter2");
        let router_side = Credential::Md5 { password: stored.clone() };
        let shard_side = Credential::Md5 { password: stored };
        pass_through("hunter2", router_side, shard_side).await.expect("md5 pass-through");
    }

    #[test]
    fn pass_through_debug_shows_no_secret() {
        let keys = PassThrough::Scram { client_key: [7; 32], secret: ScramSecret::from_password("hunter2") };
        let shown = format!(
            "{keys:?} {:?} {:?}",
            PassThrough::Md5(md5_stored(USER, "x")),
            PassThrough::Password("hunter2".into())
        );
        assert!(!shown.contains("hunter2") && !shown.contains("md5") && !shown.contains('7'), "{shown}");
    }
}

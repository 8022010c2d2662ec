//! The accept loop: startup, authentication, connection limit and shutdown. Each
//! accepted client becomes a [`Session`] on its own task, on one of the session
//! threads ([`SessionThreads`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rand::Rng;
use shardgate_directory::DirectoryHandle;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::auth::{self, Credential};
use crate::backend::ShardAddress;
use crate::config::RouterConfig;
use crate::context::RouterContext;
use crate::pool::ShardPool;
use crate::protocol::messages::{self, Severity, Startup};
use crate::protocol::{Connection, ProtocolError};
use crate::session::Session;
use crate::tls::{ClientTls, Stream};

/// A running router. Dropping the handle does not stop it; call [`shutdown`].
///
/// [`shutdown`]: RouterHandle::shutdown
pub struct RouterHandle {
    pub local_addr: SocketAddr,
    pub context: Arc<RouterContext>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl RouterHandle {
    /// Stops accepting clients and waits for the accept loop to end. Sessions in
    /// progress end when their clients disconnect or the process exits.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Errors starting a router.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "cannot listen on {addr}: {source}; is another process using the port? choose another with --port or listen"
    )]
    Listen { addr: String, source: std::io::Error },
    #[error("{0}")]
    Config(String),
}

/// Starts a router: binds the listener, builds the pools, loads the table catalog
/// (if a shard answers; otherwise later), and serves clients on a new task.
pub async fn start(
    config: RouterConfig,
    directory: DirectoryHandle,
    shard_addresses: Vec<ShardAddress>,
) -> Result<RouterHandle, StartError> {
    start_with(config, directory, shard_addresses, None).await
}

/// Starts a router that reads its directory from a local replica and refuses
/// writes when the replica's lease has run out.
pub async fn start_replicated(
    config: RouterConfig,
    node: shardgate_directory::replica::Node,
    lease: std::time::Duration,
    shard_addresses: Vec<ShardAddress>,
) -> Result<RouterHandle, StartError> {
    let handle = node.directory();
    start_with(config, handle, shard_addresses, Some((node.clone(), lease))).await
}

/// Tells the directory, once a second, that this router serves and which epoch it
/// has applied (what `SHOW ROUTERS` and `shardgate status` list), and forgets
/// routers silent for 30 s.
async fn heartbeat(ctx: Arc<RouterContext>, address: SocketAddr, mut stopped: watch::Receiver<bool>) {
    use shardgate_directory::clock::now_ms;
    use shardgate_directory::state::Command;
    let id = ctx.router_id.clone();
    let mut ticker = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut beats = 0u64;
    let started_ms = now_ms();
    loop {
        tokio::select! {
            _ = stopped.changed() => return,
            _ = ticker.tick() => {}
        }
        let now = now_ms();
        let applied_epoch = ctx.directory.load().epoch;
        let beat = Command::Heartbeat {
            router: id.clone(),
            address: address.to_string(),
            applied_epoch,
            at_ms: now,
            started_ms,
            shadow: ctx.shadow.reports(&ctx.directory.load()),
            held: ctx.held.reports(&ctx.directory.load()),
            // The load summary every fifth beat: enough for planning, little log.
            load: beats.is_multiple_of(5).then(|| ctx.load.report()),
        };
        // A lost heartbeat is harmless: the next one follows in a second.
        let _ = ctx.writer.propose(beat).await;
        beats += 1;
        let leader = ctx.replica.as_ref().is_none_or(|(node, _)| node.status().is_leader);
        if beats.is_multiple_of(10) && leader {
            let expire = Command::ExpireRouters { before_ms: now.saturating_sub(30_000) };
            let _ = ctx.writer.propose(expire).await;
        }
    }
}

async fn start_with(
    mut config: RouterConfig,
    directory: DirectoryHandle,
    shard_addresses: Vec<ShardAddress>,
    replica: Option<(shardgate_directory::replica::Node, std::time::Duration)>,
) -> Result<RouterHandle, StartError> {
    config.threads = crate::reload::session_threads(config.threads);
    let dir = directory.load();
    if shard_addresses.len() > dir.shards.len() {
        return Err(StartError::Config("more shard addresses than shards in the directory".into()));
    }
    let pools = dir
        .shards
        .iter()
        .zip(shard_addresses)
        .map(|(s, addr)| ShardPool::new(s.name.clone(), addr, &config.pool, &config.tcp_keepalive, config.threads))
        .collect::<Vec<_>>();
    let client_tls = config.client_tls().map_err(|e| StartError::Config(e.to_string()))?;
    let mut users = HashMap::new();
    for u in &config.users {
        users.insert(u.name.clone(), u.credential().map_err(StartError::Config)?);
    }
    let listener = TcpListener::bind(&config.listen)
        .await
        .map_err(|source| StartError::Listen { addr: config.listen.clone(), source })?;
    let local_addr =
        listener.local_addr().map_err(|source| StartError::Listen { addr: config.listen.clone(), source })?;
    let credentials = dir
        .shards
        .iter()
        .zip(pools.iter())
        .map(|(s, p): (_, &Arc<ShardPool>)| (s.name.clone(), p.address.clone()))
        .collect();
    let ctx = RouterContext::new(config, directory, pools, users, credentials, replica);
    ctx.client_tls.store(Arc::new(client_tls));
    let ctx = Arc::new(ctx);
    if let Err(e) = ctx.refresh_catalog().await {
        warn!(error = %e, "could not load the table catalog yet; every table counts as a reference table until a shard answers");
    }
    load_server_params(&ctx).await;
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(heartbeat(ctx.clone(), local_addr, stop.subscribe()));
    tokio::spawn(crate::hold::acknowledge_holds(
        ctx.router_id.clone(),
        ctx.directory.clone(),
        ctx.in_flight.clone(),
        ctx.writer.clone(),
        {
            let ctx = ctx.clone();
            Arc::new(move |move_id, token| ctx.held.saw(move_id, token))
        },
        stop.subscribe(),
    ));
    tokio::spawn(crate::shadow::follow_directory(ctx.clone(), stop.subscribe()));
    tokio::spawn(crate::idle::janitor(ctx.clone(), stop.subscribe()));
    tokio::spawn(crate::health::watch_shards(ctx.clone(), stop.subscribe()));
    tokio::spawn(crate::twophase::recover::sweep_forever(ctx.clone(), stop.subscribe()));
    let n_threads = ctx.config.load().threads;
    let threads = SessionThreads::start(n_threads)
        .map_err(|e| StartError::Config(format!("cannot start the session threads: {e}")))?;
    let task = tokio::spawn(accept_loop(listener, ctx.clone(), threads, stopped));
    info!(%local_addr, threads = n_threads, "router listening");
    Ok(RouterHandle { local_addr, context: ctx, stop, task })
}

async fn load_server_params(ctx: &RouterContext) {
    let dir = ctx.directory.load();
    let Some(&first) = dir.reference_shards().first() else {
        return;
    };
    let Some(pool) = ctx.pool(first) else { return };
    if let Ok(conn) = pool.get().await {
        let keep = [
            "server_version",
            "server_encoding",
            "client_encoding",
            "DateStyle",
            "IntervalStyle",
            "integer_datetimes",
            "standard_conforming_strings",
            "TimeZone",
        ];
        let params = conn.params.iter().filter(|(k, _)| keep.contains(&k.as_str())).cloned().collect();
        *ctx.server_params.lock().unwrap_or_else(|p| p.into_inner()) = params;
    }
}

/// The threads that serve client sessions. Each runs an event loop of its own
/// (a current-thread runtime), and a session stays on the thread it was given:
/// a client's request, the server's reply and the answer back are handled by
/// one thread, with no hand-over between threads on the way (which costs more
/// than the routing itself when a client waits for each answer). New clients go
/// to the thread with the fewest sessions.
struct SessionThreads {
    threads: Vec<SessionThread>,
}

struct SessionThread {
    send: tokio::sync::mpsc::UnboundedSender<(std::net::TcpStream, SocketAddr, Arc<RouterContext>)>,
    sessions: Arc<std::sync::atomic::AtomicUsize>,
}

impl SessionThreads {
    fn start(n: usize) -> std::io::Result<SessionThreads> {
        let mut threads = Vec::with_capacity(n);
        for i in 1..=n.max(1) {
            // I/O only. No timer wheel, which the loop would look at every time
            // it sleeps and wakes: the few timeouts sessions need are armed
            // elsewhere (crate::timer). No process driver either, which would
            // look for exited children at every turn: it is not built at all
            // (see the tokio features in Cargo.toml).
            let rt = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
            let (send, mut recv) =
                tokio::sync::mpsc::unbounded_channel::<(std::net::TcpStream, SocketAddr, Arc<RouterContext>)>();
            let sessions = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let count = sessions.clone();
            std::thread::Builder::new().name(format!("shardgate-session-{i}")).spawn(move || {
                crate::pool::set_thread_list(i);
                crate::timer::mark_no_wheel();
                rt.block_on(async move {
                    let mut running = tokio::task::JoinSet::new();
                    loop {
                        tokio::select! {
                            next = recv.recv() => {
                                let Some((stream, peer, ctx)) = next else { break };
                                let counted = Counted(count.clone());
                                running.spawn(async move {
                                    let _counted = counted;
                                    let result = match TcpStream::from_std(stream) {
                                        Ok(stream) => handle_client(stream, ctx).await,
                                        Err(e) => Err(ProtocolError::Io(e)),
                                    };
                                    if let Err(e) = result {
                                        debug!(%peer, error = %e, "client connection ended");
                                    }
                                });
                            }
                            Some(_) = running.join_next(), if !running.is_empty() => {}
                        }
                    }
                    // The router stopped accepting: sessions in progress run to their end.
                    while running.join_next().await.is_some() {}
                });
            })?;
            threads.push(SessionThread { send, sessions });
        }
        Ok(SessionThreads { threads })
    }

    /// Hands a client to the thread with the fewest sessions.
    fn serve(&self, stream: TcpStream, peer: SocketAddr, ctx: Arc<RouterContext>) {
        let Some(t) = self.threads.iter().min_by_key(|t| t.sessions.load(Ordering::Relaxed)) else { return };
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                warn!(%peer, error = %e, "cannot hand the client to a session thread");
                return;
            }
        };
        t.sessions.fetch_add(1, Ordering::Relaxed);
        if t.send.send((stream, peer, ctx)).is_err() {
            t.sessions.fetch_sub(1, Ordering::Relaxed);
            warn!(%peer, "a session thread has stopped; client refused");
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<RouterContext>,
    threads: SessionThreads,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stopped.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    stream.set_nodelay(true).ok();
                    threads.serve(stream, peer, ctx.clone());
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// One session of a session thread's count, given back on drop (a panic too).
struct Counted(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a client in, and out again on drop.
struct ClientSlot(Arc<RouterContext>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a connection among those logging in, and out again on drop.
struct PendingLogin(Arc<RouterContext>);

impl Drop for PendingLogin {
    fn drop(&mut self) {
        self.0.logins.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client that has logged in.
struct LoggedIn {
    params: Vec<(String, String)>,
    cancel_key: (i32, i32),
    /// Its place among `max_client_connections`.
    slot: ClientSlot,
    /// Its role's pools, when clients run on the shards as their roles.
    role: Option<Arc<crate::roles::RolePools>>,
}

async fn handle_client(stream: TcpStream, ctx: Arc<RouterContext>) -> Result<(), ProtocolError> {
    // The configuration in force as this client arrives (a reload may change it).
    let (max_message_bytes, max_pending_logins, login_timeout) = {
        let config = ctx.config.load();
        if let Err(e) = config.tcp_keepalive.apply(&stream) {
            debug!(error = %e, "could not turn on TCP keepalives for a client");
        }
        (config.max_message_bytes, config.max_pending_logins, config.client_login_timeout)
    };
    let mut conn = Connection::accepting(Stream::Plain(stream), max_message_bytes);
    let pending = PendingLogin(ctx.clone());
    if ctx.logins.fetch_add(1, Ordering::Relaxed) >= max_pending_logins {
        let msg = "sorry, too many connections are logging in at once";
        let hint = "retry in a moment; raise max_pending_logins if clients connect in bursts";
        let e = crate::error::SqlError::new("53300", msg.into()).hint(hint);
        // Read what the client sent first, briefly: a socket closed with unread
        // data is reset, and the reset can reach the client before the refusal.
        let _ = crate::timer::timeout(std::time::Duration::from_millis(250), conn.read()).await;
        conn.send(&e.to_message(Severity::Fatal)).await?;
        return Ok(());
    }
    // Each phase's state machine in a box of its own, freed when the phase
    // ends: the task of an idle client then holds only the session's (a
    // client's task is as large as its largest phase, and logging in is the
    // largest: docs/benchmarks.md, "Many clients").
    let logging_in = Box::pin(log_in(&mut conn, &ctx));
    let logged_in = match crate::timer::timeout(login_timeout, logging_in).await {
        Ok(r) => r?,
        Err(_) => {
            debug!("a client did not log in within client_login_timeout");
            let msg = "canceling authentication due to timeout";
            let _ = conn.send(&messages::error_response(Severity::Fatal, "57014", msg, None)).await;
            return Ok(());
        }
    };
    drop(pending);
    let Some(LoggedIn { params, cancel_key, slot, role }) = logged_in else {
        return Ok(());
    };
    let database = params.iter().find(|(k, _)| k == "database").map(|(_, v)| v.as_str()).unwrap_or("");
    if database == crate::console::DATABASE {
        let result = Box::pin(crate::console::serve(&ctx, &mut conn)).await;
        drop(slot);
        return result;
    }
    let user = params.iter().find(|(k, _)| k == "user").map_or("", |(_, v)| v.as_str());
    let pool_mode = ctx.config.load().pool_mode_of(user);
    let session = Session::new(ctx.clone(), conn, cancel_key)
        .with_startup_settings(&params)
        .with_role(role)
        .with_pool_mode(pool_mode);
    let result = Box::pin(session.run()).await;
    drop(slot);
    result.map_err(|e| match e {
        crate::session::SessionError::Protocol(p) => p,
    })
}

/// The startup packet, authentication and the greeting, up to the first
/// ReadyForQuery. None when the client was turned away (it has been told why)
/// or only came to cancel a statement.
async fn log_in(conn: &mut Connection<Stream>, ctx: &Arc<RouterContext>) -> Result<Option<LoggedIn>, ProtocolError> {
    // Startup: TLS as `ssl_mode` says; GSSAPI encryption is declined, and the
    // client goes on in the clear or gives up, as its gssencmode says.
    let params = loop {
        let m = conn.read().await?;
        match Startup::parse(&m)? {
            Startup::Ssl => {
                let tls = ctx.client_tls.load_full();
                if !answer_ssl_request(conn, &tls).await? {
                    return Ok(None);
                }
            }
            Startup::GssEnc => conn.send(b"N").await?,
            Startup::Cancel { pid, key } => {
                forward_cancel(ctx, pid, key).await;
                return Ok(None);
            }
            Startup::Unsupported(v) => {
                let msg = format!("unsupported frontend protocol {}.{}: server supports 3.0", v >> 16, v & 0xffff);
                conn.send(&messages::error_response(Severity::Fatal, "0A000", &msg, None)).await?;
                return Ok(None);
            }
            Startup::Params(p) => break p,
        }
    };
    conn.end_startup_phase();
    let refuses_plain = ctx.client_tls.load().refuses_plain();
    if refuses_plain && !conn.get_ref().is_tls() {
        let msg = "connection without TLS refused: this router has ssl_mode = require";
        let hint = "connect with sslmode=require (or verify-ca, verify-full)";
        conn.send(&messages::error_response(Severity::Fatal, "28000", msg, Some(hint))).await?;
        return Ok(None);
    }
    let slot = ClientSlot(ctx.clone());
    let max_clients = ctx.config.load().max_client_connections;
    if ctx.clients.fetch_add(1, Ordering::Relaxed) >= max_clients {
        conn.send(&messages::error_response(Severity::Fatal, "53300", "sorry, too many clients already", None)).await?;
        return Ok(None);
    }
    let user = params.iter().find(|(k, _)| k == "user").map(|(_, v)| v.clone()).unwrap_or_default();
    if user.is_empty() {
        conn.send(&messages::error_response(
            Severity::Fatal,
            "28000",
            "no PostgreSQL user name specified in startup packet",
            None,
        ))
        .await?;
        return Ok(None);
    }
    let Some(credential) = credential_of(conn, ctx, &user).await? else {
        return Ok(None);
    };
    let proved = match auth::authenticate_client_proving(conn, &user, &credential).await {
        Ok(p) => p,
        Err(e) => {
            // The password may have changed since it was looked up.
            ctx.roles.forget(&user);
            let msg = match e.sqlstate() {
                "28P01" => format!("password authentication failed for user \"{user}\""),
                _ => e.to_string(),
            };
            let _ = conn.send(&messages::error_response(Severity::Fatal, e.sqlstate(), &msg, None)).await;
            return Ok(None);
        }
    };
    let database = params.iter().find(|(k, _)| k == "database").map_or(user.as_str(), |(_, v)| v.as_str());
    if let Some(refusal) = database_refusal(ctx, &user, database) {
        conn.send(&refusal.to_message(Severity::Fatal)).await?;
        return Ok(None);
    }
    let role = role_of(ctx, &user, proved);
    conn.queue(&messages::auth_ok());
    let server_params = ctx.server_params.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for (k, v) in &server_params {
        conn.queue(&messages::parameter_status(k, v));
    }
    if !server_params.iter().any(|(k, _)| k == "server_version") {
        conn.queue(&messages::parameter_status("server_version", "15.0 (shardgate)"));
        conn.queue(&messages::parameter_status("client_encoding", "UTF8"));
        conn.queue(&messages::parameter_status("standard_conforming_strings", "on"));
        conn.queue(&messages::parameter_status("integer_datetimes", "on"));
        conn.queue(&messages::parameter_status("DateStyle", "ISO, MDY"));
    }
    if let Some(app) = params.iter().find(|(k, _)| k == "application_name") {
        conn.queue(&messages::parameter_status("application_name", &app.1));
    }
    let (pid, secret): (i32, i32) = {
        let mut rng = rand::thread_rng();
        (rng.gen_range(1..i32::MAX), rng.gen())
    };
    // Registered before the client learns the key.
    ctx.cancel_slot((pid, secret));
    conn.queue(&messages::backend_key_data(pid, secret));
    conn.queue(&messages::ready_for_query(b'I'));
    conn.flush().await?;
    Ok(Some(LoggedIn { params, cancel_key: (pid, secret), slot, role }))
}

/// How `user` proves who it is: its `[[users]]` entry; else, with
/// `[router.auth]`, its stored password on the shards; else trust when the
/// router has no users at all. A user without one goes through a SCRAM
/// exchange that cannot succeed, as Postgres does, so that the answer does not
/// tell which users exist. None when the client was turned away.
async fn credential_of(
    conn: &mut Connection<Stream>,
    ctx: &RouterContext,
    user: &str,
) -> Result<Option<Credential>, ProtocolError> {
    let (listed, no_users) = {
        let users = ctx.users.load();
        (users.get(user).cloned(), users.is_empty())
    };
    if listed.is_some() {
        return Ok(listed);
    }
    let found = if ctx.roles.pass_through() {
        let dir = ctx.directory.load();
        let first = dir.reference_shards().first().copied().unwrap_or(0);
        let name = dir.shards.get(first).map(|s| s.name.clone()).unwrap_or_default();
        let Some(address) = ctx.shard_address(&dir, first) else {
            let msg = "the router has no shard to look logins up on";
            conn.send(&messages::error_response(Severity::Fatal, "08006", msg, None)).await?;
            return Ok(None);
        };
        match ctx.roles.credential(user, &name, address).await {
            Ok(c) => c,
            Err(e) => {
                // The details stay in the router's log: a client that has not
                // logged in learns nothing of the router's configuration.
                warn!(error = %e, "a login could not be looked up; check that the shard is up and that [router.auth] user may run [router.auth] query");
                let msg = "the router could not look the login up on its shards; its log says why";
                let e = crate::error::SqlError::new("08006", msg.into()).hint("try again in a moment");
                conn.send(&e.to_message(Severity::Fatal)).await?;
                return Ok(None);
            }
        }
    } else if no_users {
        Some(Credential::Trust)
    } else {
        None
    };
    Ok(Some(found.unwrap_or_else(|| {
        let unguessable: [u8; 32] = rand::random();
        Credential::Scram(auth::ScramSecret::from_password(&base64_of(&unguessable)))
    })))
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Why a logged-in client may not use `database`: it is not the shards'
/// database (or an alias), or it is the admin console and `user` is not an
/// admin.
fn database_refusal(ctx: &RouterContext, user: &str, database: &str) -> Option<crate::error::SqlError> {
    if database == crate::console::DATABASE {
        return (!ctx.is_admin(user)).then(|| {
            crate::error::SqlError::new(
                "42501",
                format!("permission denied for the admin console (database \"{}\")", crate::console::DATABASE),
            )
            .hint(format!("add \"{user}\" to [router] admins to let it in"))
        });
    }
    if ctx.databases.iter().any(|d| d == database) {
        return None;
    }
    let known = ctx.databases.join("\", \"");
    Some(
        crate::error::SqlError::new("3D000", format!("database \"{database}\" does not exist"))
            .hint(format!("this router serves database \"{known}\"; add others to [router] database_aliases")),
    )
}

/// The pools a client's statements use: its own role's when clients run as
/// their roles, except for the shard URL's user (the router's own pools).
fn role_of(ctx: &RouterContext, user: &str, proved: Option<auth::PassThrough>) -> Option<Arc<crate::roles::RolePools>> {
    if !ctx.roles.pass_through() {
        return None;
    }
    let dir = ctx.directory.load();
    let own = dir.reference_shards().first().and_then(|&s| ctx.shard_address(&dir, s)).map(|a| a.user);
    if own.as_deref() == Some(user) {
        return None;
    }
    // A static user's password configured in plain answers any method.
    let plain = ctx
        .config
        .load()
        .users
        .iter()
        .find(|u| u.name == user)
        .and_then(|u| u.password.clone())
        .filter(|p| auth::is_plain_password(p));
    Some(ctx.roles.pools_for(user, plain.map(auth::PassThrough::Password).or(proved)))
}

/// A client's SSLRequest: `S` and the TLS handshake when the router has a
/// certificate, `N` otherwise. False when the client was turned away.
async fn answer_ssl_request(conn: &mut Connection<Stream>, tls: &ClientTls) -> Result<bool, ProtocolError> {
    let Some(acceptor) = tls.acceptor().filter(|_| !conn.get_ref().is_tls()) else {
        conn.send(b"N").await?;
        return Ok(true);
    };
    // Bytes sent behind the SSLRequest, before the handshake, would pass for
    // bytes sent under TLS (CVE-2021-23214); Postgres refuses them too.
    if conn.has_buffered() {
        let msg = "received unencrypted data after SSL request";
        conn.send(&messages::error_response(Severity::Fatal, "08P01", msg, None)).await?;
        return Ok(false);
    }
    conn.send(b"S").await?;
    let acceptor = acceptor.clone();
    conn.get_mut().upgrade(|tcp| async move { acceptor.accept(tcp).await.map(Into::into) }).await?;
    Ok(true)
}

/// A client's CancelRequest: sent on to the server running its statement.
async fn forward_cancel(ctx: &RouterContext, pid: i32, key: i32) {
    let Some(target) = ctx.cancel_target((pid, key)) else {
        return;
    };
    let address = &target.pool.address;
    match TcpStream::connect((address.host.as_str(), address.port)).await {
        Ok(stream) => {
            let mut c = Connection::connecting(stream, 1024);
            let _ = c.send(&messages::cancel_request(target.pid, target.secret)).await;
        }
        Err(e) => warn!(error = %e, "could not forward a cancel request"),
    }
}

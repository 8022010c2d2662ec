//! Throwaway servers for tests.

use std::ops::{Deref, DerefMut};

use crate::os_user::ServerUser;
use crate::scratch::{self, ScratchDir};
use crate::{find_bindir, free_port, template, Durability, Error, Server};

/// A throwaway PostgreSQL server for one test: a copy of the template data directory
/// (see the `template` module) with a port of its own, `fsync` off, running.
///
/// Dropping it stops the server (immediate shutdown) and deletes its directory. If the
/// test process dies without dropping it, the next `TestServer` made on this machine
/// by the same OS user stops and deletes it (see the `scratch` module).
///
/// It dereferences to its [`Server`], so `test_server.url("app")` and
/// `test_server.connect("app").await` work directly.
#[derive(Debug)]
pub struct TestServer {
    server: Server,
    /// Only its `Drop` matters: declared last, it goes after `server`, stopping the
    /// postmaster and deleting the directory.
    _scratch: ScratchDir,
}

impl TestServer {
    /// Starts a new test server, without blocking the async runtime (the copy and
    /// `pg_ctl` run on its blocking thread pool).
    pub async fn start() -> Result<TestServer, Error> {
        tokio::task::spawn_blocking(TestServer::start_blocking).await.map_err(|err| Error::Task(err.to_string()))?
    }

    /// Starts a new test server on the calling thread.
    pub fn start_blocking() -> Result<TestServer, Error> {
        let bindir = find_bindir()?;
        let user = ServerUser::current()?;
        let base = scratch::base_dir()?;
        scratch::sweep(&base, &bindir, &user);
        let template = template::template(&base, &bindir, &user)?;

        // From here on, `dir` deletes whatever we made if a step fails.
        let dir = ScratchDir::create(&base, "srv", &bindir, &user)?;
        let data_dir = dir.data_dir();
        template::copy(&template, &data_dir)?;
        let mut server = Server::prepare(bindir, user, data_dir, Some(free_port()?), Durability::Throwaway)?;
        server.start()?;
        tracing::debug!(dir = %dir.path().display(), port = server.port(), "test server started");
        Ok(TestServer { server, _scratch: dir })
    }

    /// The server.
    pub fn server(&self) -> &Server {
        &self.server
    }
}

impl Deref for TestServer {
    type Target = Server;

    fn deref(&self) -> &Server {
        &self.server
    }
}

impl DerefMut for TestServer {
    /// Lets a test stop and restart its server (to see what clients do meanwhile).
    fn deref_mut(&mut self) -> &mut Server {
        &mut self.server
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpStream;
    use std::time::Duration;

    use super::*;

    fn accepts_connections(port: u16) -> bool {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
    }

    #[tokio::test]
    async fn servers_left_by_dead_test_processes_are_stopped_and_deleted() {
        let server = TestServer::start().await.expect("start test server");
        let port = server.port();
        assert!(accepts_connections(port));

        // Pretend its test process was killed: a dead pid owns the directory now,
        // and no destructor runs.
        let mut exited = std::process::Command::new("true").spawn().expect("spawn true");
        let dead_pid = exited.id();
        exited.wait().expect("wait for true");
        let scratch = server.data_dir().parent().expect("data dirs have a parent").to_path_buf();
        let base = scratch.parent().expect("scratch dirs have a parent");
        let left_behind = base.join(format!("srv-{dead_pid}-0-0"));
        std::fs::rename(&scratch, &left_behind).expect("rename scratch dir");
        std::mem::forget(server);

        let next = TestServer::start().await.expect("start another test server");

        assert!(!left_behind.exists(), "{} still exists", left_behind.display());
        assert!(!accepts_connections(port), "port {port} still accepts connections");
        drop(next);
    }
}

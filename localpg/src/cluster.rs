//! Several test servers at once: the shards of an end-to-end test.

use crate::{Error, TestServer};

/// N test servers started in parallel, each with database [`TestCluster::DATABASE`]
/// created: the shards an end-to-end test routes to. Dropping it stops and deletes
/// them all.
#[derive(Debug)]
pub struct TestCluster {
    servers: Vec<TestServer>,
}

impl TestCluster {
    /// The database created on every server.
    pub const DATABASE: &'static str = "app";

    /// Starts `n` test servers and creates [`TestCluster::DATABASE`] on each. If any
    /// fails, the ones that started are stopped and deleted again.
    pub async fn start(n: usize) -> Result<TestCluster, Error> {
        let starting: Vec<_> = (0..n).map(|_| tokio::task::spawn_blocking(TestServer::start_blocking)).collect();
        // Wait for every start, even after a failure, so that none is left running.
        let mut servers = Vec::with_capacity(n);
        let mut first_error = None;
        for handle in starting {
            let result = handle.await.map_err(|err| Error::Task(err.to_string())).and_then(|started| started);
            match result {
                Ok(server) => servers.push(server),
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        if let Some(err) = first_error {
            return Err(err);
        }
        for server in &servers {
            server.create_database(TestCluster::DATABASE).await?;
        }
        Ok(TestCluster { servers })
    }

    /// The servers, in a fixed order.
    pub fn servers(&self) -> &[TestServer] {
        &self.servers
    }

    /// The servers, to change their settings (TLS, say) before a test starts.
    pub fn servers_mut(&mut self) -> &mut [TestServer] {
        &mut self.servers
    }

    /// The connection string of [`TestCluster::DATABASE`] on each server, in order.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(|server| server.url(TestCluster::DATABASE)).collect()
    }
}

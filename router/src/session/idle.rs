//! A client quiet past its idle timeout (`client_idle_timeout` outside a
//! transaction, `idle_transaction_timeout` inside one; see [`crate::idle`]):
//! its transaction is rolled back, the server connections it held go back to
//! their pools clean, and the client is told why before it is disconnected.

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::info;

use super::{Session, SessionError};
use crate::error::SqlError;
use crate::idle::IdleTimeout;
use crate::protocol::messages::Severity;

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Ends the session for an idle timeout.
    pub(super) async fn end_idle(&mut self, why: IdleTimeout) -> Result<(), SessionError> {
        let e = match why {
            IdleTimeout::Transaction => SqlError::new(
                "25P03",
                "terminating connection due to idle-in-transaction timeout".into(),
            )
            .hint(format!(
                "the transaction was rolled back: it stayed open and idle for longer than idle_transaction_timeout ({:?}); end transactions promptly",
                self.ctx.config.load().idle_transaction_timeout
            )),
            IdleTimeout::Session => {
                SqlError::new("57P05", "terminating connection due to idle-session timeout".into()).hint(format!(
                    "the connection was idle for longer than client_idle_timeout ({:?}); connect again",
                    self.ctx.config.load().client_idle_timeout
                ))
            }
        };
        info!(code = e.code, "disconnecting an idle client");
        crate::metrics::global().error(e.code);
        // Roll back what the client left open, so the server connections can
        // serve others at once; one that does not answer cleanly is closed.
        let mut held: Vec<_> = self.txn.held.take().into_iter().collect();
        held.append(&mut self.txn.parked);
        held.extend(self.multi.take().map(|all| all.held).unwrap_or_default());
        let mid_pipeline = self.txn.open_batch;
        self.clear_cancel();
        for mut h in held {
            if mid_pipeline || h.conn.simple_query("ROLLBACK").await.is_err() {
                h.conn.broken = true;
            }
        }
        self.txn = Default::default();
        let _ = self.client.send(&e.to_message(Severity::Fatal)).await;
        Ok(())
    }
}

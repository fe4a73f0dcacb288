//! Graceful draining of client connections that outlives any one listener.
//!
//! hyper-util's [`GracefulShutdown`] is consumed by `shutdown`, while listeners come and go
//! with config changes and connection tasks may still be registering when the node stops. This
//! wrapper lets any task register a connection while the node runs, and lets the node take the
//! tracker out exactly once at shutdown; connections that arrive after that (there should be
//! none: listeners are closed first) are simply served without being waited for.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use hyper_util::server::graceful::{GracefulConnection, GracefulShutdown};

/// Tracks client connections so a stop can wait for them.
#[derive(Debug, Default)]
pub struct Drainer(Mutex<Option<GracefulShutdown>>);

impl Drainer {
    /// A tracker with no connection yet.
    pub fn new() -> Self {
        Drainer(Mutex::new(Some(GracefulShutdown::new())))
    }

    /// Registers `conn`: when draining starts it is asked to finish its in-flight requests and
    /// close.
    pub fn watch<C>(&self, conn: C) -> Pin<Box<dyn Future<Output = C::Output> + Send>>
    where
        C: GracefulConnection + Send + 'static,
        C::Output: Send,
    {
        let guard = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match guard.as_ref() {
            Some(graceful) => Box::pin(graceful.watch(conn)),
            None => Box::pin(conn),
        }
    }

    /// Connections registered and still open.
    pub fn count(&self) -> usize {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).as_ref().map_or(0, GracefulShutdown::count)
    }

    /// Asks every registered connection to finish and waits up to `deadline`; true when all
    /// closed in time.
    pub async fn drain(&self, deadline: Duration) -> bool {
        let taken = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        match taken {
            Some(graceful) => tokio::time::timeout(deadline, graceful.shutdown()).await.is_ok(),
            None => true,
        }
    }
}

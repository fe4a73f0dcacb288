//! Graceful draining of client connections that outlives any one listener.
//!
//! hyper-util's [`GracefulShutdown`] is consumed by `shutdown`, while listeners come and go
//! with config changes and connection tasks may still be registering when the node stops. This
//! wrapper lets any task register a connection while the node runs, and lets the node take the
//! tracker out exactly once at shutdown; connections that arrive after that (there should be
//! none: listeners are closed first) are simply served without being waited for.
//!
//! HTTP/2 sessions are registered as hyper connections and get GOAWAY. Plain-HTTP connections
//! spend their idle time *parked* (see `proxy::conn`), in their listener's parking lot
//! (`proxy::lot`), with no task to ask. Each HTTP/1 serve task and
//! each lot holds a [`Watcher`] so the drain waits for them, and a receiver of the
//! [`Drainer::draining`] signal: the lot closes every parked connection as soon as draining
//! starts.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use hyper_util::server::graceful::{GracefulConnection, GracefulShutdown, Watcher};
use tokio::sync::watch;

/// Tracks client connections so a stop can wait for them.
#[derive(Debug)]
pub struct Drainer {
    graceful: Mutex<Option<GracefulShutdown>>,
    draining: watch::Sender<bool>,
}

impl Default for Drainer {
    fn default() -> Self {
        Drainer::new()
    }
}

impl Drainer {
    /// A tracker with no connection yet.
    pub fn new() -> Self {
        Drainer { graceful: Mutex::new(Some(GracefulShutdown::new())), draining: watch::Sender::new(false) }
    }

    /// Counts a connection that manages its own shutdown as open until the watcher is dropped;
    /// `None` once draining has started (the connection should close).
    pub fn hold(&self) -> Option<Watcher> {
        self.graceful.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).as_ref().map(GracefulShutdown::watcher)
    }

    /// Turns true when draining starts.
    pub fn draining(&self) -> watch::Receiver<bool> {
        self.draining.subscribe()
    }

    /// Registers `conn`: when draining starts it is asked to finish its in-flight requests and
    /// close.
    pub fn watch<C>(&self, conn: C) -> Pin<Box<dyn Future<Output = C::Output> + Send>>
    where
        C: GracefulConnection + Send + 'static,
        C::Output: Send,
    {
        let guard = self.graceful.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match guard.as_ref() {
            Some(graceful) => Box::pin(graceful.watch(conn)),
            None => Box::pin(conn),
        }
    }

    /// Connections registered and still open.
    pub fn count(&self) -> usize {
        self.graceful
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_ref()
            .map_or(0, GracefulShutdown::count)
    }

    /// Asks every registered connection to finish and waits up to `deadline`; true when all
    /// closed in time.
    pub async fn drain(&self, deadline: Duration) -> bool {
        let taken = self.graceful.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        self.draining.send_replace(true);
        match taken {
            Some(graceful) => tokio::time::timeout(deadline, graceful.shutdown()).await.is_ok(),
            None => true,
        }
    }
}

//! The data-plane worker threads: thread-per-core.
//!
//! With `workers = N` (N > 1, or `0` = one per core) the process runs N single-threaded
//! (current-thread) tokio runtimes: the main one, which also carries everything that is not
//! the data plane (admin API, health checks, DNS, dashboard sampler), and N − 1 started here.
//! Every HTTP/HTTPS listener accepts on every worker ([`crate::proxy::serve`]), and a
//! connection then lives on the worker that accepted it: its task, its timers, its socket's
//! readiness and the server connections it opens are that worker's alone. Idle server
//! connections are kept per worker too ([`index`], used by the HTTP/1 client's idle lists), so
//! a request never uses a socket whose readiness another thread's reactor watches.
//!
//! Why not tokio's multi-thread runtime: its work stealing moves tasks between threads, and a
//! task woken by another thread's reactor costs a cross-thread wake-up (futex, IPI). Measured
//! in `bench/run` on this 2-core box, its two workers cost more CPU per request than one
//! worker (README, "Scaling"). HAProxy (`nbthread`) and nginx (worker processes) are built the
//! same way: one event loop per core, connections never migrate.
//!
//! Why the workers share one listening socket (a duplicate of the descriptor, each registered
//! in its own worker's epoll set) instead of one `SO_REUSEPORT` socket each: a reload hands a
//! listener's socket to its next configuration, and closing one socket of a reuseport group
//! resets the connections waiting in that socket's own accept queue. With one shared queue
//! nothing waits in a socket that closes. The cost is that every idle worker is woken for a
//! new connection and all but one find nothing to accept (two per connection at most here; at
//! many cores `SO_REUSEPORT` with a BPF steering program is the better trade).
//!
//! TCP (layer 4) listeners and HTTP/2 client connections (`protocol = "h2c"` pools) stay on the
//! main worker's runtime: an `h2c` pool's few shared connections are driven by tasks there and
//! other workers' requests reach them through channels.

use std::cell::Cell;
use std::sync::OnceLock;

use tokio::runtime::Handle;

/// The runtimes of the workers started by [`start`], in index order (worker 1 first).
static EXTRA: OnceLock<Vec<Handle>> = OnceLock::new();

thread_local! {
    /// This thread's worker index: 0 on the main thread (and any thread that is not a worker).
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// Starts `n` worker threads, each running a current-thread runtime until the process ends.
/// Call once, before any listener is served; a second call starts nothing.
pub fn start(n: usize) -> std::io::Result<()> {
    if n == 0 || EXTRA.get().is_some() {
        return Ok(());
    }
    let mut handles = Vec::with_capacity(n);
    for i in 1..=n {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        handles.push(runtime.handle().clone());
        std::thread::Builder::new().name(format!("keel-worker-{i}")).spawn(move || {
            INDEX.with(|index| index.set(i));
            // Runs the tasks spawned on this worker until the process exits.
            runtime.block_on(std::future::pending::<()>());
        })?;
    }
    let _ = EXTRA.set(handles);
    Ok(())
}

/// The runtimes of the workers beyond the main one (empty with one worker).
pub fn extra() -> &'static [Handle] {
    EXTRA.get().map(Vec::as_slice).unwrap_or(&[])
}

/// The worker the calling thread is: 0 for the main thread, 1.. for the others.
pub fn index() -> usize {
    INDEX.with(Cell::get)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_knows_its_index() {
        start(2).expect("start workers");
        assert_eq!(index(), 0, "the calling thread is not a worker");
        let seen: Vec<usize> = extra()
            .iter()
            .map(|h| {
                let (tx, rx) = std::sync::mpsc::channel();
                h.spawn(async move { tx.send(index()).expect("send") });
                rx.recv().expect("worker answers")
            })
            .collect();
        assert_eq!(seen, vec![1, 2]);
    }
}

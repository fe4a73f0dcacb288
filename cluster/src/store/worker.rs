//! The store's own threads ([`StoreWorker`]): one writes the Raft log, one runs snapshot work (encoding and writing a
//! built snapshot, reading one to send, decoding and writing a received one, freeing replaced
//! states), one applies committed entries to the state.
//!
//! Why threads of their own and not the Raft runtime: that runtime has one worker, which also
//! sends heartbeats and answers votes; at 1M sticky entries a snapshot is 0.1–0.6 s of CPU and
//! IO, and applying four 10,000-entry batches 40–80 ms — both longer than a heartbeat, the first
//! longer than the lease. Why not tokio's blocking pool: keel runs the Raft runtime's threads
//! (the blocking pool's included) under `SCHED_RR` (`[cluster] realtime`), and a real-time thread
//! encoding for half a second would take a core from the data plane. A worker is created from
//! the Raft runtime, so it inherits its scheduling; the snapshot worker puts itself back to
//! normal scheduling first ([`Scheduling::Normal`]), and so does the apply worker: a follower
//! acknowledges entries once they are in its log, not once applied, so nothing the leader's lease
//! depends on waits for applying (and four 10,000-entry batches of real-time work on each of three
//! nodes sharing two cores starved the Raft threads in the million-entry test). The log worker
//! is on that path — an entry is acknowledged after its fsync — so it stays real-time, one
//! priority below the Raft thread ([`Scheduling::BelowInherited`]), which preempts it at once. Each worker runs its jobs one at a time, in order: a build and an
//! install never write the file at once, and entries are applied in log order.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;

use tokio::sync::oneshot;

use super::write_err;
use crate::types::StorageError;

type Job = Box<dyn FnOnce() + Send>;

/// How a worker thread is scheduled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheduling {
    /// As the thread that started it.
    Inherited,
    /// Just below the thread that started it: under a real-time policy (the Raft runtime's
    /// `SCHED_RR` with `[cluster] realtime`) one priority lower, so the Raft thread preempts it
    /// at once while it still runs before normal threads; else as inherited.
    BelowInherited,
    /// The normal time-sharing policy, whatever the starter's.
    Normal,
}

/// A handle to a worker thread; cheap to clone. The thread ends when every handle is gone.
#[derive(Clone, Debug)]
pub struct StoreWorker {
    jobs: mpsc::Sender<Job>,
}

impl StoreWorker {
    /// Starts a thread named `name`.
    pub fn start(name: &str, scheduling: Scheduling) -> Result<Self, StorageError> {
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                match scheduling {
                    Scheduling::Inherited => {}
                    Scheduling::Normal => normal_scheduling(),
                    Scheduling::BelowInherited => one_priority_lower(),
                }
                for job in rx {
                    // A panicking job drops its answer channel (the caller sees an error); the
                    // thread stays for the next one.
                    let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
                }
            })
            .map_err(write_err)?;
        Ok(StoreWorker { jobs })
    }

    /// Runs `work` on the thread and waits for its answer without blocking the caller's runtime.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(work());
            }))
            .map_err(|_| write_err(std::io::Error::other("the store thread is gone")))?;
        rx.await.map_err(|_| write_err(std::io::Error::other("a store job panicked")))?
    }

    /// Runs `work` on the thread without waiting for it (it reports its outcome itself).
    pub fn discard_with(&self, work: impl FnOnce() + Send + 'static) {
        if let Err(mpsc::SendError(job)) = self.jobs.send(Box::new(work)) {
            // The thread is gone (only when the store is being dropped): run it here rather than
            // lose what it reports.
            job();
        }
    }

    /// Drops `value` on the thread: freeing a large state is work too.
    pub fn discard<T: Send + 'static>(&self, value: T) {
        // If the thread is gone the value comes back in the error and is dropped here.
        let _ = self.jobs.send(Box::new(move || drop(value)));
    }
}

/// Lowers a real-time calling thread by one priority (lowering is always allowed).
#[allow(unsafe_code)] // two libc calls on the current thread; no safe wrapper in our dependencies
fn one_priority_lower() {
    let mut policy = 0;
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `pthread_self` is valid for the calling thread; both out-pointers are live locals.
    let rc = unsafe { libc::pthread_getschedparam(libc::pthread_self(), &mut policy, &mut param) };
    if rc != 0 || !(policy == libc::SCHED_RR || policy == libc::SCHED_FIFO) || param.sched_priority <= 1 {
        return;
    }
    param.sched_priority -= 1;
    // SAFETY: as above; `param` outlives the call.
    let rc = unsafe { libc::pthread_setschedparam(libc::pthread_self(), policy, &param) };
    if rc != 0 {
        tracing::debug!(target: "keel::raft", error = %std::io::Error::from_raw_os_error(rc), "store thread keeps its inherited priority");
    }
}

/// Puts the calling thread under the normal time-sharing policy (lowering is always allowed).
#[allow(unsafe_code)] // one libc call on the current thread; no safe wrapper in our dependencies
fn normal_scheduling() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `pthread_self` is valid for the calling thread and `param` outlives the call.
    let rc = unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_OTHER, &param) };
    if rc != 0 {
        tracing::debug!(target: "keel::raft", error = %std::io::Error::from_raw_os_error(rc), "store thread keeps its inherited scheduling");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn jobs_run_off_the_caller_and_a_panic_is_an_error_not_a_dead_thread() -> Result<(), StorageError> {
        let worker = StoreWorker::start("keel-test", Scheduling::Normal)?;
        let caller = std::thread::current().id();
        let ran_on = worker.run(move || Ok(std::thread::current().id())).await?;
        assert_ne!(ran_on, caller);
        let panicked = worker.run::<()>(|| panic!("boom")).await;
        assert!(panicked.is_err());
        assert_eq!(worker.run(|| Ok(7)).await?, 7, "the thread survives a panicking job");
        Ok(())
    }
}

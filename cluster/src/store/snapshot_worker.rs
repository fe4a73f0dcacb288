//! The thread that does snapshot work ([`SnapshotWorker`]): encoding and writing a built
//! snapshot, reading one to send, decoding and writing a received one, and freeing replaced
//! states.
//!
//! Why a thread of its own and not the Raft runtime: that runtime has one worker, which also
//! sends heartbeats and answers votes; at 1M sticky entries a snapshot is 0.1–0.6 s of CPU and
//! IO, longer than the lease. Why not tokio's blocking pool: keel runs the Raft runtime's threads
//! (the blocking pool's included) under `SCHED_RR` (`[cluster] realtime`), and a real-time thread
//! encoding for half a second would take a core from the data plane. This thread is created from
//! the Raft runtime (so it inherits `SCHED_RR`) and puts itself back to normal scheduling first.
//! One thread also runs the jobs one at a time, so a build and an install never write the file at
//! once.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;

use tokio::sync::oneshot;

use super::write_err;
use crate::types::StorageError;

type Job = Box<dyn FnOnce() + Send>;

/// A handle to the snapshot thread; cheap to clone. The thread ends when every handle is gone.
#[derive(Clone, Debug)]
pub struct SnapshotWorker {
    jobs: mpsc::Sender<Job>,
}

impl SnapshotWorker {
    /// Starts the thread.
    pub fn start() -> Result<Self, StorageError> {
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("keel-snapshot".into())
            .spawn(move || {
                normal_scheduling();
                for job in rx {
                    // A panicking job drops its answer channel (the caller sees an error); the
                    // thread stays for the next one.
                    let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
                }
            })
            .map_err(write_err)?;
        Ok(SnapshotWorker { jobs })
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
            .map_err(|_| write_err(std::io::Error::other("the snapshot thread is gone")))?;
        rx.await.map_err(|_| write_err(std::io::Error::other("a snapshot job panicked")))?
    }

    /// Drops `value` on the thread: freeing a large state is work too.
    pub fn discard<T: Send + 'static>(&self, value: T) {
        // If the thread is gone the value comes back in the error and is dropped here.
        let _ = self.jobs.send(Box::new(move || drop(value)));
    }
}

/// Puts the calling thread under the normal time-sharing policy (lowering is always allowed).
#[allow(unsafe_code)] // one libc call on the current thread; no safe wrapper in our dependencies
fn normal_scheduling() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `pthread_self` is valid for the calling thread and `param` outlives the call.
    let rc = unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_OTHER, &param) };
    if rc != 0 {
        tracing::debug!(target: "keel::raft", error = %std::io::Error::from_raw_os_error(rc), "snapshot thread keeps its inherited scheduling");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn jobs_run_off_the_caller_and_a_panic_is_an_error_not_a_dead_thread() -> Result<(), StorageError> {
        let worker = SnapshotWorker::start()?;
        let caller = std::thread::current().id();
        let ran_on = worker.run(move || Ok(std::thread::current().id())).await?;
        assert_ne!(ran_on, caller);
        let panicked = worker.run::<()>(|| panic!("boom")).await;
        assert!(panicked.is_err());
        assert_eq!(worker.run(|| Ok(7)).await?, 7, "the thread survives a panicking job");
        Ok(())
    }
}

//! The parking lot: where a listener's idle plain-HTTP connections wait, outside tokio.
//!
//! An idle keep-alive connection holds no buffer and no parser state ([`super::conn`] reads a
//! request only once the client sends one), but waiting in a task of its own still cost
//! ~1.5 KiB: the task with its future
//! (guarded stream, timer entry, shared state, drain receiver, permit) and tokio's I/O
//! registration. HAProxy spends ~0.2 KiB on the same connection. So once a connection parks,
//! its task ends and only a [`Parked`] entry is left here: the socket, the connection permit,
//! the request count (for `max_requests_per_connection`) and when it went idle — 48 bytes.
//!
//! The lot of a listener is one task owning a [`mio::Poll`]: the parked sockets are registered
//! in that epoll set (edge-triggered, readable), and the epoll descriptor itself is watched by
//! tokio through [`AsyncFd`] (an epoll set is readable while any of its descriptors has an
//! event). When the client sends something — or closes, or resets — the entry leaves the lot,
//! the socket goes back to tokio and a normal serve task is spawned for it with the carried
//! state ([`Woken`]): keel's HTTP/1 server, which a parked connection always spoke.
//!
//! Idle timeouts need no timer per connection: a listener's `idle_timeout` is one constant, so
//! deadlines come in the order connections went idle, and a FIFO of (idle since, key) with one
//! timer for its front is enough. (Connections park [`PARK_AFTER`](super::conn::PARK_AFTER) after
//! going idle, give or take a flush, so the order can be off by a few milliseconds; an
//! expiry is then late by as much.) A connection that wakes leaves its queue item behind;
//! items are checked against the entry's own idle stamp when they come due, and the queue is
//! compacted once stale items outnumber live ones, so a busy client that parks many times per
//! idle timeout does not grow it without bound.
//!
//! The lot holds one drain [`Watcher`]: when draining starts it closes every parked connection
//! (nothing is in flight on them) and ends, as a parked connection in its own task did. When
//! its listener stops (a config change) it keeps serving what it holds and ends once empty; a
//! connection that would park after that waits in its own task, as before the lot existed.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hyper_util::server::graceful::Watcher;
use mio::unix::SourceFd;
use mio::{Interest, Token};
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};

use super::guard::GuardedIo;
use crate::connlimit::ConnectionPermit;
use crate::pool::{epoch, now_millis};

/// Events taken from the epoll set per call; more simply means another call.
const EVENTS: usize = 256;

/// Stale queue items tolerated beyond twice the live entries before the queue is compacted.
const COMPACT_SLACK: usize = 1024;

/// One parked connection: all it still holds while the client is quiet.
struct Parked {
    /// A std socket registered by descriptor: mio's own socket type carries a registry id
    /// in debug builds, 12 bytes more per entry.
    stream: std::net::TcpStream,
    requests: u32,
    idle_since_ms: u64,
    permit: ConnectionPermit,
}

/// A parked connection the client sent something on (or closed): what its serve task needs.
pub struct Woken {
    /// The socket, still non-blocking, registered nowhere.
    pub stream: std::net::TcpStream,
    /// Requests it served before it parked.
    pub requests: u32,
    /// When its last request finished, as [`now_millis`].
    pub idle_since_ms: u64,
    /// Its place in the listener's connection counts.
    pub permit: ConnectionPermit,
}

struct State {
    entries: Slab<Parked>,
    /// (idle since, key) in park order; see the module doc.
    deadlines: VecDeque<(u64, usize)>,
    /// No more parking: draining, or the listener stopped and the lot emptied.
    closed: bool,
}

/// A listener's parking lot; see the module doc. Shared by the listener's connections (which
/// park) and the lot's task (which wakes and expires).
pub struct Lot {
    state: Mutex<State>,
    registry: mio::Registry,
    /// Told when the deadline queue gets a new front, or the listener stops.
    changed: Notify,
    listener_stopped: AtomicBool,
    idle_timeout_ms: u64,
    /// Connections parked, for the metrics; shared with the lot of a listener restarted under
    /// the same name, hence counted up and down rather than set.
    parked: Arc<AtomicU64>,
}

impl Lot {
    /// A lot for a listener with `idle_timeout`, counting its connections in `parked`; the
    /// poll is for [`Lot::run`].
    pub fn new(idle_timeout: Duration, parked: Arc<AtomicU64>) -> io::Result<(Arc<Lot>, mio::Poll)> {
        let poll = mio::Poll::new()?;
        let registry = poll.registry().try_clone()?;
        let lot = Lot {
            state: Mutex::new(State { entries: Slab::new(), deadlines: VecDeque::new(), closed: false }),
            registry,
            changed: Notify::new(),
            listener_stopped: AtomicBool::new(false),
            idle_timeout_ms: u64::try_from(idle_timeout.as_millis()).unwrap_or(u64::MAX),
            parked,
        };
        Ok((Arc::new(lot), poll))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Parks an idle connection (at a message boundary, nothing buffered). Gives it back
    /// when the lot has closed, for the caller to wait on itself.
    pub fn park(
        &self,
        io: GuardedIo<TcpStream>,
        permit: ConnectionPermit,
    ) -> Option<(GuardedIo<TcpStream>, ConnectionPermit)> {
        let mut state = self.lock();
        if state.closed {
            return Some((io, permit));
        }
        let activity = io.activity();
        let (requests, idle_since_ms) = (activity.requests(), activity.idle_since_ms());
        // Held under the lock, so the lot never sees an event for a key not yet filled.
        let stream = match io.into_inner().into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(target: "keel::proxy", error = %e, "could not park a connection; closed it");
                return None;
            }
        };
        let slot = state.entries.vacant_entry();
        let key = slot.key();
        // Readable also reports a close (RDHUP) or a reset, which wake the connection too: its
        // serve task then reads the end of stream or the error and closes.
        if let Err(e) = self.registry.register(&mut SourceFd(&stream.as_raw_fd()), Token(key), Interest::READABLE) {
            tracing::debug!(target: "keel::proxy", error = %e, "could not park a connection; closed it");
            return None;
        }
        slot.insert(Parked { stream, requests, idle_since_ms, permit });
        let new_front = state.deadlines.is_empty();
        state.deadlines.push_back((idle_since_ms, key));
        drop(state);
        self.parked.fetch_add(1, Ordering::Relaxed);
        if new_front {
            self.changed.notify_one();
        }
        None
    }

    /// The listener stopped: the lot ends once it holds nothing.
    pub fn listener_stopped(&self) {
        self.listener_stopped.store(true, Ordering::Release);
        self.changed.notify_one();
    }

    /// Connections parked now.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether nothing is parked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The lot's task: hands each connection the client sends on to `wake`, closes those idle
    /// past the timeout, and closes everything when draining starts. `held` is the drain's
    /// count of this lot (`None`: draining already started).
    pub async fn run(
        self: Arc<Self>,
        poll: mio::Poll,
        held: Option<Watcher>,
        mut draining: watch::Receiver<bool>,
        wake: impl Fn(Woken),
    ) {
        let Some(_held) = held else {
            self.close();
            return;
        };
        let mut poll = match register(poll) {
            Ok(poll) => poll,
            Err(e) => {
                tracing::warn!(target: "keel::proxy", error = %e, "parking lot unavailable; idle connections wait in their own tasks");
                self.close();
                return;
            }
        };
        let mut events = mio::Events::with_capacity(EVENTS);
        let mut timer = std::pin::pin!(tokio::time::sleep(Duration::ZERO));
        let mut armed: Option<u64> = None;
        loop {
            // A deadline past what an Instant holds (an absurd idle_timeout) is never armed.
            let front = self.next_deadline().filter(|&ms| epoch().checked_add(Duration::from_millis(ms)).is_some());
            if front != armed {
                if let Some(ms) = front {
                    let at = epoch() + Duration::from_millis(ms);
                    timer.as_mut().reset(at.into());
                }
                armed = front;
            }
            tokio::select! {
                biased;
                _ = draining.wait_for(|d| *d) => break,
                // Before the events, which a flood of wake-ups could keep ready for long.
                _ = timer.as_mut(), if armed.is_some() => {
                    // Re-armed next turn for whatever the front is then.
                    armed = None;
                    self.expire();
                }
                ready = poll.readable_mut() => {
                    let mut guard = match ready {
                        Ok(guard) => guard,
                        Err(e) => {
                            tracing::warn!(target: "keel::proxy", error = %e, "parking lot failed; closing its connections");
                            break;
                        }
                    };
                    match guard.get_inner_mut().poll(&mut events, Some(Duration::ZERO)) {
                        Ok(()) if events.is_empty() => guard.clear_ready(),
                        Ok(()) => self.take(&events).into_iter().for_each(&wake),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            tracing::warn!(target: "keel::proxy", error = %e, "parking lot failed; closing its connections");
                            break;
                        }
                    }
                }
                _ = self.changed.notified() => {}
            }
            if self.listener_stopped.load(Ordering::Acquire) && self.close_if_empty() {
                return;
            }
        }
        self.close();
    }

    /// When the oldest parked connection went idle, as a deadline in [`now_millis`].
    fn next_deadline(&self) -> Option<u64> {
        let state = self.lock();
        state.deadlines.front().map(|&(since, _)| since.saturating_add(self.idle_timeout_ms))
    }

    /// Takes the connections `events` name out of the lot.
    fn take(&self, events: &mio::Events) -> Vec<Woken> {
        let mut state = self.lock();
        let mut woken = Vec::with_capacity(events.iter().count());
        let mut closed = Vec::new();
        for event in events {
            let Some(parked) = state.entries.try_remove(event.token().0) else { continue };
            let _ = self.registry.deregister(&mut SourceFd(&parked.stream.as_raw_fd()));
            // A client that closed without sending more is closed here: waking it would spawn
            // a task only to read the end of stream, thousands at once
            // when a client pool shuts down. One that sent a request before closing is served.
            if (event.is_read_closed() || event.is_error()) && !has_data(&parked.stream) {
                closed.push(parked);
                continue;
            }
            let Parked { stream, requests, idle_since_ms, permit } = parked;
            woken.push(Woken { stream, requests, idle_since_ms, permit });
        }
        compact(&mut state);
        drop(state);
        self.parked.fetch_sub((woken.len() + closed.len()) as u64, Ordering::Relaxed);
        drop(closed);
        woken
    }

    /// Closes the connections idle for the timeout.
    fn expire(&self) {
        let now = now_millis();
        let mut state = self.lock();
        let mut expired = Vec::new();
        while let Some(&(since, key)) = state.deadlines.front() {
            if since.saturating_add(self.idle_timeout_ms) > now {
                break;
            }
            state.deadlines.pop_front();
            if is_live(&state.entries, since, key) {
                let parked = state.entries.remove(key);
                let _ = self.registry.deregister(&mut SourceFd(&parked.stream.as_raw_fd()));
                expired.push(parked);
            }
        }
        drop(state);
        self.parked.fetch_sub(expired.len() as u64, Ordering::Relaxed);
        if !expired.is_empty() {
            tracing::trace!(target: "keel::proxy", connections = expired.len(), "idle keep-alive connections timed out");
        }
        // Dropping closes each socket and releases its permit.
    }

    /// Closes the lot if it holds nothing; true if it did.
    fn close_if_empty(&self) -> bool {
        let mut state = self.lock();
        state.closed = state.entries.is_empty();
        state.closed
    }

    /// Closes the lot and every connection in it.
    fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.deadlines = VecDeque::new();
        let entries = std::mem::take(&mut state.entries);
        drop(state);
        self.parked.fetch_sub(entries.len() as u64, Ordering::Relaxed);
        drop(entries); // closes the sockets (which leaves the epoll set) and releases the permits
    }
}

/// Whether the client sent bytes not read yet (a request before its close, say).
fn has_data(stream: &std::net::TcpStream) -> bool {
    match stream.peek(&mut [0u8; 1]) {
        Ok(n) => n > 0,
        Err(e) => e.kind() == io::ErrorKind::WouldBlock,
    }
}

/// Drops the queue items of connections that woke, once they outnumber the parked ones.
fn compact(state: &mut State) {
    if state.deadlines.len() > 2 * state.entries.len() + COMPACT_SLACK {
        let State { entries, deadlines, .. } = state;
        deadlines.retain(|&(since, key)| is_live(entries, since, key));
    }
}

/// Whether the queue item (`since`, `key`) is the one of the entry at `key`: an entry parks
/// again only after serving another request, so its idle stamp tells its items apart.
fn is_live(entries: &Slab<Parked>, since: u64, key: usize) -> bool {
    entries.get(key).is_some_and(|p| p.idle_since_ms == since)
}

/// Watches the lot's epoll set from tokio.
#[allow(unsafe_code)] // tokio's AsyncFd registration is `unsafe` for I/O safety; see below
fn register(poll: mio::Poll) -> io::Result<AsyncFd<mio::Poll>> {
    // SAFETY: the `Poll` owns its epoll descriptor, keeps it open and returns the same one from
    // `as_raw_fd` until it is dropped, which happens only after the `AsyncFd` that owns it
    // has deregistered it.
    unsafe { AsyncFd::register_with_interest(poll, tokio::io::Interest::READABLE) }.map_err(|e| e.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connlimit::ConnectionLimiter;
    use crate::daemon::drain::Drainer;
    use crate::proxy::guard::{ConnActivity, Deadlines};
    use tokio::io::AsyncWriteExt;
    use tokio::sync::mpsc;

    const DL: Deadlines = Deadlines { header_timeout: Duration::from_secs(10), idle_timeout: Duration::from_secs(60) };

    #[test]
    fn an_entry_is_small() {
        assert!(std::mem::size_of::<Parked>() <= 48, "{} bytes", std::mem::size_of::<Parked>());
    }

    struct Setup {
        lot: Arc<Lot>,
        woken: mpsc::UnboundedReceiver<Woken>,
        limiter: ConnectionLimiter,
        drainer: Arc<Drainer>,
        listener: tokio::net::TcpListener,
        task: tokio::task::JoinHandle<()>,
    }

    async fn setup(idle_timeout: Duration) -> Setup {
        let (lot, poll) = Lot::new(idle_timeout, Arc::default()).expect("lot");
        let drainer = Arc::new(Drainer::new());
        let (tx, woken) = mpsc::unbounded_channel();
        let task = tokio::spawn(lot.clone().run(poll, drainer.hold(), drainer.draining(), move |w| {
            let _ = tx.send(w);
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Setup { lot, woken, limiter: ConnectionLimiter::with_caps(100, 100), drainer, listener, task }
    }

    impl Setup {
        /// A client connection whose server side is parked after `requests` requests.
        async fn park_one(&self, requests: u32) -> tokio::net::TcpStream {
            let addr = self.listener.local_addr().expect("addr");
            let client = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (server, peer) = self.listener.accept().await.expect("accept");
            let activity = ConnActivity::resumed(requests, now_millis());
            let io = GuardedIo::new(server, activity, DL, true, 4096);
            let permit = self.limiter.try_acquire(peer.ip()).expect("permit");
            assert!(self.lot.park(io, permit).is_none(), "the lot is open");
            client
        }
    }

    #[tokio::test]
    async fn a_client_that_sends_wakes_its_connection_with_its_state() {
        let mut s = setup(Duration::from_secs(60)).await;
        let mut quiet = s.park_one(1).await;
        let mut client = s.park_one(7).await;
        assert_eq!(s.lot.len(), 2);
        assert_eq!(s.limiter.open(), 2);
        client.write_all(b"GET / HTTP/1.1\r\n").await.expect("write");
        let woken = tokio::time::timeout(Duration::from_secs(5), s.woken.recv()).await.expect("woken").expect("one");
        assert_eq!(woken.requests, 7);
        assert_eq!(s.lot.len(), 1, "the quiet one stays");
        let mut buf = [0u8; 64];
        let n = std::io::Read::read(&mut &woken.stream, &mut buf).expect("the bytes are still there");
        assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\n");
        drop(woken);
        assert_eq!(s.limiter.open(), 1);
        // A client that closes with nothing more to say is closed by the lot itself...
        quiet.shutdown().await.expect("shutdown");
        let start = std::time::Instant::now();
        while s.limiter.open() > 0 {
            assert!(start.elapsed() < Duration::from_secs(5), "the closed connection is still held");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(s.lot.is_empty());
        assert!(s.woken.try_recv().is_err(), "nothing to serve");
        // ...one that sends a request and then closes its side is served.
        let mut half = s.park_one(2).await;
        half.write_all(b"GET / HTTP/1.1\r\n\r\n").await.expect("write");
        half.shutdown().await.expect("shutdown");
        let woken = tokio::time::timeout(Duration::from_secs(5), s.woken.recv()).await.expect("woken").expect("one");
        assert_eq!(woken.requests, 2);
    }

    #[tokio::test]
    async fn idle_connections_close_at_the_idle_timeout() {
        let s = setup(Duration::from_millis(300)).await;
        let mut client = s.park_one(1).await;
        let started = std::time::Instant::now();
        let mut buf = [0u8; 8];
        let n = tokio::time::timeout(Duration::from_secs(5), tokio::io::AsyncReadExt::read(&mut client, &mut buf))
            .await
            .expect("closed in time")
            .expect("a clean close");
        assert_eq!(n, 0);
        assert!(started.elapsed() >= Duration::from_millis(250), "closed after {:?}", started.elapsed());
        assert!(s.lot.is_empty());
        assert_eq!(s.limiter.open(), 0, "the permit is released");
    }

    #[tokio::test]
    async fn draining_closes_every_parked_connection_and_ends_the_lot() {
        let s = setup(Duration::from_secs(60)).await;
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(s.park_one(1).await);
        }
        assert!(tokio::time::timeout(Duration::from_secs(5), s.drainer.drain(Duration::from_secs(5)))
            .await
            .expect("drained in time"));
        tokio::time::timeout(Duration::from_secs(5), s.task).await.expect("the lot ended").expect("no panic");
        for mut c in clients {
            let mut buf = [0u8; 8];
            assert_eq!(tokio::io::AsyncReadExt::read(&mut c, &mut buf).await.expect("read"), 0);
        }
        assert_eq!(s.limiter.open(), 0);
    }

    #[tokio::test]
    async fn a_stopped_listener_s_lot_ends_once_empty_and_then_refuses() {
        let mut s = setup(Duration::from_secs(60)).await;
        let mut client = s.park_one(1).await;
        s.lot.listener_stopped();
        client.write_all(b"G").await.expect("write");
        let woken = tokio::time::timeout(Duration::from_secs(5), s.woken.recv()).await.expect("woken").expect("one");
        tokio::time::timeout(Duration::from_secs(5), s.task).await.expect("the lot ended").expect("no panic");
        let addr = s.listener.local_addr().expect("addr");
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (server, peer) = s.listener.accept().await.expect("accept");
        let io = GuardedIo::new(server, ConnActivity::resumed(1, now_millis()), DL, true, 4096);
        let permit = s.limiter.try_acquire(peer.ip()).expect("permit");
        assert!(s.lot.park(io, permit).is_some(), "a closed lot gives the connection back");
        drop(woken);
    }

    #[tokio::test]
    async fn stale_queue_items_are_compacted() {
        {
            let (lot, _poll) = Lot::new(Duration::from_secs(60), Arc::default()).expect("lot");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let limiter = ConnectionLimiter::with_caps(10, 10);
            let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (server, peer) = listener.accept().await.expect("accept");
            let mut io = GuardedIo::new(server, ConnActivity::resumed(1, 0), DL, true, 4096);
            let mut permit = limiter.try_acquire(peer.ip()).expect("permit");
            // One connection parks and wakes many times, as a busy client would.
            for round in 1..=(3 * COMPACT_SLACK as u64) {
                let since = io.activity().idle_since_ms();
                assert!(lot.park(io, permit).is_none());
                let key = lot.lock().deadlines.back().expect("queued").1;
                let mut state = lot.lock();
                let parked = state.entries.remove(key);
                let _ = lot.registry.deregister(&mut SourceFd(&parked.stream.as_raw_fd()));
                drop(state);
                assert_eq!(parked.idle_since_ms, since);
                let stream = TcpStream::from_std(parked.stream).expect("back to tokio");
                io = GuardedIo::new(stream, ConnActivity::resumed(1, round), DL, true, 4096);
                permit = parked.permit;
                compact(&mut lot.lock()); // as `take` does after a wake
            }
            assert!(lot.lock().deadlines.len() <= COMPACT_SLACK + 1, "{}", lot.lock().deadlines.len());
        }
    }
}

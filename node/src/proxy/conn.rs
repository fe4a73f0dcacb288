//! One client connection's life, as a state machine: the only place that decides what a
//! connection does next.
//!
//! ```text
//!             ┌──────────── readable ─────────────┐
//!             ▼                                   │
//!  accept → Waiting ──► Reading ──► (h1 serving) ──► Idle ──quiet PARK_AFTER──► Parked (lot)
//!             ▲           │  HTTP/2 preface             │ next request            │ client sends
//!             │           ▼                             ▼                         │
//!             │        HTTP/2 session ──► Done       Resuming                     │
//!             └───────────────────────────────────────────────────────────────────┘
//!  draining (any state) ──► Done;  deadline / close / error (any state) ──► Done
//! ```
//!
//! - **Waiting**: nothing read yet; the socket is only watched for readability (no buffer),
//!   under the first-request deadline (new connection) or the idle deadline (resumed).
//! - **Reading / serving**: keel's HTTP/1 server ([`super::h1::server`]) reads heads and bodies,
//!   the request path forwards them, responses go back; pipelined requests are served in
//!   order. A new connection whose first bytes are the HTTP/2 preface (h2c), or a TLS connection
//!   that negotiated `h2`, becomes an HTTP/2 session ([`super::h2`]) for the rest of its life.
//! - **Idle**: every request answered, the connection kept alive. A busy client's next request
//!   usually arrives within [`PARK_AFTER`] and is served by the same task.
//! - **Resuming**: readable again after Idle; one read without waiting, then Reading's serving
//!   with what it got, or back to Idle if nothing was there (tokio's readiness can be stale,
//!   and only Idle's wait ends in the lot).
//! - **Parked**: a plain-TCP connection that stayed quiet leaves tokio for the listener's
//!   parking lot ([`super::lot`]): its task ends, ~48 bytes of it remain, and the lot spawns a
//!   task in state Waiting when the client sends again (or closes it at the idle timeout, or at
//!   once when draining starts). A TLS connection never parks (rustls buffers plaintext on its
//!   side, so socket readability says nothing) and waits in Idle in its task instead.
//! - **Done**: the socket is closed by dropping it.
//!
//! The one stop signal is the listener's [`Drainer`]: draining ends every waiting, idle and
//! parked connection at once and lets in-flight requests finish (HTTP/2 sessions get GOAWAY).
//! Deadlines between requests, and the framing scanner, are [`GuardedIo`]'s.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::guard::{ConnActivity, Deadlines, GuardedIo};
use super::h1::codec::{poll_fill, Prefixed};
pub(super) use super::h1::server::{self as h1, Outcome};
use super::h2::H2;
use super::lot::{Lot, Woken};
use super::phases::{HttpProxy, Peer};
use crate::connlimit::ConnectionPermit;
use crate::daemon::drain::Drainer;

/// How long a plain-HTTP connection must stay quiet after a response before it parks. A busy
/// keep-alive client sends its next request well within this and keeps its task; an idle one
/// parks almost at once, so a crowd of idle connections never holds buffers together (the
/// allocator would keep that peak).
pub const PARK_AFTER: Duration = Duration::from_millis(5);

/// Read size of a connection's first read of a request: room for a whole head and, as a rule, a
/// small body behind it. At 4 KiB a request with a 4 KiB body took a second read and a copy of
/// the body's two halves into one buffer (bench case 8); HAProxy reads into 16 KiB buffers. The
/// buffer lives only while the request is read (an idle or parked connection holds none), and
/// reserving it does not touch its memory, so the size costs nothing when requests are small.
const FIRST_READ: usize = 16 * 1024;

/// What every connection of a listener shares.
pub struct ConnContext {
    /// The request path.
    pub proxy: Arc<HttpProxy>,
    /// Deadlines between requests.
    pub deadlines: Deadlines,
    /// HTTP/1 limits.
    pub h1: h1::Settings,
    /// The HTTP/2 front end.
    pub h2: H2,
    /// The one stop signal.
    pub graceful: Arc<Drainer>,
    /// Where idle plain-HTTP connections wait; `None` for TLS listeners (which never park) or
    /// when the lot could not be set up (connections then wait in their own tasks).
    pub lot: Option<Arc<Lot>>,
    /// The listener's byte and handshake counters.
    pub traffic: Arc<crate::metrics::ListenerTraffic>,
}

/// The states of a connection between requests; serving happens inside Reading.
enum State {
    Waiting,
    Reading,
    /// Readable after a response: read without waiting, back to `Idle` if nothing was there.
    Resuming,
    Idle,
    Park,
}

/// Serves a plain-TCP client connection until it parks or ends. `first`: a new connection
/// (which may open with the HTTP/2 preface); a connection back from the lot spoke HTTP/1.1.
pub async fn serve_plain(
    ctx: Arc<ConnContext>,
    mut io: GuardedIo<TcpStream>,
    peer: SocketAddr,
    mut permit: ConnectionPermit,
    mut first: bool,
) {
    // Counted by the drain, which waits for this task; None: draining already started.
    let Some(_held) = ctx.graceful.hold() else { return };
    let mut draining = ctx.graceful.draining();
    let activity = io.activity();
    let client = Peer::new(peer);
    let mut park_timer = None;
    let mut state = State::Waiting;
    loop {
        state = match state {
            State::Waiting => {
                let readable = tokio::select! {
                    biased;
                    _ = draining.wait_for(|d| *d) => false,
                    r = std::future::poll_fn(|cx| io.poll_idle(cx)) => r,
                };
                if !readable {
                    return; // dropping the stream closes it
                }
                State::Reading
            }
            which @ (State::Reading | State::Resuming) => {
                let buf = if matches!(which, State::Resuming) {
                    match read_now(&mut io, peer).await {
                        Ok(Some(buf)) => Some(buf),
                        Ok(None) => {
                            state = State::Idle;
                            continue;
                        }
                        Err(()) => return,
                    }
                } else {
                    next_read(&mut io, &mut draining, peer).await
                };
                let Some(mut buf) = buf else { return };
                if std::mem::take(&mut first) && maybe_h2(&buf) {
                    let io = Prefixed::new(io, buf.freeze());
                    ctx.h2.serve(io, ctx.proxy.clone(), Arc::new(client), activity, &ctx.graceful).await;
                    return;
                }
                match h1::serve(&ctx.proxy, &mut io, &mut buf, &client, &activity, ctx.h1, &draining).await {
                    Outcome::Idle => State::Idle,
                    Outcome::Close => return,
                }
            }
            State::Idle => match after_response(&mut io, &mut draining, &mut park_timer).await {
                Next::Request => State::Resuming,
                Next::Quiet => State::Park,
                Next::Close => return,
            },
            State::Park => match &ctx.lot {
                // The lot ends this task; it comes back (None) only if the lot has closed.
                Some(lot) => match lot.park(io, permit) {
                    Some((back, kept)) => {
                        (io, permit) = (back, kept);
                        State::Waiting
                    }
                    None => return,
                },
                None => State::Waiting,
            },
        };
    }
}

/// Serves a TLS client connection: the same states, except that it never parks (rustls buffers
/// plaintext on its side, so the socket's readability says nothing) and that `h2` was decided
/// by ALPN.
pub async fn serve_tls<T>(
    ctx: Arc<ConnContext>,
    mut io: GuardedIo<T>,
    h2: bool,
    peer: SocketAddr,
    permit: ConnectionPermit,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let _permit = permit;
    let activity = io.activity();
    let client = Peer::new(peer);
    let Some(held) = ctx.graceful.hold() else { return };
    if h2 {
        drop(held); // the session is watched by the drain itself
        ctx.h2.serve(io, ctx.proxy.clone(), Arc::new(client), activity, &ctx.graceful).await;
        return;
    }
    let mut draining = ctx.graceful.draining();
    let mut first = true;
    loop {
        let Some(mut buf) = next_read(&mut io, &mut draining, peer).await else { return };
        if std::mem::take(&mut first) && maybe_h2(&buf) {
            drop(held);
            let io = Prefixed::new(io, buf.freeze());
            ctx.h2.serve(io, ctx.proxy.clone(), Arc::new(client), activity, &ctx.graceful).await;
            return;
        }
        if h1::serve(&ctx.proxy, &mut io, &mut buf, &client, &activity, ctx.h1, &draining).await == Outcome::Close {
            return;
        }
    }
}

/// Serves a connection the client sent something on while it was in the parking lot.
pub fn resume(ctx: &Arc<ConnContext>, woken: Woken) {
    let ctx = ctx.clone();
    // Boxed like a new connection's task (see `proxy::serve`).
    tokio::spawn(Box::pin(async move {
        let Woken { stream, requests, idle_since_ms, permit } = woken;
        let stream = match TcpStream::from_std(stream) {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(target: "keel::proxy", error = %e, "could not take a parked connection back; closed it");
                return;
            }
        };
        // The peer is asked again rather than kept in the lot (32 bytes a connection); a
        // client that reset meanwhile has none, and is closed.
        let Ok(peer) = stream.peer_addr() else { return };
        let activity = ConnActivity::resumed(requests, idle_since_ms);
        let io = GuardedIo::new(stream, activity, ctx.deadlines, true, ctx.h1.max_head).counting(ctx.traffic.clone());
        serve_plain(ctx, io, peer, permit, false).await;
    }));
}

/// What a connection does after every request it had was answered.
enum Next {
    /// The client sent its next request.
    Request,
    /// The client stayed quiet for [`PARK_AFTER`]: the connection parks.
    Quiet,
    /// The connection closes (its idle deadline passed, or draining started).
    Close,
}

/// Waits up to [`PARK_AFTER`] for the client's next request. `timer` is the task's one timer,
/// made on first use and moved on each wait.
async fn after_response(
    io: &mut GuardedIo<TcpStream>,
    draining: &mut watch::Receiver<bool>,
    timer: &mut Option<Pin<Box<tokio::time::Sleep>>>,
) -> Next {
    let deadline = tokio::time::Instant::now() + PARK_AFTER;
    let timer = match timer {
        Some(t) => {
            t.as_mut().reset(deadline);
            t
        }
        None => timer.insert(Box::pin(tokio::time::sleep_until(deadline))),
    };
    tokio::select! {
        biased;
        _ = draining.wait_for(|d| *d) => Next::Close,
        readable = std::future::poll_fn(|cx| io.poll_idle(cx)) => if readable { Next::Request } else { Next::Close },
        _ = timer.as_mut() => Next::Quiet,
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4), which h2c clients with prior knowledge send
/// first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether a new connection's first bytes may be the HTTP/2 preface (h2c with prior knowledge).
fn maybe_h2(first: &[u8]) -> bool {
    H2_PREFACE.starts_with(&first[..first.len().min(H2_PREFACE.len())])
}

/// One read of what the client sent, without waiting, after its socket looked readable:
/// `Ok(None)` when nothing was there after all. tokio's readiness can be stale (an edge the
/// reactor delivers after the task already read what caused it; with a multi-thread runtime the
/// reactor runs beside the task), and a connection that then waited in [`next_read`] would wait
/// there with no park timer: never parked, seen in the parking tests. `Err` when the
/// connection should close (the client closed it, or it failed).
async fn read_now(io: &mut GuardedIo<TcpStream>, peer: SocketAddr) -> Result<Option<BytesMut>, ()> {
    let mut buf = BytesMut::new();
    // The failed attempt clears the stale readiness, so the wait that follows is a real one.
    match std::future::poll_fn(|cx| Poll::Ready(poll_fill(io, &mut buf, cx, FIRST_READ))).await {
        Poll::Pending => Ok(None),
        Poll::Ready(Ok(0)) => Err(()),
        Poll::Ready(Ok(_)) => Ok(Some(buf)),
        Poll::Ready(Err(e)) => {
            tracing::debug!(target: "keel::proxy", client = %peer, error = %e, "client connection ended with an error");
            Err(())
        }
    }
}

/// Reads what the client sent next, one read for a whole head as a rule; `None` when the
/// connection should close: the client closed it, it failed, its deadline passed, or draining
/// started.
async fn next_read<T>(io: &mut GuardedIo<T>, draining: &mut watch::Receiver<bool>, peer: SocketAddr) -> Option<BytesMut>
where
    T: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let mut buf = BytesMut::new();
    // The read first: it is called once the socket is readable, so it is ready as a rule and the
    // drain signal is then never polled (polling it registers a waiter, and dropping it takes
    // it out again: two locked list operations a request). A request that is already here when
    // draining starts is served, and its response closes the connection.
    let read = tokio::select! {
        biased;
        r = std::future::poll_fn(|cx| poll_fill(io, &mut buf, cx, FIRST_READ)) => r,
        _ = draining.wait_for(|d| *d) => return None,
    };
    match read {
        Ok(0) => None,
        Ok(_) => Some(buf),
        Err(e) => {
            tracing::debug!(target: "keel::proxy", client = %peer, error = %e, "client connection ended with an error");
            None
        }
    }
}

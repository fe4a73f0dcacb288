//! Parking idle plain-HTTP connections: no hyper connection while the client says nothing.
//!
//! A hyper connection keeps an 8 KiB read buffer, a write buffer and its own state for the
//! connection's whole life, so an idle keep-alive connection cost ~18 KiB where HAProxy spends
//! a fraction of one. Here a plain-TCP connection alternates between two states:
//!
//! - **parked**: no hyper connection, and no task either: the socket leaves tokio for the
//!   listener's parking lot ([`super::lot`]), which keeps ~48 bytes of it and spawns a serve
//!   task again when the client sends something (a task of its own, however small, was most
//!   of what an idle connection still cost). The lot closes it at the idle timeout, or at
//!   once when draining starts. A new connection waits for its first request in its own task
//!   ([`GuardedIo::poll_idle`], which reads nothing) under the first-request deadline, and so
//!   does an idle one in the rare case its lot has closed (listener stopped and lot emptied).
//! - **served**: once the client sends something, a fresh hyper connection is built over a
//!   [`Parkable`] handle to the stream: the listener's auto builder (HTTP/1.1 with upgrades, or
//!   h2c on seeing the preface) for the first request, the HTTP/1.1 builder after a park (only
//!   HTTP/1.1 connections park, and the auto builder's version sniffing is a read syscall of
//!   its own per request). When a response finishes and
//!   [`ConnActivity::poll_parkable`] says hyper holds nothing unread (no pipelined bytes, no
//!   partial head, no body left), and the client then stays quiet for
//!   [`PARK_AFTER`](super::PARK_AFTER) (a busy client keeps its hyper connection), the loop
//!   asks hyper to stop gracefully. hyper only adds
//!   `Connection: close` to a head it writes after keep-alive is disabled; this is asked once the
//!   response body has ended, so its head went out with keep-alive. hyper then "shuts down" the
//!   stream, which [`Parkable`] turns into handing the stream back, and the connection parks.
//!
//! The per-connection state that must outlive hyper — request count, deadlines, the strict
//! framing scanner — lives in [`GuardedIo`] and [`ConnActivity`], so it carries across; in the
//! lot only the request count and the idle stamp are kept, since a connection parks at a
//! message boundary, where the scanner is as good as new. Once
//! parking is decided, [`Parkable`] stops handing hyper bytes, so a request the client sends
//! while hyper finishes its stop stays in the socket for the next hyper connection (should
//! hyper still hold unread bytes, that is detected on the way back and the connection is
//! closed rather than served out of order). TLS connections are not parked (rustls buffers on its own
//! side, so socket readability says nothing about buffered plaintext).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::guard::{ConnActivity, GuardedIo};

/// Where a stream goes when hyper lets go of it while parking; one per client connection.
#[derive(Default)]
pub struct Slot {
    io: Mutex<Option<GuardedIo<TcpStream>>>,
    parking: AtomicBool,
}

impl Slot {
    /// Marks the next shutdown of the stream as "hand it back" (`true`) or a real close.
    pub fn set_parking(&self, parking: bool) {
        self.parking.store(parking, Ordering::Release);
    }

    /// Takes the stream back after hyper stopped, if it can serve another request.
    pub fn reclaim(&self, activity: &ConnActivity) -> Option<GuardedIo<TcpStream>> {
        let io = self.io.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take()?;
        (io.is_reusable() && activity.parkable()).then_some(io)
    }
}

/// The stream as hyper sees it: the real one until parking, when its shutdown hands the stream
/// back through the [`Slot`] instead of closing it.
pub struct Parkable {
    io: Option<GuardedIo<TcpStream>>,
    slot: Arc<Slot>,
    /// Bytes already read from `io` (a new connection's first read), handed to hyper first.
    prefix: Bytes,
}

impl Parkable {
    /// Lends `io` to a hyper connection.
    pub fn new(io: GuardedIo<TcpStream>, slot: Arc<Slot>) -> Self {
        Parkable::with_prefix(io, slot, Bytes::new())
    }

    /// Lends `io` to a hyper connection that reads `prefix` first: bytes already taken from
    /// `io` (and so already seen by its framing scanner).
    pub fn with_prefix(io: GuardedIo<TcpStream>, slot: Arc<Slot>, prefix: Bytes) -> Self {
        Parkable { io: Some(io), slot, prefix }
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "stream parked")
}

/// Hands out bytes of `prefix` first; true when it did.
fn read_prefix(prefix: &mut Bytes, buf: &mut ReadBuf<'_>) -> bool {
    if prefix.is_empty() {
        return false;
    }
    let n = prefix.len().min(buf.remaining());
    buf.put_slice(&prefix.split_to(n));
    true
}

/// A stream given to hyper after its first bytes were read elsewhere (by keel's own server
/// path, or to sniff the HTTP/2 preface): those bytes come first, then the stream's.
pub struct Prefixed<T> {
    io: T,
    prefix: Bytes,
}

impl<T> Prefixed<T> {
    /// `io`, read from after `prefix`.
    pub fn new(io: T, prefix: Bytes) -> Self {
        Prefixed { io, prefix }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if read_prefix(&mut this.prefix, buf) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl AsyncRead for Parkable {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if read_prefix(&mut this.prefix, buf) {
            return Poll::Ready(Ok(()));
        }
        // Once parking is decided hyper has nothing left to read for this exchange, but while it
        // finishes flushing it would read ahead (its keep-alive "empty read" check) and buffer
        // the client's next request, which would then be dropped with hyper. Not reading leaves
        // those bytes in the socket for the next hyper connection. hyper is still polled (the
        // serve loop drives its graceful stop), so this Pending does not need a waker.
        if this.slot.parking.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        match &mut this.io {
            Some(io) => Pin::new(io).poll_read(cx, buf),
            None => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncWrite for Parkable {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Some(io) => Pin::new(io).poll_write(cx, buf),
            None => Poll::Ready(Err(gone())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Some(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            None => Poll::Ready(Err(gone())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(|io| io.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Some(io) => Pin::new(io).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.slot.parking.load(Ordering::Acquire) {
            if let Some(mut io) = this.io.take() {
                if Pin::new(&mut io).poll_flush(cx).is_pending() {
                    this.io = Some(io);
                    return Poll::Pending;
                }
                *this.slot.io.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(io);
            }
            return Poll::Ready(Ok(()));
        }
        match &mut this.io {
            Some(io) => Pin::new(io).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

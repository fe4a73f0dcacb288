//! Writes to TCP sockets with `send(2)` / `sendmsg(2)`, as HAProxy and nginx write: plain
//! connections through [`poll_write_any`], the records rustls writes for an `https` listener
//! through [`SendStream`].
//!
//! tokio's `TcpStream` writes with `write(2)` / `writev(2)`, which go through the kernel's file
//! layer before reaching the socket: `fdget_pos`, `rw_verify_area`, the iovec import, the file
//! permission hooks and `vfs_writev` itself. In the keep-alive benchmark (case 1, two writes per
//! request: one to the server, one to the client) that layer was ≈ 3.5 % of keel's CPU samples,
//! where HAProxy's `sendto` path cost ≈ 0.9 %. `send` and `sendmsg` enter the socket layer
//! directly; everything else (readiness, `WouldBlock`, errors) is tokio's, as in its own
//! `poll_write`. Under TLS keep-alive (case 4) keel's writes to clients were its only `writev`
//! calls left (strace). [`SendStream`] was tried once before (24.3 → 23.5 CPU µs/req in one
//! busy run, within noise) and taken out while fresh-clone CI failed in timing-sensitive tests;
//! those failures were since traced to other causes (parking, spread VIPs, port collisions).

use std::any::Any;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use socket2::SockRef;
use tokio::io::{AsyncWrite, Interest};
use tokio::net::TcpStream;

/// Writes `bufs` to `tcp` with one `send` (one slice) or `sendmsg` (several): what
/// `AsyncWrite::poll_write_vectored` does, without the file layer.
pub fn poll_send(tcp: &TcpStream, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
    loop {
        ready!(tcp.poll_write_ready(cx))?;
        let sock = SockRef::from(tcp);
        // `try_io` clears the readiness on `WouldBlock`, so the next `poll_write_ready` waits.
        let sent = tcp.try_io(Interest::WRITABLE, || match bufs {
            [one] => sock.send(one),
            _ => sock.send_vectored(bufs),
        });
        match sent {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return Poll::Ready(other),
        }
    }
}

/// `poll_write_vectored` on any stream, through [`poll_send`] when it is a plain `TcpStream`
/// (a type check the compiler resolves per stream type: TLS and test streams keep their own).
pub fn poll_write_any<T: AsyncWrite + Unpin + 'static>(
    io: &mut T,
    cx: &mut Context<'_>,
    bufs: &[IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    match (io as &mut dyn Any).downcast_mut::<TcpStream>() {
        Some(tcp) => poll_send(tcp, cx, bufs),
        None => Pin::new(io).poll_write_vectored(cx, bufs),
    }
}

/// A TCP stream whose writes go out through [`poll_send`]; reads, shutdown and everything else
/// are tokio's. For a layer that owns its stream and writes to it itself: rustls under an
/// `https` listener, which would otherwise write every record with `writev(2)`.
#[derive(Debug)]
pub struct SendStream(pub TcpStream);

impl tokio::io::AsyncRead for SendStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for SendStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        poll_send(&self.0, cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        poll_send(&self.0, cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // TCP buffers nothing in user space.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test]
    async fn one_and_several_slices_arrive_in_order() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (mut client, (mut server, _)) = (client.unwrap(), accepted.unwrap());
        let n = std::future::poll_fn(|cx| poll_write_any(&mut client, cx, &[IoSlice::new(b"ab")])).await.unwrap();
        assert_eq!(n, 2);
        let bufs = [IoSlice::new(b"cd"), IoSlice::new(b"ef")];
        let n = std::future::poll_fn(|cx| poll_send(&client, cx, &bufs)).await.unwrap();
        assert_eq!(n, 4);
        drop(client);
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"abcdef");
    }

    #[tokio::test]
    async fn a_closed_peer_is_an_error_not_a_signal() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let client = client.unwrap();
        drop(accepted.unwrap());
        let chunk = vec![0u8; 64 * 1024];
        let mut failed = false;
        for _ in 0..64 {
            if std::future::poll_fn(|cx| poll_send(&client, cx, &[IoSlice::new(&chunk)])).await.is_err() {
                failed = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(failed, "writes to a closed peer must fail (EPIPE / ECONNRESET)");
    }

    #[tokio::test]
    async fn a_send_stream_carries_both_ways_and_shuts_down() {
        use tokio::io::AsyncWriteExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (mut client, mut server) = (SendStream(client.unwrap()), accepted.unwrap().0);
        // A large write takes several sends once the socket buffer fills; the reader drains it.
        let big = vec![7u8; 1 << 20];
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.map(|_| (got, server))
        });
        client.write_all(&big).await.unwrap();
        let n = client.write_vectored(&[IoSlice::new(b"ab"), IoSlice::new(b"cd")]).await.unwrap();
        assert_eq!(n, 4, "one sendmsg takes both slices");
        client.shutdown().await.unwrap();
        let (got, mut server) = reader.await.unwrap().unwrap();
        assert_eq!(got.len(), big.len() + 4);
        assert!(got.ends_with(b"abcd"));
        server.write_all(b"back").await.unwrap();
        drop(server);
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"back");
    }
}

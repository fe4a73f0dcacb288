//! Writes to plain TCP sockets with `send(2)` / `sendmsg(2)`, as HAProxy and nginx write.
//!
//! tokio's `TcpStream` writes with `write(2)` / `writev(2)`, which go through the kernel's file
//! layer before reaching the socket: `fdget_pos`, `rw_verify_area`, the iovec import, the file
//! permission hooks and `vfs_writev` itself. In the keep-alive benchmark (case 1, two writes per
//! request: one to the server, one to the client) that layer was ≈ 3.5 % of keel's CPU samples,
//! where HAProxy's `sendto` path cost ≈ 0.9 %. `send` and `sendmsg` enter the socket layer
//! directly; everything else (readiness, `WouldBlock`, errors) is tokio's, as in its own
//! `poll_write`.

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
}

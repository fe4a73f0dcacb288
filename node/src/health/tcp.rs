//! The TCP health check: a server is healthy if it completes a TCP handshake in time.
//!
//! This is HAProxy's plain `check` without `option httpchk`: it proves the process listens and
//! the kernel accepts, nothing about the application. The connection is closed at once.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use super::{CheckError, HealthCheck};

/// Checks that a server accepts a TCP connection within a timeout.
#[derive(Clone, Debug)]
pub struct TcpHealthCheck {
    timeout: Duration,
}

impl TcpHealthCheck {
    /// A check that allows `timeout` for the connect.
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
    }
}

impl HealthCheck for TcpHealthCheck {
    async fn check(&self, address: SocketAddr) -> Result<(), CheckError> {
        match tokio::time::timeout(self.timeout, TcpStream::connect(address)).await {
            // Dropping the stream closes it: the handshake was the whole check.
            Ok(Ok(_stream)) => Ok(()),
            Ok(Err(e)) => Err(CheckError::Connect(e)),
            Err(_) => Err(CheckError::ConnectTimeout(self.timeout)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::ErrorKind;

    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test]
    async fn an_open_port_passes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("addr");
        let check = TcpHealthCheck::new(Duration::from_millis(500));
        check.check(address).await.expect("open port passes");
    }

    #[tokio::test]
    async fn a_closed_port_fails_with_connect_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("addr");
        drop(listener);
        let check = TcpHealthCheck::new(Duration::from_millis(500));
        let err = check.check(address).await.expect_err("closed port fails");
        assert!(matches!(&err, CheckError::Connect(e) if e.kind() == ErrorKind::ConnectionRefused), "{err:?}");
    }
}

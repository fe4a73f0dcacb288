//! The HTTP health check: one HTTP/1.1 request on a fresh connection, judged by its status.
//!
//! Every check opens its own TCP connection and closes it (`Connection: close`), never reusing
//! the pool's keep-alive client: a check that rode an old connection would say nothing about
//! whether the server still accepts new ones, which is what the request path needs. The whole
//! exchange runs under one deadline and within the check's own future, so a timed-out check
//! leaves no connection or task behind.
//!
//! The verdict is the status alone, as HAProxy's `http-check expect status`. The body is read
//! and thrown away (up to a small cap, until the deadline) only so the server can finish its
//! response cleanly instead of seeing a reset; how that goes does not change the verdict.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, HOST, USER_AGENT};
use http::{HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use keel_cluster::model::{self, StatusRange};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use super::{CheckError, HealthCheck};

/// The User-Agent checks send, so server logs can tell checks from traffic.
pub const USER_AGENT_VALUE: &str = "keel-health-check";

/// Body bytes read after a good status before the connection is simply dropped.
const DRAIN_LIMIT: usize = 64 * 1024;

/// Checks a server with an HTTP/1.1 request whose response status must be in a range.
#[derive(Clone, Debug)]
pub struct HttpHealthCheck {
    method: Method,
    path: Uri,
    /// The configured Host header; the server's address is used when absent.
    host: Option<HeaderValue>,
    expect: StatusRange,
    timeout: Duration,
}

impl HttpHealthCheck {
    /// A check as configured. Fails if the method, path or host cannot go into a request
    /// (config validation rejects those, so this only guards against an unvalidated config).
    pub fn new(config: &model::HealthCheck) -> Result<Self, CheckError> {
        let method = Method::from_bytes(config.method.as_bytes())
            .map_err(|e| CheckError::InvalidRequest(format!("method {:?}: {e}", config.method)))?;
        let path = Uri::try_from(config.path.as_str())
            .map_err(|e| CheckError::InvalidRequest(format!("path {:?}: {e}", config.path)))?;
        if path.scheme().is_some() || path.authority().is_some() {
            return Err(CheckError::InvalidRequest(format!("path {:?} must be a path, not a URL", config.path)));
        }
        let host = config
            .host
            .as_deref()
            .map(|h| HeaderValue::try_from(h).map_err(|e| CheckError::InvalidRequest(format!("host {h:?}: {e}"))))
            .transpose()?;
        Ok(Self { method, path, host, expect: config.expect_status, timeout: config.timeout.get() })
    }

    async fn exchange(&self, address: SocketAddr, named: Option<&str>, deadline: Instant) -> Result<(), CheckError> {
        let stream = timeout_at(deadline, TcpStream::connect(address))
            .await
            .map_err(|_| CheckError::ConnectTimeout(self.timeout))?
            .map_err(CheckError::Connect)?;
        // Nagle would only delay our single small write.
        let _ = stream.set_nodelay(true);
        // The configured `host`, else the DNS name the server was resolved from (what a
        // name-routing server expects), else its address.
        let host = match (&self.host, named) {
            (Some(h), _) => h.clone(),
            (None, Some(name)) => HeaderValue::try_from(name).map_err(|e| CheckError::InvalidRequest(e.to_string()))?,
            (None, None) => {
                HeaderValue::try_from(address.to_string()).map_err(|e| CheckError::InvalidRequest(e.to_string()))?
            }
        };
        let request = Request::builder()
            .method(self.method.clone())
            .uri(self.path.clone())
            .header(HOST, host)
            .header(USER_AGENT, USER_AGENT_VALUE)
            .header(CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| CheckError::InvalidRequest(e.to_string()))?;

        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(CheckError::Protocol)?;
        let work = async {
            let response = timeout_at(deadline, sender.send_request(request))
                .await
                .map_err(|_| CheckError::Timeout(self.timeout))?
                .map_err(CheckError::Protocol)?;
            let status = response.status().as_u16();
            if !self.expect.contains(status) {
                return Err(CheckError::BadStatus { status, expected: self.expect });
            }
            let _ = timeout_at(deadline, discard(response.into_body())).await;
            Ok(())
        };
        drive(work, conn).await
    }
}

impl HealthCheck for HttpHealthCheck {
    async fn check(&self, address: SocketAddr) -> Result<(), CheckError> {
        self.exchange(address, None, Instant::now() + self.timeout).await
    }

    async fn check_named(&self, address: SocketAddr, host: Option<&str>) -> Result<(), CheckError> {
        self.exchange(address, host, Instant::now() + self.timeout).await
    }
}

/// Runs `work` while driving the connection that serves it, and returns `work`'s result.
///
/// The connection is polled here rather than spawned so that dropping the check (timeout,
/// pool gone) drops the socket with it. If the connection ends first, its error reaches `work`
/// through hyper's request or body channel, so only `work`'s result matters.
async fn drive<T>(work: impl Future<Output = T>, conn: impl Future<Output = hyper::Result<()>>) -> T {
    let mut work = pin!(work);
    let mut conn = pin!(conn);
    let mut conn_done = false;
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = &mut conn, if !conn_done => conn_done = true,
        }
    }
}

/// Reads and discards up to [`DRAIN_LIMIT`] body bytes; stops at the end, an error or the cap.
async fn discard(mut body: Incoming) {
    let mut seen = 0;
    while seen < DRAIN_LIMIT {
        match body.frame().await {
            Some(Ok(frame)) => seen += frame.data_ref().map_or(0, Bytes::len),
            Some(Err(_)) | None => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::ErrorKind;
    use std::time::Instant as StdInstant;

    use keel_cluster::HumanDuration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use super::*;

    fn config(expect: &str, timeout_ms: u64) -> model::HealthCheck {
        model::HealthCheck {
            kind: model::CheckKind::Http,
            method: "GET".into(),
            path: "/healthz".into(),
            host: None,
            expect_status: expect.parse().expect("status range"),
            interval: HumanDuration::from_secs(1),
            timeout: HumanDuration::from_millis(timeout_ms),
            rise: 2,
            fall: 3,
        }
    }

    /// What a test server does with each connection.
    #[derive(Clone, Copy)]
    enum Reply {
        /// Reads the request head, writes these bytes, closes.
        With(&'static [u8]),
        /// Reads the request head and then holds the connection open without answering.
        Never,
    }

    /// A raw TCP server on 127.0.0.1 that reports each request head it reads on the channel.
    async fn serve(reply: Reply) -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("addr");
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else { return };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
                    match reply {
                        Reply::With(bytes) => {
                            let _ = socket.write_all(bytes).await;
                            let _ = socket.shutdown().await;
                        }
                        Reply::Never => std::future::pending::<()>().await,
                    }
                });
            }
        });
        (address, rx)
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok";

    #[tokio::test]
    async fn status_200_passes() {
        let (address, _rx) = serve(Reply::With(OK)).await;
        let check = HttpHealthCheck::new(&config("200-399", 1000)).expect("valid");
        check.check(address).await.expect("200 passes");
    }

    #[tokio::test]
    async fn the_request_carries_method_path_host_user_agent_and_close() {
        let (address, mut rx) = serve(Reply::With(OK)).await;
        let mut cfg = config("200", 1000);
        cfg.method = "HEAD".into();
        let check = HttpHealthCheck::new(&cfg).expect("valid");
        check.check(address).await.expect("passes");
        let head = rx.recv().await.expect("request head").to_ascii_lowercase();
        assert!(head.starts_with("head /healthz http/1.1\r\n"), "{head}");
        assert!(head.contains(&format!("host: {address}\r\n")), "{head}");
        assert!(head.contains("user-agent: keel-health-check\r\n"), "{head}");
        assert!(head.contains("connection: close\r\n"), "{head}");

        // A server resolved from a DNS name is checked under that name.
        check.check_named(address, Some("app.internal:8080")).await.expect("passes");
        let head = rx.recv().await.expect("a request").to_ascii_lowercase();
        assert!(head.contains("host: app.internal:8080\r\n"), "{head}");
        cfg.host = Some("app.example".into());
        HttpHealthCheck::new(&cfg).expect("valid").check(address).await.expect("passes");
        let head = rx.recv().await.expect("request head").to_ascii_lowercase();
        assert!(head.contains("host: app.example\r\n"), "{head}");
    }

    #[tokio::test]
    async fn status_503_fails_naming_the_status() {
        let (address, _rx) = serve(Reply::With(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")).await;
        let check = HttpHealthCheck::new(&config("200-399", 1000)).expect("valid");
        let err = check.check(address).await.expect_err("503 fails");
        assert!(matches!(err, CheckError::BadStatus { status: 503, .. }), "{err:?}");
        assert!(err.to_string().contains("503"), "{err}");
    }

    #[tokio::test]
    async fn a_status_outside_the_expected_range_fails() {
        let (address, _rx) = serve(Reply::With(OK)).await;
        let check = HttpHealthCheck::new(&config("300-399", 1000)).expect("valid");
        let err = check.check(address).await.expect_err("200 is not in 300-399");
        assert!(matches!(err, CheckError::BadStatus { status: 200, .. }), "{err:?}");
    }

    #[tokio::test]
    async fn a_server_that_never_answers_fails_within_the_timeout() {
        let (address, mut rx) = serve(Reply::Never).await;
        let check = HttpHealthCheck::new(&config("200-399", 200)).expect("valid");
        let started = StdInstant::now();
        let err = check.check(address).await.expect_err("silence fails");
        let took = started.elapsed();
        assert!(matches!(err, CheckError::Timeout(_)), "{err:?}");
        assert!(took >= Duration::from_millis(190), "gave up early: {took:?}");
        assert!(took < Duration::from_millis(700), "timeout not enforced: {took:?}");
        assert!(rx.try_recv().is_ok(), "the request was sent before the wait");
    }

    #[tokio::test]
    async fn a_refused_connection_fails() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("addr");
        drop(listener);
        let check = HttpHealthCheck::new(&config("200-399", 1000)).expect("valid");
        let err = check.check(address).await.expect_err("refused fails");
        assert!(matches!(&err, CheckError::Connect(e) if e.kind() == ErrorKind::ConnectionRefused), "{err:?}");
    }

    #[tokio::test]
    async fn a_non_http_answer_is_a_protocol_error() {
        let (address, _rx) = serve(Reply::With(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")).await;
        let check = HttpHealthCheck::new(&config("200-399", 1000)).expect("valid");
        let err = check.check(address).await.expect_err("garbage fails");
        assert!(matches!(err, CheckError::Protocol(_)), "{err:?}");
    }

    #[tokio::test]
    async fn a_close_without_answer_is_a_protocol_error() {
        let (address, _rx) = serve(Reply::With(b"")).await;
        let check = HttpHealthCheck::new(&config("200-399", 1000)).expect("valid");
        let err = check.check(address).await.expect_err("empty answer fails");
        assert!(matches!(err, CheckError::Protocol(_)), "{err:?}");
    }

    #[test]
    fn an_unusable_config_is_rejected_up_front() {
        let mut cfg = config("200", 1000);
        cfg.method = "GE T".into();
        assert!(matches!(HttpHealthCheck::new(&cfg), Err(CheckError::InvalidRequest(_))));
        let mut cfg = config("200", 1000);
        cfg.path = "http://elsewhere/".into();
        assert!(matches!(HttpHealthCheck::new(&cfg), Err(CheckError::InvalidRequest(_))));
        let mut cfg = config("200", 1000);
        cfg.host = Some("bad\nhost".into());
        assert!(matches!(HttpHealthCheck::new(&cfg), Err(CheckError::InvalidRequest(_))));
    }
}

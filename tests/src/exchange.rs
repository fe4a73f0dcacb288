//! One HTTP exchange described once ([`Req`]) and sent over HTTP/1.1 or h2c, with what came back
//! in one shape ([`Resp`]): how `tests/differential.rs` compares keel's two front ends.
//!
//! - HTTP/1.1 is written by hand on a [`RawConn`]: the request line, the headers in the order
//!   and letter case given, the framing header the body asks for (`Content-Length` or
//!   `Transfer-Encoding: chunked`, chunk by chunk, trailers included), so what keel parses is
//!   exactly what the test says. The response is read off the wire with
//!   [`RawConn::read_message`]: interim responses, framing, trailers. A request with
//!   `Expect: 100-continue` sends its head, waits for the `100`, then sends the body.
//! - h2c goes through hyper's HTTP/2 client by prior knowledge on a fresh connection: header
//!   names lower-cased, no `Host` (the authority travels in `:authority`), headers HTTP/2
//!   forbids (`Connection`, `Keep-Alive`, `Transfer-Encoding`, `Upgrade`, `Proxy-Connection`)
//!   left out; no body as END_STREAM on the HEADERS frame (and no `content-length`), a
//!   `Length` body as DATA with its `content-length`, a `Chunked` body as one DATA frame per
//!   chunk then its trailers as a HEADERS frame, with no `content-length`.
//!
//! Bodies are streamed into a [`Digest`] on the way in; only their first [`BODY_KEPT`] bytes
//! are kept.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::raw::{Digest, Framing, RawConn, RawMessage, ReadOutcome, BODY_KEPT};

/// A request body and how it is framed.
#[derive(Clone, Debug)]
pub enum ReqBody {
    /// No body, no framing header.
    None,
    /// `Content-Length` and these bytes.
    Length(Bytes),
    /// HTTP/1.1: `Transfer-Encoding: chunked`, one chunk per element (an empty list is just
    /// the last chunk), then the trailers. h2c: one DATA frame per chunk, then the trailers.
    Chunked {
        /// The data chunks, in order.
        chunks: Vec<Bytes>,
        /// Trailer fields, sent after the last chunk.
        trailers: Vec<(String, String)>,
    },
}

impl ReqBody {
    fn is_empty(&self) -> bool {
        match self {
            ReqBody::None => true,
            ReqBody::Length(b) => b.is_empty(),
            ReqBody::Chunked { chunks, .. } => chunks.iter().all(Bytes::is_empty),
        }
    }
}

/// One request, to be sent over either protocol.
#[derive(Clone, Debug)]
pub struct Req {
    /// The method.
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    /// Headers besides `Host` and the framing header, in order, letter case as sent on
    /// HTTP/1.1.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: ReqBody,
}

impl Req {
    /// `method target` with no headers and no body.
    pub fn new(method: &str, target: &str) -> Req {
        Req { method: method.to_owned(), target: target.to_owned(), headers: Vec::new(), body: ReqBody::None }
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Req {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: ReqBody) -> Req {
        self.body = body;
        self
    }

    /// Whether it carries `Expect: 100-continue`.
    pub fn expects_continue(&self) -> bool {
        self.headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("expect") && v.eq_ignore_ascii_case("100-continue"))
    }

    /// The HTTP/1.1 bytes: head (with `Host: authority` first) and body, apart, for
    /// `Expect: 100-continue`.
    pub fn h1_bytes(&self, authority: &str) -> (Vec<u8>, Vec<u8>) {
        let mut head = format!("{} {} HTTP/1.1\r\nHost: {authority}\r\n", self.method, self.target);
        for (k, v) in &self.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        let mut body = Vec::new();
        match &self.body {
            ReqBody::None => {}
            ReqBody::Length(b) => {
                head.push_str(&format!("Content-Length: {}\r\n", b.len()));
                body.extend_from_slice(b);
            }
            ReqBody::Chunked { chunks, trailers } => {
                head.push_str("Transfer-Encoding: chunked\r\n");
                for c in chunks.iter().filter(|c| !c.is_empty()) {
                    body.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                    body.extend_from_slice(c);
                    body.extend_from_slice(b"\r\n");
                }
                body.extend_from_slice(b"0\r\n");
                for (k, v) in trailers {
                    body.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
                }
                body.extend_from_slice(b"\r\n");
            }
        }
        head.push_str("\r\n");
        (head.into_bytes(), body)
    }
}

/// A response as a client saw it, in the same shape for both protocols.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resp {
    /// Interim (1xx) statuses before the final one (HTTP/1.1 only: hyper's HTTP/2 client does
    /// not show them).
    pub interim: Vec<u16>,
    /// The final status.
    pub status: u16,
    /// Header fields, names lower-cased, in the order received.
    pub headers: Vec<(String, String)>,
    /// Length and digest of the whole body.
    pub body: Digest,
    /// Its first [`BODY_KEPT`] bytes.
    pub kept: Vec<u8>,
    /// Trailer fields, names lower-cased.
    pub trailers: Vec<(String, String)>,
    /// HTTP/1.1: how the body was framed; h2c: `None`.
    pub framing: Option<Framing>,
}

impl Resp {
    /// The first value of header `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The kept body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.kept).into_owned()
    }

    /// From a message read off an HTTP/1.1 connection.
    pub fn from_h1(m: RawMessage) -> Resp {
        let lower = |v: Vec<(String, String)>| v.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect();
        Resp {
            interim: m.interim.iter().map(|(s, _)| *s).collect(),
            status: m.status,
            headers: lower(m.headers),
            body: m.body.digest,
            kept: m.body.kept,
            trailers: lower(m.body.trailers),
            framing: Some(m.body.framing),
        }
    }
}

/// Sends `req` on a new HTTP/1.1 connection to `addr` and reads the response, all within
/// `deadline`.
pub async fn send_h1(addr: SocketAddr, req: &Req, deadline: Duration) -> Result<Resp> {
    let mut conn = RawConn::connect(addr).await?;
    let (head, body) = req.h1_bytes(&addr.to_string());
    conn.write(&head).await.context("writing the request head")?;
    let mut interim = Vec::new();
    if req.expects_continue() && !req.body.is_empty() {
        match conn.read_head(deadline).await? {
            ReadOutcome::Response(r) if r.status == 100 => interim.push(100),
            other => bail!("{} {}: expected 100 Continue before the body, got {other:?}", req.method, req.target),
        }
    }
    conn.write(&body).await.context("writing the request body")?;
    let m = conn.read_message(req.method == "HEAD", deadline).await?;
    let mut resp = Resp::from_h1(m);
    interim.extend(resp.interim);
    resp.interim = interim;
    Ok(resp)
}

/// Writes every request on one HTTP/1.1 connection before reading any response (pipelining),
/// then reads the responses in order, all within `deadline`.
pub async fn send_h1_pipelined(addr: SocketAddr, reqs: &[Req], deadline: Duration) -> Result<Vec<Resp>> {
    let mut conn = RawConn::connect(addr).await?;
    let mut bytes = Vec::new();
    for r in reqs {
        let (head, body) = r.h1_bytes(&addr.to_string());
        bytes.extend_from_slice(&head);
        bytes.extend_from_slice(&body);
    }
    conn.write(&bytes).await.context("writing the pipelined requests")?;
    let mut out = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        let m = conn.read_message(r.method == "HEAD", deadline).await.with_context(|| format!("response {i}"))?;
        out.push(Resp::from_h1(m));
    }
    Ok(out)
}

/// Headers HTTP/2 forbids (RFC 9113 §8.2.2), and `Host`, which travels as `:authority`.
const NOT_IN_H2: [&str; 6] = ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "host"];

type H2Body = BoxBody<Bytes, Infallible>;

/// A body that has ended before it began, without saying how long it is: HEADERS with
/// END_STREAM and no `content-length`, which is what an HTTP/1.1 request without framing
/// headers means. (hyper's client adds `content-length: 0` to a `POST` or `OPTIONS` whose
/// body has an exact size of 0, such as `Empty`.)
struct NoBody;

impl hyper::body::Body for NoBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        true
    }
}

fn h2_request(addr: SocketAddr, req: &Req) -> Result<Request<H2Body>> {
    let mut headers = HeaderMap::new();
    for (k, v) in &req.headers {
        let name = HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes())?;
        if NOT_IN_H2.contains(&name.as_str()) {
            continue;
        }
        headers.append(name, HeaderValue::from_str(v)?);
    }
    let body: H2Body = match &req.body {
        ReqBody::None => NoBody.boxed(),
        ReqBody::Length(b) => {
            headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(b.len()));
            Full::new(b.clone()).boxed()
        }
        ReqBody::Chunked { chunks, trailers } => {
            let mut frames: Vec<Result<Frame<Bytes>, Infallible>> =
                chunks.iter().filter(|c| !c.is_empty()).map(|c| Ok(Frame::data(c.clone()))).collect();
            if !trailers.is_empty() {
                let mut t = HeaderMap::new();
                for (k, v) in trailers {
                    t.append(HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes())?, HeaderValue::from_str(v)?);
                }
                frames.push(Ok(Frame::trailers(t)));
            }
            BodyExt::boxed(StreamBody::new(futures_util::stream::iter(frames)))
        }
    };
    let mut r = Request::builder()
        .method(Method::from_bytes(req.method.as_bytes())?)
        .uri(format!("http://{addr}{}", req.target))
        .body(body)?;
    *r.headers_mut() = headers;
    Ok(r)
}

/// Reads a whole h2 response, streaming the body into a digest.
async fn h2_response(resp: http::Response<hyper::body::Incoming>) -> Result<Resp> {
    let (parts, mut body) = resp.into_parts();
    let mut digest = Digest::default();
    let mut kept = Vec::new();
    let mut trailers = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("reading the response body")?;
        match frame.into_data() {
            Ok(data) => {
                digest.update(&data);
                let room = BODY_KEPT.saturating_sub(kept.len());
                kept.extend_from_slice(&data[..room.min(data.len())]);
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    for (k, v) in &t {
                        trailers.push((k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()));
                    }
                }
            }
        }
    }
    let headers = parts
        .headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    Ok(Resp {
        interim: Vec::new(),
        status: parts.status.as_u16(),
        headers,
        body: digest,
        kept,
        trailers,
        framing: None,
    })
}

/// Sends `reqs` as concurrent streams of one new h2c connection to `addr` (prior knowledge)
/// and reads every response, all within `deadline`; the responses are in the order of `reqs`.
pub async fn send_h2_many(addr: SocketAddr, reqs: &[Req], deadline: Duration) -> Result<Vec<Resp>> {
    let exchange = async {
        let stream = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
        let _ = stream.set_nodelay(true);
        let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .context("h2c handshake")?;
        let conn = tokio::spawn(conn);
        let sends = reqs.iter().map(|r| {
            let mut send = send.clone();
            async move {
                let what = format!("{} {}", r.method, r.target);
                let resp = send.send_request(h2_request(addr, r)?).await.with_context(|| format!("h2c {what}"))?;
                h2_response(resp).await.with_context(|| format!("h2c {what}"))
            }
        });
        let out = futures_util::future::join_all(sends).await.into_iter().collect::<Result<Vec<_>>>();
        drop(send);
        conn.abort();
        out
    };
    tokio::time::timeout(deadline, exchange).await.map_err(|_| anyhow!("h2c: no complete responses in {deadline:?}"))?
}

/// Sends `req` on a new h2c connection to `addr` and reads the response within `deadline`.
pub async fn send_h2(addr: SocketAddr, req: &Req, deadline: Duration) -> Result<Resp> {
    let mut out = send_h2_many(addr, std::slice::from_ref(req), deadline).await?;
    out.pop().ok_or_else(|| anyhow!("no response"))
}

//! HTTP clients for talking to keel and backends, and raw TCP for input no client would send.
//!
//! Every exchange is bounded by [`wait::REQUEST`](crate::wait::REQUEST): a hung keel fails the
//! test with a message instead of hanging it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::wait::REQUEST;

/// A complete response: status, headers and the whole body.
#[derive(Clone, Debug)]
pub struct Reply {
    /// Status code.
    pub status: StatusCode,
    /// HTTP version the response came with.
    pub version: Version,
    /// Response headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl Reply {
    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `x-backend` header a [`Backend`](crate::Backend) sets: who answered.
    pub fn backend(&self) -> Option<&str> {
        self.headers.get("x-backend").and_then(|v| v.to_str().ok())
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| format!("body is not JSON: {}", self.text()))
    }

    /// A header's value as a string, if present and ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A GET request for `path` on `addr`, to be completed with headers and sent.
pub fn get(addr: SocketAddr, path: &str) -> http::request::Builder {
    Request::builder().method(Method::GET).uri(format!("http://{addr}{path}"))
}

/// Turns a builder into a body-less request.
pub fn empty(b: http::request::Builder) -> Result<Request<Full<Bytes>>> {
    b.body(Full::new(Bytes::new())).context("building request")
}

/// Reads a whole response (head and body) into a [`Reply`].
pub async fn collect_reply(resp: http::Response<hyper::body::Incoming>) -> Result<Reply> {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.context("reading response body")?.to_bytes();
    Ok(Reply { status: parts.status, version: parts.version, headers: parts.headers, body })
}

/// hyper-util's pooling client: keep-alive connections reused across requests.
#[derive(Clone, Debug)]
pub struct Client {
    inner: hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>,
}

impl Default for Client {
    fn default() -> Self {
        Client::new()
    }
}

impl Client {
    /// HTTP/1.1 with keep-alive.
    pub fn new() -> Client {
        Client { inner: hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http() }
    }

    /// HTTP/2 with prior knowledge (h2c), no HTTP/1 at all.
    pub fn h2c() -> Client {
        Client {
            inner: hyper_util::client::legacy::Client::builder(TokioExecutor::new()).http2_only(true).build_http(),
        }
    }

    /// HTTP/1.1 that keeps no idle connection: every request on a new connection.
    pub fn no_keepalive() -> Client {
        Client {
            inner: hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build_http(),
        }
    }

    /// GET `path` on `addr`.
    pub async fn get(&self, addr: SocketAddr, path: &str) -> Result<Reply> {
        self.send(empty(get(addr, path))?).await
    }

    /// POST `body` to `path` on `addr`.
    pub async fn post(&self, addr: SocketAddr, path: &str, body: &str) -> Result<Reply> {
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{addr}{path}"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_owned())))?;
        self.send(req).await
    }

    /// Sends `req` and reads the whole response, within [`REQUEST`].
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Result<Reply> {
        let what = format!("{} {}", req.method(), req.uri());
        let fut = async {
            let resp = self.inner.request(req).await.with_context(|| format!("{what} failed"))?;
            collect_reply(resp).await
        };
        tokio::time::timeout(REQUEST, fut).await.map_err(|_| anyhow!("{what}: no complete response in {REQUEST:?}"))?
    }

    /// Sends `req` and returns the response as soon as its head arrives (within [`REQUEST`]),
    /// with the body still streaming.
    pub async fn send_streaming(&self, req: Request<Full<Bytes>>) -> Result<http::Response<hyper::body::Incoming>> {
        let what = format!("{} {}", req.method(), req.uri());
        tokio::time::timeout(REQUEST, self.inner.request(req))
            .await
            .map_err(|_| anyhow!("{what}: no response head in {REQUEST:?}"))?
            .with_context(|| format!("{what} failed"))
    }

    /// GETs `path` `n` times in sequence and returns who answered each (the `x-backend`
    /// header); fails on the first transport error or non-2xx status, naming the request.
    pub async fn backends(&self, addr: SocketAddr, path: &str, n: usize) -> Result<Vec<String>> {
        let mut who = Vec::with_capacity(n);
        for i in 0..n {
            let r = self.get(addr, path).await.with_context(|| format!("request {i} of {n}"))?;
            if !r.status.is_success() {
                anyhow::bail!("request {i} of {n}: status {} body {:?}", r.status, r.text());
            }
            who.push(r.backend().ok_or_else(|| anyhow!("request {i} of {n}: no x-backend header"))?.to_owned());
        }
        Ok(who)
    }
}

/// Sends `req` over a new TCP connection (HTTP/1.1), closed afterwards.
pub async fn send_fresh(addr: SocketAddr, req: Request<Full<Bytes>>) -> Result<Reply> {
    let what = format!("{} {}", req.method(), req.uri());
    let fut = async {
        let stream = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let conn = tokio::spawn(conn);
        let resp = send.send_request(req).await.with_context(|| format!("{what} failed"))?;
        let reply = collect_reply(resp).await;
        drop(send);
        conn.abort();
        reply
    };
    tokio::time::timeout(REQUEST, fut).await.map_err(|_| anyhow!("{what}: no complete response in {REQUEST:?}"))?
}

/// GETs `path` on `addr` over a new TCP connection.
pub async fn get_fresh(addr: SocketAddr, path: &str) -> Result<Reply> {
    send_fresh(addr, empty(get(addr, path))?).await
}

/// What came back for bytes written on a raw connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RawOutcome {
    /// A status line arrived with this code.
    Status(u16),
    /// The peer closed or reset the connection without a status line.
    Closed,
    /// Something arrived that is not an HTTP/1 status line.
    Garbage(String),
}

/// Writes `bytes` on a new connection to `addr` and reports the first answer: a status line, a
/// close, or garbage; fails if none of them comes within `deadline`. The write runs
/// concurrently with the read, so a server that answers early and closes mid-upload is seen.
pub async fn raw_exchange(addr: SocketAddr, bytes: Vec<u8>, deadline: Duration) -> Result<RawOutcome> {
    let stream = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        // A server that closes early makes this fail with EPIPE/ECONNRESET: that is an answer.
        let _ = wr.write_all(&bytes).await;
        let _ = wr.flush().await;
        wr
    });
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let outcome = loop {
        let left = deadline.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, rd.read(&mut buf)).await {
            Err(_) => {
                writer.abort();
                anyhow::bail!(
                    "no answer and no close within {deadline:?} (received so far: {:?})",
                    String::from_utf8_lossy(&got)
                );
            }
            Ok(Err(_)) | Ok(Ok(0)) if got.is_empty() => break RawOutcome::Closed,
            Ok(Err(_)) | Ok(Ok(0)) => break classify(&got),
            Ok(Ok(n)) => {
                got.extend_from_slice(&buf[..n]);
                if got.windows(2).any(|w| w == b"\r\n") || got.len() > 1024 {
                    break classify(&got);
                }
            }
        }
    };
    writer.abort();
    Ok(outcome)
}

/// Writes `bytes` on a new connection to `addr` and reads everything until the peer closes;
/// fails if it has not closed within `deadline` (the error shows what arrived).
pub async fn raw_transcript(addr: SocketAddr, bytes: Vec<u8>, deadline: Duration) -> Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
    // A server that closes early makes the write fail: what it sent is still read below.
    let _ = stream.write_all(&bytes).await;
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => anyhow::bail!(
                "the connection was still open after {deadline:?}; received: {:?}",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// One HTTP/1 response parsed out of a raw transcript.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawResponse {
    /// Status code.
    pub status: u16,
    /// Header lines, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

/// Splits a transcript into the responses it holds, in order: each head, then a body framed
/// by Content-Length, chunked encoding, or the end of the transcript; 1xx, 204 and 304 have
/// none. Stops at the first thing that does not parse.
pub fn parse_responses(transcript: &[u8]) -> Vec<RawResponse> {
    let mut out = Vec::new();
    let mut rest = transcript;
    while let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&rest[..end]).into_owned();
        rest = &rest[end + 4..];
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let Some(status) =
            status_line.strip_prefix("HTTP/1.").and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse::<u16>().ok())
        else {
            break;
        };
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let get = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        let mut body = Vec::new();
        if (100..200).contains(&status) || status == 204 || status == 304 {
            // no body
        } else if get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
            loop {
                let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else { return out };
                let size_text = String::from_utf8_lossy(&rest[..eol]).into_owned();
                let Ok(size) = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16) else {
                    return out;
                };
                rest = &rest[eol + 2..];
                if size == 0 {
                    // Skip trailers up to the blank line.
                    match rest.windows(2).position(|w| w == b"\r\n") {
                        Some(0) => rest = &rest[2..],
                        _ => match rest.windows(4).position(|w| w == b"\r\n\r\n") {
                            Some(p) => rest = &rest[p + 4..],
                            None => rest = &[],
                        },
                    }
                    break;
                }
                if rest.len() < size + 2 {
                    return out;
                }
                body.extend_from_slice(&rest[..size]);
                rest = &rest[size + 2..];
            }
        } else if let Some(len) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
            let len = len.min(rest.len());
            body.extend_from_slice(&rest[..len]);
            rest = &rest[len..];
        } else {
            body.extend_from_slice(rest);
            rest = &[];
        }
        out.push(RawResponse { status, headers, body });
    }
    out
}

/// The status codes of the responses in a raw transcript, in order (see [`parse_responses`]).
pub fn status_codes(transcript: &[u8]) -> Vec<u16> {
    parse_responses(transcript).iter().map(|r| r.status).collect()
}

fn classify(got: &[u8]) -> RawOutcome {
    let text = String::from_utf8_lossy(got);
    let line = text.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    match (parts.next(), parts.next().and_then(|c| c.parse::<u16>().ok())) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => RawOutcome::Status(code),
        _ => RawOutcome::Garbage(line.chars().take(200).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_classified() {
        assert_eq!(classify(b"HTTP/1.1 400 Bad Request\r\n"), RawOutcome::Status(400));
        assert_eq!(classify(b"HTTP/1.0 431 x\r\n"), RawOutcome::Status(431));
        assert!(matches!(classify(b"\x00\x01\r\n"), RawOutcome::Garbage(_)));
    }

    #[test]
    fn transcripts_split_into_responses() {
        let t = b"HTTP/1.1 100 Continue\r\n\r\n\
                  HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na\
                  HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n\
                  HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\ngone";
        let rs = parse_responses(t);
        assert_eq!(rs.iter().map(|r| r.status).collect::<Vec<_>>(), [100, 200, 200, 404]);
        assert_eq!(rs[1].body, b"a");
        assert_eq!(rs[2].body, b"abcde");
        assert_eq!(rs[3].body, b"gone");
    }
}

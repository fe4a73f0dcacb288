//! keel's own HTTP/1.1 server path for the request that dominates a load balancer's traffic:
//! a `GET` or `HEAD` without a body, routed to a pool of plain-HTTP servers, on a client
//! connection over plain TCP or TLS.
//!
//! hyper's server runs every request through its dispatcher: the head is parsed into a
//! `Request`, handed to a service future, and the response is encoded back by a state machine
//! built for every case (bodies both ways, upgrades, pipelining, `Expect`). In profiles of the
//! keep-alive benchmark hyper's server side was about a sixth of keel's user time. This path
//! reads the head itself, routes and forwards it with the same code as hyper's service
//! ([`HttpProxy::route_own`], [`HttpProxy::answer_own`], keel's own client), and writes the
//! response head and body straight to the connection, usually in one write.
//!
//! It takes only what it fully understands and gives everything else to hyper, untouched:
//! - the request is HTTP/1.1, `GET` or `HEAD`, in origin form (`/path`), with at most
//!   [`MAX_HEADERS`] headers and none of `Content-Length`, `Transfer-Encoding`, `Upgrade` or
//!   `Expect` (so no body and no protocol switch), and every name and value is valid for the
//!   `http` crate; a head that fails `httparse` or any of this is hyper's, which answers it
//!   exactly as before (400, 431, a body, an upgrade);
//! - its route ends at a pool of plain-HTTP servers (a TLS pool's requests are still left to
//!   hyper's server), decided before the request counts against a rate limit or the connection;
//! - the bytes have already passed the connection's [`GuardedIo`] framing scanner and its
//!   deadlines, as hyper's would.
//!
//! Handing over is at a message boundary: the head (and anything pipelined after it) stays in
//! the buffer, which becomes the prefix hyper reads first. After hyper's turn a plain
//! connection parks and comes back here for its next request; a TLS connection stays with
//! hyper (it never parks).
//!
//! Responses are framed as hyper frames them: the server's `Content-Length` is kept, a body of
//! known size gets one, anything else is sent chunked; no body after `HEAD`, 204 and 304; a
//! `Date` is added when the server sent none; `Connection: close` when the connection ends
//! with this response (the client asked, `max_requests_per_connection` was reached, or the
//! listener is draining). A server's response trailers end a chunked body. A body that fails half-way, or ends short of its length, closes the
//! connection, so the client sees a truncated message rather than a wrong one.

use std::cell::RefCell;
use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use super::guard::{ConnActivity, GuardedIo};
use super::h1::client::poll_fill;
use super::h1::codec::encode_fields;
use super::h1::scan::parse_content_length;
use super::http::{HttpProxy, Peer};

/// Most request headers this path takes; a request with more goes to hyper, whose own limit
/// (`max_headers`) decides.
pub const MAX_HEADERS: usize = 64;
/// Read size for request heads.
const READ_CHUNK: usize = 4096;
/// Body data up to this size is copied behind the head (or the previous data) to go out in one
/// write; larger data is written on its own, uncopied.
const COALESCE: usize = 16 * 1024;

/// What a connection's limits mean for this path.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// `max_requests_per_connection`; 0 is unlimited. hyper's service counts by it too.
    pub max_requests: u32,
    /// Largest request head; a larger one is hyper's to refuse (431).
    pub max_head: usize,
    /// Most request headers; more is hyper's to refuse (431).
    pub max_headers: usize,
}

/// How a turn of this path ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every request read so far is answered and the connection lives on: the buffer is empty.
    Idle,
    /// The connection is done: closed by either side, or it failed.
    Close,
    /// The next request is hyper's: the buffer holds it, unread by anyone else.
    Hyper,
}

/// Serves the requests in `buf` (reading more while a head is incomplete) until the buffer is
/// empty, the connection closes, or a request this path does not take comes next.
pub async fn serve<T: AsyncRead + AsyncWrite + Unpin>(
    proxy: &HttpProxy,
    io: &mut GuardedIo<T>,
    buf: &mut BytesMut,
    peer: &Peer,
    activity: &Arc<ConnActivity>,
    settings: Settings,
    draining: &watch::Receiver<bool>,
) -> Outcome {
    loop {
        if buf.is_empty() {
            return Outcome::Idle;
        }
        let head = match scan(buf, settings) {
            Scan::Own(head) => head,
            Scan::Partial if buf.len() < settings.max_head => match read_more(io, buf).await {
                Ok(0) | Err(_) => return Outcome::Close,
                Ok(_) => continue,
            },
            Scan::Partial | Scan::NotOwn => return Outcome::Hyper,
        };
        let raw = buf.split_to(head.len).freeze();
        let Some(parts) = head.into_parts(&raw) else {
            restore(buf, &raw);
            return Outcome::Hyper;
        };
        let Some(route) = proxy.route_own(&parts, peer) else {
            restore(buf, &raw);
            return Outcome::Hyper;
        };
        let (guard, count) = activity.start_request();
        let asked_close = wants_close(&parts.headers);
        let head_request = parts.method == Method::HEAD;
        let resp = proxy.answer_own(route, parts, peer).await;
        let last = settings.max_requests != 0 && count >= settings.max_requests;
        let keep = !last && !asked_close && !*draining.borrow() && !resp.headers().contains_key(header::CONNECTION);
        activity.set_keep(keep);
        let written = write_response(io, resp, head_request, keep).await;
        drop(guard);
        if let Err(e) = written {
            tracing::debug!(target: "keel::proxy", client = %peer.addr, error = %e, "response not delivered");
            return Outcome::Close;
        }
        if !keep {
            let _ = io.shutdown().await;
            return Outcome::Close;
        }
    }
}

/// Puts a head taken out of `buf` back in front of what follows it.
fn restore(buf: &mut BytesMut, raw: &Bytes) {
    let rest = buf.split();
    buf.reserve(raw.len() + rest.len());
    buf.extend_from_slice(raw);
    buf.extend_from_slice(&rest);
}

/// Reads what the client sent next into `buf`; `Ok(0)` is the end of the stream.
pub(super) async fn read_more<T: AsyncRead + AsyncWrite + Unpin>(
    io: &mut GuardedIo<T>,
    buf: &mut BytesMut,
) -> io::Result<usize> {
    std::future::poll_fn(|cx| poll_fill(io, buf, cx, READ_CHUNK)).await
}

/// Whether a request asks for its connection to close after the response.
pub fn wants_close(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| v.as_bytes().split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close")))
}

enum Scan {
    Own(Head),
    Partial,
    NotOwn,
}

/// Where the parts of a parsed head are, as offsets into its bytes.
struct Head {
    len: usize,
    method: Method,
    target: (usize, usize),
    headers: Vec<(HeaderName, (usize, usize))>,
}

fn span(base: &[u8], part: &[u8]) -> (usize, usize) {
    let start = part.as_ptr() as usize - base.as_ptr() as usize;
    (start, start + part.len())
}

/// Parses the head at the front of `buf`, if there is a whole one, and decides whether it is
/// this path's.
fn scan(buf: &[u8], settings: Settings) -> Scan {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Scan::Partial,
        Err(_) => return Scan::NotOwn,
    };
    if len > settings.max_head || req.headers.len() > settings.max_headers || req.version != Some(1) {
        return Scan::NotOwn;
    }
    let method = match req.method {
        Some("GET") => Method::GET,
        Some("HEAD") => Method::HEAD,
        _ => return Scan::NotOwn,
    };
    let Some(target) = req.path.filter(|p| p.starts_with('/')) else { return Scan::NotOwn };
    let mut headers = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else { return Scan::NotOwn };
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::UPGRADE
            || name == header::EXPECT
        {
            return Scan::NotOwn;
        }
        headers.push((name, span(buf, h.value)));
    }
    Scan::Own(Head { len, method, target: span(buf, target.as_bytes()), headers })
}

impl Head {
    /// The request's parts; header values and the target share `raw`'s bytes.
    fn into_parts(self, raw: &Bytes) -> Option<http::request::Parts> {
        let uri = Uri::from_maybe_shared(raw.slice(self.target.0..self.target.1)).ok()?;
        let mut headers = HeaderMap::with_capacity(self.headers.len());
        for (name, (start, end)) in self.headers {
            headers.append(name, HeaderValue::from_maybe_shared(raw.slice(start..end)).ok()?);
        }
        let (mut parts, ()) = Request::new(()).into_parts();
        parts.method = self.method;
        parts.uri = uri;
        parts.version = Version::HTTP_11;
        parts.headers = headers;
        Some(parts)
    }
}

/// How a response body goes out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// Writes `resp` to the client; an error means the connection must close.
async fn write_response<T, B>(
    io: &mut GuardedIo<T>,
    resp: Response<B>,
    head_request: bool,
    keep: bool,
) -> io::Result<()>
where
    T: AsyncRead + AsyncWrite + Unpin,
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let (mut parts, mut body) = resp.into_parts();
    let status = parts.status;
    // keel's client passes a server's repeated length ("2, 2") on as one value; should a
    // length ever arrive unparsable anyway, it is dropped and the body decides.
    let declared = match parts.headers.get(header::CONTENT_LENGTH) {
        Some(v) => match parse_content_length(v.as_bytes()) {
            Some(n) => Some(n),
            None => {
                parts.headers.remove(header::CONTENT_LENGTH);
                None
            }
        },
        None => None,
    };
    let bodyless = head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let (framing, add) = if bodyless {
        (Framing::None, None)
    } else if let Some(n) = declared {
        (Framing::Length(n), None)
    } else if let Some(n) = body.size_hint().exact() {
        (Framing::Length(n), Some(Framing::Length(n)))
    } else {
        (Framing::Chunked, Some(Framing::Chunked))
    };
    let mut out = BytesMut::with_capacity(256);
    encode_head(&mut out, status, &parts.headers, add, keep);

    let mut sent: u64 = 0;
    let mut trailers = None;
    loop {
        // Frames already at hand join what is pending; only before waiting for one is the
        // pending output written, so a small response leaves in a single write.
        let next = match body.frame().now_or_never() {
            Some(next) => next,
            None => {
                write_out(io, &mut out).await?;
                body.frame().await
            }
        };
        let data = match next {
            None => break,
            Some(Err(e)) => return Err(io::Error::other(format!("response body: {e}"))),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(frame) => {
                    // A server's trailers go on in a chunked body; other framings have no room.
                    trailers = frame.into_trailers().ok();
                    continue;
                }
            },
        };
        if framing == Framing::None || data.is_empty() {
            continue;
        }
        sent += data.len() as u64;
        if let Framing::Length(n) = framing {
            if sent > n {
                return Err(io::Error::other("response body longer than its Content-Length"));
            }
        }
        if framing == Framing::Chunked {
            out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
        }
        if data.len() <= COALESCE {
            out.extend_from_slice(&data);
        } else {
            write_out(io, &mut out).await?;
            io.write_all(&data).await?;
        }
        if framing == Framing::Chunked {
            out.extend_from_slice(b"\r\n");
        }
    }
    match framing {
        Framing::Chunked => {
            out.extend_from_slice(b"0\r\n");
            if let Some(trailers) = &trailers {
                encode_fields(&mut out, trailers);
            }
            out.extend_from_slice(b"\r\n");
        }
        Framing::Length(n) if sent != n => {
            write_out(io, &mut out).await?;
            return Err(io::Error::other("response body shorter than its Content-Length"));
        }
        _ => {}
    }
    write_out(io, &mut out).await?;
    io.flush().await
}

async fn write_out<T: AsyncRead + AsyncWrite + Unpin>(io: &mut GuardedIo<T>, out: &mut BytesMut) -> io::Result<()> {
    while out.has_remaining() {
        io.write_all_buf(out).await?;
    }
    out.clear();
    Ok(())
}

/// The status line and headers, plus the framing header `add`, `Date` when absent, and
/// `Connection: close` when the connection ends with this response.
fn encode_head(out: &mut BytesMut, status: StatusCode, headers: &HeaderMap, add: Option<Framing>, keep: bool) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match add {
        Some(Framing::Length(n)) => out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes()),
        Some(Framing::Chunked) => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    if !headers.contains_key(header::DATE) {
        out.extend_from_slice(b"date: ");
        with_date(|date| out.extend_from_slice(date));
        out.extend_from_slice(b"\r\n");
    }
    if !keep && !headers.contains_key(header::CONNECTION) {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

thread_local! {
    /// The current second's `Date` value, formatted once per second per thread.
    static DATE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

fn with_date(f: impl FnOnce(&[u8])) {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs();
    DATE.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != secs {
            *cached = (secs, httpdate::fmt_http_date(now));
        }
        f(cached.1.as_bytes());
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: Settings = Settings { max_requests: 0, max_head: 8192, max_headers: 100 };

    fn own(head: &[u8]) -> Option<http::request::Parts> {
        match scan(head, SETTINGS) {
            Scan::Own(parsed) => {
                let raw = Bytes::copy_from_slice(&head[..parsed.len]);
                parsed.into_parts(&raw)
            }
            _ => None,
        }
    }

    #[test]
    fn takes_plain_gets_and_heads() {
        let parts = own(b"GET /a?b=c HTTP/1.1\r\nHost: x\r\nX-Y: z\r\n\r\n").expect("own");
        assert_eq!(parts.method, Method::GET);
        assert_eq!(parts.uri, "/a?b=c");
        assert_eq!(parts.headers["host"], "x");
        assert_eq!(parts.headers["x-y"], "z");
        assert!(own(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n").is_some());
    }

    #[test]
    fn leaves_everything_else_to_hyper() {
        for head in [
            &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx"[..],
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
            b"GET / HTTP/1.0\r\nHost: x\r\n\r\n",
            b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
            b"GET /\x7f HTTP/1.1\r\nHost: x\r\n\r\n",
        ] {
            assert!(own(head).is_none(), "{}", String::from_utf8_lossy(head));
        }
        let crowded: Vec<u8> = [&b"GET / HTTP/1.1\r\n"[..], &b"a: b\r\n".repeat(MAX_HEADERS + 1), b"\r\n"].concat();
        assert!(matches!(scan(&crowded, SETTINGS), Scan::NotOwn));
        let few = Settings { max_headers: 1, ..SETTINGS };
        assert!(matches!(scan(b"GET / HTTP/1.1\r\nHost: x\r\nA: b\r\n\r\n", few), Scan::NotOwn));
    }

    #[test]
    fn partial_heads_wait_for_more() {
        assert!(matches!(scan(b"GET / HTTP/1.1\r\nHost: x\r\n", SETTINGS), Scan::Partial));
        assert!(matches!(scan(b"GE", SETTINGS), Scan::Partial));
    }

    #[test]
    fn a_restored_head_precedes_what_followed_it() {
        let mut buf = BytesMut::from(&b"GET /a HTTP/1.1\r\n\r\nGET /b"[..]);
        let raw = buf.split_to(19).freeze();
        restore(&mut buf, &raw);
        assert_eq!(&buf[..], b"GET /a HTTP/1.1\r\n\r\nGET /b");
    }

    #[test]
    fn heads_carry_framing_date_and_close() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let mut out = BytesMut::new();
        encode_head(&mut out, StatusCode::OK, &headers, Some(Framing::Length(2)), false);
        let text = String::from_utf8(out.to_vec()).expect("ascii");
        assert!(
            text.starts_with("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\ndate: "),
            "{text}"
        );
        assert!(text.ends_with(" GMT\r\nconnection: close\r\n\r\n"), "{text}");

        headers.insert(header::DATE, HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"));
        let mut out = BytesMut::new();
        encode_head(&mut out, StatusCode::from_u16(599).expect("code"), &headers, Some(Framing::Chunked), true);
        let text = String::from_utf8(out.to_vec()).expect("ascii");
        assert_eq!(
            text,
            "HTTP/1.1 599 \r\ncontent-type: text/plain\r\ndate: Thu, 01 Jan 1970 00:00:00 GMT\r\ntransfer-encoding: chunked\r\n\r\n"
        );
    }
}

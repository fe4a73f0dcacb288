//! keel's HTTP/1.x server half: reads every request a client sends on an HTTP/1 connection
//! (plain or TLS), hands it to the request path ([`crate::proxy::phases`]) with its body
//! streaming from the connection, and writes the response back.
//!
//! What it implements, as HAProxy and nginx do:
//! - heads parsed with `httparse` after the connection's framing scanner ([`super::scan`], in
//!   [`GuardedIo`]) has let them through (it answers ambiguous framing, a missing `Host`, an
//!   over-long request line, an unknown transfer coding and an unserved HTTP version itself:
//!   400 / 414 / 501 / 505); a head over `max_header_bytes` gets 431, more than `max_headers`
//!   fields 431, an unparsable one 400;
//! - request bodies framed by `Content-Length` or chunked (with trailers), decoded by
//!   [`codec::Decoder`] off the connection's read buffer and streamed to the server as they
//!   arrive; anything pipelined behind a request stays in the buffer for the next turn;
//! - `Expect: 100-continue`: keel answers `100 Continue` itself when the request path first asks
//!   for the body (so a request refused before that — 404, 429, 503 — never makes the client
//!   send it), and the server never sees the `Expect`;
//! - keep-alive: HTTP/1.1 unless `Connection: close`; HTTP/1.0 only with
//!   `Connection: keep-alive` (answered with the same); `Connection: close` on the last request
//!   of `max_requests_per_connection`, while draining, and after any request whose body was not
//!   read to its end (the rest of the input cannot be trusted to be framed);
//! - responses framed as the server framed them where that is possible: the server's
//!   `Content-Length` kept, a body of known size given one, anything else chunked (with the
//!   server's trailers) to HTTP/1.1 clients and delimited by the close to HTTP/1.0 clients; no
//!   body after `HEAD`, 1xx, 204 and 304; `Date` added when missing;
//! - upgrades (WebSocket): the `101` head is written, then bytes flow both ways between client
//!   and server until both sides have closed, half-close passed on; an upgrade request answered
//!   with anything else closes the connection after the answer (the scanner stopped checking
//!   at the upgrade head);
//! - `CONNECT` is refused with 405: keel is a reverse proxy, not a forward one.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use super::client::RawFields;
use super::codec::{self, poll_fill, Decoded, Decoder, Framing, Prefixed};
use crate::proxy::error::plain_response;
use crate::proxy::guard::{ConnActivity, GuardedIo};
use crate::proxy::phases::{HttpProxy, Peer, ProxyBody};

/// Read size for request heads and bodies.
const READ_CHUNK: usize = 16 * 1024;
/// Most header fields httparse is given room for; `max_headers` may only lower it.
pub const MAX_HEADERS: usize = 256;

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// What a connection's limits mean for this half.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// `max_requests_per_connection`; 0 is unlimited.
    pub max_requests: u32,
    /// Largest request head (431 beyond).
    pub max_head: usize,
    /// Most request header fields (431 beyond).
    pub max_headers: usize,
}

/// How a turn of serving ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every request read so far is answered and the connection lives on: the buffer is empty.
    Idle,
    /// The connection is done: closed by either side, failed, or upgraded and finished.
    Close,
}

/// Serves the requests in `buf` (reading more while a head is incomplete) until the buffer is
/// empty at a message boundary or the connection ends.
pub async fn serve<T>(
    proxy: &HttpProxy,
    io: &mut GuardedIo<T>,
    buf: &mut BytesMut,
    peer: &Peer,
    activity: &Arc<ConnActivity>,
    settings: Settings,
    draining: &watch::Receiver<bool>,
) -> Outcome
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    loop {
        if buf.is_empty() {
            return Outcome::Idle;
        }
        let head = match parse(buf, settings) {
            Parse::Complete(head) => head,
            Parse::Partial => match std::future::poll_fn(|cx| poll_fill(io, buf, cx, READ_CHUNK)).await {
                Ok(0) | Err(_) => return Outcome::Close,
                Ok(_) => continue,
            },
            Parse::Refused(status, why) => {
                refuse(io, status, why).await;
                return Outcome::Close;
            }
        };
        let raw = buf.split_to(head.len).freeze();
        let Some(request) = head.into_request(&raw) else {
            refuse(io, StatusCode::BAD_REQUEST, "invalid request target or header").await;
            return Outcome::Close;
        };
        let Parsed { mut parts, framing, expect_continue, wants_keep, upgrade } = request;
        if parts.method == Method::CONNECT {
            refuse(io, StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not served here").await;
            return Outcome::Close;
        }
        if expect_continue {
            parts.headers.remove(header::EXPECT);
        }
        let head_request = parts.method == Method::HEAD;
        let version = parts.version;
        let (guard, count) = activity.start_request();
        let mut decoder = Decoder::new(framing);
        let resp = {
            let body = (!decoder.is_done()).then(|| RequestBody {
                io: &mut *io,
                buf: &mut *buf,
                decoder: &mut decoder,
                owe_continue: expect_continue.then_some(0),
            });
            proxy.handle(parts, body, peer).await
        };
        let last = settings.max_requests != 0 && count >= settings.max_requests;
        let body_read = decoder.is_done();
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        let keep = wants_keep
            && !last
            && body_read
            && (!upgrade || switching)
            && !*draining.borrow()
            && !resp.headers().contains_key(header::CONNECTION);
        let written = if switching && upgrade {
            tunnel(io, buf, resp).await
        } else {
            write_response(io, resp, head_request, version, keep).await.map(|()| keep)
        };
        drop(guard);
        match written {
            Ok(true) => {}
            Ok(false) => {
                let _ = io.shutdown().await;
                return Outcome::Close;
            }
            Err(e) => {
                tracing::debug!(target: "keel::proxy", client = %peer.addr, error = %e, "response not delivered");
                return Outcome::Close;
            }
        }
    }
}

/// Answers `status` with a one-line reason and closes.
async fn refuse<T: AsyncRead + AsyncWrite + Unpin + 'static>(io: &mut GuardedIo<T>, status: StatusCode, why: &str) {
    let mut resp = plain_response(status, why.to_owned());
    resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    let resp = resp.map(ProxyBody::Local);
    let _ = write_response(io, resp, false, Version::HTTP_11, false).await;
    let _ = io.shutdown().await;
}

enum Parse {
    Complete(Head),
    Partial,
    Refused(StatusCode, &'static str),
}

/// Where the parts of a parsed head are, as offsets into its bytes.
struct Head {
    len: usize,
    method: Method,
    version: Version,
    target: (usize, usize),
    headers: Vec<(HeaderName, (usize, usize))>,
}

fn span(base: &[u8], part: &[u8]) -> (usize, usize) {
    let start = part.as_ptr() as usize - base.as_ptr() as usize;
    (start, start + part.len())
}

fn parse(buf: &[u8], settings: Settings) -> Parse {
    // Uninitialised slots: zeroing 256 of them would cost more than parsing a typical head.
    let mut slots = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let room = settings.max_headers.clamp(1, MAX_HEADERS);
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut slots[..room]) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > settings.max_head => {
            return Parse::Refused(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large")
        }
        Ok(httparse::Status::Partial) => return Parse::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            return Parse::Refused(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "too many header fields")
        }
        Err(_) => return Parse::Refused(StatusCode::BAD_REQUEST, "malformed request head"),
    };
    if len > settings.max_head {
        return Parse::Refused(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large");
    }
    let version = if req.version == Some(1) { Version::HTTP_11 } else { Version::HTTP_10 };
    let Some(method) = req.method.and_then(|m| Method::from_bytes(m.as_bytes()).ok()) else {
        return Parse::Refused(StatusCode::BAD_REQUEST, "invalid method");
    };
    let Some(target) = req.path else { return Parse::Refused(StatusCode::BAD_REQUEST, "missing request target") };
    let mut headers = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else {
            return Parse::Refused(StatusCode::BAD_REQUEST, "invalid header name");
        };
        headers.push((name, span(buf, h.value)));
    }
    Parse::Complete(Head { len, method, version, target: span(buf, target.as_bytes()), headers })
}

/// A request as the request path gets it, and what the connection needs to know of it.
struct Parsed {
    parts: http::request::Parts,
    framing: Framing,
    expect_continue: bool,
    /// The client lets the connection live on after this exchange.
    wants_keep: bool,
    /// It asks to switch protocols (`Connection: upgrade` + `Upgrade`).
    upgrade: bool,
}

impl Head {
    /// The request's parts (header values and the target share `raw`'s bytes) and its framing.
    /// `None` when a value or the target is not valid for the `http` crate.
    fn into_request(self, raw: &Bytes) -> Option<Parsed> {
        let uri = Uri::from_maybe_shared(raw.slice(self.target.0..self.target.1)).ok()?;
        // Room for what the request path adds (X-Forwarded-*, the request id): growing the map
        // rehashes every field.
        let mut headers = HeaderMap::with_capacity(self.headers.len() + 4);
        let mut framing = Framing::Empty;
        let mut expect_continue = false;
        let mut close = false;
        let mut keep_alive = false;
        let mut upgrade_token = false;
        for (name, (start, end)) in self.headers {
            let value = HeaderValue::from_maybe_shared(raw.slice(start..end)).ok()?;
            if name == header::CONTENT_LENGTH {
                // The scanner allowed one plain number, and never beside Transfer-Encoding.
                framing = Framing::Length(codec::parse_content_length(value.as_bytes())?);
            } else if name == header::TRANSFER_ENCODING {
                framing = Framing::Chunked;
            } else if name == header::EXPECT {
                expect_continue |= value.as_bytes().eq_ignore_ascii_case(b"100-continue");
            } else if name == header::CONNECTION {
                for token in value.as_bytes().split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    close |= token.eq_ignore_ascii_case(b"close");
                    keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
                    upgrade_token |= token.eq_ignore_ascii_case(b"upgrade");
                }
            }
            headers.append(name, value);
        }
        let http11 = self.version == Version::HTTP_11;
        let upgrade = http11 && upgrade_token && headers.contains_key(header::UPGRADE);
        let (mut parts, ()) = http::Request::new(()).into_parts();
        parts.method = self.method;
        parts.uri = uri;
        parts.version = self.version;
        parts.headers = headers;
        Some(Parsed {
            parts,
            framing,
            expect_continue: expect_continue && http11,
            wants_keep: !close && (http11 || keep_alive),
            upgrade,
        })
    }
}

/// A request body streaming off the client connection: decoded from what the connection has
/// buffered, reading more as the request path asks for it.
pub struct RequestBody<'a, T> {
    io: &'a mut GuardedIo<T>,
    buf: &'a mut BytesMut,
    decoder: &'a mut Decoder,
    /// `Some(written)` while a `100 Continue` is owed to the client.
    owe_continue: Option<usize>,
}

/// An HTTP/1 body borrows its connection: it is never handed to a task of its own.
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> crate::proxy::phases::ClientSource for RequestBody<'_, T> {
    fn detach(
        _: &mut Option<crate::proxy::body::Streamed<crate::proxy::access_log::Counted<Self>>>,
    ) -> Option<crate::proxy::h2_client::OwnedBody> {
        None
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + 'static> RequestBody<'_, T> {
    /// Writes the owed `100 Continue`, unless the client already sent body bytes.
    fn poll_continue(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(written) = self.owe_continue {
            if !self.buf.is_empty() || written == CONTINUE.len() {
                self.owe_continue = None;
                break;
            }
            match Pin::new(&mut *self.io).poll_write(cx, &CONTINUE[written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.owe_continue = Some(written + n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + 'static> Body for RequestBody<'_, T> {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if let Err(e) = std::task::ready!(this.poll_continue(cx)) {
            return Poll::Ready(Some(Err(e)));
        }
        loop {
            match this.decoder.decode(this.buf) {
                Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(Decoded::Trailers(trailers)) => return Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
                Ok(Decoded::End) => return Poll::Ready(None),
                Ok(Decoded::NeedMore) => {}
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
            }
            match std::task::ready!(poll_fill(this.io, this.buf, cx, READ_CHUNK)) {
                Ok(0) => {
                    let ended = this.decoder.eof().map_err(io::Error::from);
                    return Poll::Ready(ended.err().map(Err));
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder.remaining() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// Writes `resp` to the client; an error means the connection must close.
async fn write_response<T>(
    io: &mut GuardedIo<T>,
    resp: Response<ProxyBody>,
    head_request: bool,
    version: Version,
    mut keep: bool,
) -> Result<(), codec::WriteBodyError>
where
    T: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let (mut parts, mut body) = resp.into_parts();
    let status = parts.status;
    let raw = body.raw_fields();
    // keel's client passes a server's repeated length ("2, 2") on as one value; should a
    // length ever arrive unparsable anyway, it is dropped and the body decides.
    let declared = match (raw, parts.headers.get(header::CONTENT_LENGTH)) {
        (Some(raw), _) => raw.length,
        (None, Some(v)) => match codec::parse_content_length(v.as_bytes()) {
            Some(n) => Some(n),
            None => {
                parts.headers.remove(header::CONTENT_LENGTH);
                None
            }
        },
        (None, None) => None,
    };
    let bodyless = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let (framing, add) = if bodyless {
        (Framing::Empty, None)
    } else if let Some(n) = declared {
        (Framing::Length(n), None)
    } else if let Some(n) = body.size_hint().exact() {
        (Framing::Length(n), Some(Framing::Length(n)))
    } else if version == Version::HTTP_11 {
        (Framing::Chunked, Some(Framing::Chunked))
    } else {
        // An HTTP/1.0 client knows no chunked coding: the close ends the body.
        keep = false;
        (Framing::Close, None)
    };
    let raw_len = raw.map_or(0, |r| r.lines.len());
    let mut out = BytesMut::with_capacity(256 + codec::encoded_len(&parts.headers) + raw_len);
    encode_head(&mut out, status, Fields { map: &parts.headers, raw }, add, keep, version);
    codec::write_body(io, &mut out, &mut body, framing).await.map(drop)
}

/// A response's fields: its map, and the server's fields as lines when they came so (the map
/// then holds only what keel set: the request id).
#[derive(Clone, Copy)]
struct Fields<'a> {
    map: &'a HeaderMap,
    raw: Option<&'a RawFields>,
}

/// The status line and headers, plus the framing header `add`, `Date` when absent, and the
/// connection's fate: `Connection: close` when it ends with this response, `keep-alive` to an
/// HTTP/1.0 client that may keep it.
fn encode_head(
    out: &mut BytesMut,
    status: StatusCode,
    fields: Fields<'_>,
    add: Option<Framing>,
    keep: bool,
    version: Version,
) {
    let headers = fields.map;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    codec::encode_fields(out, headers);
    if let Some(raw) = fields.raw {
        out.extend_from_slice(&raw.lines);
    }
    match add {
        Some(Framing::Length(n)) => out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes()),
        Some(Framing::Chunked) => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    if !headers.contains_key(header::DATE) && !fields.raw.is_some_and(|r| r.date) {
        out.extend_from_slice(b"date: ");
        codec::with_date(|date| out.extend_from_slice(date));
        out.extend_from_slice(b"\r\n");
    }
    if !headers.contains_key(header::CONNECTION) {
        if !keep {
            out.extend_from_slice(b"connection: close\r\n");
        } else if version == Version::HTTP_10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes a `101` and then carries bytes both ways until both sides have closed. Anything the
/// client sent after its upgrade request (already in `buf`) goes to the server first. Returns
/// `Ok(false)`: the connection is done afterwards.
async fn tunnel<T>(
    io: &mut GuardedIo<T>,
    buf: &mut BytesMut,
    resp: Response<ProxyBody>,
) -> Result<bool, codec::WriteBodyError>
where
    T: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let (parts, body) = resp.into_parts();
    let ProxyBody::Upgrade(mut server) = body else {
        // A 101 keel did not get a server connection for cannot be honoured.
        return Err(codec::WriteBodyError::Sink(io::Error::other("101 without an upgraded server connection")));
    };
    let mut out = BytesMut::with_capacity(256);
    encode_head(&mut out, parts.status, Fields { map: &parts.headers, raw: None }, None, true, Version::HTTP_11);
    codec::write_out(io, &mut out).await.map_err(codec::WriteBodyError::Sink)?;
    io.flush().await.map_err(codec::WriteBodyError::Sink)?;
    let mut client = Prefixed::new(io, buf.split().freeze());
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut server).await {
        tracing::debug!(target: "keel::proxy", error = %e, "upgraded connection ended with an error");
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: Settings = Settings { max_requests: 0, max_head: 8192, max_headers: 100 };

    fn request(head: &[u8]) -> Option<Parsed> {
        match parse(head, SETTINGS) {
            Parse::Complete(parsed) => {
                let raw = Bytes::copy_from_slice(&head[..parsed.len]);
                parsed.into_request(&raw)
            }
            _ => None,
        }
    }

    #[test]
    fn heads_become_requests_with_their_framing() {
        let r = request(b"GET /a?b=c HTTP/1.1\r\nHost: x\r\nX-Y: z\r\n\r\n").expect("parsed");
        assert_eq!((r.parts.method, r.parts.uri.to_string()), (Method::GET, "/a?b=c".to_owned()));
        assert_eq!((r.framing, r.wants_keep, r.upgrade), (Framing::Empty, true, false));
        let r =
            request(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n").expect("post");
        assert_eq!((r.framing, r.expect_continue), (Framing::Length(5), true));
        let r = request(b"PUT / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
            .expect("put");
        assert_eq!((r.framing, r.wants_keep), (Framing::Chunked, false));
        let r = request(b"GET / HTTP/1.0\r\n\r\n").expect("1.0");
        assert!(!r.wants_keep, "HTTP/1.0 closes unless it asks for keep-alive");
        let r = request(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").expect("1.0 keep-alive");
        assert!(r.wants_keep);
        let r =
            request(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").expect("ws");
        assert!(r.upgrade);
        let r = request(b"GET http://x/p HTTP/1.1\r\nHost: y\r\n\r\n").expect("absolute form");
        assert_eq!(r.parts.uri.host(), Some("x"));
        assert!(request(b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n").is_some());
    }

    #[test]
    fn oversized_and_crowded_heads_get_431() {
        let long: Vec<u8> = [&b"GET / HTTP/1.1\r\nX: "[..], &[b'a'; 9000], b"\r\n\r\n"].concat();
        assert!(matches!(parse(&long, SETTINGS), Parse::Refused(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, _)));
        assert!(matches!(
            parse(&long[..8500], SETTINGS),
            Parse::Refused(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, _)
        ));
        let few = Settings { max_headers: 1, ..SETTINGS };
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nHost: x\r\nA: b\r\n\r\n", few),
            Parse::Refused(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, _)
        ));
        assert!(matches!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n", SETTINGS), Parse::Partial));
        assert!(matches!(parse(b"\x01GET / HTTP/1.1\r\n\r\n", SETTINGS), Parse::Refused(StatusCode::BAD_REQUEST, _)));
    }

    #[test]
    fn heads_carry_framing_date_and_connection() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let mut out = BytesMut::new();
        encode_head(
            &mut out,
            StatusCode::OK,
            Fields { map: &headers, raw: None },
            Some(Framing::Length(2)),
            false,
            Version::HTTP_11,
        );
        let text = String::from_utf8(out.to_vec()).expect("ascii");
        assert!(
            text.starts_with("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\ndate: "),
            "{text}"
        );
        assert!(text.ends_with(" GMT\r\nconnection: close\r\n\r\n"), "{text}");

        headers.insert(header::DATE, HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"));
        let mut out = BytesMut::new();
        let status = StatusCode::from_u16(599).expect("code");
        encode_head(
            &mut out,
            status,
            Fields { map: &headers, raw: None },
            Some(Framing::Chunked),
            true,
            Version::HTTP_11,
        );
        let text = String::from_utf8(out.to_vec()).expect("ascii");
        assert_eq!(
            text,
            "HTTP/1.1 599 \r\ncontent-type: text/plain\r\ndate: Thu, 01 Jan 1970 00:00:00 GMT\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        let mut out = BytesMut::new();
        encode_head(&mut out, StatusCode::OK, Fields { map: &headers, raw: None }, None, true, Version::HTTP_10);
        assert!(String::from_utf8_lossy(&out).ends_with("connection: keep-alive\r\n\r\n"));
    }

    #[test]
    fn a_servers_fields_as_lines_follow_keels_own() {
        let mut keel = HeaderMap::new();
        keel.insert("x-request-id", HeaderValue::from_static("ours"));
        let lines =
            Bytes::from_static(b"server: nginx\r\ndate: Thu, 01 Jan 1970 00:00:00 GMT\r\ncontent-length: 2\r\n");
        let raw = RawFields { lines, date: true, length: Some(2) };
        let mut out = BytesMut::new();
        encode_head(&mut out, StatusCode::OK, Fields { map: &keel, raw: Some(&raw) }, None, true, Version::HTTP_11);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "HTTP/1.1 200 OK\r\nx-request-id: ours\r\nserver: nginx\r\ndate: Thu, 01 Jan 1970 00:00:00 GMT\r\n\
             content-length: 2\r\n\r\n",
            "no second Date, no framing line of keel's beside the server's length"
        );
        let raw = RawFields { lines: Bytes::new(), date: false, length: None };
        let mut out = BytesMut::new();
        encode_head(
            &mut out,
            StatusCode::OK,
            Fields { map: &HeaderMap::new(), raw: Some(&raw) },
            None,
            false,
            Version::HTTP_11,
        );
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\ndate: ") && text.ends_with("connection: close\r\n\r\n"), "{text}");
    }
}

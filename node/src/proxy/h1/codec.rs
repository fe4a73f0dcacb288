//! HTTP/1.1 message framing, both directions, shared by keel's server half (client
//! connections) and client half (server connections): how a body is delimited ([`Framing`]),
//! reading one off a buffer ([`Decoder`]: `Content-Length`, chunked with trailers, or until
//! close), and writing one out ([`write_body`]), plus the small encoders for heads.
//!
//! One implementation for both sides is the point: a request body from a client and a response
//! body from a server are the same wire format, so they meet the same limits and the same
//! checks (the chunk-size and `Content-Length` rules are the framing scanner's, see
//! [`super::scan`]).

use std::cell::RefCell;
use std::io;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http_body::Body;
use http_body_util::BodyExt;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

pub use super::scan::{parse_chunk_size, parse_content_length};

/// Longest chunk-size line (size, extensions, CRLF) accepted.
const MAX_CHUNK_LINE: usize = 1024;
/// Longest trailer section accepted.
pub const MAX_TRAILERS: usize = 16 * 1024;
/// Most trailer fields accepted.
const MAX_TRAILER_FIELDS: usize = 64;
/// Body data up to this size is copied behind what is pending (a head, earlier data) so that
/// it leaves in one write; larger data is written on its own, uncopied.
pub const COALESCE: usize = 16 * 1024;

/// How a message body is delimited on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`, possibly with trailers.
    Chunked,
    /// Until the sender closes the connection (responses only).
    Close,
}

/// One step of decoding a body from a buffer.
#[derive(Debug)]
pub enum Decoded {
    /// Body bytes.
    Data(Bytes),
    /// The trailer fields of a chunked body; the body has ended.
    Trailers(HeaderMap),
    /// The body has ended.
    End,
    /// The buffer holds no whole step: read more, then call again.
    NeedMore,
}

/// Why a body's framing was refused.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Chunked framing broke its rules.
    #[error("invalid chunked framing: {0}")]
    Chunk(&'static str),
    /// The stream ended before the body did.
    #[error("connection closed inside the body")]
    Truncated,
}

impl From<DecodeError> for io::Error {
    fn from(e: DecodeError) -> Self {
        let kind = match e {
            DecodeError::Chunk(_) => io::ErrorKind::InvalidData,
            DecodeError::Truncated => io::ErrorKind::UnexpectedEof,
        };
        io::Error::new(kind, e)
    }
}

#[derive(Debug)]
enum State {
    Length(u64),
    /// Reading a chunk-size line.
    Size,
    /// Inside chunk data: bytes left.
    Data(u64),
    /// The CRLF after chunk data.
    DataEnd,
    /// After the last chunk: the trailer section, up to its empty line.
    Trailers,
    Close,
    Done,
}

/// Decodes one body off the front of a connection's read buffer, leaving whatever follows it
/// (the next pipelined message) in the buffer.
#[derive(Debug)]
pub struct Decoder {
    state: State,
}

impl Decoder {
    /// A decoder for a body framed as `framing`.
    pub fn new(framing: Framing) -> Self {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Size,
            Framing::Close => State::Close,
        };
        Decoder { state }
    }

    /// Whether the whole body has been decoded.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Bytes of body still expected, when the framing says.
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(n) => Some(n),
            State::Done => Some(0),
            _ => None,
        }
    }

    /// The next step from what `buf` holds. Data is split off the buffer without copying.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, DecodeError> {
        loop {
            match &mut self.state {
                State::Done => return Ok(Decoded::End),
                State::Close => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    return Ok(Decoded::Data(buf.split().freeze()));
                }
                State::Length(left) => {
                    let Some(data) = take(left, buf) else { return Ok(Decoded::NeedMore) };
                    if *left == 0 {
                        self.state = State::Done;
                    }
                    return Ok(Decoded::Data(data));
                }
                State::Size => {
                    let Some(end) = find_crlf(buf) else {
                        if buf.len() > MAX_CHUNK_LINE {
                            return Err(DecodeError::Chunk("chunk-size line too long"));
                        }
                        return Ok(Decoded::NeedMore);
                    };
                    let size = parse_chunk_size(&buf[..end + 2]).map_err(DecodeError::Chunk)?;
                    buf.advance(end + 2);
                    self.state = if size == 0 { State::Trailers } else { State::Data(size) };
                }
                State::Data(left) => {
                    let Some(data) = take(left, buf) else { return Ok(Decoded::NeedMore) };
                    if *left == 0 {
                        self.state = State::DataEnd;
                    }
                    return Ok(Decoded::Data(data));
                }
                State::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(DecodeError::Chunk("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    self.state = State::Size;
                }
                State::Trailers => {
                    // Most chunked bodies end with no trailers: "0\r\n\r\n".
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        self.state = State::Done;
                        return Ok(Decoded::End);
                    }
                    let Some(end) = find_blank_line(buf) else {
                        if buf.len() > MAX_TRAILERS {
                            return Err(DecodeError::Chunk("trailer section too large"));
                        }
                        return Ok(Decoded::NeedMore);
                    };
                    if end > MAX_TRAILERS {
                        return Err(DecodeError::Chunk("trailer section too large"));
                    }
                    let section = buf.split_to(end).freeze();
                    self.state = State::Done;
                    return Ok(Decoded::Trailers(parse_trailers(&section)?));
                }
            }
        }
    }

    /// The stream ended: fine for a body delimited by the close (which ends here), an error for
    /// any other body still expecting bytes.
    pub fn eof(&mut self) -> Result<(), DecodeError> {
        match self.state {
            State::Close | State::Done => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(DecodeError::Truncated),
        }
    }
}

/// Splits up to `left` bytes off the front of `buf` (none: `None`), counting them off `left`.
fn take(left: &mut u64, buf: &mut BytesMut) -> Option<Bytes> {
    if buf.is_empty() {
        return None;
    }
    let n = (*left).min(buf.len() as u64) as usize;
    *left -= n as u64;
    Some(buf.split_to(n).freeze())
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// Position just past the CRLFCRLF ending a trailer section (whose first line is not empty).
fn find_blank_line(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Trailer fields, validated like header fields; fields that must not be trailers (framing,
/// routing, authentication: RFC 9110 §6.5.1) are dropped.
fn parse_trailers(section: &[u8]) -> Result<HeaderMap, DecodeError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_TRAILER_FIELDS];
    let fields = match httparse::parse_headers(section, &mut slots) {
        Ok(httparse::Status::Complete((_, fields))) => fields,
        Ok(httparse::Status::Partial) | Err(_) => return Err(DecodeError::Chunk("malformed trailer")),
    };
    let mut trailers = HeaderMap::with_capacity(fields.len());
    for field in fields.iter() {
        let name =
            HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| DecodeError::Chunk("malformed trailer"))?;
        let value = HeaderValue::from_bytes(field.value).map_err(|_| DecodeError::Chunk("malformed trailer"))?;
        if !forbidden_trailer(&name) {
            trailers.append(name, value);
        }
    }
    Ok(trailers)
}

fn forbidden_trailer(name: &HeaderName) -> bool {
    use http::header::*;
    [CONTENT_LENGTH, TRANSFER_ENCODING, HOST, CONNECTION, TE, TRAILER, AUTHORIZATION, SET_COOKIE, CONTENT_TYPE]
        .contains(name)
}

/// Appends `name: value\r\n` for every field.
pub fn encode_fields(out: &mut BytesMut, fields: &HeaderMap) {
    for (name, value) in fields {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// Bytes the fields take once encoded, for reserving.
pub fn encoded_len(fields: &HeaderMap) -> usize {
    fields.iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum()
}

/// Why a body could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum WriteBodyError {
    /// The body's source failed (a client's upload broke, a server's response broke).
    #[error("body source failed: {0}")]
    Source(Box<dyn std::error::Error + Send + Sync>),
    /// Writing to the receiving connection failed.
    #[error("writing the body: {0}")]
    Sink(#[source] io::Error),
    /// The source gave more or fewer bytes than the declared length.
    #[error("body length does not match its Content-Length ({sent} of {declared} bytes)")]
    Length {
        /// Bytes the source gave.
        sent: u64,
        /// Bytes the framing declared.
        declared: u64,
    },
}

impl WriteBodyError {
    /// Whether the receiving side failed (rather than the body's source).
    pub fn is_sink(&self) -> bool {
        matches!(self, WriteBodyError::Sink(_))
    }
}

/// Streams `body` to `io` framed as `framing`, after whatever `out` already holds (a head).
/// Frames already at hand are gathered into `out` and written together; only before waiting
/// for the source is pending output written, so a small message leaves in a single write.
/// `Framing::Empty` sends nothing of the body (a response to `HEAD`, a 204, a 304) but still
/// drains it. Returns the body bytes sent; `out` is empty on return.
pub async fn write_body<W, B>(
    io: &mut W,
    out: &mut BytesMut,
    body: &mut B,
    framing: Framing,
) -> Result<u64, WriteBodyError>
where
    W: AsyncWrite + Unpin,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut sent: u64 = 0;
    let mut trailers = None;
    loop {
        let next = match body.frame().now_or_never() {
            Some(next) => next,
            None => {
                write_out(io, out).await.map_err(WriteBodyError::Sink)?;
                body.frame().await
            }
        };
        let frame = match next {
            None => break,
            Some(Err(e)) => return Err(WriteBodyError::Source(e.into())),
            Some(Ok(frame)) => frame,
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
                continue;
            }
        };
        if framing == Framing::Empty || data.is_empty() {
            continue;
        }
        sent += data.len() as u64;
        if let Framing::Length(n) = framing {
            if sent > n {
                return Err(WriteBodyError::Length { sent, declared: n });
            }
        }
        if framing == Framing::Chunked {
            out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
        }
        if data.len() <= COALESCE {
            out.extend_from_slice(&data);
        } else {
            write_out(io, out).await.map_err(WriteBodyError::Sink)?;
            io.write_all(&data).await.map_err(WriteBodyError::Sink)?;
        }
        if framing == Framing::Chunked {
            out.extend_from_slice(b"\r\n");
        }
    }
    match framing {
        Framing::Chunked => {
            out.extend_from_slice(b"0\r\n");
            if let Some(trailers) = &trailers {
                encode_fields(out, trailers);
            }
            out.extend_from_slice(b"\r\n");
        }
        Framing::Length(n) if sent != n => {
            write_out(io, out).await.map_err(WriteBodyError::Sink)?;
            return Err(WriteBodyError::Length { sent, declared: n });
        }
        _ => {}
    }
    write_out(io, out).await.map_err(WriteBodyError::Sink)?;
    io.flush().await.map_err(WriteBodyError::Sink)?;
    Ok(sent)
}

/// Writes and clears `out`.
pub async fn write_out<W: AsyncWrite + Unpin>(io: &mut W, out: &mut BytesMut) -> io::Result<()> {
    while out.has_remaining() {
        io.write_all_buf(out).await?;
    }
    out.clear();
    Ok(())
}

/// Reads once into `buf`, first reserving `want` bytes when less than a quarter of that is free.
/// Every HTTP/1 read keel makes, from clients and from servers, goes through here.
pub fn poll_fill<R: AsyncRead + Unpin>(
    stream: &mut R,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
    want: usize,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < want / 4 {
        buf.reserve(want);
    }
    // Through `AsyncRead` (not `try_read_buf`): a short read clears the cached readiness, which
    // is what lets an idle connection's readiness be trusted (see the client's checkout).
    tokio_util::io::poll_read_buf(Pin::new(stream), cx, buf)
}

/// A stream whose first bytes were already read elsewhere (to sniff the HTTP/2 preface, sent
/// behind an upgrade request or its 101): those bytes come first, then the stream's.
pub struct Prefixed<T> {
    io: T,
    prefix: bytes::Bytes,
}

impl<T> Prefixed<T> {
    /// `io`, read from after `prefix`.
    pub fn new(io: T, prefix: bytes::Bytes) -> Self {
        Prefixed { io, prefix }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
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

thread_local! {
    /// The current second's `Date` value, formatted once per second per thread.
    static DATE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// Calls `f` with the current `Date` header value.
pub fn with_date(f: impl FnOnce(&[u8])) {
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
    use http_body_util::StreamBody;

    fn decode_all(framing: Framing, wire: &[u8]) -> Result<(Vec<u8>, Option<HeaderMap>, BytesMut), DecodeError> {
        let mut d = Decoder::new(framing);
        let mut buf = BytesMut::from(wire);
        let mut data = Vec::new();
        loop {
            match d.decode(&mut buf)? {
                Decoded::Data(b) => data.extend_from_slice(&b),
                Decoded::Trailers(t) => return Ok((data, Some(t), buf)),
                Decoded::End => return Ok((data, None, buf)),
                Decoded::NeedMore => {
                    d.eof()?;
                    return Ok((data, None, buf));
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_with_and_without_trailers() {
        let (data, trailers, rest) = decode_all(Framing::Chunked, b"3;x=y\r\nabc\r\n2\r\nde\r\n0\r\n\r\nNEXT").unwrap();
        assert_eq!((data.as_slice(), trailers.is_none(), &rest[..]), (&b"abcde"[..], true, &b"NEXT"[..]));
        let (data, trailers, rest) =
            decode_all(Framing::Chunked, b"1\r\na\r\n0\r\ngrpc-status: 0\r\nContent-Length: 9\r\n\r\nNEXT").unwrap();
        let trailers = trailers.expect("trailers");
        assert_eq!((data.as_slice(), &rest[..]), (&b"a"[..], &b"NEXT"[..]));
        assert_eq!(trailers["grpc-status"], "0");
        assert!(!trailers.contains_key("content-length"), "framing fields are never trailers");
    }

    #[test]
    fn chunked_framing_errors() {
        for wire in [&b"z\r\n"[..], b"3\r\nabcX", b"0\r\nbad trailer\r\n\r\n", b"-1\r\n"] {
            assert!(decode_all(Framing::Chunked, wire).is_err(), "{:?}", String::from_utf8_lossy(wire));
        }
        assert!(matches!(decode_all(Framing::Chunked, b"5\r\nab"), Err(DecodeError::Truncated)));
    }

    #[test]
    fn lengths_and_close() {
        let (data, _, rest) = decode_all(Framing::Length(3), b"abcdef").unwrap();
        assert_eq!((data.as_slice(), &rest[..]), (&b"abc"[..], &b"def"[..]));
        assert!(matches!(decode_all(Framing::Length(9), b"abc"), Err(DecodeError::Truncated)));
        let (data, _, _) = decode_all(Framing::Close, b"all of it").unwrap();
        assert_eq!(data, b"all of it");
        assert!(Decoder::new(Framing::Length(0)).is_done());
    }

    #[test]
    fn split_anywhere_decodes_the_same() {
        let wire = b"3\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nx-t: 1\r\n\r\n";
        for cut in 0..wire.len() {
            let mut d = Decoder::new(Framing::Chunked);
            let mut buf = BytesMut::from(&wire[..cut]);
            let mut data = Vec::new();
            let mut trailers = None;
            let mut fed = false;
            loop {
                match d.decode(&mut buf).expect("valid") {
                    Decoded::Data(b) => data.extend_from_slice(&b),
                    Decoded::Trailers(t) => {
                        trailers = Some(t);
                        break;
                    }
                    Decoded::End => break,
                    Decoded::NeedMore => {
                        assert!(!fed, "stuck at cut {cut}");
                        buf.extend_from_slice(&wire[cut..]);
                        fed = true;
                    }
                }
            }
            assert_eq!(data, b"abc0123456789abcdef", "cut {cut}");
            assert_eq!(trailers.expect("trailers")["x-t"], "1");
        }
    }

    #[tokio::test]
    async fn bodies_are_written_framed() {
        let frames = || {
            futures_util::stream::iter(vec![
                Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from_static(b"abc"))),
                Ok(http_body::Frame::data(Bytes::from_static(b"de"))),
                Ok(http_body::Frame::trailers({
                    let mut t = HeaderMap::new();
                    t.insert("x-t", HeaderValue::from_static("1"));
                    t
                })),
            ])
        };
        let mut body = StreamBody::new(frames());
        let mut wire = Vec::new();
        let mut out = BytesMut::from(&b"HEAD\r\n"[..]);
        write_body(&mut wire, &mut out, &mut body, Framing::Chunked).await.unwrap();
        assert_eq!(wire, b"HEAD\r\n3\r\nabc\r\n2\r\nde\r\n0\r\nx-t: 1\r\n\r\n");

        let mut body = StreamBody::new(frames());
        let mut wire = Vec::new();
        write_body(&mut wire, &mut BytesMut::new(), &mut body, Framing::Length(5)).await.unwrap();
        assert_eq!(wire, b"abcde");

        let mut body = StreamBody::new(frames());
        let short = write_body(&mut Vec::new(), &mut BytesMut::new(), &mut body, Framing::Length(9)).await;
        assert!(matches!(short, Err(WriteBodyError::Length { sent: 5, declared: 9 })));
        let mut empty = http_body_util::Empty::<Bytes>::new();
        let mut wire = Vec::new();
        write_body(&mut wire, &mut BytesMut::new(), &mut empty, Framing::Chunked).await.unwrap();
        assert_eq!(wire, b"0\r\n\r\n");
    }
}

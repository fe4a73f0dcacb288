//! A client's request body on its way to a server: the limits the edge enforces (a size cap,
//! a longest pause between bytes, a minimum average upload rate) and request buffering.
//!
//! - [`ClientBody`] enforces the limits. A violation fails the stream (keel's client abandons
//!   any exchange with the server) and records *why* in a shared [`BodyVerdict`], so the proxy
//!   answers the client with the status that names its own fault — 413, 408, 400 — instead of
//!   a 502 that would blame the server. A client that closes or resets its connection inside
//!   the body is [`BodyFault::Gone`]: its fault too, never the server's.
//! - [`buffer`] is nginx's `proxy_request_buffering` for small bodies: a body that fits in the
//!   listener's `request_buffer` is read whole, under those limits, *before* a server is chosen,
//!   so a slow client holds no server connection, and the body becomes [`Buffered`]: it can be
//!   sent again on a retry. A larger body streams ([`Streamed`]), with whatever was read while
//!   finding out that it was larger sent first; it can be sent once.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

/// Any error a body source may end with.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a client body was cut off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum BodyFault {
    /// Larger than `max_body_bytes`.
    TooLarge = 1,
    /// A pause longer than `body_timeout`, or an average rate below `min_body_rate`.
    TooSlow = 2,
    /// The body's framing was invalid (e.g. a bad chunk).
    Malformed = 3,
    /// The client closed or reset its connection (or stream) before the body ended.
    Gone = 4,
}

impl BodyFault {
    /// What a failed body source means: invalid framing, or a client that went away. Any other
    /// failure of the client's source is counted as the client gone: it is never the server's.
    fn of(error: &(dyn std::error::Error + 'static)) -> BodyFault {
        let mut cause = Some(error);
        while let Some(e) = cause {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                return if io.kind() == std::io::ErrorKind::InvalidData {
                    BodyFault::Malformed
                } else {
                    BodyFault::Gone
                };
            }
            cause = e.source();
        }
        BodyFault::Gone
    }
}

/// Shared record of a body's fault, read by the proxy after the exchange failed.
#[derive(Debug, Default)]
pub struct BodyVerdict(AtomicU8);

impl BodyVerdict {
    /// The fault, if the body was cut off.
    pub fn fault(&self) -> Option<BodyFault> {
        match self.0.load(Ordering::Acquire) {
            1 => Some(BodyFault::TooLarge),
            2 => Some(BodyFault::TooSlow),
            3 => Some(BodyFault::Malformed),
            4 => Some(BodyFault::Gone),
            _ => None,
        }
    }

    fn set(&self, fault: BodyFault) {
        self.0.store(fault as u8, Ordering::Release);
    }
}

/// The error a cut-off body reports to keel's client.
#[derive(Debug, thiserror::Error)]
#[error("client request body refused: {0:?}")]
pub struct BodyError(pub BodyFault);

/// Limits applied to one request body.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimits {
    /// Most bytes accepted.
    pub max_bytes: u64,
    /// Longest pause between two reads; also the grace period before the rate applies.
    pub timeout: Duration,
    /// Lowest average rate in bytes/s (0 = none).
    pub min_rate: u32,
}

pin_project_lite::pin_project! {
    /// A client's request body with size, pause and rate limits.
    pub struct ClientBody<B> {
        #[pin]
        inner: B,
        // Made only when the body first has to wait for the client: a body that is already in
        // the connection's buffer (most small ones) never registers a timer. Boxed so the body
        // stays Unpin, which keel's client requires.
        timer: Option<Pin<Box<tokio::time::Sleep>>>,
        limits: BodyLimits,
        received: u64,
        started: Instant,
        last: Instant,
        verdict: Arc<BodyVerdict>,
    }
}

impl<B> ClientBody<B> {
    /// Wraps `inner`; faults are recorded in `verdict`.
    pub fn new(inner: B, limits: BodyLimits, verdict: Arc<BodyVerdict>) -> Self {
        let now = Instant::now();
        ClientBody { inner, timer: None, limits, received: 0, started: now, last: now, verdict }
    }
}

/// When the body must next show progress: the pause limit, or the moment the average rate
/// would fall below the minimum if nothing more arrived.
fn next_deadline(limits: &BodyLimits, started: Instant, last: Instant, received: u64) -> Instant {
    let pause = last + limits.timeout;
    if limits.min_rate == 0 {
        return pause;
    }
    let earned = Duration::from_secs_f64(received as f64 / f64::from(limits.min_rate));
    pause.min(started + earned.max(limits.timeout))
}

impl<B> Body for ClientBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let mut this = self.project();
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    *this.received += data.len() as u64;
                    if *this.received > this.limits.max_bytes {
                        this.verdict.set(BodyFault::TooLarge);
                        return Poll::Ready(Some(Err(BodyError(BodyFault::TooLarge))));
                    }
                }
                *this.last = Instant::now();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let fault = BodyFault::of(&*e.into());
                this.verdict.set(fault);
                Poll::Ready(Some(Err(BodyError(fault))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                // The deadline moves only when the body is waiting: one timer update per wait,
                // not one per frame.
                let deadline = next_deadline(this.limits, *this.started, *this.last, *this.received).into();
                let timer = match this.timer {
                    Some(timer) => {
                        if timer.deadline() != deadline {
                            timer.as_mut().reset(deadline);
                        }
                        timer
                    }
                    None => this.timer.insert(Box::pin(tokio::time::sleep_until(deadline))),
                };
                if timer.as_mut().poll(cx).is_ready() {
                    this.verdict.set(BodyFault::TooSlow);
                    return Poll::Ready(Some(Err(BodyError(BodyFault::TooSlow))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body after the buffering phase.
pub enum Payload<B> {
    /// Read whole before a server was chosen: sendable any number of times.
    Buffered(Buffered),
    /// Streams from the client: sendable once.
    Streamed(Streamed<B>),
}

/// Reads `body` whole if it fits in `limit` bytes (its declared length, or what arrives before
/// its end), under the body limits; otherwise hands it back to stream. Fails only with the
/// client's own fault: nothing has been sent anywhere yet.
pub async fn buffer<B>(mut body: ClientBody<B>, limit: u64) -> Result<Payload<B>, BodyFault>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    if limit == 0 || body.size_hint().lower() > limit {
        return Ok(Payload::Streamed(Streamed { prefix: None, inner: body }));
    }
    // A body that arrives as one frame (most small ones: read with their head) is kept as that
    // frame's bytes, uncopied. A frame that does not end the body is copied at once instead:
    // its bytes share the connection's read buffer, and holding them while the next read
    // reserves room would make that read allocate a fresh buffer.
    let mut first = Bytes::new();
    let mut data = BytesMut::new();
    let mut trailers = None;
    loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        match frame {
            None => break,
            Some(Err(BodyError(fault))) => return Err(fault),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(bytes) if first.is_empty() && data.is_empty() && body.is_end_stream() => first = bytes,
                Ok(bytes) => {
                    if data.is_empty() {
                        data.extend_from_slice(&std::mem::take(&mut first));
                    }
                    data.extend_from_slice(&bytes);
                }
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        trailers = Some(t);
                    }
                }
            },
        }
        if (first.len() + data.len()) as u64 > limit {
            // Larger than its declaration allowed for (a chunked body): it streams, what was
            // read going first.
            let read = if data.is_empty() { first } else { data.freeze() };
            return Ok(Payload::Streamed(Streamed { prefix: Some(read), inner: body }));
        }
    }
    let data = if data.is_empty() { first } else { data.freeze() };
    Ok(Payload::Buffered(Buffered { data, trailers }))
}

/// A body read whole: its bytes and trailers, shared by every attempt that sends it.
#[derive(Clone, Debug, Default)]
pub struct Buffered {
    data: Bytes,
    trailers: Option<HeaderMap>,
}

impl Buffered {
    /// One sending of the body (cheap: the bytes are shared).
    pub fn replay(&self) -> Replay {
        Replay { data: Some(self.data.clone()).filter(|d| !d.is_empty()), trailers: self.trailers.clone() }
    }

    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        self.data.len() as u64
    }

    /// Whether it ended with trailers.
    pub fn has_trailers(&self) -> bool {
        self.trailers.is_some()
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// One sending of a [`Buffered`] body (an empty one for a request without a body).
#[derive(Debug, Default)]
pub struct Replay {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for Replay {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if let Some(data) = this.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// A body streaming from the client, after the bytes read while trying to buffer it.
pub struct Streamed<B> {
    prefix: Option<Bytes>,
    inner: ClientBody<B>,
}

impl<B> Body for Streamed<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if let Some(prefix) = this.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        Pin::new(&mut this.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let prefix = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + prefix);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + prefix);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    #[test]
    fn deadline_is_the_pause_or_the_rate_whichever_comes_first() {
        let t0 = Instant::now();
        let limits = BodyLimits { max_bytes: u64::MAX, timeout: Duration::from_secs(10), min_rate: 100 };
        // Nothing received: the grace period.
        assert_eq!(next_deadline(&limits, t0, t0, 0), t0 + Duration::from_secs(10));
        // 5000 bytes buy 50 s at 100 B/s, but a pause still ends 10 s after the last byte.
        let last = t0 + Duration::from_secs(1);
        assert_eq!(next_deadline(&limits, t0, last, 5000), last + Duration::from_secs(10));
        // A trickle: 1200 bytes after 11 s must have had more by 12 s.
        let last = t0 + Duration::from_secs(11);
        assert_eq!(next_deadline(&limits, t0, last, 1200), t0 + Duration::from_secs(12));
        let no_rate = BodyLimits { min_rate: 0, ..limits };
        assert_eq!(next_deadline(&no_rate, t0, last, 1), last + Duration::from_secs(10));
    }

    fn limits() -> BodyLimits {
        BodyLimits { max_bytes: 1000, timeout: Duration::from_secs(10), min_rate: 0 }
    }

    fn chunks(parts: &[&'static [u8]]) -> impl Body<Data = Bytes, Error = std::io::Error> + Unpin {
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> =
            parts.iter().map(|p| Ok(Frame::data(Bytes::from_static(p)))).collect();
        http_body_util::StreamBody::new(futures_util::stream::iter(frames))
    }

    async fn collect<B: Body<Data = Bytes> + Unpin>(mut body: B) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(Ok(frame)) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            if let Ok(data) = frame.into_data() {
                out.extend_from_slice(&data);
            }
        }
        out
    }

    #[tokio::test]
    async fn a_small_body_is_buffered_and_replays_a_larger_one_streams_whole() {
        let body = ClientBody::new(chunks(&[b"ab", b"cd"]), limits(), Arc::default());
        let Ok(Payload::Buffered(buffered)) = buffer(body, 4).await else { panic!("not buffered") };
        assert_eq!(collect(buffered.replay()).await, b"abcd");
        assert_eq!(collect(buffered.replay()).await, b"abcd", "a second attempt sends it all again");

        let body = ClientBody::new(chunks(&[b"ab", b"cd", b"ef"]), limits(), Arc::default());
        let Ok(Payload::Streamed(streamed)) = buffer(body, 3).await else { panic!("not streamed") };
        assert_eq!(collect(streamed).await, b"abcdef", "what was read to find out comes first");

        let body = ClientBody::new(chunks(&[b"ab"]), limits(), Arc::default());
        assert!(matches!(buffer(body, 0).await, Ok(Payload::Streamed(_))), "0 turns buffering off");
    }

    #[tokio::test]
    async fn a_client_gone_mid_body_is_its_own_fault() {
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed")),
        ];
        let verdict = Arc::new(BodyVerdict::default());
        let body = ClientBody::new(
            http_body_util::StreamBody::new(futures_util::stream::iter(frames)),
            limits(),
            verdict.clone(),
        );
        assert!(matches!(buffer(body, 100).await, Err(BodyFault::Gone)));
        assert_eq!(verdict.fault(), Some(BodyFault::Gone));
        let bad = std::io::Error::new(std::io::ErrorKind::InvalidData, "bad chunk");
        assert_eq!(BodyFault::of(&bad), BodyFault::Malformed);
    }

    fn body_of(
        frames: Vec<&'static [u8]>,
    ) -> ClientBody<impl Body<Data = Bytes, Error = std::convert::Infallible> + Unpin> {
        let frames = frames.into_iter().map(|f| Ok(Frame::data(Bytes::from_static(f))));
        let inner = http_body_util::StreamBody::new(futures_util::stream::iter(frames.collect::<Vec<_>>()));
        let limits = BodyLimits { max_bytes: 1 << 20, timeout: Duration::from_secs(10), min_rate: 0 };
        ClientBody::new(inner, limits, Arc::default())
    }

    #[tokio::test]
    async fn one_frame_bodies_are_buffered_uncopied_and_longer_ones_whole() {
        static ONE: &[u8] = b"the whole body in one read";
        let limits = BodyLimits { max_bytes: 1 << 20, timeout: Duration::from_secs(10), min_rate: 0 };
        let whole = ClientBody::new(http_body_util::Full::new(Bytes::from_static(ONE)), limits, Arc::default());
        let Ok(Payload::Buffered(b)) = buffer(whole, 64).await else { panic!("not buffered") };
        assert_eq!(b.data.as_ptr(), ONE.as_ptr(), "a frame that ends the body: its bytes themselves");
        let Ok(Payload::Buffered(b)) = buffer(body_of(vec![ONE]), 64).await else { panic!("not buffered") };
        assert_ne!(b.data.as_ptr(), ONE.as_ptr(), "a frame that may not end the body is copied");
        assert_eq!(&b.data[..], ONE);
        let Ok(Payload::Buffered(b)) = buffer(body_of(vec![b"ab", b"", b"cd", b"e"]), 64).await else {
            panic!("not buffered")
        };
        assert_eq!(&b.data[..], b"abcde");
        let Ok(Payload::Streamed(s)) = buffer(body_of(vec![b"abc", b"def"]), 4).await else { panic!("not streamed") };
        assert_eq!(s.prefix.as_deref(), Some(&b"abcdef"[..]), "what was read goes first");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_never_waits_registers_no_timer_and_a_stalled_one_times_out() {
        let mut body = body_of(vec![b"ready"]);
        assert!(body.frame().await.is_some());
        assert!(body.timer.is_none());
        let limits = BodyLimits { max_bytes: 1 << 20, timeout: Duration::from_secs(10), min_rate: 0 };
        let verdict = Arc::new(BodyVerdict::default());
        let mut stalled = ClientBody::new(
            http_body_util::StreamBody::new(futures_util::stream::pending::<
                Result<Frame<Bytes>, std::convert::Infallible>,
            >()),
            limits,
            verdict.clone(),
        );
        let started = tokio::time::Instant::now();
        assert!(matches!(stalled.frame().await, Some(Err(BodyError(BodyFault::TooSlow)))));
        assert!(started.elapsed() >= Duration::from_secs(10));
        assert_eq!(verdict.fault(), Some(BodyFault::TooSlow));
    }

    #[test]
    fn verdict_records_the_fault() {
        let v = BodyVerdict::default();
        assert_eq!(v.fault(), None);
        v.set(BodyFault::TooLarge);
        assert_eq!(v.fault(), Some(BodyFault::TooLarge));
    }
}

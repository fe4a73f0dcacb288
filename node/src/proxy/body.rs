//! A client's request body on its way to a server, with the limits the edge enforces: a size
//! cap, a longest pause between bytes, and a minimum average upload rate.
//!
//! The body is streamed, so a violation is discovered mid-request. The wrapper then fails the
//! stream (keel's client abandons the exchange with the server) and records *why* in a shared
//! [`BodyVerdict`], so the proxy can answer the client with the status that names its own
//! fault — 413, 408 or 400 — instead of a 502 that would blame the server.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

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
        // Boxed so the body stays Unpin, which keel's client requires.
        timer: Pin<Box<tokio::time::Sleep>>,
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
        ClientBody {
            inner,
            timer: Box::pin(tokio::time::sleep_until((now + limits.timeout).into())),
            limits,
            received: 0,
            started: now,
            last: now,
            verdict,
        }
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

impl<B: Body<Data = Bytes>> Body for ClientBody<B> {
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
                let deadline = next_deadline(this.limits, *this.started, *this.last, *this.received);
                this.timer.as_mut().reset(deadline.into());
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(_))) => {
                this.verdict.set(BodyFault::Malformed);
                Poll::Ready(Some(Err(BodyError(BodyFault::Malformed))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if this.timer.as_mut().poll(cx).is_ready() {
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

#[cfg(test)]
mod tests {
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

    #[test]
    fn verdict_records_the_fault() {
        let v = BodyVerdict::default();
        assert_eq!(v.fault(), None);
        v.set(BodyFault::TooLarge);
        assert_eq!(v.fault(), Some(BodyFault::TooLarge));
    }
}

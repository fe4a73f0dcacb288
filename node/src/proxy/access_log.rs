//! Access logs: one line per HTTP request or TCP session, per listener that has an
//! `access_log` table.
//!
//! The request path never waits for a disk: a finished [`Entry`] is rendered to a line and put
//! on a bounded queue ([`QUEUE`] lines) that one writer thread per log drains. A line that
//! finds the queue full is dropped and counted ([`dropped`], `keel_access_log_dropped_total`).
//! A thread rather than a task because file writes block; it ends once every sender (the
//! listener's proxy and its connections) is gone.
//!
//! A [`Pending`] entry is a guard: it writes its line when dropped, so an exchange that ends
//! any way at all — a response body that ends, a client that goes away mid-body, a request
//! future that is cancelled (an HTTP/2 stream reset) — leaves exactly one line. What the line
//! says about how it ended is set as the exchange goes.
//!
//! Files are opened in append mode and reopened after SIGUSR1 ([`reopen_all`]), which is what
//! logrotate's `postrotate` sends: the writer notices within [`REOPEN_CHECK`] even while idle.
//! Syslog and user-defined templates are not offered: `human` and `json` only.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keel_cluster::model::{self, AccessLogFormat};
use serde::Serialize;

/// Lines a log's queue holds before new ones are dropped.
pub const QUEUE: usize = 8192;
/// How often an idle writer looks for a reopen request.
pub const REOPEN_CHECK: Duration = Duration::from_millis(200);

static DROPPED: AtomicU64 = AtomicU64::new(0);
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Lines dropped by every access log since start, for `/metrics`.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Asks every file-backed access log to reopen its file (SIGUSR1).
pub fn reopen_all() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// Why an access log could not start.
#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    /// The file could not be opened for appending.
    #[error("cannot open access log {path:?}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The writer thread could not be started.
    #[error("cannot start the access log writer: {0}")]
    Thread(io::Error),
}

/// Where lines go.
enum Sink {
    Stdout,
    File(PathBuf),
}

impl Sink {
    fn open(&self) -> Result<Box<dyn Write + Send>, AccessLogError> {
        match self {
            Sink::Stdout => Ok(Box::new(io::stdout())),
            Sink::File(path) => OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map(|f: File| Box::new(f) as Box<dyn Write + Send>)
                .map_err(|source| AccessLogError::Open { path: path.clone(), source }),
        }
    }
}

/// One listener's access log: the sending end of its writer's queue.
pub struct AccessLog {
    tx: SyncSender<String>,
    format: AccessLogFormat,
}

impl AccessLog {
    /// Opens the destination (so a bad path fails at start, not silently later) and starts the
    /// writer.
    pub fn start(config: &model::AccessLog) -> Result<Arc<Self>, AccessLogError> {
        let sink = match config.destination.as_str() {
            "stdout" | "-" => Sink::Stdout,
            path => Sink::File(PathBuf::from(path)),
        };
        let out = sink.open()?;
        let (tx, rx) = mpsc::sync_channel::<String>(QUEUE);
        std::thread::Builder::new()
            .name("keel-access-log".into())
            .spawn(move || write_lines(&sink, out, &rx))
            .map_err(AccessLogError::Thread)?;
        Ok(Arc::new(AccessLog { tx, format: config.format }))
    }

    /// Queues `entry`'s line; drops (and counts) it when the writer is behind.
    pub fn write(&self, entry: &Entry) {
        let line = match self.format {
            AccessLogFormat::Human => entry.human(),
            AccessLogFormat::Json => entry.json(),
        };
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The writer thread: lines as they come, flushed whenever the queue is empty, the file reopened
/// when [`reopen_all`] was called.
fn write_lines(sink: &Sink, out: Box<dyn Write + Send>, rx: &mpsc::Receiver<String>) {
    let mut out = BufWriter::new(out);
    let mut generation = GENERATION.load(Ordering::Relaxed);
    loop {
        let first = match rx.recv_timeout(REOPEN_CHECK) {
            Ok(line) => Some(line),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let now = GENERATION.load(Ordering::Relaxed);
        if now != generation {
            generation = now;
            let _ = out.flush();
            match sink.open() {
                Ok(new) => out = BufWriter::new(new),
                // Keep writing to the old file rather than lose lines.
                Err(e) => tracing::warn!(target: "keel::proxy", error = %e, "cannot reopen access log"),
            }
        }
        let Some(first) = first else { continue };
        let _ = out.write_all(first.as_bytes());
        while let Ok(line) = rx.try_recv() {
            let _ = out.write_all(line.as_bytes());
        }
        let _ = out.flush();
    }
    let _ = out.flush();
}

/// Everything one line says.
#[derive(Clone, Debug, Serialize)]
pub struct Entry {
    /// When the request head (or TCP connection) arrived, as RFC 3339 UTC.
    #[serde(serialize_with = "ser_time")]
    pub time: SystemTime,
    /// The listener's name.
    pub listener: Arc<str>,
    /// The client's address.
    pub client: SocketAddr,
    /// Request method (empty for TCP).
    pub method: String,
    /// Request path and query (empty for TCP).
    pub path: String,
    /// `HTTP/1.1`, `HTTP/2`, … or `TCP`.
    pub version: &'static str,
    /// The request's authority (`:authority` or `Host`).
    pub authority: Option<String>,
    /// Response status (none for TCP, or when no response was made).
    pub status: Option<u16>,
    /// Request body bytes from the client (for TCP: bytes from the client).
    pub bytes_in: u64,
    /// Response body bytes to the client (for TCP: bytes to the client).
    pub bytes_out: u64,
    /// The pool chosen.
    pub pool: Option<String>,
    /// The server that answered (or last failed).
    pub server: Option<String>,
    /// Attempts after the first.
    pub retries: u32,
    /// From the head received to the last response byte (or the connection closed).
    #[serde(rename = "total_ms", serialize_with = "ser_ms")]
    pub total: Duration,
    /// From the request sent to the server's response head.
    #[serde(rename = "server_ms", serialize_with = "ser_opt_ms")]
    pub server_time: Option<Duration>,
    /// Why the exchange did not end normally (`client_gone`, `server_timeout`, …).
    pub termination: Option<&'static str>,
    /// The request's id.
    pub request_id: Option<String>,
}

impl Entry {
    /// An entry for an exchange that started now.
    pub fn new(listener: Arc<str>, client: SocketAddr, version: &'static str) -> Self {
        Entry {
            time: SystemTime::now(),
            listener,
            client,
            method: String::new(),
            path: String::new(),
            version,
            authority: None,
            status: None,
            bytes_in: 0,
            bytes_out: 0,
            pool: None,
            server: None,
            retries: 0,
            total: Duration::ZERO,
            server_time: None,
            termination: None,
            request_id: None,
        }
    }

    /// One JSON object and a newline.
    pub fn json(&self) -> String {
        let mut line = serde_json::to_string(self).unwrap_or_default();
        line.push('\n');
        line
    }

    /// In the spirit of HAProxy's `httplog`:
    /// `client [time] listener pool/server server_ms/total_ms status in/out termination
    /// retries authority id "METHOD path VERSION"`, `-` for what is missing.
    pub fn human(&self) -> String {
        fn or_dash(v: Option<&str>) -> &str {
            v.unwrap_or("-")
        }
        let server_ms = self.server_time.map_or_else(|| "-".to_owned(), |d| ms(d).to_string());
        let status = self.status.map_or_else(|| "-".to_owned(), |s| s.to_string());
        let request = if self.method.is_empty() {
            self.version.to_owned()
        } else {
            format!("{} {} {}", self.method, escape(&self.path), self.version)
        };
        format!(
            "{} [{}] {} {}/{} {}/{} {} {}/{} {} {} {} {} \"{}\"\n",
            self.client,
            rfc3339(self.time),
            self.listener,
            or_dash(self.pool.as_deref()),
            or_dash(self.server.as_deref()),
            server_ms,
            ms(self.total),
            status,
            self.bytes_in,
            self.bytes_out,
            or_dash(self.termination),
            self.retries,
            escape(or_dash(self.authority.as_deref())),
            escape(or_dash(self.request_id.as_deref())),
            request,
        )
    }
}

/// A client's bytes in a human line: no quotes, spaces or control characters that would let
/// a request forge a field or a line.
fn escape(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_graphic() && c != '"' { c } else { '?' }).collect()
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn ser_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(ms(*d))
}

fn ser_opt_ms<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_f64(ms(*d)),
        None => s.serialize_none(),
    }
}

fn ser_time<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*t))
}

/// `2026-12-02T15:05:12.123Z`.
fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z", rem / 3600, rem % 3600 / 60, rem % 60, d.subsec_millis())
}

/// Howard Hinnant's days-to-civil: the proleptic Gregorian date of a day count since 1970.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// An entry on its way: written when dropped, however the exchange ended.
pub struct Pending {
    log: Arc<AccessLog>,
    started: Instant,
    /// The line so far; fields are filled in as the exchange goes.
    pub entry: Entry,
    /// Bytes of the request body read so far (shared with the body's counter).
    pub bytes_in: Arc<AtomicU64>,
}

impl Pending {
    /// An entry for `log`, timed from `started`.
    pub fn new(log: Arc<AccessLog>, started: Instant, entry: Entry) -> Self {
        Pending { log, started, entry, bytes_in: Arc::default() }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.entry.total = self.started.elapsed();
        self.entry.bytes_in = self.entry.bytes_in.max(self.bytes_in.load(Ordering::Relaxed));
        self.log.write(&self.entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_civil_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_964_712_123);
        assert_eq!(rfc3339(t), "2026-11-29T15:05:12.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn human_lines_cannot_be_forged() {
        let mut e = Entry::new("web".into(), "127.0.0.1:9".parse().expect("addr"), "HTTP/1.1");
        e.method = "GET".into();
        e.path = "/a\" 200 \n".into();
        let line = e.human();
        assert_eq!(line.matches('"').count(), 2, "{line}");
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        let json: serde_json::Value = serde_json::from_str(&e.json()).expect("json");
        assert_eq!(json["path"], "/a\" 200 \n");
        assert_eq!(json["status"], serde_json::Value::Null);
    }
}

pin_project_lite::pin_project! {
    /// A request body that counts the bytes it passes on, for the line's `bytes_in`.
    pub struct Counted<B> {
        #[pin]
        inner: B,
        count: Option<Arc<AtomicU64>>,
    }
}

impl<B> Counted<B> {
    /// Counts into `count`, or passes through when there is no log.
    pub fn new(inner: B, count: Option<Arc<AtomicU64>>) -> Self {
        Counted { inner, count }
    }
}

impl<B: http_body::Body<Data = bytes::Bytes>> http_body::Body for Counted<B> {
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let (Some(count), std::task::Poll::Ready(Some(Ok(frame)))) = (this.count.as_ref(), &polled) {
            if let Some(data) = frame.data_ref() {
                count.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that counts what it sends and writes the line when it is dropped: at its
/// end, or when the client went away before it.
pub struct Logged {
    /// The response body.
    pub inner: super::phases::ProxyBody,
    /// The line, written on drop.
    pub pending: Pending,
    ended: bool,
}

impl Logged {
    /// Logs `pending` once `inner` has been sent (or abandoned).
    pub fn new(inner: super::phases::ProxyBody, pending: Pending) -> Self {
        Logged { inner, pending, ended: false }
    }
}

impl http_body::Body for Logged {
    type Data = bytes::Bytes;
    type Error = super::phases::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        use std::task::Poll;
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.pending.entry.bytes_out += data.len() as u64;
                }
            }
            Poll::Ready(Some(Err(_))) => {
                this.ended = true;
                this.pending.entry.termination = Some("server_broken");
            }
            Poll::Ready(None) => this.ended = true,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        http_body::Body::is_end_stream(&self.inner)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::Body::size_hint(&self.inner)
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        // Dropped with bytes still to send: the client stopped reading (closed, reset).
        if !self.ended && !http_body::Body::is_end_stream(&self.inner) && self.pending.entry.termination.is_none() {
            self.pending.entry.termination = Some("client_gone");
        }
    }
}

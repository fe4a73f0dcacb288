//! Access logs: one line per HTTP request or TCP session, per listener that has an
//! `access_log` table.
//!
//! # Never in the way of a request
//!
//! The request path never waits for a disk or a syslog daemon: a finished [`Entry`] is rendered
//! to a line and put on a bounded queue ([`QUEUE`] lines) that one writer thread per log drains.
//! A line that finds the queue full is dropped and counted ([`dropped`],
//! `keel_access_log_dropped_total`); so is a line the syslog receiver would not take (a send
//! that fails or waits longer than [`SYSLOG_SEND_TIMEOUT`]), with a warning at most once per
//! 10 s. A thread rather than a task because file and socket writes block; it ends once every
//! sender (the listener's proxy and its connections) is gone.
//!
//! A [`Pending`] entry is a guard: it writes its line when dropped, so an exchange that ends
//! any way at all — a response body that ends, a client that goes away mid-body, a request
//! future that is cancelled (an HTTP/2 stream reset) — leaves exactly one line. What the line
//! says about how it ended is set as the exchange goes.
//!
//! # Formats
//!
//! `human` (HAProxy's `httplog` in spirit), `json` (one object, a key per
//! [`AccessLogField`]) and `template`: the operator's line in nginx's `log_format` syntax
//! (`$client $status ${total_ms}ms`), parsed once at start into literal and field pieces
//! ([`parse_template`]) so a line costs one pass over them. Fields are named alike in `json`
//! and `template` because both render them through [`Entry::value`], an exhaustive match over
//! the field list the config is validated against. Text a client chose (path, authority, a
//! request id it sent) cannot forge a field or a line in `human` or `template`: spaces,
//! quotes and control characters become `?` ([`escape_into`]); `json` escapes them as JSON does.
//!
//! # Destinations
//!
//! stdout; a file, opened in append mode and reopened after SIGUSR1 ([`reopen_all`]), which is
//! what logrotate's `postrotate` sends — the writer notices within [`REOPEN_CHECK`] even while
//! idle; or syslog, one RFC 5424 message per line ([`Syslog`]) over a local datagram socket
//! (`/dev/log`, or `unix:/path`) or UDP. A local socket that went away (the syslog daemon
//! restarted) is reconnected on the next line, and on SIGUSR1 too.
//!
//! The RFC 5424 header is written here by hand ([`Syslog::frame`]): it is one `write!` of six
//! fields, and the timestamp formatter already exists for the lines themselves. The `syslog`
//! crate frames 5424 but owns its sockets (blocking, no send timeout, no per-line drop count)
//! and brings `time`, `hostname` and `log` with it; `syslog_rfc5424` only parses.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keel_cluster::access_log_config::{parse_template, TemplatePiece};
use keel_cluster::model::{self, AccessLogField, AccessLogFormat, Destination, SyslogTarget};
use keel_cluster::throttle::{LogThrottle, EVERY};

/// Lines a log's queue holds before new ones are dropped.
pub const QUEUE: usize = 8192;
/// How often an idle writer looks for a reopen request.
pub const REOPEN_CHECK: Duration = Duration::from_millis(200);
/// How long a busy writer lets lines gather before it writes them ([`write_lines`]).
pub const BATCH: Duration = Duration::from_millis(5);
/// A file's write buffer: a busy batch is written in few `write` calls.
const FILE_BUFFER: usize = 64 * 1024;
/// Longest a syslog send may wait for room in the receiver's queue before the line is dropped.
pub const SYSLOG_SEND_TIMEOUT: Duration = Duration::from_millis(100);
/// RFC 5424 APP-NAME.
pub const SYSLOG_APP_NAME: &str = "keel";
/// RFC 5424 MSGID: what kind of message this is, for a receiver's filters.
pub const SYSLOG_MSG_ID: &str = "access";
/// RFC 5424 severity of every line: informational.
const SEVERITY_INFO: u8 = 6;

static DROPPED: AtomicU64 = AtomicU64::new(0);
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Lines dropped by every access log since start, for `/metrics`.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Asks every file-backed access log to reopen its file, and every local syslog socket to
/// reconnect (SIGUSR1).
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
    /// The syslog socket could not be set up.
    #[error("cannot reach syslog at {target}: {source}")]
    Syslog {
        /// The socket path or address.
        target: String,
        /// The OS error.
        source: io::Error,
    },
    /// The table did not validate (the config is checked before this is reached).
    #[error("invalid access_log: {0}")]
    Config(String),
    /// The writer thread could not be started.
    #[error("cannot start the access log writer: {0}")]
    Thread(io::Error),
}

/// Where lines go, as the writer (re)opens it.
enum Sink {
    Stdout,
    File(PathBuf),
    Syslog(SyslogTarget, u8),
}

/// An opened sink.
enum Output {
    /// Lines appended to a byte stream, flushed after each batch.
    Stream(BufWriter<Box<dyn Write + Send>>),
    /// One datagram per line.
    Syslog(Syslog),
}

impl Sink {
    fn open(&self) -> Result<Output, AccessLogError> {
        let stream = |w: Box<dyn Write + Send>| Output::Stream(BufWriter::with_capacity(FILE_BUFFER, w));
        match self {
            Sink::Stdout => Ok(stream(Box::new(io::stdout()))),
            Sink::File(path) => OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map(|f: File| stream(Box::new(f)))
                .map_err(|source| AccessLogError::Open { path: path.clone(), source }),
            Sink::Syslog(target, facility) => Syslog::connect(target, *facility).map(Output::Syslog),
        }
    }
}

impl Output {
    fn write(&mut self, line: &str) {
        match self {
            Output::Stream(out) => {
                let _ = out.write_all(line.as_bytes());
            }
            Output::Syslog(syslog) => syslog.send(line),
        }
    }

    fn flush(&mut self) {
        if let Output::Stream(out) = self {
            let _ = out.flush();
        }
    }
}

/// How an entry becomes a line.
enum Render {
    Human,
    Json,
    Template(Vec<TemplatePiece>),
}

/// One listener's access log: the sending end of its writer's queue.
pub struct AccessLog {
    tx: SyncSender<String>,
    render: Render,
}

impl AccessLog {
    /// Opens the destination (so a bad path fails at start, not silently later) and starts the
    /// writer.
    pub fn start(config: &model::AccessLog) -> Result<Arc<Self>, AccessLogError> {
        let sink = match config.target().map_err(AccessLogError::Config)? {
            Destination::Stdout => Sink::Stdout,
            Destination::File(path) => Sink::File(path),
            Destination::Syslog(target) => Sink::Syslog(target, config.facility().code()),
        };
        let render = match config.format {
            AccessLogFormat::Human => Render::Human,
            AccessLogFormat::Json => Render::Json,
            AccessLogFormat::Template => {
                let template = config.template.as_deref().unwrap_or_default();
                Render::Template(parse_template(template).map_err(AccessLogError::Config)?)
            }
        };
        let out = sink.open()?;
        let (tx, rx) = mpsc::sync_channel::<String>(QUEUE);
        std::thread::Builder::new()
            .name("keel-access-log".into())
            .spawn(move || write_lines(&sink, out, &rx))
            .map_err(AccessLogError::Thread)?;
        Ok(Arc::new(AccessLog { tx, render }))
    }

    /// Queues `entry`'s line; drops (and counts) it when the writer is behind.
    pub fn write(&self, entry: &Entry) {
        let line = match &self.render {
            Render::Human => entry.human(),
            Render::Json => entry.json(),
            Render::Template(pieces) => entry.template(pieces),
        };
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The writer thread. Idle, it blocks on the queue (waking every [`REOPEN_CHECK`] to see a
/// reopen request). Once a line comes it is busy: it sleeps [`BATCH`], takes every line queued
/// meanwhile, writes and flushes them, and goes on so until a batch comes back empty. A sender
/// then never has a parked writer to wake, so a busy log costs one wake-up and one `write` per
/// batch instead of a futex wake and a `write` per line (the bench measured that at most of the
/// log's cost). A line waits at most about [`BATCH`] before it is written.
fn write_lines(sink: &Sink, mut out: Output, rx: &mpsc::Receiver<String>) {
    let mut generation = GENERATION.load(Ordering::Relaxed);
    // The file reopened (the syslog socket reconnected) when [`reopen_all`] was called.
    let mut reopen = |out: &mut Output| {
        let now = GENERATION.load(Ordering::Relaxed);
        if now != generation {
            generation = now;
            out.flush();
            match sink.open() {
                Ok(new) => *out = new,
                // Keep writing to the old file rather than lose lines.
                Err(e) => tracing::warn!(target: "keel::proxy", error = %e, "cannot reopen access log"),
            }
        }
    };
    loop {
        let first = match rx.recv_timeout(REOPEN_CHECK) {
            Ok(line) => Some(line),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        reopen(&mut out);
        let Some(first) = first else { continue };
        out.write(&first);
        loop {
            std::thread::sleep(BATCH);
            let mut taken = 0usize;
            while let Ok(line) = rx.try_recv() {
                out.write(&line);
                taken += 1;
            }
            out.flush();
            reopen(&mut out);
            if taken == 0 {
                break;
            }
        }
    }
    out.flush();
}

/// A syslog receiver and the parts of the RFC 5424 header that never change.
struct Syslog {
    socket: Datagram,
    /// `<PRI>`: facility × 8 + severity (informational).
    pri: u8,
    hostname: String,
    pid: u32,
    /// The datagram being built, kept to reuse its allocation.
    buf: String,
}

enum Datagram {
    Unix(UnixDatagram, PathBuf),
    Udp(UdpSocket),
}

/// Failed syslog sends (the line is dropped and counted): one warning per 10 s.
static SYSLOG_FAILED: LogThrottle = LogThrottle::new(EVERY);

impl Syslog {
    fn connect(target: &SyslogTarget, facility: u8) -> Result<Syslog, AccessLogError> {
        let socket = match target {
            SyslogTarget::Unix(path) => Datagram::Unix(unix_socket(path)?, path.clone()),
            SyslogTarget::Udp(addr) => {
                let fail = |source| AccessLogError::Syslog { target: format!("udp://{addr}"), source };
                let local: SocketAddr =
                    if addr.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
                let socket = UdpSocket::bind(local).map_err(fail)?;
                socket.connect(addr).map_err(fail)?;
                socket.set_write_timeout(Some(SYSLOG_SEND_TIMEOUT)).map_err(fail)?;
                Datagram::Udp(socket)
            }
        };
        Ok(Syslog {
            socket,
            pri: facility * 8 + SEVERITY_INFO,
            hostname: hostname(),
            pid: std::process::id(),
            buf: String::with_capacity(512),
        })
    }

    /// `line` (its newline dropped) as the MSG of one RFC 5424 message.
    fn send(&mut self, line: &str) {
        let mut buf = std::mem::take(&mut self.buf);
        Syslog::frame(&mut buf, self.pri, SystemTime::now(), &self.hostname, self.pid, line);
        let sent = match &mut self.socket {
            Datagram::Udp(socket) => socket.send(buf.as_bytes()).map(drop),
            // The daemon may have restarted and made a new socket: reconnect once and retry.
            Datagram::Unix(socket, path) => socket.send(buf.as_bytes()).map(drop).or_else(|first| {
                if first.kind() == io::ErrorKind::WouldBlock || first.kind() == io::ErrorKind::TimedOut {
                    return Err(first);
                }
                let fresh = unix_socket(path).map_err(|_| first)?;
                *socket = fresh;
                socket.send(buf.as_bytes()).map(drop)
            }),
        };
        self.buf = buf;
        if let Err(e) = sent {
            DROPPED.fetch_add(1, Ordering::Relaxed);
            keel_cluster::throttled!(SYSLOG_FAILED, warn, target: "keel::proxy", error = %e,
                "syslog did not take an access log line; dropped");
        }
    }

    /// `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG` (RFC 5424 §6), into `buf`.
    fn frame(buf: &mut String, pri: u8, time: SystemTime, hostname: &str, pid: u32, line: &str) {
        buf.clear();
        let msg = line.strip_suffix('\n').unwrap_or(line);
        let _ = write!(buf, "<{pri}>1 {} {hostname} {SYSLOG_APP_NAME} {pid} {SYSLOG_MSG_ID} - {msg}", rfc3339(time));
    }
}

fn unix_socket(path: &PathBuf) -> Result<UnixDatagram, AccessLogError> {
    let fail = |source| AccessLogError::Syslog { target: path.display().to_string(), source };
    let socket = UnixDatagram::unbound().map_err(fail)?;
    socket.connect(path).map_err(fail)?;
    socket.set_write_timeout(Some(SYSLOG_SEND_TIMEOUT)).map_err(fail)?;
    Ok(socket)
}

/// This host's name for RFC 5424's HOSTNAME: printable ASCII without spaces, `-` if unknown.
fn hostname() -> String {
    // Linux's own record of the host name; no unsafe `gethostname` call needed.
    let name: String = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_graphic)
        .take(255)
        .collect();
    if name.is_empty() {
        "-".to_owned()
    } else {
        name
    }
}

/// Everything one line says.
#[derive(Clone, Debug)]
pub struct Entry {
    /// When the request head (or TCP connection) arrived, as RFC 3339 UTC.
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
    /// From the head received (TCP: the connection accepted) to the last attempt's start:
    /// buffering a body, the sticky lookup, earlier attempts. None when no server was tried.
    pub wait: Option<Duration>,
    /// The last attempt's connect (TCP, and TLS to a server); zero when it reused a kept-alive
    /// connection, none when no connection was made.
    pub connect: Option<Duration>,
    /// From the connection ready to the server's response head: the request written and the
    /// server's own time.
    pub server_time: Option<Duration>,
    /// From the head received to the last response byte (or the connection closed).
    pub total: Duration,
    /// Why the exchange did not end normally (`client_gone`, `server_timeout`, …); the word's
    /// side says who ended it ([`closed_by`]).
    pub termination: Option<&'static str>,
    /// The request's id.
    pub request_id: Option<String>,
    /// A gRPC call's `grpc-status`, from the trailers (or a trailers-only head).
    pub grpc_status: Option<u32>,
}

/// One field's value, before a format writes it.
enum Value<'a> {
    /// Text keel chose (names, versions, causes): written as it is.
    Text(&'a str),
    /// Text a client chose: escaped in `human` and `template`.
    Untrusted(&'a str),
    Number(u64),
    Ms(Duration),
    Time(SystemTime),
    Addr(SocketAddr),
    /// No value: `-`, or `null` in JSON.
    None,
}

/// Who ended an exchange that did not end normally: the client, a server, or keel itself (a
/// policy, a timeout of its own, a drain).
pub fn closed_by(termination: &str) -> &'static str {
    if termination.starts_with("client_") {
        "client"
    } else if termination.starts_with("server_") {
        "server"
    } else {
        "keel"
    }
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
            wait: None,
            connect: None,
            server_time: None,
            total: Duration::ZERO,
            termination: None,
            request_id: None,
            grpc_status: None,
        }
    }

    /// The value of `field`: the one place a field's name meets its data.
    fn value(&self, field: AccessLogField) -> Value<'_> {
        use AccessLogField as F;
        let text = |v: Option<&'static str>| v.map_or(Value::None, Value::Text);
        fn untrusted(v: Option<&str>) -> Value<'_> {
            v.map_or(Value::None, Value::Untrusted)
        }
        fn named(v: &Option<String>) -> Value<'_> {
            v.as_deref().map_or(Value::None, Value::Text)
        }
        let ms = |v: Option<Duration>| v.map_or(Value::None, Value::Ms);
        match field {
            F::Time => Value::Time(self.time),
            F::Listener => Value::Text(&self.listener),
            F::Client => Value::Addr(self.client),
            // Both come from the parsed request: a method token and a valid target, no spaces.
            F::Method => Value::Untrusted(&self.method),
            F::Path => Value::Untrusted(&self.path),
            F::Version => Value::Text(self.version),
            F::Authority => untrusted(self.authority.as_deref()),
            F::Status => self.status.map_or(Value::None, |s| Value::Number(s.into())),
            F::BytesIn => Value::Number(self.bytes_in),
            F::BytesOut => Value::Number(self.bytes_out),
            F::Pool => named(&self.pool),
            F::Server => named(&self.server),
            F::Retries => Value::Number(self.retries.into()),
            F::WaitMs => ms(self.wait),
            F::ConnectMs => ms(self.connect),
            F::ServerMs => ms(self.server_time),
            F::TotalMs => Value::Ms(self.total),
            F::Termination => text(self.termination),
            F::ClosedBy => text(self.termination.map(closed_by)),
            F::RequestId => untrusted(self.request_id.as_deref()),
            F::GrpcStatus => self.grpc_status.map_or(Value::None, |s| Value::Number(s.into())),
        }
    }

    /// One JSON object and a newline: a key per [`AccessLogField`], `null` where there is no
    /// value.
    pub fn json(&self) -> String {
        let mut line = String::with_capacity(512);
        line.push('{');
        for (i, field) in AccessLogField::ALL.into_iter().enumerate() {
            if i > 0 {
                line.push(',');
            }
            line.push('"');
            line.push_str(field.name());
            line.push_str("\":");
            match self.value(field) {
                Value::Text(s) | Value::Untrusted(s) => json_string(&mut line, s),
                Value::Number(n) => {
                    let _ = write!(line, "{n}");
                }
                Value::Ms(d) => {
                    let _ = write!(line, "{}", ms(d));
                }
                Value::Time(t) => {
                    let _ = write!(line, "\"{}\"", rfc3339(t));
                }
                Value::Addr(a) => {
                    let _ = write!(line, "\"{a}\"");
                }
                Value::None => line.push_str("null"),
            }
        }
        line.push_str("}\n");
        line
    }

    /// The operator's template, each field's value in place of its `$name`, `-` where there is
    /// none; client text escaped.
    pub fn template(&self, pieces: &[TemplatePiece]) -> String {
        let mut line = String::with_capacity(256);
        for piece in pieces {
            match piece {
                TemplatePiece::Literal(text) => line.push_str(text),
                TemplatePiece::Field(field) => self.put(&mut line, *field),
            }
        }
        line.push('\n');
        line
    }

    /// In the spirit of HAProxy's `httplog`:
    /// `client [time] listener pool/server wait_ms/connect_ms/server_ms/total_ms status
    /// in/out termination retries authority id "METHOD path VERSION"`, `-` for what is missing.
    pub fn human(&self) -> String {
        use AccessLogField as F;
        let mut line = String::with_capacity(256);
        let put = |line: &mut String, before: &str, field: F| {
            line.push_str(before);
            self.put(line, field);
        };
        put(&mut line, "", F::Client);
        put(&mut line, " [", F::Time);
        put(&mut line, "] ", F::Listener);
        put(&mut line, " ", F::Pool);
        put(&mut line, "/", F::Server);
        put(&mut line, " ", F::WaitMs);
        put(&mut line, "/", F::ConnectMs);
        put(&mut line, "/", F::ServerMs);
        put(&mut line, "/", F::TotalMs);
        put(&mut line, " ", F::Status);
        put(&mut line, " ", F::BytesIn);
        put(&mut line, "/", F::BytesOut);
        put(&mut line, " ", F::Termination);
        put(&mut line, " ", F::Retries);
        put(&mut line, " ", F::Authority);
        put(&mut line, " ", F::RequestId);
        if self.method.is_empty() {
            put(&mut line, " \"", F::Version);
        } else {
            put(&mut line, " \"", F::Method);
            put(&mut line, " ", F::Path);
            put(&mut line, " ", F::Version);
        }
        line.push_str("\"\n");
        line
    }

    /// `field`'s value as `human` and `template` write it: `-` for none, client text escaped.
    fn put(&self, line: &mut String, field: AccessLogField) {
        match self.value(field) {
            Value::Text(s) => line.push_str(s),
            Value::Untrusted(s) => escape_into(line, s),
            Value::Number(n) => {
                let _ = write!(line, "{n}");
            }
            Value::Ms(d) => {
                let _ = write!(line, "{}", ms(d));
            }
            Value::Time(t) => line.push_str(&rfc3339(t)),
            Value::Addr(a) => {
                let _ = write!(line, "{a}");
            }
            Value::None => line.push('-'),
        }
    }
}

/// A client's bytes in a human or template line: no quotes, spaces or control characters that
/// would let a request forge a field or a line.
fn escape_into(out: &mut String, s: &str) {
    out.extend(s.chars().map(|c| if c.is_ascii_graphic() && c != '"' { c } else { '?' }));
}

/// `s` as a JSON string: quotes, backslashes and control characters escaped (RFC 8259 §7).
fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
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
                } else if let Some(trailers) = frame.trailers_ref() {
                    if let Some(status) = grpc_status(trailers) {
                        this.pending.entry.grpc_status = Some(status);
                    }
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

/// The `grpc-status` in `headers`, if it is a number.
pub fn grpc_status(headers: &http::HeaderMap) -> Option<u32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

impl Drop for Logged {
    fn drop(&mut self) {
        // Dropped with bytes still to send: the client stopped reading (closed, reset).
        if !self.ended && !http_body::Body::is_end_stream(&self.inner) && self.pending.entry.termination.is_none() {
            self.pending.entry.termination = Some("client_gone");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        let mut e = Entry::new("web".into(), "127.0.0.1:9".parse().expect("addr"), "HTTP/1.1");
        e.method = "GET".into();
        e.path = "/a?b=1".into();
        e
    }

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
        let mut e = entry();
        e.path = "/a\" 200 \n".into();
        let line = e.human();
        assert_eq!(line.matches('"').count(), 2, "{line}");
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        let json: serde_json::Value = serde_json::from_str(&e.json()).expect("json");
        assert_eq!(json["path"], "/a\" 200 \n");
        assert_eq!(json["status"], serde_json::Value::Null);
    }

    #[test]
    fn json_has_a_key_per_field_in_order() {
        let mut e = entry();
        e.status = Some(504);
        e.termination = Some("server_timeout");
        e.connect = Some(Duration::from_micros(1500));
        e.request_id = Some("id\u{1}\\".into());
        let line = e.json();
        let json: serde_json::Value = serde_json::from_str(&line).expect("json");
        let keys: Vec<&str> = json.as_object().expect("object").keys().map(String::as_str).collect();
        let names: Vec<&str> = AccessLogField::ALL.iter().map(|f| f.name()).collect();
        // serde_json's map sorts keys; compare as sets, then the order in the text.
        let (mut k, mut n) = (keys.clone(), names.clone());
        k.sort_unstable();
        n.sort_unstable();
        assert_eq!(k, n);
        let positions: Vec<usize> =
            names.iter().map(|name| line.find(&format!("\"{name}\":")).expect("key in line")).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{line}");
        assert_eq!(json["closed_by"], "server");
        assert_eq!(json["connect_ms"], 1.5);
        assert_eq!(json["wait_ms"], serde_json::Value::Null);
        assert_eq!(json["request_id"], "id\u{1}\\");
        assert_eq!(json["client"], "127.0.0.1:9");
    }

    #[test]
    fn templates_fill_fields_and_escape_client_text() {
        let pieces = parse_template("$client \"$method $path\" ${status}/$termination/$closed_by $$ $server_ms")
            .expect("template");
        let mut e = entry();
        e.path = "/x y\"\n".into();
        e.status = Some(200);
        assert_eq!(e.template(&pieces), "127.0.0.1:9 \"GET /x?y??\" 200/-/- $ -\n");
        e.termination = Some("client_gone");
        e.server_time = Some(Duration::from_micros(2_250));
        assert_eq!(e.template(&pieces), "127.0.0.1:9 \"GET /x?y??\" 200/client_gone/client $ 2.25\n");
    }

    #[test]
    fn causes_name_who_closed() {
        assert_eq!(closed_by("client_timeout"), "client");
        assert_eq!(closed_by("server_connect_timeout"), "server");
        assert_eq!(closed_by("total_timeout"), "keel");
        assert_eq!(closed_by("idle_timeout"), "keel");
    }

    #[test]
    fn syslog_messages_are_rfc_5424() {
        let mut buf = String::new();
        let t = UNIX_EPOCH + Duration::from_millis(1_795_964_712_123);
        Syslog::frame(&mut buf, 16 * 8 + 6, t, "lb1", 4242, "127.0.0.1:9 GET / 200\n");
        assert_eq!(buf, "<134>1 2026-11-29T15:05:12.123Z lb1 keel 4242 access - 127.0.0.1:9 GET / 200");
        let h = hostname();
        assert!(!h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()), "{h:?}");
    }
}

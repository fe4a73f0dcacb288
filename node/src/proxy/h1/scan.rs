//! A strict HTTP/1.x framing scanner that runs in front of keel's HTTP/1 server and refuses
//! ambiguous requests.
//!
//! A front proxy that *accepts* an ambiguous message has already disagreed with somebody about
//! where it ends, even if it re-frames everything it forwards (keel does). HAProxy's stance —
//! refuse, answer, close — is what operators expect, so every byte a client sends on an HTTP/1
//! connection is fed through this scanner first ([`super::super::guard::GuardedIo`]), and a
//! message it refuses never reaches the parser or a server.
//!
//! The scanner tracks message boundaries itself (head, `Content-Length` body, chunked body with
//! trailers) so that pipelined and keep-alive requests are each checked, and it stops looking
//! once the connection is no longer HTTP/1 request framing: HTTP/2 (the `PRI` preface), an
//! upgrade or `CONNECT`, or a head too large to buffer (keel's HTTP/1 server then answers 431).
//!
//! A [`Refusal`] carries the status to answer and a fixed reason, which the answer's body names
//! (never the client's bytes):
//!
//! - **400**: bare LF or bare CR, NUL and other control bytes, obsolete line folding, whitespace
//!   before a header's colon, invalid header names, a malformed request line or version,
//!   `Content-Length` together with `Transfer-Encoding`, more than one `Content-Length` (even
//!   identical), a `Content-Length` that is not plain digits, `chunked` anywhere but last in
//!   `Transfer-Encoding`, more than one `Transfer-Encoding`, `Transfer-Encoding` on HTTP/1.0,
//!   more than one `Host`, no `Host` on HTTP/1.1 (unless the target is absolute), and invalid
//!   chunk framing;
//! - **414**: a request line longer than [`MAX_REQUEST_LINE`] or the head limit, whichever is
//!   smaller (nginx's `large_client_header_buffers` and HAProxy answer the same); the target
//!   also counts toward the head limit (`max_header_bytes`);
//! - **501**: a transfer coding keel does not implement (`gzip, chunked`, `xchunked`): RFC 9112
//!   §6.1, as nginx answers;
//! - **505**: a well-formed HTTP version other than 1.0 and 1.1 (`HTTP/1.2`, `HTTP/3.0`).

use http::StatusCode;

/// Longest request line accepted (method, target, version), unless the head limit is smaller.
pub const MAX_REQUEST_LINE: usize = 8 * 1024;
/// Longest chunk-size line accepted (size, extensions, CRLF).
const MAX_CHUNK_LINE: usize = 256;
/// Longest trailer section accepted.
const MAX_TRAILERS: usize = 8 * 1024;

/// Why a message was refused: the status to answer and a fixed reason for the log line and the
/// answer's body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// What the client is answered.
    pub status: StatusCode,
    /// Why, in a few words; never bytes of the request.
    pub reason: &'static str,
}

/// A malformed or ambiguous message: 400.
fn bad(reason: &'static str) -> Refusal {
    Refusal { status: StatusCode::BAD_REQUEST, reason }
}

impl From<&'static str> for Refusal {
    fn from(reason: &'static str) -> Self {
        bad(reason)
    }
}

/// How a request's body is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BodyKind {
    None,
    Length(u64),
    Chunked,
}

#[derive(Debug)]
enum ChunkState {
    /// Reading a chunk-size line.
    Size(Vec<u8>),
    /// Inside chunk data: bytes left.
    Data(u64),
    /// After chunk data: expecting CR then LF (how many of the two seen).
    DataEnd(u8),
    /// After the last chunk: trailer section, bytes so far and whether the current line is empty.
    Trailers { seen: usize, line: Vec<u8> },
}

#[derive(Debug)]
enum Phase {
    /// Between messages (empty), or accumulating a request head that arrived in parts.
    Head(Vec<u8>),
    /// Inside a body of known length: bytes left.
    Body(u64),
    /// Inside a chunked body.
    Chunked(ChunkState),
    /// No longer scanning (HTTP/2, upgrade, CONNECT, oversized head).
    Opaque,
}

/// Scanner state of one client connection.
#[derive(Debug)]
pub struct H1Scanner {
    phase: Phase,
    max_head: usize,
    /// Longest request line: [`MAX_REQUEST_LINE`] or `max_head`, the smaller.
    max_line: usize,
}

/// What feeding bytes revealed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Heads completed in this feed.
    pub heads: usize,
}

impl H1Scanner {
    /// A scanner for a fresh connection; heads longer than `max_head` are left to keel's HTTP/1
    /// server (431), request lines longer than `max_head` or [`MAX_REQUEST_LINE`] refused (414).
    pub fn new(max_head: usize) -> Self {
        H1Scanner { phase: Phase::Head(Vec::new()), max_head, max_line: max_head.min(MAX_REQUEST_LINE) }
    }

    /// Whether a request head has started but not completed (the slowloris window).
    pub fn in_partial_head(&self) -> bool {
        matches!(&self.phase, Phase::Head(buf) if !buf.is_empty())
    }

    /// Whether the scanner is between messages: no partial head, no body pending, not opaque.
    pub fn at_boundary(&self) -> bool {
        matches!(&self.phase, Phase::Head(buf) if buf.is_empty())
    }

    /// Whether the scanner has stopped looking at this connection.
    pub fn is_opaque(&self) -> bool {
        matches!(self.phase, Phase::Opaque)
    }

    /// Feeds the next bytes the client sent. An error means the connection must be refused.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<Progress, Refusal> {
        let mut progress = Progress::default();
        while !data.is_empty() {
            if self.at_boundary() {
                // The usual case, a whole head in one read: checked where it lies. Copying it
                // into the scanner's buffer first (an allocation and a copy per request) was a
                // twentieth of keel's user-space instructions per keep-alive request. A partial
                // head goes the copying way below, which checks it as it grows.
                let window = &data[..data.len().min(self.max_head + 1)];
                if !window.starts_with(b"PRI * HTTP/2.0") {
                    if let Some(end) = find_head_end(window) {
                        let kind = validate_head(&window[..end], self.max_line)?;
                        progress.heads += 1;
                        data = &data[end..];
                        self.phase = after_head(kind);
                        continue;
                    }
                }
            }
            match &mut self.phase {
                Phase::Opaque => return Ok(progress),
                Phase::Head(buf) => {
                    // Find the end of the head across the boundary of the previous feed.
                    let start = buf.len().saturating_sub(3);
                    let take = data.len().min(self.max_head.saturating_sub(buf.len()) + 1);
                    buf.extend_from_slice(&data[..take]);
                    if buf.starts_with(b"PRI * HTTP/2.0") {
                        self.phase = Phase::Opaque;
                        continue;
                    }
                    match find_head_end(&buf[start..]) {
                        Some(end) => {
                            let end = start + end;
                            let consumed_here = end - (buf.len() - take);
                            let head = std::mem::take(buf);
                            let kind = validate_head(&head[..end], self.max_line)?;
                            progress.heads += 1;
                            data = &data[consumed_here..];
                            self.phase = after_head(kind);
                        }
                        None => {
                            check_partial_head(buf)?;
                            // Checked before the head limit: a long target is a 414, not a 431.
                            if buf.len() > self.max_line && !buf.contains(&b'\n') {
                                return Err(too_long());
                            }
                            if buf.len() > self.max_head {
                                // keel's HTTP/1 server answers 431 for this one; nothing more to check.
                                self.phase = Phase::Opaque;
                            }
                            data = &data[take..];
                        }
                    }
                }
                Phase::Body(left) => {
                    let n = (*left).min(data.len() as u64);
                    *left -= n;
                    data = &data[n as usize..];
                    if *left == 0 {
                        self.phase = Phase::Head(Vec::new());
                    }
                }
                Phase::Chunked(state) => {
                    let (used, done) = feed_chunked(state, data)?;
                    data = &data[used..];
                    if done {
                        self.phase = Phase::Head(Vec::new());
                    }
                }
            }
        }
        Ok(progress)
    }
}

/// Where the scanner goes once a head of `kind` has passed.
fn after_head(kind: HeadKind) -> Phase {
    match kind {
        HeadKind::Opaque => Phase::Opaque,
        HeadKind::Body(BodyKind::None) | HeadKind::Body(BodyKind::Length(0)) => Phase::Head(Vec::new()),
        HeadKind::Body(BodyKind::Length(n)) => Phase::Body(n),
        HeadKind::Body(BodyKind::Chunked) => Phase::Chunked(ChunkState::Size(Vec::new())),
    }
}

/// Position just past the CRLFCRLF ending a head, if present. A bare-LF ending is found by
/// validation (as a bare LF), not here.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    // memchr finds the few LFs of a head with SIMD; memmem's searcher costs more to set up than
    // a short head costs to search.
    memchr::memchr_iter(b'\n', buf).find(|&i| i >= 3 && &buf[i - 3..=i] == b"\r\n\r\n").map(|i| i + 1)
}

/// Early refusal of what can never become a valid head, so a client cannot park garbage in a
/// buffer until the header timeout.
fn check_partial_head(buf: &[u8]) -> Result<(), Refusal> {
    if line_ends_are_clean(buf) {
        return Ok(());
    }
    name_broken_line_end(buf)
}

/// The first NUL, bare CR or bare LF of `buf`, as a refusal.
fn name_broken_line_end(buf: &[u8]) -> Result<(), Refusal> {
    for (i, &b) in buf.iter().enumerate() {
        match b {
            b'\n' if i == 0 || buf[i - 1] != b'\r' => return Err(bad("bare LF in request head")),
            b'\r' if i + 1 < buf.len() && buf[i + 1] != b'\n' => return Err(bad("bare CR in request head")),
            0 => return Err(bad("NUL byte in request head")),
            _ => {}
        }
    }
    Ok(())
}

/// Whether `buf` has no NUL and no bare CR or LF (a CR last may still get its LF): the fast
/// path of [`check_partial_head`], which finds which rule broke only when one did. Every byte
/// after the first must be LF exactly when the byte before it is CR; written without branches,
/// the compiler checks 32 bytes at a time (the byte-by-byte match was a third of a typical
/// GET's validation).
fn line_ends_are_clean(buf: &[u8]) -> bool {
    let Some(&first) = buf.first() else { return true };
    let broken = buf.iter().zip(&buf[1..]).fold(0u8, |broken, (&before, &b)| {
        broken | (u8::from(before == b'\r') ^ u8::from(b == b'\n')) | u8::from(b == 0)
    });
    broken == 0 && first != b'\n' && first != 0
}

enum HeadKind {
    Body(BodyKind),
    Opaque,
}

/// `tchar` (RFC 9110 §5.6.2) by byte value: one load per byte of every name and method.
static TCHAR: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        table[i] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_' | b'`' | b'|' | b'~'
            );
        i += 1;
    }
    table
};

fn is_tchar(b: u8) -> bool {
    TCHAR[usize::from(b)]
}

/// Whether `bytes` has a byte for which `bad` holds. It looks at every byte, without stopping
/// at the first bad one, so that the compiler checks 16 or 32 at a time: a head is refused
/// rarely and checked always.
fn any_byte(bytes: &[u8], bad: impl Fn(u8) -> bool) -> bool {
    bytes.iter().fold(false, |found, &b| found | bad(b))
}

/// 414: the request line (in practice its target) is longer than the scanner takes.
fn too_long() -> Refusal {
    Refusal { status: StatusCode::URI_TOO_LONG, reason: "request target too long" }
}

/// `HTTP/<digit>.<digit>`: a version keel can name, if not serve.
fn is_http_version(v: &[u8]) -> bool {
    matches!(v, [b'H', b'T', b'T', b'P', b'/', major, b'.', minor] if major.is_ascii_digit() && minor.is_ascii_digit())
}

/// Validates a complete head (ending in CRLFCRLF) and tells how its body is framed.
fn validate_head(head: &[u8], max_line: usize) -> Result<HeadKind, Refusal> {
    check_partial_head(head)?;
    let body = &head[..head.len() - 4];
    // The lines between LFs (as `body.split`, found with memchr).
    let mut start = 0;
    let mut lines = memchr::memchr_iter(b'\n', body).chain(std::iter::once(body.len())).map(|end| {
        let line = &body[start..end];
        start = end + 1;
        line.strip_suffix(b"\r").unwrap_or(line)
    });

    let request_line = lines.next().ok_or("empty request")?;
    if request_line.len() > max_line {
        return Err(too_long());
    }
    let mut parts = request_line.split(|&b| b == b' ');
    let method = parts.next().filter(|m| !m.is_empty() && m.iter().all(|&b| is_tchar(b))).ok_or("invalid method")?;
    let target = parts.next().filter(|t| !t.is_empty()).ok_or("missing request target")?;
    let version = parts.next().ok_or("missing HTTP version")?;
    if parts.next().is_some() {
        return Err(bad("malformed request line"));
    }
    if any_byte(target, |b| (b <= b' ') | (b == 0x7f)) {
        return Err(bad("invalid byte in request target"));
    }
    let http10 = match version {
        b"HTTP/1.1" => false,
        b"HTTP/1.0" => true,
        v if is_http_version(v) => {
            return Err(Refusal {
                status: StatusCode::HTTP_VERSION_NOT_SUPPORTED,
                reason: "HTTP version not supported (HTTP/1.0 and HTTP/1.1 are)",
            })
        }
        _ => return Err(bad("malformed HTTP version")),
    };

    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_encoding = false;
    let mut unknown_coding = false;
    let mut hosts = 0;
    let mut upgrade = false;
    for line in lines {
        if line.first().is_some_and(|&b| b == b' ' || b == b'\t') {
            return Err(bad("obsolete line folding"));
        }
        let colon = memchr::memchr(b':', line).ok_or("header line without colon")?;
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return Err(bad("invalid header name (or whitespace before the colon)"));
        }
        if any_byte(value, |b| ((b < b' ') & (b != b'\t')) | (b == 0x7f)) {
            return Err(bad("control byte in header value"));
        }
        let value = value.trim_ascii();
        if name.eq_ignore_ascii_case(b"content-length") {
            if content_length.is_some() {
                return Err(bad("more than one Content-Length"));
            }
            content_length = Some(parse_content_length(value).ok_or("Content-Length is not a plain number")?);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if transfer_encoding {
                return Err(bad("more than one Transfer-Encoding"));
            }
            transfer_encoding = true;
            unknown_coding = !check_codings(value)?;
            chunked = !unknown_coding;
        } else if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade = true;
        }
    }
    if transfer_encoding && content_length.is_some() {
        return Err(bad("both Content-Length and Transfer-Encoding"));
    }
    if transfer_encoding && http10 {
        return Err(bad("Transfer-Encoding on HTTP/1.0"));
    }
    if hosts > 1 {
        return Err(bad("more than one Host"));
    }
    // An absolute-form target names its host itself (RFC 9112 §3.2.2).
    let absolute = target.starts_with(b"http://") || target.starts_with(b"https://");
    if !http10 && hosts == 0 && !absolute {
        return Err(bad("HTTP/1.1 request without a Host header"));
    }
    // Only once the framing is known to be otherwise unambiguous: a coding keel lacks is a 501,
    // an ambiguity stays a 400.
    if unknown_coding {
        return Err(Refusal {
            status: StatusCode::NOT_IMPLEMENTED,
            reason: "transfer coding not implemented (only chunked is)",
        });
    }
    if method == b"CONNECT" || upgrade {
        return Ok(HeadKind::Opaque);
    }
    Ok(HeadKind::Body(match (chunked, content_length) {
        (true, _) => BodyKind::Chunked,
        (false, Some(n)) => BodyKind::Length(n),
        (false, None) => BodyKind::None,
    }))
}

/// Checks a `Transfer-Encoding` list: `Ok(true)` for exactly `chunked`, `Ok(false)` for a
/// well-formed list with a coding keel does not implement (`gzip, chunked`, `xchunked`), and a
/// 400 where the body's end could not be found whatever the codings mean: `chunked` anywhere but
/// last or twice (RFC 9112 §6.3), an empty or malformed element.
fn check_codings(value: &[u8]) -> Result<bool, Refusal> {
    let mut codings = value.split(|&b| b == b',').map(<[u8]>::trim_ascii).peekable();
    let mut only_chunked = true;
    while let Some(coding) = codings.next() {
        let name = coding.split(|&b| b == b';').next().unwrap_or_default().trim_ascii();
        if name.is_empty() || !coding.iter().all(|&b| is_tchar(b) || b" \t;=\"".contains(&b)) {
            return Err(bad("malformed Transfer-Encoding"));
        }
        if name.eq_ignore_ascii_case(b"chunked") {
            if codings.peek().is_some() {
                return Err(bad("chunked is not the final transfer coding"));
            }
        } else {
            only_chunked = false;
        }
    }
    Ok(only_chunked)
}

/// Advances through chunked framing; returns bytes used and whether the body ended.
fn feed_chunked(state: &mut ChunkState, data: &[u8]) -> Result<(usize, bool), Refusal> {
    let mut i = 0;
    while i < data.len() {
        match state {
            ChunkState::Size(line) => {
                let b = data[i];
                i += 1;
                line.push(b);
                if line.len() > MAX_CHUNK_LINE {
                    return Err(bad("chunk-size line too long"));
                }
                if b == b'\n' {
                    let size = parse_chunk_size(line)?;
                    *state = if size == 0 {
                        ChunkState::Trailers { seen: 0, line: Vec::new() }
                    } else {
                        ChunkState::Data(size)
                    };
                }
            }
            ChunkState::Data(left) => {
                let n = (*left).min((data.len() - i) as u64);
                *left -= n;
                i += n as usize;
                if *left == 0 {
                    *state = ChunkState::DataEnd(0);
                }
            }
            ChunkState::DataEnd(seen) => {
                let want = if *seen == 0 { b'\r' } else { b'\n' };
                if data[i] != want {
                    return Err(bad("chunk data not followed by CRLF"));
                }
                i += 1;
                *seen += 1;
                if *seen == 2 {
                    *state = ChunkState::Size(Vec::new());
                }
            }
            ChunkState::Trailers { seen, line } => {
                let b = data[i];
                i += 1;
                *seen += 1;
                if *seen > MAX_TRAILERS {
                    return Err(bad("trailer section too long"));
                }
                line.push(b);
                if b == b'\n' {
                    if line.len() < 2 || line[line.len() - 2] != b'\r' {
                        return Err(bad("bare LF in chunked trailers"));
                    }
                    if line.len() == 2 {
                        return Ok((i, true));
                    }
                    let content = &line[..line.len() - 2];
                    if content.first().is_some_and(|&b| b == b' ' || b == b'\t') || !content.contains(&b':') {
                        return Err(bad("malformed trailer"));
                    }
                    line.clear();
                }
            }
        }
    }
    Ok((i, false))
}

/// A Content-Length value: plain digits only (no sign, no space, no list), at most 18 of them so
/// it always fits. keel's upstream client frames responses with the same rule.
pub fn parse_content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// Parses "1a;ext=v\r\n": hex digits only (no sign, no whitespace, no "0x"), at most 15 of
/// them, optional extensions of token characters.
pub fn parse_chunk_size(line: &[u8]) -> Result<u64, &'static str> {
    let line = line.strip_suffix(b"\r\n").ok_or("bare LF in chunk-size line")?;
    let (size, ext) = match line.iter().position(|&b| b == b';') {
        Some(p) => (&line[..p], Some(&line[p + 1..])),
        None => (line, None),
    };
    if size.is_empty() || size.len() > 15 || !size.iter().all(u8::is_ascii_hexdigit) {
        return Err("invalid chunk size");
    }
    if let Some(ext) = ext {
        if ext.iter().any(|&b| !(is_tchar(b) || b == b'=' || b == b';' || b == b'"')) {
            return Err("invalid chunk extension");
        }
    }
    let text = std::str::from_utf8(size).map_err(|_| "invalid chunk size")?;
    u64::from_str_radix(text, 16).map_err(|_| "invalid chunk size")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(bytes: &[u8]) -> Result<Progress, Refusal> {
        H1Scanner::new(64 * 1024).feed(bytes)
    }

    #[test]
    fn plain_requests_pass_and_are_counted() {
        let two = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc";
        assert_eq!(scan(two), Ok(Progress { heads: 2 }));
        let chunked = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nX-T: 1\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(scan(chunked), Ok(Progress { heads: 2 }));
        assert_eq!(scan(b"GET / HTTP/1.0\r\n\r\n"), Ok(Progress { heads: 1 }));
        assert_eq!(scan(b"GET http://a/ HTTP/1.1\r\n\r\n"), Ok(Progress { heads: 1 }));
    }

    #[test]
    fn byte_at_a_time_gives_the_same_verdict() {
        let msg = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n";
        let mut s = H1Scanner::new(1024);
        let heads: usize = msg.iter().map(|b| s.feed(std::slice::from_ref(b)).expect("valid").heads).sum();
        assert_eq!(heads, 2);
        assert!(!s.in_partial_head());
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        let cases: &[&[u8]] = &[
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcd",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +4\r\n\r\nabcd",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\x0bchunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"GET / HTTP/1.1\nHost: a\n\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n Transfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nz\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\n",
        ];
        for case in cases {
            assert!(scan(case).is_err(), "accepted: {:?}", String::from_utf8_lossy(case));
        }
    }

    #[test]
    fn each_refusal_carries_its_status() {
        let status = |bytes: &[u8]| scan(bytes).map(|_| ()).map_err(|r| r.status.as_u16());
        let cases: &[(&[u8], Result<(), u16>)] = &[
            (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", Err(505)),
            (b"GET / HTTP/3.0\r\nHost: a\r\n\r\n", Err(505)),
            (b"GET / HTTP/0.9\r\nHost: a\r\n\r\n", Err(505)),
            (b"GET / HTTP/1\r\nHost: a\r\n\r\n", Err(400)),
            (b"GET / HTTQ/1.1\r\nHost: a\r\n\r\n", Err(400)),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", Err(501)),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n", Err(501)),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", Err(501)),
            // Ambiguous before it is unknown: still 400.
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n", Err(400)),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", Err(400)),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: ,chunked\r\n\r\n", Err(400)),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: gzip\r\n\r\n", Err(400)),
            (b"POST / HTTP/1.0\r\nTransfer-Encoding: gzip\r\n\r\n", Err(400)),
            (b"GET / HTTP/1.1\r\n\r\n", Err(400)),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n0\r\n\r\n", Ok(())),
        ];
        for (bytes, want) in cases {
            assert_eq!(&status(bytes), want, "{:?}", String::from_utf8_lossy(bytes));
        }
        let missing = scan(b"GET / HTTP/1.1\r\n\r\n").expect_err("no Host");
        assert!(missing.reason.contains("Host"), "{missing:?}");
    }

    #[test]
    fn a_long_request_line_is_414_before_the_head_limit_is_reached() {
        let long = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(MAX_REQUEST_LINE));
        assert_eq!(scan(long.as_bytes()).map_err(|r| r.status), Err(StatusCode::URI_TOO_LONG));
        // Still incomplete: refused as soon as the line is known to be too long.
        let mut s = H1Scanner::new(64 * 1024);
        let partial = format!("GET /{}", "a".repeat(MAX_REQUEST_LINE));
        assert_eq!(s.feed(partial.as_bytes()).map_err(|r| r.status), Err(StatusCode::URI_TOO_LONG));
        // A head limit below 8 KiB bounds the line too.
        let mut s = H1Scanner::new(100);
        let partial = format!("GET /{}", "a".repeat(200));
        assert_eq!(s.feed(partial.as_bytes()).map_err(|r| r.status), Err(StatusCode::URI_TOO_LONG));
        // A line at the limit passes.
        let fits = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(MAX_REQUEST_LINE - 14));
        assert_eq!(scan(fits.as_bytes()), Ok(Progress { heads: 1 }));
    }

    #[test]
    fn second_request_after_a_body_is_checked_too() {
        let msg = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx";
        assert!(scan(msg).is_err());
    }

    #[test]
    fn upgrades_and_h2_stop_the_scan() {
        let mut s = H1Scanner::new(1024);
        s.feed(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n").expect("valid");
        assert!(s.is_opaque());
        assert!(s.feed(b"\x81\x05hello\n\n\r").is_ok());
        let mut s = H1Scanner::new(1024);
        s.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").expect("preface");
        assert!(s.is_opaque());
        let mut s = H1Scanner::new(1024);
        s.feed(b"PRI * H").expect("preface start");
        s.feed(b"TTP/2.0\r\n\r\nSM\r\n\r\n").expect("preface end");
        assert!(s.is_opaque());
    }

    #[test]
    fn oversized_heads_are_left_to_the_server() {
        let mut s = H1Scanner::new(16);
        assert!(s.feed(b"GET / HTTP/1.1\r\nX-Long: aaaaaaaaaaaaaaaaaaaaaa").is_ok());
        assert!(s.is_opaque());
    }

    #[test]
    fn partial_head_tracking() {
        let mut s = H1Scanner::new(1024);
        assert!(!s.in_partial_head());
        s.feed(b"GET / HT").expect("partial");
        assert!(s.in_partial_head());
        s.feed(b"TP/1.1\r\nHost: a\r\n\r\n").expect("rest");
        assert!(!s.in_partial_head());
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_splitting_does_not_change_the_verdict(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), cut in 0usize..300) {
            let whole = H1Scanner::new(256).feed(&data).map(|p| p.heads);
            let cut = cut.min(data.len());
            let mut s = H1Scanner::new(256);
            let split = s.feed(&data[..cut]).and_then(|a| s.feed(&data[cut..]).map(|b| a.heads + b.heads));
            proptest::prop_assert_eq!(whole.is_ok(), split.is_ok());
        }
    }

    #[test]
    fn the_fast_line_end_check_agrees_with_the_rules() {
        // Every string of up to 7 bytes over the bytes that matter, and a letter.
        const BYTES: [u8; 4] = [b'a', b'\r', b'\n', 0];
        for len in 0..=7u32 {
            for mut code in 0..4usize.pow(len) {
                let mut s = Vec::new();
                for _ in 0..len {
                    s.push(BYTES[code % 4]);
                    code /= 4;
                }
                assert_eq!(line_ends_are_clean(&s), name_broken_line_end(&s).is_ok(), "{s:?}");
            }
        }
    }
}

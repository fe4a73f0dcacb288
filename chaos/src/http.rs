//! A minimal blocking HTTP/1.1 client and server over `std::net`, enough for probing a VIP,
//! talking to keel's admin API and serving as a backend. Every call has a deadline.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// A response: status code and body.
#[derive(Clone, Debug)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Body as text (lossy).
    pub body: String,
}

/// Splits `http://HOST:PORT/PATH` into a socket address and a path.
pub fn parse_url(url: &str) -> Result<(SocketAddr, String), String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| format!("not an http:// URL: {url}"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_owned()),
        None => (rest, "/".to_owned()),
    };
    let host = if host.contains(':') { host.to_owned() } else { format!("{host}:80") };
    let addr = host
        .to_socket_addrs()
        .map_err(|e| format!("bad address {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("no address for {host}"))?;
    Ok((addr, path))
}

/// Sends one request (`Connection: close`) and reads the whole response, all within `timeout`.
pub fn request(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<&str>,
    timeout: Duration,
) -> Result<Response, String> {
    request_from(None, method, url, token, body, timeout)
}

/// [`request`] from the local address `src` (the kernel's choice when `None`).
pub fn request_from(
    src: Option<IpAddr>,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<&str>,
    timeout: Duration,
) -> Result<Response, String> {
    let started = Instant::now();
    let (addr, path) = parse_url(url)?;
    let mut stream = match src {
        None => TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?,
        Some(src) => {
            let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)
                .map_err(|e| format!("socket: {e}"))?;
            socket.bind(&SocketAddr::new(src, 0).into()).map_err(|e| format!("bind {src}: {e}"))?;
            socket.connect_timeout(&addr.into(), timeout).map_err(|e| format!("connect: {e}"))?;
            socket.into()
        }
    };
    let left = |started: Instant| timeout.saturating_sub(started.elapsed()).max(Duration::from_millis(1));
    stream.set_write_timeout(Some(left(started))).map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or("");
    if method != "GET" {
        head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    head.push_str(body);
    stream.write_all(head.as_bytes()).map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 8192];
    loop {
        if started.elapsed() >= timeout {
            return Err("timeout reading the response".into());
        }
        stream.set_read_timeout(Some(left(started))).map_err(|e| e.to_string())?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > 4 << 20 {
                    return Err("response too large".into());
                }
                if complete(&buf) {
                    break;
                }
            }
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    parse_response(&buf)
}

/// True once `buf` holds a full response with a `Content-Length` body.
fn complete(buf: &[u8]) -> bool {
    let text = String::from_utf8_lossy(buf);
    let Some(end) = text.find("\r\n\r\n") else { return false };
    let head = text[..end].to_ascii_lowercase();
    let Some(len) =
        head.lines().find_map(|l| l.strip_prefix("content-length:").and_then(|v| v.trim().parse::<usize>().ok()))
    else {
        return false;
    };
    buf.len() >= end + 4 + len
}

fn parse_response(buf: &[u8]) -> Result<Response, String> {
    let text = String::from_utf8_lossy(buf);
    let end = text.find("\r\n\r\n").ok_or("no response head")?;
    let status = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or("bad status line")?;
    Ok(Response { status, body: text[end + 4..].to_owned() })
}

/// Serves `text` to every request on `addr` for at most `max` (a backend for the lab).
pub fn serve(addr: SocketAddr, text: &str, max: Duration) -> Result<(), String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let body = format!("{text}\n");
    while started.elapsed() < max {
        match listener.accept() {
            Ok((mut stream, _)) => {
                let body = body.clone();
                std::thread::spawn(move || {
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // One request per connection is enough for keel's pool and health checks.
                    for _ in 0..64 {
                        match stream.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                buf.extend_from_slice(&chunk[..n]);
                                if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                                    break;
                                }
                            }
                        }
                    }
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(resp.as_bytes());
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
    Ok(())
}

/// Milliseconds since the Unix epoch: the one clock every lab process shares.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

//! The lab's helper, run inside a namespace with `ip netns exec NS chaos-probe …`:
//!
//! - `serve ADDR TEXT MAX_SECS`: a backend answering TEXT to every request.
//! - `probe URL INTERVAL_MS TIMEOUT_MS MAX_SECS`: GETs URL every INTERVAL_MS and prints
//!   `P START_MS END_MS ok|err DETAIL` per request (a client of the VIP). A new request starts
//!   every INTERVAL_MS even while earlier ones hang, so lines come in completion order.
//! - `watch VIP INTERVAL_MS MAX_SECS`: prints `W TS_MS 0|1 SPAN_US` every INTERVAL_MS, 1 when VIP
//!   (IPv4 or IPv6) is an
//!   address of this namespace's `eth0` — what makes a host answer ARP for it. (A node that
//!   handed the VIP over keeps it on `lo` for a while, with `arp_ignore = 1`, to finish its
//!   connections: a local address, but not one it announces.)
//! - `get URL TIMEOUT_MS [TOKEN]` / `post URL TIMEOUT_MS TOKEN BODY`: one request; prints the
//!   status code on the first line and the body after it.
//! - `get-from SRC URL TIMEOUT_MS`: `get` from the local address SRC (a second client of the
//!   client namespace, as another client host would be: its own sticky binding).

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use keel_chaos::http::{self, now_ms};

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> Result<T, String> {
    args.get(i)
        .ok_or_else(|| format!("missing {what}"))?
        .parse::<T>()
        .map_err(|_| format!("bad {what}: {:?}", args.get(i)))
}

fn run(args: &[String]) -> Result<(), String> {
    let mode = args.get(1).map(String::as_str).unwrap_or("");
    match mode {
        "serve" => {
            let addr: SocketAddr = arg(args, 2, "ADDR")?;
            let text: String = arg(args, 3, "TEXT")?;
            let max: u64 = arg(args, 4, "MAX_SECS")?;
            http::serve(addr, &text, Duration::from_secs(max))
        }
        "probe" => {
            let url: String = arg(args, 2, "URL")?;
            let interval = Duration::from_millis(arg(args, 3, "INTERVAL_MS")?);
            let timeout = Duration::from_millis(arg(args, 4, "TIMEOUT_MS")?);
            let max = Duration::from_secs(arg(args, 5, "MAX_SECS")?);
            probe(&url, interval, timeout, max)
        }
        "watch" => {
            let vip: IpAddr = arg(args, 2, "VIP")?;
            let interval = Duration::from_millis(arg(args, 3, "INTERVAL_MS")?);
            let max = Duration::from_secs(arg(args, 4, "MAX_SECS")?);
            let started = Instant::now();
            let mut out = std::io::stdout().lock();
            while started.elapsed() < max {
                let t0 = Instant::now();
                // One getifaddrs call (a single netlink dump): the observation takes tens of
                // microseconds, so the timestamp taken right after it is the time it describes —
                // unless the helper was preempted in between, on a busy box for many
                // milliseconds. SPAN_US says how long the observation and its stamp took
                // together, so the lab can tell a sharp sample from a blurred one.
                let holding = nix::ifaddrs::getifaddrs().is_ok_and(|mut addrs| {
                    addrs.any(|a| {
                        a.interface_name == "eth0"
                            && a.address.as_ref().is_some_and(|s| match vip {
                                IpAddr::V4(v) => s.as_sockaddr_in().is_some_and(|s| s.ip() == v),
                                IpAddr::V6(v) => s.as_sockaddr_in6().is_some_and(|s| s.ip() == v),
                            })
                    })
                });
                let stamp = now_ms();
                let span = t0.elapsed().as_micros();
                writeln!(out, "W {stamp} {} {span}", u8::from(holding)).map_err(|e| e.to_string())?;
                out.flush().map_err(|e| e.to_string())?;
                std::thread::sleep(interval.saturating_sub(t0.elapsed()));
            }
            Ok(())
        }
        "get-from" => {
            let src: IpAddr = arg(args, 2, "SRC")?;
            let url: String = arg(args, 3, "URL")?;
            let timeout = Duration::from_millis(arg(args, 4, "TIMEOUT_MS")?);
            let r = http::request_from(Some(src), "GET", &url, None, None, timeout)?;
            println!("{}\n{}", r.status, r.body);
            Ok(())
        }
        "get" | "post" => {
            let url: String = arg(args, 2, "URL")?;
            let timeout = Duration::from_millis(arg(args, 3, "TIMEOUT_MS")?);
            let token = args.get(4).map(String::as_str).filter(|t| !t.is_empty());
            let body = args.get(5).map(String::as_str);
            let method = if mode == "get" { "GET" } else { "POST" };
            let r = http::request(method, &url, token, body, timeout)?;
            println!("{}\n{}", r.status, r.body);
            Ok(())
        }
        _ => Err("usage: chaos-probe serve|probe|watch|get|get-from|post …".into()),
    }
}

/// Starts a request every `interval` whatever the ones in flight are doing (at most
/// [`MAX_IN_FLIGHT`]), so the outage is resolved to about `interval`, not to `timeout`.
fn probe(url: &str, interval: Duration, timeout: Duration, max: Duration) -> Result<(), String> {
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let in_flight = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writer = std::thread::spawn(move || {
        let mut out = std::io::stdout().lock();
        for line in rx {
            if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                return;
            }
        }
    });
    let started = Instant::now();
    let mut next = Instant::now();
    while started.elapsed() < max {
        if in_flight.load(std::sync::atomic::Ordering::SeqCst) < MAX_IN_FLIGHT {
            in_flight.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (tx, url, in_flight) = (tx.clone(), url.to_owned(), in_flight.clone());
            std::thread::spawn(move || {
                let start = now_ms();
                let line = match http::request("GET", &url, None, None, timeout) {
                    Ok(r) if r.status == 200 => format!("P {start} {} ok {}", now_ms(), r.body.trim()),
                    Ok(r) => format!("P {start} {} err status {}", now_ms(), r.status),
                    Err(e) => format!("P {start} {} err {}", now_ms(), e.replace('\n', " ")),
                };
                in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                let _ = tx.send(line);
            });
        }
        next += interval;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    drop(tx);
    writer.join().map_err(|_| "writer thread panicked".to_owned())
}

/// Upper bound on concurrent probe requests.
const MAX_IN_FLIGHT: usize = 64;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chaos-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

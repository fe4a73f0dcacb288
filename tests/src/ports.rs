//! Free loopback ports for the sockets keel binds.
//!
//! Backends bind port 0 themselves and need none of this; keel's listener and admin addresses
//! must be written into its config before it starts, so they are picked here by binding
//! 127.0.0.1:0, reading the port the kernel chose, and closing the socket.
//!
//! The tiny race: between that close and keel's bind, another process may take the port. The
//! window is milliseconds, but with many tests starting backends on port 0 at once it does
//! happen now and then; keel then exits with "Address already in use", and
//! [`KeelBuilder::start`](crate::KeelBuilder::start) and [`Demo::start`](crate::keel::Demo::start)
//! start it again on new ports.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A loopback address whose port was free a moment ago.
pub fn free_addr() -> SocketAddr {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr of a bound socket")
}

/// A port that was free on 127.0.0.1 a moment ago.
pub fn free_port() -> u16 {
    free_addr().port()
}

/// Lowest port of the kernel's ephemeral range (`ip_local_port_range`), 32768 if unreadable.
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// A free loopback address whose port lies *below* the kernel's ephemeral range, on an address
/// of 127.0.0.0/8 other than 127.0.0.1.
///
/// A port from [`free_addr`] comes from the ephemeral range, so between its release and keel's
/// bind any outgoing connection on the machine (Raft peers dial each other all the time) or
/// any `bind(:0)` may take it. Ports below that range are never handed out by the kernel, so
/// only another test picking the same one at random could collide: the address is drawn at
/// random from 127.1.0.1–127.254.255.254 and the port from [10000, low), and checked bindable,
/// so two picks meet only if both of ~10¹¹ draws agree (with ports alone, a full run's few
/// hundred picks met now and then: a test's client reached another test's Raft port). Used for
/// cluster nodes, whose addresses must stay the same across restarts and are recorded in the
/// Raft membership.
pub fn stable_addr() -> SocketAddr {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let low = 10_000u64;
    let high = u64::from(ephemeral_low()).max(low + 1000);
    for _ in 0..1000 {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        let mut x = nanos ^ (u64::from(std::process::id()) << 32) ^ COUNTER.fetch_add(0x9e37_79b9, Ordering::Relaxed);
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        let port = (low + x % (high - low)) as u16;
        let y = x / (high - low);
        let ip = Ipv4Addr::new(127, 1 + (y % 254) as u8, ((y >> 8) % 256) as u8, 1 + ((y >> 16) % 254) as u8);
        let addr = SocketAddr::from((ip, port));
        if TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
    free_addr()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_addrs_are_loopback_and_bindable() {
        let a = free_addr();
        assert!(a.ip().is_loopback());
        TcpListener::bind(a).expect("the port is free again");
    }

    #[test]
    fn stable_addrs_are_below_the_ephemeral_range() {
        let a = stable_addr();
        assert!(a.port() < ephemeral_low() && a.port() >= 10_000, "{a}");
        assert!(a.ip().is_loopback() && a.ip() != std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), "{a}");
        TcpListener::bind(a).expect("bindable");
    }
}

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

/// A loopback address whose port was free a moment ago.
pub fn free_addr() -> SocketAddr {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr of a bound socket")
}

/// A port that was free on 127.0.0.1 a moment ago.
pub fn free_port() -> u16 {
    free_addr().port()
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
}

//! The layer-2 sender both announcement kinds go out through: a pnet datalink channel on the
//! VIP's interface, and the burst that paces the frames. What the frames say is
//! [`super::arp`]'s (IPv4) and [`super::ndp`]'s (IPv6) business; when and how they are sent is
//! this module's, so both families share one timing.

use std::io;
use std::time::Duration;

use pnet_datalink::{Channel, Config, DataLinkSender, NetworkInterface};

/// Opens a layer-2 sender on `iface`, not promiscuous (pnet's default config turns promiscuous
/// mode on, which a load balancer has no business doing). The receiving half is dropped at once
/// so no packets queue up for a reader that never reads.
pub(crate) fn open_sender(iface: &NetworkInterface) -> io::Result<Box<dyn DataLinkSender>> {
    let config = Config { promiscuous: false, ..Config::default() };
    match pnet_datalink::channel(iface, config)? {
        Channel::Ethernet(tx, _rx) => Ok(tx),
        _ => Err(io::Error::other("pnet returned a non-Ethernet channel")),
    }
}

/// Sends `count` rounds of `frames` (each round all of them, in order), the first round at once
/// and the rest `interval` apart.
pub(crate) async fn send_burst(
    iface: &NetworkInterface,
    frames: &[&[u8]],
    count: u32,
    interval: Duration,
) -> io::Result<()> {
    let mut tx = open_sender(iface)?;
    for round in 0..count {
        if round > 0 {
            tokio::time::sleep(interval).await;
        }
        for frame in frames {
            tx.send_to(frame, None).unwrap_or_else(|| Err(io::Error::other("pnet send buffer too small")))?;
        }
    }
    Ok(())
}

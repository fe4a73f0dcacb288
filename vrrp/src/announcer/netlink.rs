//! `NetlinkAnnouncer`: the real [`VipAnnouncer`]. The address goes on and off the interface
//! through rtnetlink (as `ip addr add/del VIP/32 dev IF` would), and the announcement goes out as
//! raw gratuitous-ARP frames through a pnet datalink channel.
//!
//! Everything that can be checked before the node ever leads is checked in
//! [`NetlinkAnnouncer::new`], once, with an error that names the fix: the interface exists, is up
//! and has a MAC; the process has CAP_NET_ADMIN (read from `/proc/self/status`, since probing it
//! would mean changing an address) and CAP_NET_RAW (by opening the raw socket it will use).
//!
//! The interface is looked up again by name on every operation, so an interface that is
//! recreated (a new index) after start is still found.

use std::io;
use std::net::{IpAddr, Ipv4Addr};

use futures_util::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressMessage, CacheInfo};
use netlink_packet_route::AddressFamily;
use pnet_datalink::NetworkInterface;
use tokio::task::JoinHandle;

use super::arp;
use super::{VipAnnouncer, VipFuture};
use crate::error::errno;
use crate::{VipConfig, VipError};

/// Capability bit numbers (linux/capability.h).
const CAP_NET_ADMIN_BIT: u32 = 12;
const CAP_NET_RAW_BIT: u32 = 13;
const NEEDED_FOR_NETLINK: &str = "adding and removing the VIP address (netlink)";
const NEEDED_FOR_ARP: &str = "sending gratuitous ARP (raw packet socket)";

/// Owns a VIP on a real interface: rtnetlink for the address, pnet for gratuitous ARP.
pub struct NetlinkAnnouncer {
    config: VipConfig,
    handle: rtnetlink::Handle,
    connection: JoinHandle<()>,
}

/// The interface as found by name at the time of an operation.
struct Link {
    iface: NetworkInterface,
    mac: [u8; 6],
}

impl NetlinkAnnouncer {
    /// Checks the interface and the process's capabilities and opens the netlink socket.
    ///
    /// Must be called inside a tokio runtime (the netlink connection runs as a task).
    /// Errors: [`VipError::InterfaceNotFound`], [`VipError::NoMac`], [`VipError::InterfaceDown`],
    /// [`VipError::MissingCapability`], or a bad [`VipConfig`].
    pub async fn new(config: VipConfig) -> Result<Self, VipError> {
        config.validate()?;
        find_link(&config.interface)?;
        if effective_capability(CAP_NET_ADMIN_BIT) == Some(false) {
            return Err(VipError::MissingCapability { capability: "CAP_NET_ADMIN", needed_for: NEEDED_FOR_NETLINK });
        }
        if effective_capability(CAP_NET_RAW_BIT) == Some(false) {
            return Err(VipError::MissingCapability { capability: "CAP_NET_RAW", needed_for: NEEDED_FOR_ARP });
        }
        let (connection, handle, _) = rtnetlink::new_connection().map_err(|source| VipError::Netlink {
            action: "connect",
            address: config.address,
            interface: config.interface.clone(),
            source,
        })?;
        let announcer = NetlinkAnnouncer { config, handle, connection: tokio::spawn(connection) };
        // The raw socket is the real CAP_NET_RAW test (capabilities may be granted in ways the
        // status line does not show, e.g. in a user namespace); open it once and drop it.
        let link = find_link(&announcer.config.interface)?;
        arp::open_sender(&link.iface).map_err(|e| announcer.arp_error(e))?;
        // One netlink round trip, so a broken socket shows up now rather than at first claim.
        announcer.query().await?;
        Ok(announcer)
    }

    /// The configuration this announcer was built with.
    pub fn config(&self) -> &VipConfig {
        &self.config
    }

    /// The VIP's address entries on the interface (normally zero or one).
    async fn query(&self) -> Result<Vec<AddressMessage>, VipError> {
        self.query_on(&self.config.interface).await
    }

    /// The VIP's address entries on interface `name`.
    async fn query_on(&self, name: &str) -> Result<Vec<AddressMessage>, VipError> {
        // Any state of the link will do (a down interface still carries addresses); a gone
        // interface carries none.
        let Ok(iface) = find_interface(name) else { return Ok(Vec::new()) };
        let mut request = self
            .handle
            .address()
            .get()
            .set_link_index_filter(iface.index)
            .set_address_filter(IpAddr::V4(self.config.address));
        request.message_mut().header.family = AddressFamily::Inet;
        request.execute().try_collect().await.map_err(|e| self.netlink_error("query", e))
    }

    async fn burst(&self, link: &Link) -> Result<(), VipError> {
        arp::send_burst(&link.iface, link.mac, self.config.address, self.config.arp_count, self.config.arp_interval)
            .await
            .map_err(|e| self.arp_error(e))
    }

    async fn do_claim(&self) -> Result<(), VipError> {
        // The address goes on even if the link is down right now, so that announcing is all
        // that is left to retry once it comes up.
        self.add_address().await?;
        self.do_announce().await
    }

    /// `ip addr replace VIP/32 dev IF [valid_lft L preferred_lft L]`: adds the address, or
    /// renews its lifetime.
    async fn add_address(&self) -> Result<(), VipError> {
        let iface = find_interface(&self.config.interface)?;
        let mut request = self.handle.address().add(iface.index, IpAddr::V4(self.config.address), 32).replace();
        if let Some(lifetime) = self.config.lifetime {
            let secs = u32::try_from(lifetime.as_secs()).unwrap_or(u32::MAX);
            let mut info = CacheInfo::default();
            info.ifa_preferred = secs;
            info.ifa_valid = secs;
            request.message_mut().attributes.push(AddressAttribute::CacheInfo(info));
        }
        request.execute().await.map_err(|e| self.netlink_error("add", e))
    }

    /// Removes the VIP from the interface and from `lo` (where a hand-over left it).
    async fn do_release(&self) -> Result<(), VipError> {
        self.delete_from(&self.config.interface).await?;
        self.delete_from(LOOPBACK).await
    }

    /// `ip addr add VIP/32 dev lo valid_lft ASIDE preferred_lft ASIDE`, then off the interface.
    async fn do_step_aside(&self) -> Result<(), VipError> {
        quiet_arp(&self.config.interface);
        let lo = find_interface(LOOPBACK)?;
        let mut request = self.handle.address().add(lo.index, IpAddr::V4(self.config.address), 32).replace();
        let secs = u32::try_from(ASIDE_LIFETIME.as_secs()).unwrap_or(u32::MAX);
        let mut info = CacheInfo::default();
        info.ifa_preferred = secs;
        info.ifa_valid = secs;
        request.message_mut().attributes.push(AddressAttribute::CacheInfo(info));
        request.execute().await.map_err(|e| self.netlink_error("add to lo", e))?;
        self.delete_from(&self.config.interface).await
    }

    async fn delete_from(&self, name: &str) -> Result<(), VipError> {
        for message in self.query_on(name).await? {
            match self.handle.address().del(message).execute().await {
                Ok(()) => {}
                // Removed by someone else between the query and the delete: still success.
                Err(rtnetlink::Error::NetlinkError(m)) if m.to_io().raw_os_error() == Some(errno::EADDRNOTAVAIL) => {}
                Err(e) => return Err(self.netlink_error("delete", e)),
            }
        }
        Ok(())
    }

    async fn do_announce(&self) -> Result<(), VipError> {
        let link = find_link(&self.config.interface)?;
        self.burst(&link).await
    }

    fn netlink_error(&self, action: &'static str, error: rtnetlink::Error) -> VipError {
        let source = match error {
            rtnetlink::Error::NetlinkError(message) => message.to_io(),
            other => io::Error::other(other.to_string()),
        };
        match source.raw_os_error() {
            Some(errno::EPERM) => {
                VipError::MissingCapability { capability: "CAP_NET_ADMIN", needed_for: NEEDED_FOR_NETLINK }
            }
            Some(errno::ENODEV) => VipError::InterfaceNotFound { interface: self.config.interface.clone() },
            _ => VipError::Netlink {
                action,
                address: self.config.address,
                interface: self.config.interface.clone(),
                source,
            },
        }
    }

    fn arp_error(&self, source: io::Error) -> VipError {
        match source.raw_os_error() {
            Some(errno::EPERM) => VipError::MissingCapability { capability: "CAP_NET_RAW", needed_for: NEEDED_FOR_ARP },
            Some(errno::ENETDOWN) => VipError::InterfaceDown { interface: self.config.interface.clone() },
            _ => VipError::Arp { address: self.config.address, interface: self.config.interface.clone(), source },
        }
    }
}

impl Drop for NetlinkAnnouncer {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl VipAnnouncer for NetlinkAnnouncer {
    fn address(&self) -> Ipv4Addr {
        self.config.address
    }

    fn interface(&self) -> &str {
        &self.config.interface
    }

    fn claim(&self) -> VipFuture<'_, ()> {
        Box::pin(self.do_claim())
    }

    fn step_aside(&self) -> VipFuture<'_, ()> {
        Box::pin(self.do_step_aside())
    }

    fn release(&self) -> VipFuture<'_, ()> {
        Box::pin(self.do_release())
    }

    fn announce(&self) -> VipFuture<'_, ()> {
        Box::pin(self.do_announce())
    }

    fn holds(&self) -> VipFuture<'_, bool> {
        Box::pin(async move { Ok(!self.query().await?.is_empty()) })
    }

    fn renew(&self) -> VipFuture<'_, ()> {
        Box::pin(self.add_address())
    }

    fn renew_every(&self) -> Option<std::time::Duration> {
        self.config.renew_every()
    }
}

/// Finds `name` among this namespace's interfaces, in whatever state it is.
/// Where a hand-over keeps the VIP while the LAN follows the successor.
const LOOPBACK: &str = "lo";

/// How long a handed-over VIP stays on `lo`: the kernel removes it then, whatever keel does
/// (a stop removes it at once, after the drain). Long enough for the successor's announcements
/// (400 ms) and for the requests this node is finishing.
const ASIDE_LIFETIME: std::time::Duration = std::time::Duration::from_secs(30);

/// Makes the interface answer ARP only for addresses configured on it
/// (`net.ipv4.conf.IF.arp_ignore = 1`, as for LVS direct routing), so the VIP kept on `lo`
/// after a hand-over is not announced by this host. Best effort: without the right to write
/// the sysctl (keel under `DynamicUser=`; the unit sets it instead), this host goes on
/// answering ARP for the VIP on `lo` until it leaves, which the successor's repeated
/// announcements override; logged once.
fn quiet_arp(interface: &str) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    let path = format!("/proc/sys/net/ipv4/conf/{interface}/arp_ignore");
    let current = std::fs::read_to_string(&path).ok().and_then(|v| v.trim().parse::<u32>().ok());
    if current.is_some_and(|v| v >= 1) {
        return;
    }
    if let Err(e) = std::fs::write(&path, "1") {
        WARNED.call_once(|| {
            tracing::warn!(target: "keel::vip", %path, error = %e,
                "cannot set arp_ignore=1: after a hand-over this host still answers ARP for the VIP kept on lo (set it with sysctl)");
        });
    }
}

fn find_interface(name: &str) -> Result<NetworkInterface, VipError> {
    pnet_datalink::interfaces()
        .into_iter()
        .find(|i| i.name == name)
        .ok_or_else(|| VipError::InterfaceNotFound { interface: name.to_string() })
}

/// Finds `name` and checks it can send an announcement: it has a MAC and is up.
fn find_link(name: &str) -> Result<Link, VipError> {
    let iface = find_interface(name)?;
    let mac = match iface.mac {
        Some(mac) if !mac.is_zero() => mac.octets(),
        _ => return Err(VipError::NoMac { interface: name.to_string() }),
    };
    if !iface.is_up() {
        return Err(VipError::InterfaceDown { interface: name.to_string() });
    }
    Ok(Link { iface, mac })
}

/// Whether capability `bit` is in this process's effective set, or `None` when
/// `/proc/self/status` cannot tell (then the operation itself will report EPERM).
fn effective_capability(bit: u32) -> Option<bool> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_cap_eff(&status).map(|caps| caps & (1u64 << bit) != 0)
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    u64::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_effective_capabilities() {
        let caps = parse_cap_eff("Name:\tkeel\nCapInh:\t0\nCapEff:\t0000000000003000\n").unwrap();
        assert_ne!(caps & (1 << CAP_NET_ADMIN_BIT), 0);
        assert_ne!(caps & (1 << CAP_NET_RAW_BIT), 0);
        assert_eq!(parse_cap_eff("CapEff:\tzz\n"), None);
    }

    #[tokio::test]
    async fn missing_interface_is_named_at_start() {
        let config = VipConfig::new("10.99.0.100", "keel-nope0").unwrap();
        let err = NetlinkAnnouncer::new(config).await.err().unwrap();
        assert!(matches!(&err, VipError::InterfaceNotFound { interface } if interface == "keel-nope0"), "{err}");
        assert!(err.to_string().contains("\"keel-nope0\" does not exist"), "{err}");
    }

    #[tokio::test]
    async fn loopback_is_refused_for_having_no_mac() {
        let config = VipConfig::new("10.99.0.100", "lo").unwrap();
        let err = NetlinkAnnouncer::new(config).await.err().unwrap();
        assert!(matches!(err, VipError::NoMac { .. }), "{err}");
    }
}

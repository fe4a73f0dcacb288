//! `NetlinkAnnouncer`: the real [`VipAnnouncer`]. The address goes on and off the interface
//! through rtnetlink (as `ip addr add/del VIP/32 dev IF` would, or for IPv6
//! `ip addr add VIP/128 dev IF nodad noprefixroute`), and the announcement goes out as raw
//! frames through a pnet datalink channel: gratuitous ARP for IPv4, unsolicited Neighbor
//! Advertisements for IPv6.
//!
//! An IPv6 VIP is added with `IFA_F_NODAD`: otherwise the kernel holds it "tentative" for the
//! second or so of duplicate address detection, answers no Neighbor Solicitation for it and
//! refuses to bind it — a failover that waits on that is a second slower, and during a
//! hand-over the old holder still has the address on `lo`, which DAD on the new holder would not
//! see anyway. A tentative or DAD-failed entry (added by someone else without `nodad`) does not
//! count as held, and a claim replaces it. `IFA_F_NOPREFIXROUTE` keeps the /128 from adding a
//! route of its own, as a /32 adds none.
//!
//! Everything that can be checked before the node ever leads is checked in
//! [`NetlinkAnnouncer::new`], once, with an error that names the fix: the interface exists, is up
//! and has a MAC (and for an IPv6 VIP, has IPv6 enabled); the process has CAP_NET_ADMIN (read
//! from `/proc/self/status`, since probing it would mean changing an address) and CAP_NET_RAW
//! (by opening the raw socket it will use).
//!
//! The interface is looked up again by name on every operation, so an interface that is
//! recreated (a new index) after start is still found.

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use futures_util::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage, CacheInfo};
use netlink_packet_route::AddressFamily;
use pnet_datalink::NetworkInterface;
use tokio::task::JoinHandle;

use super::arp::{gratuitous_arp_frame, ArpForm};
use super::ndp::unsolicited_na_frame;
use super::{datalink, VipAnnouncer, VipFuture};
use crate::config::host_prefix_len;
use crate::error::errno;
use crate::{VipConfig, VipError};

/// Capability bit numbers (linux/capability.h).
const CAP_NET_ADMIN_BIT: u32 = 12;
const CAP_NET_RAW_BIT: u32 = 13;
const NEEDED_FOR_NETLINK: &str = "adding and removing the VIP address (netlink)";
const NEEDED_FOR_ARP: &str = "sending gratuitous ARP (raw packet socket)";
const NEEDED_FOR_NDP: &str = "sending IPv6 neighbour advertisements (raw packet socket)";

/// Owns a VIP on a real interface: rtnetlink for the address, pnet for the announcement
/// (gratuitous ARP or unsolicited Neighbor Advertisements).
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
        if config.address.is_ipv6() && ipv6_disabled(&config.interface) {
            return Err(VipError::Ipv6Disabled { interface: config.interface.clone() });
        }
        if effective_capability(CAP_NET_ADMIN_BIT) == Some(false) {
            return Err(VipError::MissingCapability { capability: "CAP_NET_ADMIN", needed_for: NEEDED_FOR_NETLINK });
        }
        if effective_capability(CAP_NET_RAW_BIT) == Some(false) {
            return Err(VipError::MissingCapability {
                capability: "CAP_NET_RAW",
                needed_for: needed_for_announce(config.address),
            });
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
        datalink::open_sender(&link.iface).map_err(|e| announcer.announce_error(e))?;
        // One netlink round trip, so a broken socket shows up now rather than at first claim.
        announcer.query().await?;
        Ok(announcer)
    }

    /// The configuration this announcer was built with.
    pub fn config(&self) -> &VipConfig {
        &self.config
    }

    /// The VIP's address entries on the interface (normally zero or one), in whatever state.
    async fn query(&self) -> Result<Vec<AddressMessage>, VipError> {
        self.query_on(&self.config.interface).await
    }

    /// The VIP's address entries on interface `name`.
    async fn query_on(&self, name: &str) -> Result<Vec<AddressMessage>, VipError> {
        // Any state of the link will do (a down interface still carries addresses); a gone
        // interface carries none.
        let Ok(iface) = find_interface(name) else { return Ok(Vec::new()) };
        let mut request =
            self.handle.address().get().set_link_index_filter(iface.index).set_address_filter(self.config.address);
        request.message_mut().header.family = match self.config.address {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        request.execute().try_collect().await.map_err(|e| self.netlink_error("query", e))
    }

    async fn burst(&self, link: &Link) -> Result<(), VipError> {
        let (count, interval) = (self.config.arp_count, self.config.arp_interval);
        let sent = match self.config.address {
            IpAddr::V4(ip) => {
                let request = gratuitous_arp_frame(link.mac, ip, ArpForm::Request);
                let reply = gratuitous_arp_frame(link.mac, ip, ArpForm::Reply);
                datalink::send_burst(&link.iface, &[&request, &reply], count, interval).await
            }
            IpAddr::V6(ip) => {
                let advert = unsolicited_na_frame(link.mac, ip);
                datalink::send_burst(&link.iface, &[&advert], count, interval).await
            }
        };
        sent.map_err(|e| self.announce_error(e))
    }

    async fn do_claim(&self) -> Result<(), VipError> {
        // An entry the kernel does not answer for (tentative, or DAD failed: someone added the
        // VIP without `nodad`) would survive a `replace` in that state; start from nothing.
        for message in self.query().await? {
            if !usable(&message) {
                self.delete(message).await?;
            }
        }
        // The address goes on even if the link is down right now, so that announcing is all
        // that is left to retry once it comes up.
        self.add_address().await?;
        self.do_announce().await
    }

    /// `ip addr replace VIP/32 dev IF [valid_lft L preferred_lft L]` (IPv6: `VIP/128 ... nodad
    /// noprefixroute`): adds the address, or renews its lifetime.
    async fn add_address(&self) -> Result<(), VipError> {
        let iface = find_interface(&self.config.interface)?;
        self.add_on(iface.index, self.config.lifetime, "add").await
    }

    /// Adds the VIP as a host address on interface `index`, with `lifetime` (`None`: permanent).
    async fn add_on(&self, index: u32, lifetime: Option<Duration>, action: &'static str) -> Result<(), VipError> {
        let address = self.config.address;
        let mut request = self.handle.address().add(index, address, host_prefix_len(address)).replace();
        let message = request.message_mut();
        if address.is_ipv6() {
            message.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad | AddressFlags::Noprefixroute));
        }
        if let Some(lifetime) = lifetime {
            let secs = u32::try_from(lifetime.as_secs()).unwrap_or(u32::MAX);
            let mut info = CacheInfo::default();
            info.ifa_preferred = secs;
            info.ifa_valid = secs;
            message.attributes.push(AddressAttribute::CacheInfo(info));
        }
        request.execute().await.map_err(|e| self.netlink_error(action, e))
    }

    /// Removes the VIP from the interface and from `lo` (where a hand-over left it).
    async fn do_release(&self) -> Result<(), VipError> {
        self.delete_from(&self.config.interface).await?;
        self.delete_from(LOOPBACK).await
    }

    /// `ip addr add VIP/32 dev lo valid_lft ASIDE preferred_lft ASIDE`, then off the interface.
    async fn do_step_aside(&self) -> Result<(), VipError> {
        // IPv6 needs no counterpart of arp_ignore: Linux answers a Neighbor Solicitation only
        // for an address on the interface it arrived on (`ndisc_recv_ns` looks the target up
        // strictly on that device), so the VIP on `lo` is served but never advertised.
        // `vrrp/tests/netns.rs` (netns_v6_step_aside_keeps_serving_but_stops_answering_nd)
        // checks it against the running kernel.
        if self.config.address.is_ipv4() {
            quiet_arp(&self.config.interface);
        }
        let lo = find_interface(LOOPBACK)?;
        self.add_on(lo.index, Some(ASIDE_LIFETIME), "add to lo").await?;
        self.delete_from(&self.config.interface).await
    }

    async fn delete_from(&self, name: &str) -> Result<(), VipError> {
        for message in self.query_on(name).await? {
            self.delete(message).await?;
        }
        Ok(())
    }

    async fn delete(&self, message: AddressMessage) -> Result<(), VipError> {
        match self.handle.address().del(message).execute().await {
            Ok(()) => Ok(()),
            // Removed by someone else between the query and the delete: still success.
            Err(rtnetlink::Error::NetlinkError(m)) if m.to_io().raw_os_error() == Some(errno::EADDRNOTAVAIL) => Ok(()),
            Err(e) => Err(self.netlink_error("delete", e)),
        }
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

    fn announce_error(&self, source: io::Error) -> VipError {
        match source.raw_os_error() {
            Some(errno::EPERM) => VipError::MissingCapability {
                capability: "CAP_NET_RAW",
                needed_for: needed_for_announce(self.config.address),
            },
            Some(errno::ENETDOWN) => VipError::InterfaceDown { interface: self.config.interface.clone() },
            _ => VipError::Announce { address: self.config.address, interface: self.config.interface.clone(), source },
        }
    }
}

impl Drop for NetlinkAnnouncer {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl VipAnnouncer for NetlinkAnnouncer {
    fn address(&self) -> IpAddr {
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
        Box::pin(async move { Ok(self.query().await?.iter().any(usable)) })
    }

    fn renew(&self) -> VipFuture<'_, ()> {
        Box::pin(self.add_address())
    }

    fn renew_every(&self) -> Option<std::time::Duration> {
        self.config.renew_every()
    }
}

/// Where a hand-over keeps the VIP while the LAN follows the successor.
const LOOPBACK: &str = "lo";

/// How long a handed-over VIP stays on `lo`: the kernel removes it then, whatever keel does
/// (a stop removes it at once, after the drain). Long enough for the successor's announcements
/// (400 ms) and for the requests this node is finishing.
const ASIDE_LIFETIME: Duration = Duration::from_secs(30);

/// What the raw socket is for, in a missing-capability error.
fn needed_for_announce(address: IpAddr) -> &'static str {
    match address {
        IpAddr::V4(_) => NEEDED_FOR_ARP,
        IpAddr::V6(_) => NEEDED_FOR_NDP,
    }
}

/// Whether the kernel answers for this address entry: an IPv6 address that is still tentative
/// (duplicate address detection running) or whose detection failed is on the interface but
/// neither answered for in Neighbor Discovery nor usable as a source, so it is not "held".
fn usable(message: &AddressMessage) -> bool {
    // IFA_FLAGS carries all 32 bits; the header's byte is the older, truncated copy.
    let flags = message
        .attributes
        .iter()
        .find_map(|a| match a {
            AddressAttribute::Flags(flags) => Some(*flags),
            _ => None,
        })
        .unwrap_or_else(|| AddressFlags::from_bits_retain(u32::from(message.header.flags.bits())));
    !flags.intersects(AddressFlags::Tentative | AddressFlags::Dadfailed)
}

/// Whether IPv6 is switched off on `interface` (`disable_ipv6 = 1`, or no IPv6 in this kernel
/// at all): the kernel would then refuse the address with a bare "permission denied".
fn ipv6_disabled(interface: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{interface}/disable_ipv6")) {
        Ok(value) => value.trim() == "1",
        // No such file although the interface exists: the kernel has no IPv6.
        Err(e) => e.kind() == io::ErrorKind::NotFound,
    }
}

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

/// Finds `name` among this namespace's interfaces, in whatever state it is.
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
    use netlink_packet_route::address::AddressHeaderFlags;

    #[test]
    fn reads_effective_capabilities() {
        let caps = parse_cap_eff("Name:\tkeel\nCapInh:\t0\nCapEff:\t0000000000003000\n").unwrap();
        assert_ne!(caps & (1 << CAP_NET_ADMIN_BIT), 0);
        assert_ne!(caps & (1 << CAP_NET_RAW_BIT), 0);
        assert_eq!(parse_cap_eff("CapEff:\tzz\n"), None);
    }

    fn entry(header: AddressHeaderFlags, attribute: Option<AddressFlags>) -> AddressMessage {
        let mut message = AddressMessage::default();
        message.header.flags = header;
        message.attributes.extend(attribute.map(AddressAttribute::Flags));
        message
    }

    #[test]
    fn tentative_or_dad_failed_entries_are_not_held() {
        assert!(usable(&entry(AddressHeaderFlags::empty(), None)));
        assert!(usable(&entry(AddressHeaderFlags::Nodad, Some(AddressFlags::Nodad | AddressFlags::Noprefixroute))));
        assert!(usable(&entry(AddressHeaderFlags::Permanent, Some(AddressFlags::Permanent))));
        assert!(!usable(&entry(AddressHeaderFlags::empty(), Some(AddressFlags::Tentative))));
        assert!(!usable(&entry(AddressHeaderFlags::empty(), Some(AddressFlags::Tentative | AddressFlags::Dadfailed))));
        // Without IFA_FLAGS the header byte decides.
        assert!(!usable(&entry(AddressHeaderFlags::Tentative, None)));
        assert!(!usable(&entry(AddressHeaderFlags::Dadfailed, None)));
    }

    #[tokio::test]
    async fn missing_interface_is_named_at_start() {
        let config = VipConfig::new("10.99.0.100", "keel-nope0").unwrap();
        let err = NetlinkAnnouncer::new(config).await.err().unwrap();
        assert!(matches!(&err, VipError::InterfaceNotFound { interface } if interface == "keel-nope0"), "{err}");
        assert!(err.to_string().contains("\"keel-nope0\" does not exist"), "{err}");
        let config = VipConfig::new("fd88::100", "keel-nope0").unwrap();
        let err = NetlinkAnnouncer::new(config).await.err().unwrap();
        assert!(matches!(&err, VipError::InterfaceNotFound { interface } if interface == "keel-nope0"), "{err}");
    }

    #[tokio::test]
    async fn loopback_is_refused_for_having_no_mac() {
        let config = VipConfig::new("10.99.0.100", "lo").unwrap();
        let err = NetlinkAnnouncer::new(config).await.err().unwrap();
        assert!(matches!(err, VipError::NoMac { .. }), "{err}");
    }
}

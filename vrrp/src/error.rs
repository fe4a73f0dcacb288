//! `VipError`: everything that can go wrong while owning the VIP, worded for the operator who
//! reads it in a log line. Each variant names the interface or capability involved, because
//! "permission denied" alone never tells anyone what to fix.

use std::io;
use std::net::IpAddr;

/// Why a VIP operation (or setting one up) failed.
#[derive(Debug, thiserror::Error)]
pub enum VipError {
    /// The configured VIP is not a usable IPv4 or IPv6 host address.
    #[error("invalid VIP address {input:?}: {reason}")]
    BadAddress {
        /// What the configuration said.
        input: String,
        /// Why it was refused.
        reason: String,
    },
    /// The configuration is inconsistent (empty interface name, zero ARP count, ...).
    #[error("invalid VIP setting {key}: {reason}")]
    BadSetting {
        /// The setting at fault.
        key: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// No interface by that name exists in this network namespace.
    #[error("interface {interface:?} does not exist in this network namespace (see `ip link`)")]
    InterfaceNotFound {
        /// The interface that was asked for.
        interface: String,
    },
    /// The interface exists but has no Ethernet address, so neither gratuitous ARP nor a
    /// Neighbor Advertisement can announce the VIP on it.
    #[error(
        "interface {interface:?} has no MAC address: announcing the VIP (gratuitous ARP, IPv6 neighbour advertisement) needs an Ethernet interface"
    )]
    NoMac {
        /// The interface at fault.
        interface: String,
    },
    /// The interface is administratively down: announcements would fail (ENETDOWN).
    #[error("interface {interface:?} is down (bring it up with `ip link set {interface} up`)")]
    InterfaceDown {
        /// The interface at fault.
        interface: String,
    },
    /// The VIP is IPv6 but the interface has IPv6 switched off, so the kernel would refuse the
    /// address (with a bare "permission denied").
    #[error(
        "interface {interface:?} has IPv6 disabled, so it cannot carry an IPv6 VIP (set net.ipv6.conf.{interface}.disable_ipv6=0)"
    )]
    Ipv6Disabled {
        /// The interface at fault.
        interface: String,
    },
    /// The process lacks a capability it needs.
    #[error("missing {capability}, needed for {needed_for} (systemd: AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW)")]
    MissingCapability {
        /// `CAP_NET_ADMIN` or `CAP_NET_RAW`.
        capability: &'static str,
        /// What it is needed for.
        needed_for: &'static str,
    },
    /// A netlink request failed for another reason.
    #[error("netlink {action} of VIP {address} on {interface:?} failed: {source}")]
    Netlink {
        /// "add", "delete", "query" or "connect".
        action: &'static str,
        /// The VIP.
        address: IpAddr,
        /// The interface.
        interface: String,
        /// What the kernel (or the socket) said.
        #[source]
        source: io::Error,
    },
    /// Sending the announcement burst failed: gratuitous ARP for an IPv4 VIP, unsolicited
    /// Neighbor Advertisements for an IPv6 one.
    #[error("{} for VIP {address} on {interface:?} failed: {source}", announcement_kind(address))]
    Announce {
        /// The VIP.
        address: IpAddr,
        /// The interface.
        interface: String,
        /// What the socket said.
        #[source]
        source: io::Error,
    },
}

/// What an announcement of `address` is called, for the operator reading the error.
fn announcement_kind(address: &IpAddr) -> &'static str {
    match address {
        IpAddr::V4(_) => "gratuitous ARP",
        IpAddr::V6(_) => "unsolicited neighbour advertisement",
    }
}

/// errno values the announcer maps to named errors.
pub(crate) mod errno {
    /// Operation not permitted.
    pub const EPERM: i32 = 1;
    /// No such device.
    pub const ENODEV: i32 = 19;
    /// Cannot assign requested address: the address was not there (on delete).
    pub const EADDRNOTAVAIL: i32 = 99;
    /// Network is down.
    pub const ENETDOWN: i32 = 100;
}

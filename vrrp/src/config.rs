//! `VipConfig`: which address, on which interface, announced how often. Parsing and checking
//! happen here, once, so a bad VIP is refused when the node starts rather than when it first
//! becomes leader. The VIP may be IPv4 (a /32, announced by gratuitous ARP) or IPv6 (a /128,
//! announced by unsolicited Neighbor Advertisements); the burst settings serve both.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use crate::VipError;

/// Default number of announcement rounds: for IPv4 each round sends both gratuitous-ARP forms,
/// for IPv6 one unsolicited Neighbor Advertisement.
pub const DEFAULT_ARP_COUNT: u32 = 5;
/// Default spacing between rounds. The first round goes out at once.
pub const DEFAULT_ARP_INTERVAL: Duration = Duration::from_millis(100);
/// Longest interface name Linux accepts (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;

/// The VIP this node may hold, and how it is announced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipConfig {
    /// The virtual IP. Always added as a host address ([`host_prefix_len`]: /32 or /128), so an
    /// IPv4 VIP never becomes a secondary of (and is never deleted along with) the interface's
    /// own address, and an IPv6 VIP brings no prefix route with it.
    pub address: IpAddr,
    /// The interface that carries it, e.g. `eth0`.
    pub interface: String,
    /// Rounds per announcement: for IPv4 each sends a gratuitous-ARP request and reply form, for
    /// IPv6 one unsolicited Neighbor Advertisement. (The name predates IPv6 and is the config
    /// key operators know.)
    pub arp_count: u32,
    /// Time between rounds; the first round is sent immediately.
    pub arp_interval: Duration,
    /// The address's kernel lifetime (`valid_lft`/`preferred_lft`, whole seconds), renewed
    /// while the node holds its lease; `None`: permanent (removed only by keel or a stop hook).
    pub lifetime: Option<Duration>,
}

impl VipConfig {
    /// A config with the default ARP burst and a permanent address, from the address as
    /// written in a config file.
    ///
    /// The address must be a plain host address: `10.0.0.100` or `fd00::100`, not
    /// `10.0.0.100/24`. IPv6 VIPs must be global or unique-local unicast: a link-local VIP would
    /// need a zone and is not reachable through a router.
    pub fn new(address: &str, interface: impl Into<String>) -> Result<Self, VipError> {
        let config = VipConfig {
            address: parse_vip(address)?,
            interface: interface.into(),
            arp_count: DEFAULT_ARP_COUNT,
            arp_interval: DEFAULT_ARP_INTERVAL,
            lifetime: None,
        };
        config.validate()?;
        Ok(config)
    }

    /// How often a holder renews the address's lifetime: a quarter of it, so three renewals in
    /// a row may fail before the kernel removes the address.
    pub fn renew_every(&self) -> Option<Duration> {
        self.lifetime.map(|l| l / 4)
    }

    /// Checks the invariants that span fields; [`crate::NetlinkAnnouncer::new`] calls it too.
    pub fn validate(&self) -> Result<(), VipError> {
        check_host(self.address, &self.address.to_string())?;
        let name = &self.interface;
        if name.is_empty() || name.len() > MAX_IFNAME || name.contains(['/', ':']) || name.contains(char::is_whitespace)
        {
            return Err(VipError::BadSetting {
                key: "interface",
                reason: format!(
                    "{name:?} is not a valid interface name (1-{MAX_IFNAME} characters, no '/', ':' or spaces)"
                ),
            });
        }
        if self.arp_count == 0 || self.arp_count > 100 {
            return Err(VipError::BadSetting {
                key: "arp_count",
                reason: format!("{} is out of range 1-100: at least one announcement must go out", self.arp_count),
            });
        }
        if let Some(l) = self.lifetime {
            if l < Duration::from_secs(1) || l.subsec_nanos() != 0 || l > Duration::from_secs(3600) {
                return Err(VipError::BadSetting {
                    key: "lifetime",
                    reason: format!("{l:?} is not a whole number of seconds from 1s to 1h (the kernel counts seconds)"),
                });
            }
        }
        if self.arp_interval > Duration::from_secs(10) {
            return Err(VipError::BadSetting {
                key: "arp_interval",
                reason: format!("{:?} is longer than 10s: clients would keep the old MAC too long", self.arp_interval),
            });
        }
        Ok(())
    }
}

/// The prefix length keel adds `address` with: a single host, /32 or /128.
pub fn host_prefix_len(address: IpAddr) -> u8 {
    match address {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

fn parse_vip(input: &str) -> Result<IpAddr, VipError> {
    let bad = |reason: &str| VipError::BadAddress { input: input.to_string(), reason: reason.to_string() };
    let trimmed = input.trim();
    if trimmed.contains('/') {
        return Err(bad("write the address without a prefix length: keel always adds the VIP as a /32 (IPv6: /128)"));
    }
    let ip = trimmed.parse::<IpAddr>().map_err(|e| bad(&format!("not an IPv4 or IPv6 address ({e})")))?;
    check_host(ip, input).map(|()| ip)
}

fn check_host(ip: IpAddr, input: &str) -> Result<(), VipError> {
    let reason = match ip {
        IpAddr::V4(v4) => v4_reason(v4),
        IpAddr::V6(v6) => v6_reason(v6),
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(VipError::BadAddress { input: input.to_string(), reason: reason.to_string() }),
    }
}

fn v4_reason(ip: Ipv4Addr) -> Option<&'static str> {
    if ip.is_unspecified() {
        Some("0.0.0.0 is not a host address")
    } else if ip.is_loopback() {
        Some("a loopback address cannot be reached from other hosts")
    } else if ip.is_multicast() {
        Some("a multicast address cannot be a VIP")
    } else if ip.is_broadcast() {
        Some("the broadcast address cannot be a VIP")
    } else {
        None
    }
}

fn v6_reason(ip: Ipv6Addr) -> Option<&'static str> {
    if ip.is_unspecified() {
        Some(":: is not a host address")
    } else if ip.is_loopback() {
        Some("a loopback address cannot be reached from other hosts")
    } else if ip.is_multicast() {
        Some("a multicast address cannot be a VIP")
    } else if ip.is_unicast_link_local() {
        Some("a link-local (fe80::/10) address cannot be a VIP: it is valid on one link only and needs a zone; use a global or unique-local (fc00::/7) address")
    } else if ip.to_ipv4_mapped().is_some() {
        Some("an IPv4-mapped address (::ffff:a.b.c.d) is not an IPv6 host address: write the IPv4 address itself")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_ipv4_with_defaults() {
        let c = VipConfig::new(" 10.0.0.100 ", "eth0").unwrap();
        assert_eq!(c.address, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 100)));
        assert_eq!(c.arp_count, DEFAULT_ARP_COUNT);
        assert_eq!(c.arp_interval, DEFAULT_ARP_INTERVAL);
        assert_eq!(host_prefix_len(c.address), 32);
    }

    #[test]
    fn parses_global_and_unique_local_ipv6() {
        for input in ["2001:db8::100", " fd88::100 ", "2a00:1450:4001:82a::200e"] {
            let c = VipConfig::new(input, "eth0").unwrap();
            assert_eq!(c.address, input.trim().parse::<IpAddr>().unwrap());
            assert_eq!(host_prefix_len(c.address), 128);
        }
    }

    #[test]
    fn refuses_malformed_addresses_with_a_reason() {
        for (input, needle) in [
            ("10.0.0.100/24", "without a prefix"),
            ("10.0.0", "not an IPv4 or IPv6 address"),
            ("127.0.0.1", "loopback"),
            ("0.0.0.0", "not a host"),
            ("224.0.0.18", "multicast"),
            ("fd88::100/64", "without a prefix"),
            ("fd88::100/128", "without a prefix"),
            ("fd88::1::2", "not an IPv4 or IPv6 address"),
            ("fe80::1", "link-local"),
            ("febf::1", "link-local"),
            ("::", "not a host"),
            ("::1", "loopback"),
            ("ff02::1", "multicast"),
            ("ff05::1:3", "multicast"),
            ("::ffff:10.0.0.1", "IPv4-mapped"),
        ] {
            let err = VipConfig::new(input, "eth0").unwrap_err().to_string();
            assert!(err.contains(needle) && err.contains(input.trim()), "{input}: {err}");
        }
    }

    #[test]
    fn refuses_bad_interface_names_and_burst_sizes() {
        assert!(VipConfig::new("10.0.0.1", "").is_err());
        assert!(VipConfig::new("10.0.0.1", "a-very-long-interface-name").is_err());
        assert!(VipConfig::new("10.0.0.1", "eth0:1").is_err());
        let mut c = VipConfig::new("10.0.0.1", "eth0").unwrap();
        c.arp_count = 0;
        assert!(c.validate().unwrap_err().to_string().contains("arp_count"));
    }
}

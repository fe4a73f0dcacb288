//! `VipConfig`: which address, on which interface, announced how often. Parsing and checking
//! happen here, once, so a bad VIP is refused when the node starts rather than when it first
//! becomes leader.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use crate::VipError;

/// Default number of gratuitous ARP rounds per announcement (each round sends both forms).
pub const DEFAULT_ARP_COUNT: u32 = 5;
/// Default spacing between rounds. The first round goes out at once.
pub const DEFAULT_ARP_INTERVAL: Duration = Duration::from_millis(100);
/// Longest interface name Linux accepts (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;

/// The VIP this node may hold, and how it is announced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipConfig {
    /// The virtual IP. Always added as a /32, so it never becomes a secondary of (and is never
    /// deleted along with) the interface's own address.
    pub address: Ipv4Addr,
    /// The interface that carries it, e.g. `eth0`.
    pub interface: String,
    /// Gratuitous ARP rounds per announcement; each round sends a request and a reply form.
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
    /// The address must be a plain IPv4 host address: `10.0.0.100`, not `10.0.0.100/24`.
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

fn parse_vip(input: &str) -> Result<Ipv4Addr, VipError> {
    let bad = |reason: &str| VipError::BadAddress { input: input.to_string(), reason: reason.to_string() };
    let trimmed = input.trim();
    if trimmed.contains('/') {
        return Err(bad("write the address without a prefix length: keel always adds the VIP as a /32"));
    }
    match trimmed.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => check_host(v4, input).map(|()| v4),
        Ok(IpAddr::V6(_)) => Err(bad("IPv6 VIPs are not supported yet (see keel-vrrp's crate docs)")),
        Err(e) => Err(bad(&format!("not an IPv4 address ({e})"))),
    }
}

fn check_host(ip: Ipv4Addr, input: &str) -> Result<(), VipError> {
    let reason = if ip.is_unspecified() {
        "0.0.0.0 is not a host address"
    } else if ip.is_loopback() {
        "a loopback address cannot be reached from other hosts"
    } else if ip.is_multicast() {
        "a multicast address cannot be a VIP"
    } else if ip.is_broadcast() {
        "the broadcast address cannot be a VIP"
    } else {
        return Ok(());
    };
    Err(VipError::BadAddress { input: input.to_string(), reason: reason.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_ipv4_with_defaults() {
        let c = VipConfig::new(" 10.0.0.100 ", "eth0").unwrap();
        assert_eq!(c.address, Ipv4Addr::new(10, 0, 0, 100));
        assert_eq!(c.arp_count, DEFAULT_ARP_COUNT);
        assert_eq!(c.arp_interval, DEFAULT_ARP_INTERVAL);
    }

    #[test]
    fn refuses_malformed_addresses_with_a_reason() {
        for (input, needle) in [
            ("10.0.0.100/24", "without a prefix"),
            ("10.0.0", "not an IPv4 address"),
            ("fe80::1", "IPv6"),
            ("127.0.0.1", "loopback"),
            ("0.0.0.0", "not a host"),
            ("224.0.0.18", "multicast"),
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

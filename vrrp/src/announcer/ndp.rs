//! Unsolicited Neighbor Advertisements (RFC 4861 §7.2.6): the IPv6 counterpart of gratuitous
//! ARP, built here as whole Ethernet frames so they go out through the same pnet datalink
//! channel as the ARP burst ([`super::datalink`]).
//!
//! Every field is what a Linux receiver checks before it lets an advertisement touch its
//! neighbour table (`ndisc_recv_na`):
//!
//! - **hop limit 255**: proof the packet was not routed; anything else is dropped;
//! - **Solicited clear**: an NA to a multicast destination with S set is dropped, and S would
//!   mark the entry REACHABLE without reachability having been confirmed;
//! - **Override set**: without it a receiver keeps the MAC it already has (it only fills in an
//!   entry with none), so the VIP would not move;
//! - **Router clear**: keel is not a router, and R would make receivers change their routing
//!   state for this address;
//! - **Target Link-Layer Address option**: the new MAC itself; an NA without it cannot change
//!   the MAC a receiver has.
//!
//! As with ARP (`arp_accept=0`), Linux hosts only *update* an existing entry from it
//! (`accept_untracked_na=0`); unlike ARP there is no 1 s lock to get past, so one form is enough.
//! The IPv6 source is the VIP itself, as keepalived sends it; the destination is all-nodes
//! (ff02::1, Ethernet 33:33:00:00:00:01), which every IPv6 host listens to.

use std::net::Ipv6Addr;

use pnet_datalink::MacAddr;
use pnet_packet::ethernet::{EtherTypes, MutableEthernetPacket};
use pnet_packet::icmpv6::ndp::{MutableNeighborAdvertPacket, NdpOptionTypes, NeighborAdvertFlags};
use pnet_packet::icmpv6::{Icmpv6Code, Icmpv6Packet, Icmpv6Types};
use pnet_packet::ip::IpNextHeaderProtocols;
use pnet_packet::ipv6::MutableIpv6Packet;

/// All-nodes link-local multicast, where unsolicited advertisements go.
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
/// ff02::1 mapped to Ethernet (RFC 2464 §7: 33:33 + the low 32 bits).
const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];
/// RFC 4861 §7.1.2: a receiver drops any Neighbor Discovery packet with another hop limit.
const ND_HOP_LIMIT: u8 = 255;

/// Neighbor Advertisement body: type, code, checksum, flags + reserved, target.
const NA_LEN: usize = 24;
/// Target Link-Layer Address option for Ethernet: type, length (in 8-byte units), MAC.
const TLLA_LEN: usize = 8;
/// The ICMPv6 message: the advertisement and its one option.
const ICMPV6_LEN: usize = NA_LEN + TLLA_LEN;
const IPV6_HEADER_LEN: usize = 40;
const ETHERNET_HEADER_LEN: usize = 14;

/// Length of an Ethernet + IPv6 + Neighbor Advertisement frame with the target link-layer
/// address option.
pub const NA_FRAME_LEN: usize = ETHERNET_HEADER_LEN + IPV6_HEADER_LEN + ICMPV6_LEN;

/// Builds one unsolicited Neighbor Advertisement frame announcing that `ip` lives at `mac`:
/// Override set, Solicited and Router clear, sent from `ip` to all nodes with hop limit 255.
pub fn unsolicited_na_frame(mac: [u8; 6], ip: Ipv6Addr) -> [u8; NA_FRAME_LEN] {
    let mut icmp = [0u8; ICMPV6_LEN];
    // Every buffer is sized exactly for its packet, so the constructors cannot fail; the
    // `if let`s only keep this free of panicking paths.
    if let Some(mut na) = MutableNeighborAdvertPacket::new(&mut icmp) {
        na.set_icmpv6_type(Icmpv6Types::NeighborAdvert);
        na.set_icmpv6_code(Icmpv6Code(0));
        na.set_flags(NeighborAdvertFlags::Override);
        na.set_target_addr(ip);
    }
    // The option is written by hand: pnet's option setter wants a length field that already
    // counts the type and length bytes, an easy place to be off by one.
    let option = &mut icmp[NA_LEN..];
    option[0] = NdpOptionTypes::TargetLLAddr.0;
    option[1] = (TLLA_LEN / 8) as u8;
    option[2..].copy_from_slice(&mac);
    let checksum = Icmpv6Packet::new(&icmp).map_or(0, |p| pnet_packet::icmpv6::checksum(&p, &ip, &ALL_NODES));
    icmp[2..4].copy_from_slice(&checksum.to_be_bytes());

    let mut ipv6 = [0u8; IPV6_HEADER_LEN + ICMPV6_LEN];
    if let Some(mut header) = MutableIpv6Packet::new(&mut ipv6) {
        header.set_version(6);
        header.set_traffic_class(0);
        header.set_flow_label(0);
        header.set_payload_length(ICMPV6_LEN as u16);
        header.set_next_header(IpNextHeaderProtocols::Icmpv6);
        header.set_hop_limit(ND_HOP_LIMIT);
        header.set_source(ip);
        header.set_destination(ALL_NODES);
        header.set_payload(&icmp);
    }

    let mut frame = [0u8; NA_FRAME_LEN];
    if let Some(mut eth) = MutableEthernetPacket::new(&mut frame) {
        eth.set_destination(MacAddr::from(ALL_NODES_MAC));
        eth.set_source(MacAddr::from(mac));
        eth.set_ethertype(EtherTypes::Ipv6);
        eth.set_payload(&ipv6);
    }
    frame
}

#[cfg(test)]
mod tests {
    use super::*;
    use pnet_packet::ethernet::EthernetPacket;
    use pnet_packet::icmpv6::ndp::NeighborAdvertPacket;
    use pnet_packet::ipv6::Ipv6Packet;
    use pnet_packet::Packet;

    const MAC: [u8; 6] = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
    const VIP: Ipv6Addr = Ipv6Addr::new(0xfd88, 0, 0, 0, 0, 0, 0, 0x100);

    #[test]
    fn ethernet_and_ipv6_headers_address_all_nodes_from_the_vip() {
        let frame = unsolicited_na_frame(MAC, VIP);
        let eth = EthernetPacket::new(&frame).unwrap();
        assert_eq!(eth.get_destination(), MacAddr::new(0x33, 0x33, 0, 0, 0, 1));
        assert_eq!(eth.get_source(), MacAddr::from(MAC));
        assert_eq!(eth.get_ethertype(), EtherTypes::Ipv6);

        let ip = Ipv6Packet::new(eth.payload()).unwrap();
        assert_eq!(ip.get_version(), 6);
        assert_eq!(ip.get_traffic_class(), 0);
        assert_eq!(ip.get_flow_label(), 0);
        assert_eq!(ip.get_payload_length() as usize, ICMPV6_LEN);
        assert_eq!(ip.payload().len(), ICMPV6_LEN);
        assert_eq!(ip.get_next_header(), IpNextHeaderProtocols::Icmpv6);
        assert_eq!(ip.get_hop_limit(), 255);
        assert_eq!(ip.get_source(), VIP);
        assert_eq!(ip.get_destination(), "ff02::1".parse::<Ipv6Addr>().unwrap());
    }

    #[test]
    fn advertisement_overrides_unsolicited_for_the_vip_with_our_mac() {
        let frame = unsolicited_na_frame(MAC, VIP);
        let eth = EthernetPacket::new(&frame).unwrap();
        let ip = Ipv6Packet::new(eth.payload()).unwrap();
        let na = NeighborAdvertPacket::new(ip.payload()).unwrap();
        assert_eq!(na.get_icmpv6_type(), Icmpv6Types::NeighborAdvert);
        assert_eq!(na.get_icmpv6_type().0, 136);
        assert_eq!(na.get_icmpv6_code(), Icmpv6Code(0));
        assert_eq!(na.get_flags(), NeighborAdvertFlags::Override, "O set; R and S clear");
        assert_eq!(na.get_reserved(), 0);
        assert_eq!(na.get_target_addr(), VIP);

        let options = na.get_options();
        assert_eq!(options.len(), 1, "{options:?}");
        assert_eq!(options[0].option_type, NdpOptionTypes::TargetLLAddr);
        assert_eq!(options[0].length, 1, "one 8-byte unit");
        assert_eq!(options[0].data, MAC);
    }

    #[test]
    fn checksum_verifies_over_the_pseudo_header() {
        let frame = unsolicited_na_frame(MAC, VIP);
        let eth = EthernetPacket::new(&frame).unwrap();
        let ip = Ipv6Packet::new(eth.payload()).unwrap();
        let icmp = Icmpv6Packet::new(ip.payload()).unwrap();
        let carried = icmp.get_checksum();
        assert_ne!(carried, 0);
        assert_eq!(carried, pnet_packet::icmpv6::checksum(&icmp, &ip.get_source(), &ip.get_destination()));

        // Independently: the one's-complement sum over pseudo-header + message folds to 0xffff.
        let mut sum: u32 = 0;
        let mut add = |bytes: &[u8]| {
            for pair in bytes.chunks(2) {
                sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
            }
        };
        add(&VIP.octets());
        add(&ALL_NODES.octets());
        add(&(ICMPV6_LEN as u32).to_be_bytes());
        add(&[0, 0, 0, 58]);
        add(ip.payload());
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff);

        // A different VIP changes the checksum (the pseudo-header is covered).
        let other = unsolicited_na_frame(MAC, Ipv6Addr::new(0xfd88, 0, 0, 0, 0, 0, 0, 0x101));
        assert_ne!(&other[56..58], &frame[56..58]);
    }

    #[test]
    fn frame_bytes_match_the_wire_layout() {
        let frame = unsolicited_na_frame(MAC, VIP);
        assert_eq!(frame.len(), 86);
        assert_eq!(&frame[0..6], &[0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(&frame[6..12], &MAC);
        assert_eq!(&frame[12..14], &[0x86, 0xdd]); // IPv6
        assert_eq!(&frame[14..18], &[0x60, 0, 0, 0]); // version 6, class 0, flow 0
        assert_eq!(&frame[18..22], &[0, 32, 58, 255]); // payload length, ICMPv6, hop limit
        assert_eq!(&frame[22..38], &VIP.octets());
        assert_eq!(&frame[38..54], &ALL_NODES.octets());
        assert_eq!(&frame[54..56], &[136, 0]); // Neighbor Advertisement, code 0
        assert_eq!(&frame[58..62], &[0x20, 0, 0, 0]); // R=0 S=0 O=1
        assert_eq!(&frame[62..78], &VIP.octets());
        assert_eq!(&frame[78..80], &[2, 1]); // Target Link-Layer Address, 8 bytes
        assert_eq!(&frame[80..86], &MAC);
    }
}

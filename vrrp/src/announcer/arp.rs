//! Gratuitous ARP: the two frame forms Linux receivers accept as the announcement of an IPv4
//! VIP. They go out through [`super::datalink`]; [`super::ndp`] is the IPv6 counterpart.
//!
//! With the default `arp_accept=0` a Linux host only *updates* an existing neighbour entry from
//! an unsolicited ARP, and it bypasses its 1 s neighbour lock only for a true gratuitous packet:
//! a **request** whose sender IP equals its target IP, or a **reply** whose sender IP equals its
//! target IP *and* whose target MAC equals its sender MAC (a reply with target MAC
//! ff:ff:ff:ff:ff:ff was ignored when measured). Other stacks and switches differ in which form
//! they honour, so every round sends both, to the Ethernet broadcast address.

use std::net::Ipv4Addr;

use pnet_datalink::MacAddr;
use pnet_packet::arp::{ArpHardwareTypes, ArpOperations, MutableArpPacket};
use pnet_packet::ethernet::{EtherTypes, MutableEthernetPacket};

/// Length of an Ethernet + ARP frame without padding (the NIC pads to 60 bytes).
pub const ARP_FRAME_LEN: usize = 14 + 28;

/// Which of the two accepted gratuitous-ARP shapes to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArpForm {
    /// Opcode 1, sender IP = target IP = VIP, target MAC 00:00:00:00:00:00.
    Request,
    /// Opcode 2, sender IP = target IP = VIP, target MAC = sender MAC.
    Reply,
}

/// Builds one broadcast gratuitous-ARP frame announcing that `ip` lives at `mac`.
pub fn gratuitous_arp_frame(mac: [u8; 6], ip: Ipv4Addr, form: ArpForm) -> [u8; ARP_FRAME_LEN] {
    let sender = MacAddr::from(mac);
    let mut frame = [0u8; ARP_FRAME_LEN];
    let mut arp_bytes = [0u8; ARP_FRAME_LEN - 14];
    // Both buffers are sized exactly for their packet, so the constructors cannot fail; the
    // `if let` only keeps this free of panicking paths.
    if let Some(mut arp) = MutableArpPacket::new(&mut arp_bytes) {
        arp.set_hardware_type(ArpHardwareTypes::Ethernet);
        arp.set_protocol_type(EtherTypes::Ipv4);
        arp.set_hw_addr_len(6);
        arp.set_proto_addr_len(4);
        arp.set_sender_hw_addr(sender);
        arp.set_sender_proto_addr(ip);
        arp.set_target_proto_addr(ip);
        match form {
            ArpForm::Request => {
                arp.set_operation(ArpOperations::Request);
                arp.set_target_hw_addr(MacAddr::zero());
            }
            ArpForm::Reply => {
                arp.set_operation(ArpOperations::Reply);
                arp.set_target_hw_addr(sender);
            }
        }
    }
    if let Some(mut eth) = MutableEthernetPacket::new(&mut frame) {
        eth.set_destination(MacAddr::broadcast());
        eth.set_source(sender);
        eth.set_ethertype(EtherTypes::Arp);
        eth.set_payload(&arp_bytes);
    }
    frame
}

#[cfg(test)]
mod tests {
    use super::*;
    use pnet_packet::arp::ArpPacket;
    use pnet_packet::ethernet::EthernetPacket;
    use pnet_packet::Packet;

    const MAC: [u8; 6] = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
    const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);

    fn parse(frame: &[u8]) -> (EthernetPacket<'_>, ArpPacket<'static>) {
        let eth = EthernetPacket::new(frame).unwrap();
        let arp = ArpPacket::owned(eth.payload().to_vec()).unwrap();
        (eth, arp)
    }

    #[test]
    fn request_form_has_sender_ip_equal_target_ip_and_zero_target_mac() {
        let frame = gratuitous_arp_frame(MAC, VIP, ArpForm::Request);
        let (eth, arp) = parse(&frame);
        assert_eq!(eth.get_destination(), MacAddr::broadcast());
        assert_eq!(eth.get_source(), MacAddr::from(MAC));
        assert_eq!(eth.get_ethertype(), EtherTypes::Arp);
        assert_eq!(arp.get_operation(), ArpOperations::Request);
        assert_eq!(arp.get_sender_hw_addr(), MacAddr::from(MAC));
        assert_eq!(arp.get_sender_proto_addr(), VIP);
        assert_eq!(arp.get_target_proto_addr(), VIP);
        assert_eq!(arp.get_target_hw_addr(), MacAddr::zero());
    }

    #[test]
    fn reply_form_has_target_mac_equal_sender_mac() {
        let frame = gratuitous_arp_frame(MAC, VIP, ArpForm::Reply);
        let (eth, arp) = parse(&frame);
        assert_eq!(eth.get_destination(), MacAddr::broadcast());
        assert_eq!(arp.get_operation(), ArpOperations::Reply);
        assert_eq!(arp.get_sender_proto_addr(), VIP);
        assert_eq!(arp.get_target_proto_addr(), VIP);
        assert_eq!(arp.get_target_hw_addr(), MacAddr::from(MAC));
    }

    #[test]
    fn frame_bytes_match_the_wire_layout() {
        let frame = gratuitous_arp_frame(MAC, VIP, ArpForm::Request);
        assert_eq!(&frame[0..6], &[0xff; 6]);
        assert_eq!(&frame[12..14], &[0x08, 0x06]); // ARP
        assert_eq!(&frame[14..22], &[0, 1, 0x08, 0, 6, 4, 0, 1]); // Ethernet, IPv4, 6, 4, request
        assert_eq!(&frame[28..32], &[10, 0, 0, 100]);
        assert_eq!(&frame[38..42], &[10, 0, 0, 100]);
    }
}

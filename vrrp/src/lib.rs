//! keel-vrrp owns the virtual IP: adding and removing the address with rtnetlink and
//! announcing it with gratuitous ARP through pnet, behind a small `VipAnnouncer` trait so tests
//! can use a recording double, plus the controller that turns "should this node hold the VIP?"
//! into those calls.
//!
//! Nothing is implemented yet: the VIP depends on the Raft cluster (leadership and its lease
//! decide who may hold the address), which lands first. See `DESIGN.md` § "The VIP" for the
//! ordering this crate must guarantee.

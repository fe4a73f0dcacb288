//! keel-vrrp owns the virtual IP: only the Raft leader (with a fresh quorum lease) may have it on
//! its interface, and when leadership moves the address moves with it, announced so clients and
//! switches send to the new MAC within a second — by gratuitous ARP for an IPv4 VIP, by
//! unsolicited Neighbor Advertisements for an IPv6 one.
//!
//! # Layout
//!
//! - [`config`]: [`VipConfig`], the address (IPv4 or IPv6), interface and announcement burst,
//!   checked once at start.
//! - [`error`]: [`VipError`], errors that name the interface, address or capability at fault.
//! - [`announcer`]: the [`VipAnnouncer`] role (claim, release, step aside, announce, holds), with
//!   [`NetlinkAnnouncer`] (rtnetlink for the address, pnet for raw ARP or Neighbor
//!   Advertisement frames) and [`RecordingAnnouncer`], the test double.
//! - [`controller`]: [`VipController`], which follows `ClusterHandle::leadership()` and turns it
//!   into announcer calls, publishing a [`VipStatus`].
//!
//! `vrrp/LIFECYCLE.md` explains failover step by step: who holds the VIP when, why two live nodes
//! never do, and what a SIGKILL leaves behind.
//!
//! # Wiring (in the daemon)
//!
//! ```no_run
//! # async fn wire(leadership: tokio::sync::watch::Receiver<bool>) -> Result<(), keel_vrrp::VipError> {
//! use std::sync::Arc;
//! use keel_vrrp::{ControllerSettings, NetlinkAnnouncer, VipConfig, VipController};
//!
//! let announcer = NetlinkAnnouncer::new(VipConfig::new("10.0.0.100", "eth0")?).await?;
//! let controller = VipController::new(Arc::new(announcer), ControllerSettings::default());
//! let status = controller.status(); // for the admin API and /metrics
//! let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
//! let task = tokio::spawn(controller.run(leadership, stop_rx));
//! // ... at shutdown:
//! let _ = stop_tx.send(true);
//! let _ = task.await; // the VIP has been released
//! # drop(status); Ok(()) }
//! ```
//!
//! # IPv6
//!
//! An IPv6 VIP (`VipConfig::new("fd00::100", "eth0")`: global or unique-local unicast; link-local,
//! loopback, multicast and IPv4-mapped addresses are refused) takes the same path with
//! different packets, chosen by the address family alone:
//!
//! - **The address** is added as a /128 with `IFA_F_NODAD`, or the kernel would hold it
//!   "tentative" during duplicate address detection (about a second) and neither answer
//!   Neighbor Solicitations for it nor accept connections to it; and with
//!   `IFA_F_NOPREFIXROUTE`, so it brings no route, as a /32 brings none. Lifetimes
//!   (`valid_lft`/`preferred_lft`) and their renewal work as for IPv4. A tentative or
//!   DAD-failed entry (added by hand without `nodad`) does not count as held, and a claim
//!   replaces it.
//! - **The announcement** is an unsolicited Neighbor Advertisement per round (RFC 4861
//!   §7.2.6; [`unsolicited_na_frame`](announcer::unsolicited_na_frame)): Override set, Solicited
//!   and Router clear, target = VIP, a Target Link-Layer Address option with our MAC, from the
//!   VIP to ff02::1 with hop limit 255 (receivers drop ND packets with any other), sent as a raw
//!   Ethernet frame through the same pnet channel and burst timing as the ARPs. Like ARP, Linux
//!   receivers only update an entry they already have (`accept_untracked_na=0`); they leave it
//!   STALE with the new MAC, and the next packet goes there.
//! - **Stepping aside** moves the /128 to `lo` (30 s lifetime) and off the interface, as for
//!   IPv4, but needs no `arp_ignore` counterpart: Linux answers a Neighbor Solicitation only for
//!   an address on the interface it arrived on, while it still accepts packets for an address on
//!   `lo`. `tests/netns.rs` checks both against the running kernel.
//!
//! The daemon's `[vip] address` is still parsed as IPv4 (`node/src/config.rs`); this crate
//! takes either.

pub mod announcer;
pub mod config;
pub mod controller;
pub mod error;

pub use announcer::{NetlinkAnnouncer, RecordedCall, RecordingAnnouncer, VipAnnouncer, VipFuture};
pub use config::VipConfig;
pub use controller::{ControllerSettings, VipController, VipStatus};
pub use error::VipError;

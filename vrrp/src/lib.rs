//! keel-vrrp owns the virtual IP: only the Raft leader (with a fresh quorum lease) may have it on
//! its interface, and when leadership moves the address moves with it, announced by gratuitous
//! ARP so clients and switches send to the new MAC within a second.
//!
//! # Layout
//!
//! - [`config`]: [`VipConfig`], the address, interface and ARP burst, checked once at start.
//! - [`error`]: [`VipError`], errors that name the interface or capability at fault.
//! - [`announcer`]: the [`VipAnnouncer`] role (claim, release, announce, holds), with
//!   [`NetlinkAnnouncer`] (rtnetlink for the address, pnet for raw ARP frames) and
//!   [`RecordingAnnouncer`], the test double.
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
//! # IPv6 (not built yet)
//!
//! An IPv6 VIP needs the same shape with different packets: add the address with the `nodad`
//! flag (`IFA_F_NODAD`), or the kernel holds it "tentative" for the duration of duplicate address
//! detection and will not answer for it; announce it with unsolicited Neighbor Advertisements
//! (ICMPv6 type 136, override flag set, solicited flag clear, target = VIP, target link-layer
//! address option = our MAC) sent to ff02::1 with hop limit 255 through an ICMPv6 raw socket
//! (receivers drop NAs with any other hop limit). Receivers only update existing neighbour
//! entries, as with ARP. `VipConfig::new` refuses IPv6 addresses until this exists.

pub mod announcer;
pub mod config;
pub mod controller;
pub mod error;

pub use announcer::{NetlinkAnnouncer, RecordedCall, RecordingAnnouncer, VipAnnouncer, VipFuture};
pub use config::VipConfig;
pub use controller::{ControllerSettings, VipController, VipStatus};
pub use error::VipError;

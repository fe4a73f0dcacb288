//! The `VipAnnouncer` role: the four things the controller needs from "the network" to own a
//! VIP — put it on the interface and tell the LAN, take it off, re-announce, and ask whether it
//! is there. One trait so the controller can be tested against [`RecordingAnnouncer`] with
//! paused time, while [`NetlinkAnnouncer`] does the real work.
//!
//! Methods return boxed futures ([`VipFuture`]) rather than `async fn` so the trait stays
//! object-safe: the daemon holds an `Arc<dyn VipAnnouncer>` and picks the implementation at
//! run time (witness nodes hold none).
//!
//! # Layout
//!
//! - `netlink`: [`NetlinkAnnouncer`], the real one: the address on and off the interface through
//!   rtnetlink (IPv4 and IPv6 alike), and the announcement that fits the address family.
//! - `datalink`: the pnet channel and the burst that paces announcement frames.
//! - `arp`: the gratuitous-ARP frames that announce an IPv4 VIP.
//! - `ndp`: the unsolicited Neighbor Advertisement frame that announces an IPv6 VIP.
//! - `recording`: [`RecordingAnnouncer`], the test double.

mod arp;
mod datalink;
mod ndp;
mod netlink;
mod recording;

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;

pub use arp::{gratuitous_arp_frame, ArpForm, ARP_FRAME_LEN};
pub use ndp::{unsolicited_na_frame, NA_FRAME_LEN};
pub use netlink::NetlinkAnnouncer;
pub use recording::{RecordedCall, RecordingAnnouncer};

use crate::VipError;

/// The future every [`VipAnnouncer`] method returns.
pub type VipFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, VipError>> + Send + 'a>>;

/// Puts the VIP on this host's interface and takes it off again.
///
/// Every method is idempotent: claiming a held VIP re-announces it, releasing an absent one
/// succeeds. The controller relies on that to retry blindly after an error or a cancellation.
/// Dropping a returned future part-way is safe (the state is then simply unknown, and the
/// controller reconciles it by calling again).
pub trait VipAnnouncer: Send + Sync {
    /// The VIP (IPv4 or IPv6), for log lines.
    fn address(&self) -> IpAddr;

    /// The interface carrying it, for log lines.
    fn interface(&self) -> &str;

    /// Adds the VIP (as a /32 or /128) to the interface if it is not there, then sends the
    /// announcement burst (gratuitous ARP for IPv4, unsolicited Neighbor Advertisements for
    /// IPv6) so neighbours move their entry for the VIP to this host's MAC.
    fn claim(&self) -> VipFuture<'_, ()>;

    /// Removes the VIP from the interface. "Not present" is success.
    fn release(&self) -> VipFuture<'_, ()>;

    /// Hands the VIP over: takes it off the interface (so this host no longer answers ARP or
    /// Neighbor Solicitations for it) but keeps it as a local address for a while, so that connections already open to it
    /// are finished and packets still addressed to this host's MAC are served rather than
    /// dropped, until the LAN has followed the successor's announcement. Defaults to
    /// [`release`](Self::release).
    fn step_aside(&self) -> VipFuture<'_, ()> {
        self.release()
    }

    /// Sends the announcement burst again, without touching the address.
    fn announce(&self) -> VipFuture<'_, ()>;

    /// Whether the VIP is on the interface right now, usable (an IPv6 address still tentative
    /// or failed duplicate detection does not count: the kernel does not answer for it).
    fn holds(&self) -> VipFuture<'_, bool>;

    /// Extends the address's kernel lifetime (when it has one), without an announcement. Called
    /// while the node holds its lease; when calls stop (a crash, a frozen process) the kernel
    /// removes the address by itself.
    fn renew(&self) -> VipFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    /// How often [`renew`](Self::renew) must be called; `None`: never.
    fn renew_every(&self) -> Option<std::time::Duration> {
        None
    }
}

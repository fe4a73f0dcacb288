//! `RecordingAnnouncer`: a [`VipAnnouncer`] test double. It keeps an in-memory "is the address
//! on the interface" flag, records every call with the (tokio) time it was made, and can be told
//! to fail the next N calls of a kind or to take a while, so the controller's ordering, retries
//! and cancellation can be tested with paused time and no network.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use super::{VipAnnouncer, VipFuture};
use crate::VipError;

/// One call the double received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordedCall {
    /// [`VipAnnouncer::claim`].
    Claim,
    /// [`VipAnnouncer::release`].
    Release,
    /// [`VipAnnouncer::announce`].
    Announce,
    /// [`VipAnnouncer::holds`].
    Holds,
    /// [`VipAnnouncer::renew`].
    Renew,
}

#[derive(Default)]
struct State {
    calls: Vec<(RecordedCall, Instant)>,
    held: bool,
    fail_claims: u32,
    fail_releases: u32,
    fail_announces: u32,
    delay: Duration,
    renew_every: Option<Duration>,
}

/// Records calls instead of touching the network. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct RecordingAnnouncer {
    address: IpAddr,
    interface: String,
    state: Arc<Mutex<State>>,
}

impl Default for RecordingAnnouncer {
    fn default() -> Self {
        Self::new(Ipv4Addr::new(10, 0, 0, 100), "eth0")
    }
}

impl RecordingAnnouncer {
    /// A double for `address` (IPv4 or IPv6) on `interface`, not holding it.
    pub fn new(address: impl Into<IpAddr>, interface: &str) -> Self {
        RecordingAnnouncer { address: address.into(), interface: interface.to_string(), state: Arc::default() }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock has already failed; keep the data.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<RecordedCall> {
        self.state().calls.iter().map(|(call, _)| *call).collect()
    }

    /// Every call so far with the time it started.
    pub fn timed_calls(&self) -> Vec<(RecordedCall, Instant)> {
        self.state().calls.clone()
    }

    /// Whether the simulated interface carries the VIP now.
    pub fn is_held(&self) -> bool {
        self.state().held
    }

    /// Simulates someone running `ip addr del` behind keel's back.
    pub fn remove_externally(&self) {
        self.state().held = false;
    }

    /// Makes the next `n` claims fail (after recording them).
    pub fn fail_claims(&self, n: u32) {
        self.state().fail_claims = n;
    }

    /// Makes the next `n` releases fail.
    pub fn fail_releases(&self, n: u32) {
        self.state().fail_releases = n;
    }

    /// Makes the next `n` announcements fail.
    pub fn fail_announces(&self, n: u32) {
        self.state().fail_announces = n;
    }

    /// Pretends the address has a kernel lifetime to renew every `every`.
    pub fn set_renew_every(&self, every: Option<Duration>) {
        self.state().renew_every = every;
    }

    /// Makes claim, release and announce take `delay` (a claim's address change happens at the
    /// start, the way the real one adds the address before its ARP burst).
    pub fn set_delay(&self, delay: Duration) {
        self.state().delay = delay;
    }

    fn injected(&self, what: &str) -> VipError {
        VipError::Announce {
            address: self.address,
            interface: self.interface.clone(),
            source: std::io::Error::other(format!("injected {what} failure")),
        }
    }

    async fn call(&self, call: RecordedCall) -> Result<(), VipError> {
        let delay = {
            let mut s = self.state();
            s.calls.push((call, Instant::now()));
            let fail = match call {
                RecordedCall::Claim => &mut s.fail_claims,
                RecordedCall::Release => &mut s.fail_releases,
                RecordedCall::Announce => &mut s.fail_announces,
                RecordedCall::Holds | RecordedCall::Renew => return Ok(()),
            };
            if *fail > 0 {
                *fail -= 1;
                return Err(self.injected(&format!("{call:?}").to_lowercase()));
            }
            match call {
                RecordedCall::Claim => s.held = true,
                RecordedCall::Release => s.held = false,
                _ => {}
            }
            s.delay
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok(())
    }
}

impl VipAnnouncer for RecordingAnnouncer {
    fn address(&self) -> IpAddr {
        self.address
    }

    fn interface(&self) -> &str {
        &self.interface
    }

    fn claim(&self) -> VipFuture<'_, ()> {
        Box::pin(self.call(RecordedCall::Claim))
    }

    fn release(&self) -> VipFuture<'_, ()> {
        Box::pin(self.call(RecordedCall::Release))
    }

    fn announce(&self) -> VipFuture<'_, ()> {
        Box::pin(self.call(RecordedCall::Announce))
    }

    fn holds(&self) -> VipFuture<'_, bool> {
        Box::pin(async move {
            self.call(RecordedCall::Holds).await?;
            Ok(self.is_held())
        })
    }

    fn renew(&self) -> VipFuture<'_, ()> {
        Box::pin(self.call(RecordedCall::Renew))
    }

    fn renew_every(&self) -> Option<Duration> {
        self.state().renew_every
    }
}

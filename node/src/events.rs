//! The node's recent events, for the dashboard: health changes, ejections, drains and weights,
//! VIP claims and releases, elections, config reloads.
//!
//! One bounded ring per process ([`CAPACITY`] events, oldest dropped first), written where the
//! state changes (never per request) and read by the dashboard's sampler. The log keeps the
//! full record; this is the last screenful of it, with the time of each.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Events kept.
pub const CAPACITY: usize = 200;

/// One event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Event {
    /// Sequence number, from 1; a reader shows what is newer than the last it saw.
    pub seq: u64,
    /// When, in Unix milliseconds.
    pub at_unix_ms: u64,
    /// What kind: `health`, `ejection`, `drain`, `weight`, `vip`, `election`, `config`.
    pub kind: &'static str,
    /// What happened, for a person.
    pub text: String,
}

struct Ring {
    next: u64,
    events: VecDeque<Event>,
}

static RING: Mutex<Ring> = Mutex::new(Ring { next: 1, events: VecDeque::new() });

/// Records an event.
pub fn record(kind: &'static str, text: impl Into<String>) {
    let at_unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let mut ring = RING.lock().unwrap_or_else(|p| p.into_inner());
    let seq = ring.next;
    ring.next += 1;
    if ring.events.len() == CAPACITY {
        ring.events.pop_front();
    }
    ring.events.push_back(Event { seq, at_unix_ms, kind, text: text.into() });
}

/// The last `n` events, newest first.
pub fn recent(n: usize) -> Vec<Event> {
    let ring = RING.lock().unwrap_or_else(|p| p.into_inner());
    ring.events.iter().rev().take(n).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_and_numbers_them() {
        for i in 0..CAPACITY + 5 {
            record("health", format!("event {i}"));
        }
        let last = recent(CAPACITY + 10);
        assert_eq!(last.len(), CAPACITY);
        assert_eq!(last[0].text, format!("event {}", CAPACITY + 4));
        assert!(last.windows(2).all(|w| w[0].seq > w[1].seq));
    }
}

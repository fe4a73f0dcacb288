//! Slow start (HAProxy's `slowstart`): a server that comes back — its checks rise, its
//! ejection ends, the operator enables it after a drain — or is added to a running pool gets
//! a weight that grows from a tenth of its own to all of it over the pool's `slow_start`, so a
//! cold cache or a JIT warming up is not handed its full share at once.
//!
//! # Why a few rebuilds, not a weight computed per pick
//!
//! Selectors are rebuilt when the eligible set changes and swapped in ([`crate::pool::Pool`]);
//! picking reads a prebuilt schedule and never computes. A weight computed at pick time would
//! put a clock read and a division on every request of every pool, slow start or not. Instead
//! the ramp is [`STEPS`] rebuilds spread over the window, scheduled like an ejection's end:
//! ten selector rebuilds per recovery, nothing per request, and a pool without `slow_start`
//! never sees any of it.
//!
//! Integer weights cannot take a tenth of 1 (the default weight), so while any member ramps,
//! every member's weight is scaled by [`scale`] (up to [`STEPS`], within the selectors' 1–256
//! range): weights 1,1 with one server at step 3 become 10 and 3.
//!
//! Step `k` (1–10) starts at `(k-1)/10` of the window and gives `k/10` of the weight, so the
//! server has its full weight for the window's last tenth and the ramp state is cleared at its
//! end.
//!
//! Round robin and ip_hash ignore weights, so slow start does not change them.

use std::time::Duration;

use keel_cluster::model::MAX_WEIGHT;

/// Rebuilds over one slow-start window; the ramp starts at `1 / STEPS` of the weight.
pub const STEPS: u32 = 10;

/// Which step of the ramp a server is at `elapsed` into a `window`: `Some(1..=STEPS)` while
/// ramping (step `k` means `k / STEPS` of its weight), `None` once the window is over.
pub fn step(elapsed: Duration, window: Duration) -> Option<u32> {
    if window.is_zero() || elapsed >= window {
        return None;
    }
    let k = elapsed.as_nanos() * u128::from(STEPS) / window.as_nanos();
    Some(u32::try_from(k).unwrap_or(STEPS - 1) + 1)
}

/// When step `k` (1-based) of a ramp begins, from the ramp's start.
pub fn step_start(k: u32, window: Duration) -> Duration {
    window.mul_f64(f64::from(k.saturating_sub(1)) / f64::from(STEPS))
}

/// The factor every weight of a pool is multiplied by while one of its members ramps: as
/// close to [`STEPS`] as the largest weight allows within [`MAX_WEIGHT`].
pub fn scale(max_weight: u32) -> u32 {
    (MAX_WEIGHT / max_weight.max(1)).clamp(1, STEPS)
}

/// The selector weight of a member with `weight` at ramp `step` (`None`: not ramping), when
/// the pool's weights are scaled by `scale`. Never 0: a ramping server still gets some traffic.
pub fn scaled_weight(weight: u32, scale: u32, step: Option<u32>) -> u32 {
    let full = weight.saturating_mul(scale);
    match step {
        None => full,
        Some(k) => (full.saturating_mul(k) / STEPS).max(1),
    }
}

/// The effective weight for humans (`/status`): the share of its own weight a ramping server
/// gets, in the units of its configured weight.
pub fn effective_weight(weight: u32, step: Option<u32>) -> f64 {
    match step {
        None => f64::from(weight),
        Some(k) => f64::from(weight) * f64::from(k) / f64::from(STEPS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ramp_goes_from_a_tenth_to_full_in_steps() {
        let w = Duration::from_secs(30);
        assert_eq!(step(Duration::ZERO, w), Some(1));
        assert_eq!(step(Duration::from_millis(2_999), w), Some(1));
        assert_eq!(step(Duration::from_secs(3), w), Some(2));
        assert_eq!(step(Duration::from_secs(15), w), Some(6));
        assert_eq!(step(Duration::from_millis(29_999), w), Some(10));
        assert_eq!(step(w, w), None);
        assert_eq!(step(Duration::from_secs(60), w), None);
        assert_eq!(step_start(1, w), Duration::ZERO);
        assert_eq!(step_start(6, w), Duration::from_secs(15));
    }

    #[test]
    fn scaled_weights_keep_proportions_and_never_reach_zero() {
        assert_eq!(scale(1), STEPS);
        assert_eq!(scale(256), 1);
        assert_eq!(scale(30), 8);
        // Default weights: the ramping server gets 1/10, then 3/10 of a peer's share.
        assert_eq!(scaled_weight(1, scale(1), None), 10);
        assert_eq!(scaled_weight(1, scale(1), Some(1)), 1);
        assert_eq!(scaled_weight(1, scale(1), Some(3)), 3);
        // A heavy pool cannot scale: integer tenths of the weight itself, at least 1.
        assert_eq!(scaled_weight(256, 1, Some(5)), 128);
        assert_eq!(scaled_weight(2, 1, Some(1)), 1);
        assert!((effective_weight(4, Some(5)) - 2.0).abs() < f64::EPSILON);
        assert!((effective_weight(4, None) - 4.0).abs() < f64::EPSILON);
    }
}

//! PLACEHOLDER outlier.
use std::time::Duration;
/// Placeholder.
#[derive(Debug, Default)]
pub struct OutlierState;
impl OutlierState {
    /// Placeholder.
    pub fn is_ejected(&self, _now_ms: u64) -> bool {
        false
    }
    /// Placeholder.
    pub fn observe(&self, _ok: bool, _now_ms: u64, _threshold: u32, _base: Duration) -> Option<Duration> {
        None
    }
}

//! PLACEHOLDER health module.
pub mod outlier;
/// Placeholder.
pub fn spawn(_pool: &std::sync::Arc<crate::pool::Pool>) {}

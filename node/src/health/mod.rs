//! PLACEHOLDER health module.
pub mod outlier;

//! PLACEHOLDER config

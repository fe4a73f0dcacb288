//! PLACEHOLDER snapshot

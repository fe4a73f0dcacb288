//! PLACEHOLDER daemon

//! PLACEHOLDER proxy

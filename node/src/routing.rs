//! PLACEHOLDER routing

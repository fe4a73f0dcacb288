//! PLACEHOLDER admin

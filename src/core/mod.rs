//! The protocol-free core.
pub mod route;

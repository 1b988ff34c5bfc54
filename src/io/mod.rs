//! Byte movers that know no protocol, shared by the HTTP and TCP sides:
//! [`tunnel`] copies both ways (half-close, idle bound) for `mode: tcp`
//! and upgraded connections; [`stall`] bounds each wait on a peer that
//! must take or send more bytes.

pub mod stall;
pub mod tunnel;

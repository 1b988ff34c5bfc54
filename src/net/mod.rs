//! The listening side: sockets (one per worker, `SO_REUSEPORT`), accept
//! loops, the connection cap and drain ([`listen`]), and the worker threads
//! ([`workers`]). It hands each accepted connection to the HTTP or the TCP
//! side, by the listener's mode.

pub mod listen;
pub mod tls;
pub mod workers;

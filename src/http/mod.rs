//! The HTTP side, on top of the core: one client connection ([`server`]:
//! the HTTP/1 fast path in [`fast`], or hyper for HTTP/1.1 and h2c), the
//! per-request work ([`proxy`]), the attempt loop that sends a request to
//! the pool's backends and retries it ([`retry`]), bodies ([`body`]), the
//! backend client ([`client`]), `Upgrade` pass-through ([`upgrade`]),
//! affinity cookies ([`affinity`]) and the HTTP/2 stream watchdog
//! ([`h2_stream`]).

pub mod affinity;
pub mod body;
pub mod client;
pub mod fast;
pub mod grpc;
pub mod h2_stream;
pub mod proxy;
pub mod retry;
pub mod server;
pub mod upgrade;

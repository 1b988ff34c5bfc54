//! Layer-4 mode (`mode: tcp`): every accepted client connection is joined to
//! one backend connection, and bytes are copied both ways until both sides
//! are done.
//!
//! It shares everything below the protocol with HTTP mode: the snapshot's
//! pool and strategy pick the backend, [`crate::core::state`] counts the open
//! connection as in flight (so least_connections counts connections) and
//! the failed connects (passive detection, through the same
//! `crate::core::passive::note_failure` as HTTP), and the health checker probes
//! with TCP connects. What differs: only the connect is retried, never the
//! bytes after it. Optionally a PROXY protocol header (`send_proxy_protocol`)
//! tells the backend who the client is.

mod proxy;
pub(crate) mod proxy_protocol;

pub(crate) use proxy::{serve, Accepted};

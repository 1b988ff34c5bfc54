//! TLS building blocks that know nothing of the proxy: a certificate and
//! key pair read from PEM files and checked against each other ([`pair`]),
//! the certificate store a handshake picks from by SNI, swappable while
//! lb runs ([`store`]), and the ClientHello's server name read without
//! terminating, for SNI routing in `mode: tcp` ([`client_hello`]), and the
//! client settings of HTTPS to a pool's backends, following their files
//! ([`client`]). `net::tls` builds a listener's TLS settings and
//! follows the files; `config` uses [`pair`] to check a file's pairs at
//! load, so a broken pair is an error at its `tls.certificates[i]` line.
//!
//! The crypto provider is `ring`: it builds with the C compiler every
//! machine here has, where aws-lc-rs (rustls's default, a little faster at
//! handshakes) can need cmake or more, and CI starts from a clean clone.

pub mod client;
pub mod client_hello;
pub mod pair;
pub mod store;

/// The crypto provider every TLS config of lb uses.
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

//! What operators see of TLS termination: each certificate served (files,
//! names, expiry, why its files are not applied, if so) for `/status` and
//! the expiry metric, and the failure counters. Written by `net::tls`,
//! read by the admin listener.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

/// One configured certificate as it serves now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertStatus {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub names: Vec<String>,
    pub not_after: SystemTime,
    /// Why the files on disk are not what serves (a rotation half-way, a
    /// broken file): the last good pair keeps serving.
    pub error: Option<String>,
}

#[derive(Debug, Default)]
pub struct TlsStatus {
    /// Each TLS listener's certificates, in config order, by listener name.
    certificates: Mutex<Vec<(String, Vec<CertStatus>)>>,
    /// Handshakes that failed or timed out (the client's doing).
    pub handshake_failures: AtomicU64,
    /// Certificate files that changed but could not be applied.
    pub reload_failures: AtomicU64,
    /// Certificate pairs applied after a change of their files.
    pub reloads: AtomicU64,
}

impl TlsStatus {
    /// What `listener` serves now.
    pub fn set(&self, listener: &str, certificates: Vec<CertStatus>) {
        let mut all = self
            .certificates
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match all.iter_mut().find(|(l, _)| l == listener) {
            Some((_, certs)) => *certs = certificates,
            None => all.push((listener.to_owned(), certificates)),
        }
    }

    /// `listener` serves no TLS (any more).
    pub fn remove(&self, listener: &str) {
        self.certificates
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|(l, _)| l != listener);
    }

    /// Every certificate served, with its listener's name.
    pub fn certificates(&self) -> Vec<(String, CertStatus)> {
        self.certificates
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .flat_map(|(l, certs)| certs.iter().map(move |c| (l.clone(), c.clone())))
            .collect()
    }
}

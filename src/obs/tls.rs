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
    /// The listener's certificates, in config order; empty without TLS.
    certificates: Mutex<Vec<CertStatus>>,
    /// The listener, as `listen` names it, for the metric's label.
    listener: Mutex<String>,
    /// Handshakes that failed or timed out (the client's doing).
    pub handshake_failures: AtomicU64,
    /// Certificate files that changed but could not be applied.
    pub reload_failures: AtomicU64,
    /// Certificate pairs applied after a change of their files.
    pub reloads: AtomicU64,
}

impl TlsStatus {
    pub fn set(&self, listener: String, certificates: Vec<CertStatus>) {
        *self.listener.lock().unwrap_or_else(PoisonError::into_inner) = listener;
        *self
            .certificates
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = certificates;
    }

    pub fn certificates(&self) -> Vec<CertStatus> {
        self.certificates
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn listener(&self) -> String {
        self.listener
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

//! A pool's `tls:` (top level: `backend_tls:`, since the top-level `tls:`
//! terminates clients' TLS): HTTPS to the backends. The files are named
//! here, resolved against the config file's directory and checked at load
//! like the listener's; `crate::tls::client` reads and follows them.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::tls::CertificateFiles;

type Invalid = (String, String);

/// `tls:` of a pool as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping like {ca: tls/internal-ca.pem, server_name: billing.internal}"
)]
pub struct RawBackendTls {
    pub server_name: Option<String>,
    pub ca: Option<PathBuf>,
    pub client_certificate: Option<RawClientCertificate>,
    pub insecure_skip_verify: Option<bool>,
}

/// `client_certificate:` as written (the listener's `{cert, key}`).
#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping like {cert: tls/lb.crt, key: tls/lb.key}"
)]
pub struct RawClientCertificate {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// HTTPS to a pool's backends.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendTls {
    /// Sent as SNI and verified in the backend's certificate; `None`: each
    /// backend's own host (name or IP address).
    pub server_name: Option<String>,
    /// The CAs a backend's certificate must chain to; `None`: the
    /// platform's roots.
    pub ca: Option<PathBuf>,
    /// lb's certificate for backends that ask for one (mTLS).
    pub client_certificate: Option<CertificateFiles>,
    /// Accept any certificate (still TLS, no authentication): a warning at
    /// every load.
    pub insecure_skip_verify: bool,
    /// The key path it was written at (`pools.billing.tls`, `backend_tls`),
    /// for the errors and warnings about its files.
    pub written_at: String,
}

impl BackendTls {
    /// TLS with the platform's roots and no client certificate: what
    /// `protocol: h2` or `auto` means without a `tls:`.
    pub fn platform_default(written_at: String) -> BackendTls {
        BackendTls {
            server_name: None,
            ca: None,
            client_certificate: None,
            insecure_skip_verify: false,
            written_at,
        }
    }

    /// Every file named, for the watcher.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.ca.iter().map(PathBuf::as_path).chain(
            self.client_certificate
                .iter()
                .flat_map(|c| [c.cert.as_path(), c.key.as_path()]),
        )
    }

    /// Relative paths made relative to `dir` (the config file's directory).
    pub fn resolve_against(&mut self, dir: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        if let Some(ca) = &mut self.ca {
            resolve(ca);
        }
        if let Some(c) = &mut self.client_certificate {
            resolve(&mut c.cert);
            resolve(&mut c.key);
        }
    }

    /// Reads the CA and the client pair now, so a file that cannot serve is
    /// an error at its key and the running proxy keeps its last good config.
    pub fn check_files(&self) -> Result<(), Invalid> {
        let at = |key: &str| format!("{}.{key}", self.written_at);
        if let Some(ca) = &self.ca {
            crate::tls::pair::read_ca(ca).map_err(|e| (at("ca"), e.to_string()))?;
        }
        if let Some(c) = &self.client_certificate {
            if let Err(e) = crate::tls::pair::CertPair::load(&c.cert, &c.key) {
                let which = if e.file == c.key { "key" } else { "cert" };
                return Err((at(&format!("client_certificate.{which}")), e.to_string()));
            }
        }
        Ok(())
    }

    /// `, tls (server name X, CA file, client certificate)` for the summary.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(name) = &self.server_name {
            parts.push(format!("server name {name}"));
        }
        parts.push(match (&self.ca, self.insecure_skip_verify) {
            (_, true) => "certificates NOT verified".to_owned(),
            (Some(ca), false) => format!("CA {}", ca.display()),
            (None, false) => "platform CAs".to_owned(),
        });
        if self.client_certificate.is_some() {
            parts.push("client certificate".to_owned());
        }
        format!("tls ({})", parts.join(", "))
    }
}

/// A pool's `tls:` → [`BackendTls`]; field paths relative to the section.
pub fn validate(raw: RawBackendTls, written_at: String) -> Result<BackendTls, Invalid> {
    let err = |field: &str, message: &str| Err((field.to_owned(), message.to_owned()));
    let server_name = match raw.server_name.as_deref().map(str::trim) {
        None => None,
        Some("") => return err("server_name", "is empty: name the host the certificates are for, or leave it out (each backend's host is used)"),
        Some(name) => {
            if rustls_pki_types::ServerName::try_from(name).is_err() {
                return err(
                    "server_name",
                    "is not a DNS name or IP address a certificate can be for",
                );
            }
            Some(name.to_ascii_lowercase())
        }
    };
    if raw.ca.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
        return err("ca", "is empty");
    }
    let insecure_skip_verify = raw.insecure_skip_verify.unwrap_or(false);
    let client_certificate = match raw.client_certificate {
        None => None,
        Some(c) => {
            let (Some(cert), Some(key)) = (c.cert, c.key) else {
                return err(
                    "client_certificate",
                    "needs both cert: and key: (PEM files)",
                );
            };
            for (what, p) in [("cert", &cert), ("key", &key)] {
                if p.as_os_str().is_empty() {
                    return err(&format!("client_certificate.{what}"), "is empty");
                }
            }
            Some(CertificateFiles { cert, key })
        }
    };
    Ok(BackendTls {
        server_name,
        ca: raw.ca,
        client_certificate,
        insecure_skip_verify,
        written_at,
    })
}

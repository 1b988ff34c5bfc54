//! The `tls:` section: TLS termination on the listener. The files are named
//! here (relative paths resolved against the config file's directory when
//! the file is parsed); they are read, checked and watched by `crate::tls`,
//! since a certificate changes without the config changing.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// `tls:` as written.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping like {certificates: [{cert: tls/server.crt, key: tls/server.key}]}"
)]
pub struct RawTls {
    pub certificates: Option<Vec<RawCertificate>>,
    pub min_version: Option<String>,
    pub alpn: Option<Vec<String>>,
    pub client_auth: Option<RawClientAuth>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping like {cert: tls/server.crt, key: tls/server.key}"
)]
pub struct RawCertificate {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping like {ca: tls/clients-ca.pem, required: true}"
)]
pub struct RawClientAuth {
    pub ca: Option<PathBuf>,
    pub required: Option<bool>,
}

/// TLS termination on the listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// Certificate and key files; the first is served when the client's
    /// SNI names none of them (or it sends none).
    pub certificates: Vec<CertificateFiles>,
    pub min_version: TlsVersion,
    /// ALPN protocols offered, in order of preference.
    pub alpn: Vec<Alpn>,
    pub client_auth: Option<ClientAuth>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    V1_2,
    V1_3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    H2,
    Http11,
}

impl Alpn {
    pub fn id(self) -> &'static [u8] {
        match self {
            Alpn::H2 => b"h2",
            Alpn::Http11 => b"http/1.1",
        }
    }
}

/// Mutual TLS: client certificates checked against `ca`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAuth {
    pub ca: PathBuf,
    /// A client without a certificate fails the handshake; `false` asks for
    /// one and accepts clients that send none.
    pub required: bool,
}

impl TlsSettings {
    /// Every file this section names, for the watcher.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.certificates
            .iter()
            .flat_map(|c| [c.cert.as_path(), c.key.as_path()])
            .chain(self.client_auth.iter().map(|c| c.ca.as_path()))
    }

    /// Reads every pair and the client CA now, so a file that cannot serve
    /// is an error at its key (`tls.certificates[0].key`), and the running
    /// proxy keeps its last good config.
    pub fn check_files(&self) -> Result<(), Invalid> {
        for (i, c) in self.certificates.iter().enumerate() {
            if let Err(e) = crate::tls::pair::CertPair::load(&c.cert, &c.key) {
                let which = if e.file == c.key { "key" } else { "cert" };
                return Err((format!("tls.certificates[{i}].{which}"), e.to_string()));
            }
        }
        if let Some(auth) = &self.client_auth {
            crate::tls::pair::read_ca(&auth.ca)
                .map_err(|e| ("tls.client_auth.ca".to_owned(), e.to_string()))?;
        }
        Ok(())
    }

    /// Relative paths made relative to `dir` (the config file's directory).
    pub fn resolve_against(&mut self, dir: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        for c in &mut self.certificates {
            resolve(&mut c.cert);
            resolve(&mut c.key);
        }
        if let Some(auth) = &mut self.client_auth {
            resolve(&mut auth.ca);
        }
    }
}

type Invalid = (String, String);

/// `tls:` → [`TlsSettings`], with the key path in each error. `tcp`: the
/// listener relays bytes, so it offers no ALPN unless the file lists some.
pub fn validate(raw: RawTls, tcp: bool) -> Result<TlsSettings, Invalid> {
    let err = |field: &str, message: String| Err((format!("tls.{field}"), message));
    let raw_certs = raw.certificates.unwrap_or_default();
    if raw_certs.is_empty() {
        return err(
            "certificates",
            "needs at least one {cert: FILE, key: FILE} (the first is the default)".to_owned(),
        );
    }
    let mut certificates = Vec::with_capacity(raw_certs.len());
    for (i, c) in raw_certs.into_iter().enumerate() {
        let (Some(cert), Some(key)) = (c.cert, c.key) else {
            return err(
                &format!("certificates[{i}]"),
                "needs both cert: and key: (PEM files)".to_owned(),
            );
        };
        for (what, p) in [("cert", &cert), ("key", &key)] {
            if p.as_os_str().is_empty() {
                return err(&format!("certificates[{i}].{what}"), "is empty".to_owned());
            }
        }
        certificates.push(CertificateFiles { cert, key });
    }
    let min_version = match raw.min_version.as_deref().map(str::trim) {
        None | Some("1.2") => TlsVersion::V1_2,
        Some("1.3") => TlsVersion::V1_3,
        Some(other) => {
            return err(
                "min_version",
                format!("{other:?} is not a TLS version lb speaks: \"1.2\" or \"1.3\""),
            )
        }
    };
    let alpn = match raw.alpn {
        None if tcp => Vec::new(),
        None => vec![Alpn::H2, Alpn::Http11],
        Some(list) => {
            let mut alpn = Vec::new();
            for (i, name) in list.iter().enumerate() {
                let proto = match name.trim() {
                    "h2" => Alpn::H2,
                    "http/1.1" => Alpn::Http11,
                    other => {
                        return err(
                            &format!("alpn[{i}]"),
                            format!("{other:?} is not a protocol lb serves: h2 or http/1.1"),
                        )
                    }
                };
                if !alpn.contains(&proto) {
                    alpn.push(proto);
                }
            }
            if alpn.is_empty() {
                return err("alpn", "is empty: list h2, http/1.1 or both".to_owned());
            }
            alpn
        }
    };
    let client_auth = match raw.client_auth {
        None => None,
        Some(RawClientAuth { ca: None, .. }) => {
            return err(
                "client_auth.ca",
                "is required: the CA (PEM) client certificates must chain to".to_owned(),
            )
        }
        Some(RawClientAuth {
            ca: Some(ca),
            required,
        }) => Some(ClientAuth {
            ca,
            required: required.unwrap_or(true),
        }),
    };
    Ok(TlsSettings {
        certificates,
        min_version,
        alpn,
        client_auth,
    })
}

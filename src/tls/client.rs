//! TLS to backends: the rustls client settings of one pool, built from its
//! files and rebuilt when they change.
//!
//! A [`ClientTls`] is what a pool's backend connections are made with. Its
//! CA and client certificate are read at build and again on every
//! [`ClientTls::recheck`] (the follower calls it when a file changes and
//! once a second); new settings apply to new connections, open ones keep
//! their session. Files that change into something unusable (a rotation
//! half done: a new key beside the old certificate) keep the settings that
//! worked, and say why once per state of the files.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwapOption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::pair::{self, CertPair};

/// What a pool's backend TLS is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFiles {
    /// The CAs a backend's certificate must chain to; `None`: the platform's.
    pub ca: Option<PathBuf>,
    /// lb's own certificate and key, for backends that ask (mTLS).
    pub client_pair: Option<(PathBuf, PathBuf)>,
    /// Accept any certificate the backend shows.
    pub insecure_skip_verify: bool,
    /// Sent as SNI and verified; `None`: the host lb connects to.
    pub server_name: Option<String>,
    /// ALPN offered, in order of preference.
    pub alpn: Vec<Vec<u8>>,
}

/// One pool's live client settings.
pub struct ClientTls {
    files: ClientFiles,
    server_name: Option<ServerName<'static>>,
    current: ArcSwapOption<ClientConfig>,
    judged: Mutex<Judged>,
}

/// What the files held when last looked at.
#[derive(Debug, Default)]
struct Judged {
    /// The bytes `current` was built from.
    applied: Option<u64>,
    /// The bytes found unusable, not tried again until they change.
    broken: Option<u64>,
    /// Why, while the files are not what serves.
    error: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

/// What a recheck did.
#[derive(Debug, PartialEq, Eq)]
pub enum Rechecked {
    /// Nothing new.
    Same,
    /// The files changed and new connections use them.
    Applied,
    /// The files changed into something unusable: the last good settings
    /// go on (`None` if there never were any).
    Broken(String),
}

impl ClientTls {
    /// Reads the files and builds the settings. Files that cannot be used
    /// (the config's check read them a moment ago) leave it without
    /// settings: its connections fail, saying why, until they can.
    pub fn new(files: ClientFiles) -> ClientTls {
        let server_name = files
            .server_name
            .as_deref()
            .and_then(|n| ServerName::try_from(n.to_owned()).ok());
        let tls = ClientTls {
            files,
            server_name,
            current: ArcSwapOption::empty(),
            judged: Mutex::default(),
        };
        if let Rechecked::Broken(why) = tls.recheck() {
            tracing::error!("backend TLS cannot be used: {why}");
        }
        tls
    }

    pub fn files(&self) -> &ClientFiles {
        &self.files
    }

    /// The settings for a new connection to `host` and the name to verify,
    /// or why there are none.
    pub fn for_host(&self, host: &str) -> Result<(Arc<ClientConfig>, ServerName<'static>), String> {
        let Some(config) = self.current.load_full() else {
            let judged = self.judged.lock().unwrap_or_else(PoisonError::into_inner);
            return Err(judged
                .error
                .clone()
                .unwrap_or_else(|| "backend TLS has no usable settings".to_owned()));
        };
        let name = match &self.server_name {
            Some(name) => name.clone(),
            None => {
                // `[::1]` in a URI is `::1` to verify.
                let host = host.trim_start_matches('[').trim_end_matches(']');
                ServerName::try_from(host.to_owned()).map_err(|_| {
                    format!("{host:?} is not a name TLS can verify; set tls.server_name")
                })?
            }
        };
        Ok((config, name))
    }

    /// The directories holding the files, for the watcher.
    pub fn directories(&self) -> BTreeSet<PathBuf> {
        let ca = self.files.ca.iter();
        let pair = self.files.client_pair.iter().flat_map(|(c, k)| [c, k]);
        ca.chain(pair)
            .map(|f| {
                f.parent()
                    .map_or_else(|| PathBuf::from("."), Path::to_owned)
            })
            .collect()
    }

    /// Why the files are not what serves, if they are not.
    pub fn error(&self) -> Option<String> {
        let judged = self.judged.lock().unwrap_or_else(PoisonError::into_inner);
        judged.error.clone()
    }

    /// Reads the files again and rebuilds the settings if they changed.
    pub fn recheck(&self) -> Rechecked {
        let mut judged = self.judged.lock().unwrap_or_else(PoisonError::into_inner);
        let read = Read::files(&self.files);
        let read = match read {
            Ok(read) => read,
            Err(why) => {
                if judged.error.as_deref() == Some(&why) {
                    return Rechecked::Same;
                }
                judged.error = Some(why.clone());
                return Rechecked::Broken(why);
            }
        };
        if judged.applied == Some(read.fingerprint) {
            // What serves: a half-done rotation undone.
            judged.error = None;
            return Rechecked::Same;
        }
        if judged.broken == Some(read.fingerprint) {
            return Rechecked::Same;
        }
        match build(&self.files, &read) {
            Ok(config) => {
                self.current.store(Some(Arc::new(config)));
                *judged = Judged {
                    applied: Some(read.fingerprint),
                    ..Judged::default()
                };
                Rechecked::Applied
            }
            Err(why) => {
                judged.broken = Some(read.fingerprint);
                judged.error = Some(why.clone());
                Rechecked::Broken(why)
            }
        }
    }
}

/// The files' bytes.
struct Read {
    ca: Option<Vec<u8>>,
    pair: Option<(Vec<u8>, Vec<u8>)>,
    fingerprint: u64,
}

impl Read {
    fn files(files: &ClientFiles) -> Result<Read, String> {
        let ca = files
            .ca
            .as_deref()
            .map(pair::read_pem)
            .transpose()
            .map_err(|e| e.to_string())?;
        let pair = match &files.client_pair {
            None => None,
            Some((cert, key)) => Some((
                pair::read_pem(cert).map_err(|e| e.to_string())?,
                pair::read_pem(key).map_err(|e| e.to_string())?,
            )),
        };
        let empty: &[u8] = &[];
        let fingerprint = pair::fingerprint(
            ca.as_deref().unwrap_or(empty),
            &pair
                .as_ref()
                .map(|(c, k)| [c.as_slice(), k.as_slice()].concat())
                .unwrap_or_default(),
        );
        Ok(Read {
            ca,
            pair,
            fingerprint,
        })
    }
}

fn build(files: &ClientFiles, read: &Read) -> Result<ClientConfig, String> {
    let provider = super::provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("backend TLS: {e}"))?;
    let builder = if files.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
    } else {
        let roots = match (&files.ca, &read.ca) {
            (Some(path), Some(pem)) => pair::ca_from_pem(path, pem).map_err(|e| e.to_string())?,
            _ => platform_roots()?,
        };
        builder.with_root_certificates(roots)
    };
    let mut config = match (&files.client_pair, &read.pair) {
        (Some((cert_file, key_file)), Some((cert, key))) => {
            let pair =
                CertPair::from_pem(cert_file, cert, key_file, key).map_err(|e| e.to_string())?;
            builder.with_client_cert_resolver(Arc::new(OneCertificate(pair.key)))
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = files.alpn.clone();
    Ok(config)
}

/// The machine's CA store (`/etc/ssl/certs` and the like, or
/// `SSL_CERT_FILE` / `SSL_CERT_DIR`), read at each build: a pool made
/// after the store changed sees the change.
fn platform_roots() -> Result<rustls::RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map_or_else(|| "none found".to_owned(), ToString::to_string);
        return Err(format!(
            "no CA certificates on this machine to verify backends with ({why}): set tls.ca"
        ));
    }
    Ok(roots)
}

/// lb's one client certificate, shown to every backend that asks.
#[derive(Debug)]
struct OneCertificate(Arc<CertifiedKey>);

impl ResolvesClientCert for OneCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// `insecure_skip_verify: true`: any certificate is accepted; the
/// handshake's signatures are still checked, so the session is at least
/// with the holder of the certificate's key.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

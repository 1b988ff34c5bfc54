//! One certificate and its key, read from PEM files and checked against
//! each other: a pair is usable only when both files parse and the key is
//! the certificate's, so a rotation caught half-way (the new key beside the
//! old certificate) is refused, never served.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A PEM file bigger than this is not a certificate chain or a key.
pub const MAX_PEM_BYTES: u64 = 1 << 20;

/// A usable pair and what operators see of it.
#[derive(Debug, Clone)]
pub struct CertPair {
    pub key: Arc<CertifiedKey>,
    pub info: CertInfo,
    /// Hash of both files' bytes: tells a re-read that changed nothing.
    pub fingerprint: u64,
}

/// A leaf certificate's names and validity, for SNI, `/status` and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// SAN DNS names, lowercase (`*.example.com` kept as written).
    pub names: Vec<String>,
    pub not_after: SystemTime,
}

/// Why a pair cannot be used; names the file at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairError {
    pub file: PathBuf,
    pub kind: PairErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PairErrorKind {
    Read(String),
    NotRegular,
    TooBig,
    NoCertificate,
    BadCertificate(String),
    NoKey,
    UnsupportedKey(String),
    /// The key is not the certificate's (`file` is the certificate).
    Mismatch {
        key_file: PathBuf,
    },
}

impl fmt::Display for PairError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.display();
        match &self.kind {
            PairErrorKind::Read(e) => write!(f, "{file}: cannot read: {e}"),
            PairErrorKind::NotRegular => write!(f, "{file}: not a regular file"),
            PairErrorKind::TooBig => {
                write!(
                    f,
                    "{file}: larger than {} KiB: not a PEM certificate or key",
                    MAX_PEM_BYTES >> 10
                )
            }
            PairErrorKind::NoCertificate => {
                write!(
                    f,
                    "{file}: no certificate in the file (PEM \"BEGIN CERTIFICATE\")"
                )
            }
            PairErrorKind::BadCertificate(e) => write!(f, "{file}: not a valid certificate: {e}"),
            PairErrorKind::NoKey => {
                write!(f, "{file}: not a private key (PKCS#8, PKCS#1 or SEC1 PEM)")
            }
            PairErrorKind::UnsupportedKey(e) => write!(f, "{file}: unusable private key: {e}"),
            PairErrorKind::Mismatch { key_file } => write!(
                f,
                "{file} and {}: the key does not match the certificate",
                key_file.display()
            ),
        }
    }
}

impl std::error::Error for PairError {}

/// Reads a PEM file: a regular file (symlinks followed, as Kubernetes
/// mounts them), at most [`MAX_PEM_BYTES`].
pub fn read_pem(path: &Path) -> Result<Vec<u8>, PairError> {
    let err = |kind| PairError {
        file: path.to_owned(),
        kind,
    };
    let file = std::fs::File::open(path).map_err(|e| err(PairErrorKind::Read(e.to_string())))?;
    let meta = file
        .metadata()
        .map_err(|e| err(PairErrorKind::Read(e.to_string())))?;
    if !meta.is_file() {
        return Err(err(PairErrorKind::NotRegular));
    }
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| err(PairErrorKind::Read(e.to_string())))?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(err(PairErrorKind::TooBig));
    }
    Ok(bytes)
}

impl CertPair {
    /// Reads and checks the pair.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<CertPair, PairError> {
        let cert_pem = read_pem(cert_file)?;
        let key_pem = read_pem(key_file)?;
        CertPair::from_pem(cert_file, &cert_pem, key_file, &key_pem)
    }

    /// Checks a pair given as PEM bytes (`*_file` name them in errors).
    pub fn from_pem(
        cert_file: &Path,
        cert_pem: &[u8],
        key_file: &Path,
        key_pem: &[u8],
    ) -> Result<CertPair, PairError> {
        let cert_err = |kind| PairError {
            file: cert_file.to_owned(),
            kind,
        };
        let key_err = |kind| PairError {
            file: key_file.to_owned(),
            kind,
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| cert_err(PairErrorKind::BadCertificate(e.to_string())))?;
        let Some(leaf) = chain.first() else {
            return Err(cert_err(PairErrorKind::NoCertificate));
        };
        let info = leaf_info(leaf).map_err(|e| cert_err(PairErrorKind::BadCertificate(e)))?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| key_err(PairErrorKind::NoKey))?;
        let signing = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| key_err(PairErrorKind::UnsupportedKey(e.to_string())))?;
        let certified = CertifiedKey::new(chain, signing);
        certified.keys_match().map_err(|_| {
            cert_err(PairErrorKind::Mismatch {
                key_file: key_file.to_owned(),
            })
        })?;
        Ok(CertPair {
            key: Arc::new(certified),
            info: CertInfo {
                cert_file: cert_file.to_owned(),
                key_file: key_file.to_owned(),
                names: info.0,
                not_after: info.1,
            },
            fingerprint: fingerprint(cert_pem, key_pem),
        })
    }
}

/// The CA certificates of a PEM file (for client certificates), as a
/// root store.
pub fn read_ca(path: &Path) -> Result<rustls::RootCertStore, PairError> {
    ca_from_pem(path, &read_pem(path)?)
}

/// [`read_ca`] of bytes already read (`path` names them in errors).
pub fn ca_from_pem(path: &Path, pem: &[u8]) -> Result<rustls::RootCertStore, PairError> {
    let err = |kind| PairError {
        file: path.to_owned(),
        kind,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| err(PairErrorKind::BadCertificate(e.to_string())))?;
        roots
            .add(cert)
            .map_err(|e| err(PairErrorKind::BadCertificate(e.to_string())))?;
    }
    if roots.is_empty() {
        return Err(err(PairErrorKind::NoCertificate));
    }
    Ok(roots)
}

/// FNV-1a over both files: cheap, and only compared with itself.
pub fn fingerprint(cert_pem: &[u8], key_pem: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in cert_pem.iter().chain(&[0xff]).chain(key_pem) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The leaf's SAN DNS names (lowercase) and not-after.
fn leaf_info(leaf: &CertificateDer<'_>) -> Result<(Vec<String>, SystemTime), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push(dns.trim_end_matches('.').to_ascii_lowercase());
            }
        }
    }
    let secs = cert.validity().not_after.timestamp();
    let not_after = UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    Ok((names, not_after))
}

#[cfg(test)]
pub(crate) mod testing {
    //! Test certificates made with rcgen.

    /// A self-signed certificate for `names` (ECDSA P-256), as (cert PEM, key PEM).
    pub fn self_signed(names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        let ck = rcgen::generate_simple_self_signed(names).expect("rcgen");
        (ck.cert.pem(), ck.key_pair.serialize_pem())
    }

    /// A self-signed certificate for `names` over a fixed key (ring makes
    /// no RSA keys): `pkcs8` is the key rcgen signs with.
    pub fn self_signed_with(names: &[&str], pkcs8: &str) -> String {
        let key = rcgen::KeyPair::from_pem(pkcs8).expect("test key");
        let params = rcgen::CertificateParams::new(
            names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
        )
        .expect("params");
        params.self_signed(&key).expect("self-signed").pem()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    fn load(cert: &str, key: &str) -> Result<CertPair, PairError> {
        CertPair::from_pem(
            Path::new("tls/server.crt"),
            cert.as_bytes(),
            Path::new("tls/server.key"),
            key.as_bytes(),
        )
    }

    #[test]
    fn an_ecdsa_pair_loads_with_its_names() {
        let (cert, key) = self_signed(&["api.example.com", "*.Example.org"]);
        let pair = load(&cert, &key).unwrap();
        assert_eq!(pair.info.names, ["api.example.com", "*.example.org"]);
        assert!(pair.info.not_after > SystemTime::now());
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let (cert, _) = self_signed(&["a.example.com"]);
        let (_, other_key) = self_signed(&["a.example.com"]);
        let e = load(&cert, &other_key).unwrap_err();
        assert_eq!(
            e.to_string(),
            "tls/server.crt and tls/server.key: the key does not match the certificate"
        );
    }

    #[test]
    fn garbage_files_say_which_file_and_why() {
        let (cert, key) = self_signed(&["a.example.com"]);
        assert_eq!(
            load("hello", &key).unwrap_err().to_string(),
            "tls/server.crt: no certificate in the file (PEM \"BEGIN CERTIFICATE\")"
        );
        assert_eq!(
            load(&cert, "hello").unwrap_err().to_string(),
            "tls/server.key: not a private key (PKCS#8, PKCS#1 or SEC1 PEM)"
        );
        // Swapped files: the key file holds a certificate.
        assert!(load(&key, &cert).is_err());
    }

    /// Test keys made once with openssl (`genrsa -traditional`, `ecparam
    /// -genkey`, `pkcs8 -topk8`): each key in two encodings.
    const RSA_PKCS1: &str = include_str!("testdata/rsa-pkcs1.key");
    const RSA_PKCS8: &str = include_str!("testdata/rsa-pkcs8.key");
    const EC_SEC1: &str = include_str!("testdata/ec-sec1.key");
    const EC_PKCS8: &str = include_str!("testdata/ec-pkcs8.key");

    #[test]
    fn rsa_and_ecdsa_keys_load_in_every_encoding() {
        let rsa = self_signed_with(&["rsa.example.com"], RSA_PKCS8);
        for key in [RSA_PKCS8, RSA_PKCS1] {
            assert_eq!(load(&rsa, key).unwrap().info.names, ["rsa.example.com"]);
        }
        let ec = self_signed_with(&["ec.example.com"], EC_PKCS8);
        for key in [EC_PKCS8, EC_SEC1] {
            assert_eq!(load(&ec, key).unwrap().info.names, ["ec.example.com"]);
        }
        // Each key is refused with the other's certificate.
        assert!(load(&rsa, EC_SEC1).is_err());
        assert!(load(&ec, RSA_PKCS1).is_err());
    }

    #[test]
    fn read_pem_refuses_directories_and_huge_files() {
        let dir = tempfile::tempdir().unwrap();
        let e = read_pem(dir.path()).unwrap_err();
        assert!(
            matches!(e.kind, PairErrorKind::NotRegular | PairErrorKind::Read(_)),
            "{e}"
        );
        let big = dir.path().join("big.pem");
        std::fs::write(&big, vec![b'a'; (MAX_PEM_BYTES + 1) as usize]).unwrap();
        assert_eq!(read_pem(&big).unwrap_err().kind, PairErrorKind::TooBig);
    }
}

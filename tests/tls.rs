//! TLS termination: real handshakes with a rustls client against lb on
//! 127.0.0.1, certificates made by rcgen at test time, files rotated the
//! ways people and Kubernetes rotate them.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// A certificate and key, PEM, with the DER of the certificate.
struct Cert {
    cert: String,
    key: String,
    der: CertificateDer<'static>,
}

fn cert(names: &[&str]) -> Cert {
    let ck = rcgen::generate_simple_self_signed(
        names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
    )
    .unwrap();
    Cert {
        cert: ck.cert.pem(),
        key: ck.key_pair.serialize_pem(),
        der: ck.cert.der().clone(),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Replaces `name` atomically (temp file + rename), as most tools do.
fn rename_over(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

struct TlsLb {
    lb: lb::Lb,
    dir: tempfile::TempDir,
}

impl TlsLb {
    /// lb with `yaml` (no `listen:`), after `files` are written into its
    /// directory (the config's relative paths are relative to it).
    async fn start(yaml: &str, files: &[(&str, &str)]) -> TlsLb {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            if let Some(parent) = Path::new(name).parent() {
                std::fs::create_dir_all(dir.path().join(parent)).unwrap();
            }
            write(dir.path(), name, text);
        }
        Self::start_in(dir, yaml).await
    }

    /// lb serving `c` as its one pair (`tls/server.crt`, `tls/server.key`)
    /// in front of `backend`, `extra` YAML first.
    async fn one_pair(backend: &Backend, c: &Cert, extra: &str) -> TlsLb {
        TlsLb::start(
            &format!("{extra}{}", tls_yaml(backend, ONE_PAIR)),
            &[("tls/server.crt", &c.cert), ("tls/server.key", &c.key)],
        )
        .await
    }

    async fn start_in(dir: tempfile::TempDir, yaml: &str) -> TlsLb {
        Self::start_exact(dir, &format!("listen: 127.0.0.1:0\n{yaml}")).await
    }

    /// lb with `yaml` as it is (a `listeners:` file), in `dir`.
    async fn start_exact(dir: tempfile::TempDir, yaml: &str) -> TlsLb {
        let path = write(dir.path(), "config.yaml", yaml);
        let (config, hash) = lb::config::Config::load(&path).unwrap();
        let listener = lb::net::listen::bind(config.listen()).unwrap();
        let settings = settings(
            &path,
            lb::reload::WatchSettings {
                watch: true,
                poll_interval: Duration::from_millis(200),
            },
        );
        let lb = lb::Lb::start(listener, config, hash, settings).unwrap();
        TlsLb { lb, dir }
    }

    fn addr(&self) -> SocketAddr {
        self.lb.local_addr()
    }

    fn status(&self) -> serde_json::Value {
        // The admin listener is not configured here: read what it would show.
        let rt = self.lb.runtime();
        let certs = rt.tls.certificates();
        serde_json::json!(certs
            .iter()
            .map(|(_, c)| serde_json::json!({"names": c.names, "error": c.error}))
            .collect::<Vec<_>>())
    }
}

/// A client trusting `roots`, offering `alpn`.
fn connector(roots: &[&Cert], alpn: &[&[u8]]) -> TlsConnector {
    let mut store = rustls::RootCertStore::empty();
    for c in roots {
        store.add(c.der.clone()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

async fn handshake(
    addr: SocketAddr,
    connector: &TlsConnector,
    sni: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_owned()).unwrap();
    connector.connect(name, tcp).await
}

/// The certificate the server presented.
fn served(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// One HTTP/1.1 GET over `stream`: (status, body).
async fn get_over(stream: TlsStream<TcpStream>, path: &str) -> (u16, String) {
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "api.example.com")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn tls_yaml(backend: &Backend, certificates: &str) -> String {
    format!(
        "tls:\n  certificates:\n{certificates}{}",
        backends_yaml(&[backend])
    )
}

const ONE_PAIR: &str = "    - {cert: tls/server.crt, key: tls/server.key}\n";

#[tokio::test]
async fn https_reaches_the_backend_with_x_forwarded_proto_https() {
    let backend = Backend::start("b1").await;
    let c = cert(&["api.example.com"]);
    let lb = TlsLb::one_pair(&backend, &c, "").await;
    let stream = handshake(
        lb.addr(),
        &connector(&[&c], &[b"http/1.1"]),
        "api.example.com",
    )
    .await
    .unwrap();
    assert_eq!(served(&stream), c.der);
    let (status, body) = get_over(stream, "/x").await;
    assert_eq!((status, body.as_str()), (200, "b1"));
    let seen = backend.seen();
    assert_eq!(seen[0].headers["x-forwarded-proto"], "https");
}

#[tokio::test]
async fn sni_picks_exact_then_wildcard_then_the_first() {
    let backend = Backend::start("b1").await;
    let default = cert(&["default.test"]);
    let wildcard = cert(&["*.example.com"]);
    let exact = cert(&["api.example.com"]);
    let lb = TlsLb::start(
        &tls_yaml(
            &backend,
            "    - {cert: d.crt, key: d.key}\n    - {cert: w.crt, key: w.key}\n    - {cert: e.crt, key: e.key}\n",
        ),
        &[
            ("d.crt", &default.cert),
            ("d.key", &default.key),
            ("w.crt", &wildcard.cert),
            ("w.key", &wildcard.key),
            ("e.crt", &exact.cert),
            ("e.key", &exact.key),
        ],
    )
    .await;
    // Each client trusts only the certificate it expects: a wrong pick
    // fails the handshake.
    for (sni, expect) in [
        ("api.example.com", &exact),
        ("API.Example.com", &exact),
        ("web.example.com", &wildcard),
        ("default.test", &default),
    ] {
        let stream = handshake(lb.addr(), &connector(&[expect], &[]), sni)
            .await
            .unwrap_or_else(|e| panic!("{sni}: {e}"));
        assert_eq!(served(&stream), expect.der, "{sni}");
    }
    // A name no certificate has: the first (the client trusting it, for a
    // name it does not carry, fails verification, so trust all and look).
    let tcp = TcpStream::connect(lb.addr()).await.unwrap();
    let insecure = insecure_connector();
    let stream = insecure
        .connect(ServerName::try_from("a.b.example.com").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(served(&stream), default.der);
}

/// A client that accepts any certificate: to see which one lb serves.
fn insecure_connector() -> TlsConnector {
    #[derive(Debug)]
    struct AnyCert;
    impl rustls::client::danger::ServerCertVerifier for AnyCert {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyCert))
    .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

#[tokio::test]
async fn h2_is_negotiated_by_alpn() {
    let backend = Backend::start("b1").await;
    let c = cert(&["api.example.com"]);
    let lb = TlsLb::one_pair(&backend, &c, "").await;
    let stream = handshake(
        lb.addr(),
        &connector(&[&c], &[b"h2", b"http/1.1"]),
        "api.example.com",
    )
    .await
    .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = Request::get("https://api.example.com/h2")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"b1");
    assert_eq!(backend.seen()[0].headers["x-forwarded-proto"], "https");
}

/// Waits until a new handshake gets `expect`.
async fn wait_served(lb: &TlsLb, expect: &Cert) {
    let insecure = insecure_connector();
    eventually!(
        WAIT,
        {
            let tcp = TcpStream::connect(lb.addr()).await.unwrap();
            match insecure
                .connect(ServerName::try_from("api.example.com").unwrap(), tcp)
                .await
            {
                Ok(s) => served(&s) == expect.der,
                Err(_) => false,
            }
        },
        "new handshakes get the rotated certificate"
    );
}

#[tokio::test]
async fn a_pair_renamed_over_applies_and_open_connections_carry_on() {
    let backend = Backend::start("b1").await;
    let old = cert(&["api.example.com"]);
    let new = cert(&["api.example.com"]);
    let lb = TlsLb::one_pair(&backend, &old, "").await;
    // An open keep-alive connection from before the rotation.
    let stream = handshake(
        lb.addr(),
        &connector(&[&old], &[b"http/1.1"]),
        "api.example.com",
    )
    .await
    .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let dir = lb.dir.path().join("tls");
    rename_over(&dir, "server.key", &new.key);
    rename_over(&dir, "server.crt", &new.cert);
    wait_served(&lb, &new).await;
    let req = Request::get("/after")
        .header("host", "api.example.com")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send.send_request(req).await.unwrap().status(), 200);
    assert!(
        lb.lb
            .runtime()
            .tls
            .reloads
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}

#[tokio::test]
async fn half_a_rotation_keeps_the_old_pair_until_the_other_half_arrives() {
    let backend = Backend::start("b1").await;
    let old = cert(&["api.example.com"]);
    let new = cert(&["api.example.com"]);
    let lb = TlsLb::one_pair(&backend, &old, "").await;
    let dir = lb.dir.path().join("tls");
    // The key first, written in place (cert-manager writes them apart).
    std::fs::write(dir.join("server.key"), &new.key).unwrap();
    eventually!(
        WAIT,
        lb.status()[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("does not match")),
        "the half rotation is reported: {}",
        lb.status()
    );
    // Still the old pair, whole, for new clients.
    let stream = handshake(lb.addr(), &connector(&[&old], &[]), "api.example.com")
        .await
        .unwrap();
    assert_eq!(served(&stream), old.der);
    std::fs::write(dir.join("server.crt"), &new.cert).unwrap();
    wait_served(&lb, &new).await;
    eventually!(
        WAIT,
        lb.status()[0]["error"].is_null(),
        "error cleared: {}",
        lb.status()
    );
    let failures = lb
        .lb
        .runtime()
        .tls
        .reload_failures
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(failures >= 1);
}

/// A Secret volume as the kubelet writes it: `tls.crt -> ..data/tls.crt`,
/// `..data -> ..<version>`; an update writes a new version directory and
/// renames a new `..data` symlink over the old one.
fn secret_version(secret: &Path, version: &str, c: &Cert) {
    let dir = secret.join(version);
    std::fs::create_dir_all(&dir).unwrap();
    write(&dir, "tls.crt", &c.cert);
    write(&dir, "tls.key", &c.key);
    let tmp = secret.join("..data_tmp");
    std::os::unix::fs::symlink(version, &tmp).unwrap();
    std::fs::rename(&tmp, secret.join("..data")).unwrap();
    for name in ["tls.crt", "tls.key"] {
        let link = secret.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link).unwrap();
        }
    }
}

#[tokio::test]
async fn a_kubernetes_secret_swap_applies() {
    let backend = Backend::start("b1").await;
    let old = cert(&["api.example.com"]);
    let new = cert(&["api.example.com"]);
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    secret_version(&secret, "..2026_12_02_a", &old);
    let lb = TlsLb::start_in(
        dir,
        &tls_yaml(
            &backend,
            "    - {cert: secret/tls.crt, key: secret/tls.key}\n",
        ),
    )
    .await;
    wait_served(&lb, &old).await;
    secret_version(&secret, "..2026_12_02_b", &new);
    std::fs::remove_dir_all(secret.join("..2026_12_02_a")).unwrap();
    wait_served(&lb, &new).await;
}

#[tokio::test]
async fn a_client_that_is_not_tls_costs_a_counted_failure_and_nothing_else() {
    let backend = Backend::start("b1").await;
    let c = cert(&["api.example.com"]);
    let lb = TlsLb::one_pair(&backend, &c, "").await;
    let mut plain = TcpStream::connect(lb.addr()).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    // lb answers a TLS alert or nothing, and closes.
    let _ = tokio::time::timeout(Duration::from_secs(WAIT), plain.read_to_end(&mut buf)).await;
    assert!(
        !String::from_utf8_lossy(&buf).contains("HTTP/1.1"),
        "no HTTP answer in plaintext"
    );
    let rt = lb.lb.runtime();
    eventually!(
        WAIT,
        rt.tls
            .handshake_failures
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    assert_eq!(backend.hits(), 0);
    let stream = handshake(lb.addr(), &connector(&[&c], &[]), "api.example.com")
        .await
        .unwrap();
    assert_eq!(get_over(stream, "/ok").await.0, 200);
    let metrics = lb::admin::exposition::render(rt);
    assert!(
        metrics.contains("lb_tls_handshake_failures_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("lb_tls_certificate_expiry_seconds{listener=\""),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_missing_or_mismatched_file_is_a_config_error_at_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let a = cert(&["a.test"]);
    let b = cert(&["b.test"]);
    write(dir.path(), "a.crt", &a.cert);
    write(dir.path(), "b.key", &b.key);
    let yaml = "tls:\n  certificates:\n    - {cert: a.crt, key: b.key}\nbackends:\n  - address: 127.0.0.1:9\n";
    let path = write(dir.path(), "config.yaml", yaml);
    let e = lb::config::Config::load(&path).unwrap_err().to_string();
    assert!(e.contains("config.yaml:3:"), "{e}");
    assert!(e.contains("tls.certificates[0].cert"), "{e}");
    assert!(e.contains("the key does not match the certificate"), "{e}");
    let yaml = yaml.replace("b.key", "missing.key");
    std::fs::write(&path, yaml).unwrap();
    let e = lb::config::Config::load(&path).unwrap_err().to_string();
    assert!(e.contains("tls.certificates[0].key"), "{e}");
    assert!(e.contains("missing.key: cannot read"), "{e}");
}

#[tokio::test]
async fn client_auth_required_refuses_a_client_without_a_certificate() {
    let backend = Backend::start("b1").await;
    let server = cert(&["api.example.com"]);
    let ca = cert(&["clients.test"]);
    let lb = TlsLb::start(
        &format!(
            "tls:\n  certificates:\n{ONE_PAIR}  client_auth: {{ca: tls/ca.pem, required: true}}\n{}",
            backends_yaml(&[&backend])
        ),
        &[
            ("tls/server.crt", &server.cert),
            ("tls/server.key", &server.key),
            ("tls/ca.pem", &ca.cert),
        ],
    )
    .await;
    // TLS 1.3: the client learns of the refusal on its first read.
    let refused = match handshake(lb.addr(), &connector(&[&server], &[]), "api.example.com").await {
        Err(_) => true,
        Ok(mut s) => {
            let _ = s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
            let mut buf = [0u8; 64];
            !matches!(s.read(&mut buf).await, Ok(n) if n > 0)
        }
    };
    assert!(refused);
    assert_eq!(backend.hits(), 0);
}

#[tokio::test]
async fn a_client_that_never_finishes_its_handshake_is_closed_after_client_header() {
    let backend = Backend::start("b1").await;
    let c = cert(&["api.example.com"]);
    let lb = TlsLb::one_pair(&backend, &c, "timeouts: {client_header: 300ms}\n").await;
    // Three bytes of a record header, then silence.
    let mut stalled = TcpStream::connect(lb.addr()).await.unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    let mut buf = Vec::new();
    let closed =
        tokio::time::timeout(Duration::from_secs(WAIT), stalled.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "lb closed the stalled handshake");
    let rt = lb.lb.runtime();
    eventually!(
        WAIT,
        rt.tls
            .handshake_failures
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    assert_eq!(backend.hits(), 0);
}

#[tokio::test]
async fn client_auth_accepts_a_client_certificate_from_its_ca() {
    let backend = Backend::start("b1").await;
    let server = cert(&["api.example.com"]);
    // A CA, and a client certificate it signed.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let client_key = rcgen::KeyPair::generate().unwrap();
    let client = rcgen::CertificateParams::new(vec!["client.test".to_owned()])
        .unwrap()
        .signed_by(&client_key, &ca, &ca_key)
        .unwrap();
    let lb = TlsLb::start(
        &format!(
            "tls:\n  certificates:\n{ONE_PAIR}  client_auth: {{ca: tls/ca.pem, required: true}}\n{}",
            backends_yaml(&[&backend])
        ),
        &[
            ("tls/server.crt", &server.cert),
            ("tls/server.key", &server.key),
            ("tls/ca.pem", &ca.pem()),
        ],
    )
    .await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server.der.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![client.der().clone()],
        rustls::pki_types::PrivateKeyDer::try_from(client_key.serialize_der()).unwrap(),
    )
    .unwrap();
    let stream = handshake(
        lb.addr(),
        &TlsConnector::from(Arc::new(config)),
        "api.example.com",
    )
    .await
    .unwrap();
    assert_eq!(get_over(stream, "/mtls").await, (200, "b1".to_owned()));
}

#[tokio::test]
async fn a_reload_that_adds_a_certificate_serves_it_and_a_broken_one_is_refused() {
    let backend = Backend::start("b1").await;
    let first = cert(&["default.test"]);
    let api = cert(&["api.example.com"]);
    let lb = TlsLb::start(
        &tls_yaml(&backend, "    - {cert: d.crt, key: d.key}\n"),
        &[("d.crt", &first.cert), ("d.key", &first.key)],
    )
    .await;
    let dir = lb.dir.path();
    write(dir, "a.crt", &api.cert);
    write(dir, "a.key", &api.key);
    let config = |certs: &str| format!("listen: 127.0.0.1:0\n{}", tls_yaml(&backend, certs));
    // A pair whose key is not its certificate's: refused, nothing changes.
    rename_over(
        dir,
        "config.yaml",
        &config("    - {cert: d.crt, key: d.key}\n    - {cert: a.crt, key: d.key}\n"),
    );
    let rt = lb.lb.runtime();
    eventually!(
        WAIT,
        rt.reloads
            .rejected
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 1
    );
    let error = rt.reloads.last().error.unwrap_or_default();
    assert!(error.contains("tls.certificates[1].cert"), "{error}");
    rename_over(
        dir,
        "config.yaml",
        &config("    - {cert: d.crt, key: d.key}\n    - {cert: a.crt, key: a.key}\n"),
    );
    eventually!(WAIT, rt.tls.certificates().len() == 2);
    let stream = handshake(lb.addr(), &connector(&[&api], &[]), "api.example.com")
        .await
        .unwrap();
    assert_eq!(served(&stream), api.der);
}

/// A TLS echo server with `c`'s certificate: what a passthrough pool's
/// backend is (lb never sees inside).
async fn tls_echo_backend(c: &Cert) -> SocketAddr {
    use rustls::pki_types::pem::PemObject;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(c.key.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![c.der.clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = tls.read(&mut buf).await {
                        if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        let _ = tls.flush().await;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn mode_tcp_routes_by_sni_without_terminating() {
    let a = cert(&["a.test"]);
    let other = cert(&["other.test"]);
    let a_addr = tls_echo_backend(&a).await;
    let other_addr = tls_echo_backend(&other).await;
    let lb = TlsLb::start(
        &format!(
            "mode: tcp\npools:\n  a: {{backends: [{{address: {a_addr}}}]}}\n  other: {{backends: [{{address: {other_addr}}}]}}\nroutes:\n  - {{sni: a.test, pool: a}}\n  - {{pool: other}}\n"
        ),
        &[],
    )
    .await;
    // Each client trusts only the backend it should reach: end to end TLS
    // with that backend's certificate, through lb.
    for (sni, expect) in [
        ("a.test", &a),
        ("A.test", &a),
        ("other.test", &other),
        ("x.test", &other),
    ] {
        // x.test: a name no certificate has, so look without verifying.
        let connector = if sni == "x.test" {
            insecure_connector()
        } else {
            connector(&[expect], &[])
        };
        let mut stream = handshake(lb.addr(), &connector, sni)
            .await
            .unwrap_or_else(|e| panic!("{sni}: {e}"));
        assert_eq!(served(&stream), expect.der, "{sni}");
        stream.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }
    // Not TLS: closed, nothing relayed.
    let mut plain = TcpStream::connect(lb.addr()).await.unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(WAIT), plain.read_to_end(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
}

/// A plain TCP server that answers every connection with `name`.
async fn named_tcp_backend(name: &'static str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4];
                if tcp.read_exact(&mut buf).await.is_ok() {
                    let _ = tcp.write_all(name.as_bytes()).await;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn mode_tcp_with_tls_terminates_and_routes_by_the_sessions_name() {
    let db = named_tcp_backend("db").await;
    let rest = named_tcp_backend("rest").await;
    let c = cert(&["db.example.com", "*.example.com"]);
    let lb = TlsLb::start(
        &format!(
            "mode: tcp\ntls:\n  certificates:\n{ONE_PAIR}pools:\n  db: {{backends: [{{address: {db}}}]}}\n  rest: {{backends: [{{address: {rest}}}]}}\nroutes:\n  - {{sni: db.example.com, pool: db}}\n  - {{pool: rest}}\n"
        ),
        &[("tls/server.crt", &c.cert), ("tls/server.key", &c.key)],
    )
    .await;
    for (sni, expect) in [("db.example.com", "db"), ("web.example.com", "rest")] {
        let mut stream = handshake(lb.addr(), &connector(&[&c], &[]), sni)
            .await
            .unwrap();
        // lb's certificate: it terminated TLS; the backend got plaintext.
        assert_eq!(served(&stream), c.der);
        stream.write_all(b"ping").await.unwrap();
        let mut got = Vec::new();
        let _ = stream.read_to_end(&mut got).await;
        assert_eq!(String::from_utf8_lossy(&got), expect, "{sni}");
    }
}

#[test]
fn check_lists_the_certificates_with_their_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let c = cert(&["api.example.com", "*.example.com"]);
    write(dir.path(), "s.crt", &c.cert);
    write(dir.path(), "s.key", &c.key);
    let path = write(
        dir.path(),
        "config.yaml",
        "tls:\n  certificates:\n    - {cert: s.crt, key: s.key}\nbackends:\n  - address: 127.0.0.1:9\n",
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(["--config", path.to_str().unwrap(), "--check"])
        .env_clear()
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("certificates (the first is the default):"),
        "{stdout}"
    );
    assert!(
        stdout.contains("s.crt: api.example.com, *.example.com (not after "),
        "{stdout}"
    );
    assert!(stdout.contains("days left)"), "{stdout}");
}

#[tokio::test]
async fn status_and_metrics_show_each_certificate() {
    let backend = Backend::start("b1").await;
    let c = cert(&["api.example.com"]);
    let lb = TlsLb::one_pair(&backend, &c, "admin: 127.0.0.1:0\n").await;
    let admin = lb.lb.admin_addr().expect("admin listener");
    let status = get(&client(), &format!("http://{admin}/status")).await;
    let json: serde_json::Value = serde_json::from_str(&status.text()).unwrap();
    let first = &json["tls"]["certificates"][0];
    assert_eq!(first["names"][0], "api.example.com", "{json}");
    assert!(
        first["cert"].as_str().unwrap().ends_with("tls/server.crt"),
        "{json}"
    );
    assert!(first["not_after"].as_str().is_some(), "{json}");
    assert!(first["error"].is_null(), "{json}");
    let metrics = get(&client(), &format!("http://{admin}/metrics"))
        .await
        .text();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("lb_tls_certificate_expiry_seconds{"))
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(line.contains("name=\"api.example.com\""), "{line}");
    let expiry: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(expiry > now, "{line}");
}

// ---- Several listeners (issue 17 item 3) ----

/// `GET path` with `host` to a plain-HTTP `addr`.
async fn plain_get(addr: SocketAddr, host: &str, path: &str) -> Answer {
    send(
        &client(),
        Request::get(format!("http://{addr}{path}"))
            .header("host", host)
            .body(Full::default())
            .unwrap(),
    )
    .await
}

/// A listener's bound address once lb has it (a reload adds listeners).
async fn bound(lb: &TlsLb, name: &str) -> SocketAddr {
    eventually!(WAIT, lb.lb.local_addr_of(name).is_some());
    lb.lb.local_addr_of(name).unwrap()
}

/// A config directory holding `c` as `tls/server.crt` and `tls/server.key`.
fn dir_with_pair(c: &Cert) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("tls")).unwrap();
    write(dir.path(), "tls/server.crt", &c.cert);
    write(dir.path(), "tls/server.key", &c.key);
    dir
}

fn listeners_yaml(api: &Backend, web: &Backend, extra_listener: &str) -> String {
    format!(
        "listeners:\n\
         \x20 - {{name: web, address: 127.0.0.1:0}}\n\
         \x20 - {{name: websecure, address: 127.0.0.1:0, tls: {{certificates: [{{cert: tls/server.crt, key: tls/server.key}}]}}}}\n\
         \x20 - {{name: plain-redirect, address: 127.0.0.1:0, redirect_https: 8443}}\n\
         {extra_listener}\
         pools:\n\
         \x20 api: {{backends: [{{address: {}}}]}}\n\
         \x20 web: {{backends: [{{address: {}}}]}}\n\
         routes:\n\
         \x20 - {{path_prefix: /api, pool: api, listeners: [websecure]}}\n\
         \x20 - {{pool: web}}\n",
        api.addr, web.addr
    )
}

#[tokio::test]
async fn listeners_each_serve_their_routes_and_the_redirect_answers_308() {
    let (api, web, c) = (
        Backend::start("api").await,
        Backend::start("web").await,
        cert(&["api.example.com"]),
    );
    let dir = dir_with_pair(&c);
    let lb = TlsLb::start_exact(dir, &listeners_yaml(&api, &web, "")).await;
    let (plain, secure, redirect) = (
        bound(&lb, "web").await,
        bound(&lb, "websecure").await,
        bound(&lb, "plain-redirect").await,
    );
    // /api is websecure's only: on web the catch-all serves it.
    let on_web = plain_get(plain, "api.example.com", "/api/x").await;
    assert_eq!(on_web.status, 200);
    assert_eq!(on_web.body, "web");
    let stream = handshake(secure, &connector(&[&c], &[]), "api.example.com")
        .await
        .unwrap();
    assert_eq!(get_over(stream, "/api/x").await, (200, "api".to_owned()));
    // The redirect: same host (port dropped) and target, the HTTPS port.
    let moved = plain_get(redirect, "shop.example.com:8081", "/cart?id=7").await;
    assert_eq!(moved.status, 308, "{:?}", moved.body);
    assert_eq!(
        moved.headers["location"],
        "https://shop.example.com:8443/cart?id=7"
    );
    assert_eq!(
        api.hits() + web.hits(),
        2,
        "the redirect reached no backend"
    );
    // Plaintext to the TLS listener is no request.
    let mut raw = TcpStream::connect(secure).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(WAIT), raw.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
}

#[tokio::test]
async fn listeners_are_added_moved_and_removed_by_reload() {
    let (api, web, c) = (
        Backend::start("api").await,
        Backend::start("web").await,
        cert(&["api.example.com"]),
    );
    let dir = dir_with_pair(&c);
    let lb = TlsLb::start_exact(dir, &listeners_yaml(&api, &web, "")).await;
    let rt = lb.lb.runtime();
    let applied = || rt.reloads.applied.load(std::sync::atomic::Ordering::SeqCst);
    let web_at = bound(&lb, "web").await;
    // An open keep-alive connection on the listener that will go.
    let redirect_at = bound(&lb, "plain-redirect").await;
    let mut kept = TcpStream::connect(redirect_at).await.unwrap();
    kept.write_all(b"GET / HTTP/1.1\r\nhost: a.test\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    kept.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 308");
    // Added: `extra`; removed: `plain-redirect`.
    let before = applied();
    let yaml = listeners_yaml(&api, &web, "  - {name: extra, address: 127.0.0.1:0}\n").replace(
        "  - {name: plain-redirect, address: 127.0.0.1:0, redirect_https: 8443}\n",
        "",
    );
    rename_over(lb.dir.path(), "config.yaml", &yaml);
    eventually!(WAIT, applied() > before);
    let extra = bound(&lb, "extra").await;
    assert_eq!(plain_get(extra, "a.test", "/").await.body, "web");
    assert!(lb.lb.local_addr_of("plain-redirect").is_none());
    // Its socket is closed, and its open connection was drained.
    eventually!(WAIT, TcpStream::connect(redirect_at).await.is_err());
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(WAIT), kept.read_to_end(&mut rest)).await;
    assert!(
        matches!(ended, Ok(Ok(_)) | Ok(Err(_))),
        "the removed listener's connection stays open"
    );
    // Unchanged: `web` kept its socket.
    assert_eq!(lb.lb.local_addr_of("web"), Some(web_at));
    // Moved: `web` to a new port, the old one closed.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let new_port = free.local_addr().unwrap();
    drop(free);
    let before = applied();
    rename_over(
        lb.dir.path(),
        "config.yaml",
        &yaml.replace(
            "{name: web, address: 127.0.0.1:0}",
            &format!("{{name: web, address: {new_port}}}"),
        ),
    );
    // Waited for, not read once: a reload still settling from the last
    // rename may be what `applied` counted.
    eventually!(WAIT, applied() > before);
    eventually!(WAIT, lb.lb.local_addr_of("web") == Some(new_port));
    assert_eq!(plain_get(new_port, "a.test", "/").await.body, "web");
    eventually!(WAIT, TcpStream::connect(web_at).await.is_err());
    // A mode change by name is refused whole; the old config serves on.
    let rejected = rt
        .reloads
        .rejected
        .load(std::sync::atomic::Ordering::SeqCst);
    rename_over(
        lb.dir.path(),
        "config.yaml",
        &yaml.replace(
            "{name: extra, address: 127.0.0.1:0}",
            "{name: extra, address: 127.0.0.1:0, mode: tcp, pool: web}",
        ),
    );
    eventually!(
        WAIT,
        rt.reloads
            .rejected
            .load(std::sync::atomic::Ordering::SeqCst)
            > rejected
    );
    let error = rt.reloads.last().error.unwrap_or_default();
    assert!(
        error.contains("listener extra cannot change from http to tcp"),
        "{error}"
    );
    assert_eq!(plain_get(extra, "a.test", "/").await.body, "web");
}

#[tokio::test]
async fn a_tcp_listener_names_its_pool_and_another_routes_by_sni_beside_http() {
    let db = named_tcp_backend("db__").await;
    let a = cert(&["a.test"]);
    let other = cert(&["other.test"]);
    let a_addr = tls_echo_backend(&a).await;
    let other_addr = tls_echo_backend(&other).await;
    let web = Backend::start("web").await;
    let lb = TlsLb::start_exact(
        tempfile::tempdir().unwrap(),
        &format!(
            "listeners:\n\
             \x20 - {{name: web, address: 127.0.0.1:0}}\n\
             \x20 - {{name: postgres, address: 127.0.0.1:0, mode: tcp, pool: db}}\n\
             \x20 - {{name: passthrough, address: 127.0.0.1:0, mode: tcp, routes: [{{sni: a.test, pool: a}}, {{pool: other}}]}}\n\
             pools:\n\
             \x20 db: {{backends: [{{address: {db}}}]}}\n\
             \x20 a: {{backends: [{{address: {a_addr}}}]}}\n\
             \x20 other: {{backends: [{{address: {other_addr}}}]}}\n\
             \x20 web: {{backends: [{{address: {}}}]}}\n\
             routes:\n\
             \x20 - {{pool: web}}\n",
            web.addr
        ),
    )
    .await;
    let mut pg = TcpStream::connect(bound(&lb, "postgres").await)
        .await
        .unwrap();
    pg.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    pg.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"db__");
    let passthrough = bound(&lb, "passthrough").await;
    for (sni, expect) in [("a.test", &a), ("other.test", &other)] {
        let stream = handshake(passthrough, &connector(&[expect], &[]), sni)
            .await
            .unwrap_or_else(|e| panic!("{sni}: {e}"));
        // The backend's own certificate: lb never terminated.
        assert_eq!(served(&stream), expect.der, "{sni}");
    }
    let answer = plain_get(bound(&lb, "web").await, "x.test", "/").await;
    assert_eq!(answer.body, "web");
}

#[test]
fn listeners_config_mistakes_are_errors_at_their_key() {
    let dir = tempfile::tempdir().unwrap();
    let pools = "pools:\n  a: {backends: [{address: 127.0.0.1:9001}]}\n";
    for (yaml, want) in [
        (
            format!("listen: 127.0.0.1:8080\nlisteners:\n  - {{name: web, address: 127.0.0.1:8081}}\n{pools}"),
            "listen: cannot be used with listeners:",
        ),
        (
            format!("listeners:\n  - {{name: web, address: 127.0.0.1:8081}}\n{pools}routes:\n  - {{pool: a, listeners: [wbe]}}\n"),
            "routes[0].listeners: no http listener named \"wbe\"",
        ),
        (
            format!("listeners:\n  - {{name: pg, address: 127.0.0.1:5432, mode: tcp}}\n{pools}"),
            "listeners[0]: a tcp listener needs pool: NAME",
        ),
        (
            format!("listeners:\n  - {{name: web, address: 127.0.0.1:8081}}\n  - {{name: web, address: 127.0.0.1:8082}}\n{pools}"),
            "listeners[1].name: \"web\" names two listeners",
        ),
        (
            format!("listeners:\n  - {{name: a, address: 127.0.0.1:8081}}\n  - {{name: b, address: 127.0.0.1:8081}}\n{pools}"),
            "listeners[1].address: 127.0.0.1:8081 is also the address of listener a",
        ),
        (
            format!("listeners:\n  - {{name: pg, address: 127.0.0.1:5432, mode: tcp, pool: b}}\n{pools}"),
            "listeners[0].pool: no pool named \"b\"",
        ),
        (
            format!("listeners:\n  - {{name: r, address: 127.0.0.1:80, redirect_https: 70000}}\n{pools}"),
            "listeners[0].redirect_https: 70000 is not a port",
        ),
    ] {
        let path = write(dir.path(), "config.yaml", &yaml);
        let err = lb::config::Config::load(&path).unwrap_err().to_string();
        assert!(err.contains(want), "{yaml}\nwant {want}\ngot  {err}");
        // At the key's line in the file.
        assert!(err.contains("config.yaml:"), "{err}");
    }
}

#[tokio::test]
async fn a_reload_whose_new_listener_cannot_serve_is_refused_whole() {
    let (api, web, c) = (
        Backend::start("api").await,
        Backend::start("web").await,
        cert(&["api.example.com"]),
    );
    let other = cert(&["other.test"]);
    let dir = dir_with_pair(&c);
    // A key that is not the certificate's.
    write(dir.path(), "tls/wrong.key", &other.key);
    let lb = TlsLb::start_exact(dir, &listeners_yaml(&api, &web, "")).await;
    let rt = lb.lb.runtime();
    let rejected = || {
        rt.reloads
            .rejected
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    let web_at = bound(&lb, "web").await;
    // Another process holds this port: the new listener cannot bind.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_at = taken.local_addr().unwrap();
    for (extra, why) in [
        (
            "  - {name: extra, address: 127.0.0.1:0, tls: {certificates: [{cert: tls/server.crt, key: tls/wrong.key}]}}\n".to_owned(),
            "listeners[3].tls.certificates[0]",
        ),
        (
            format!("  - {{name: extra, address: {taken_at}}}\n"),
            "cannot listen on",
        ),
    ] {
        let before = rejected();
        // The same reload also sends everything to `api`: none of it applies.
        let yaml = listeners_yaml(&api, &web, &extra).replace("  - {pool: web}\n", "  - {pool: api}\n");
        rename_over(lb.dir.path(), "config.yaml", &yaml);
        eventually!(WAIT, rejected() > before);
        let error = rt.reloads.last().error.unwrap_or_default();
        assert!(error.contains(why), "want {why}, got {error}");
        assert!(lb.lb.local_addr_of("extra").is_none());
        assert_eq!(plain_get(web_at, "a.test", "/").await.body, "web");
    }
    drop(taken);
}

//! HTTPS to backends: real rustls backends on 127.0.0.1 with certificates
//! rcgen makes at test time (a CA and the leaves it signs), lb in between
//! with a pool's `tls:` (CA, server name, client certificate) and
//! `protocol: h2` / `auto`; CA files rotated while lb runs.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

/// A CA that signs leaves.
struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A leaf for `names` (DNS names or IP addresses), signed by this CA.
    fn leaf(&self, names: &[&str]) -> Leaf {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }
}

struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

/// What the HTTPS backend saw.
#[derive(Default)]
struct Seen {
    /// Per request: its path and HTTP version.
    requests: Mutex<Vec<(String, hyper::Version)>>,
    /// Per handshake: the SNI sent, and whether a client certificate came.
    handshakes: Mutex<Vec<(Option<String>, bool)>>,
}

impl Seen {
    fn versions(&self) -> Vec<hyper::Version> {
        let requests = self.requests.lock().unwrap();
        requests.iter().map(|(_, v)| *v).collect()
    }
}

/// An HTTPS backend serving `leaf`, offering `alpn`; with `client_ca`, it
/// requires a client certificate that CA signed. Answers `secret from
/// backend` to every request.
async fn https_backend(
    leaf: &Leaf,
    alpn: &[&[u8]],
    client_ca: Option<&Ca>,
) -> (SocketAddr, Arc<Seen>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.cert.der().clone()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(
            vec![leaf.der.clone()],
            PrivateKeyDer::try_from(leaf.key_der.clone()).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let seen_by_server = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let seen = Arc::clone(&seen_by_server);
            tokio::spawn(async move {
                // A handshake lb aborts (a certificate it rejects) ends here.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                {
                    let session = tls.get_ref().1;
                    seen.handshakes.lock().unwrap().push((
                        session.server_name().map(str::to_owned),
                        session.peer_certificates().is_some(),
                    ));
                }
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let seen = Arc::clone(&seen);
                        async move {
                            seen.requests
                                .lock()
                                .unwrap()
                                .push((req.uri().path().to_owned(), req.version()));
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                                b"secret from backend",
                            ))))
                        }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// One pool of `backend` with `pool_keys` (indented for `pools.app`).
fn pool_yaml(backend: SocketAddr, pool_keys: &str) -> String {
    format!(
        "outlier_detection: {{consecutive_failures: 0}}\nretry: {{attempts: 1}}\npools:\n  app:\n    backends: [{{address: \"{backend}\"}}]\n{pool_keys}routes:\n  - {{pool: app}}\n"
    )
}

/// Asks until the answer's status is `want`, within a deadline (a file
/// change is applied by a follower that looks within a second).
async fn until_status(t: &TestLb, want: u16) -> Answer {
    let client = client();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let answer = get(&client, &t.url("/")).await;
        if answer.status == want || tokio::time::Instant::now() > deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_backend_signed_by_the_pools_ca_serves_and_is_health_checked_over_tls() {
    let ca = Ca::new("internal CA");
    let leaf = ca.leaf(&["127.0.0.1"]);
    let (addr, seen) = https_backend(&leaf, &[b"http/1.1"], None).await;
    let files = tempfile::tempdir().unwrap();
    let ca_file = write(files.path(), "ca.pem", &ca.pem());
    let t = TestLb::start(&pool_yaml(
        addr,
        &format!(
            "    tls: {{ca: {}}}\n    health_check: {{path: /health, interval: 200ms, timeout: 100ms}}\n",
            ca_file.display()
        ),
    ))
    .await;
    let answer = get(&client(), &t.url("/hello")).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.text(), "secret from backend");
    // The probes speak TLS to the backend as requests do.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !seen
        .requests
        .lock()
        .unwrap()
        .iter()
        .any(|(p, _)| p == "/health")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no health check reached the backend"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(seen
        .versions()
        .iter()
        .all(|v| *v == hyper::Version::HTTP_11));
    // `--check`'s summary names the pool's TLS.
    let summary = t.lb.runtime().snapshot().config.summary();
    assert!(summary.contains("tls (CA "), "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_certificate_from_another_ca_is_a_502_and_never_the_body() {
    let ours = Ca::new("our CA");
    let theirs = Ca::new("someone else's CA");
    let (addr, seen) = https_backend(&theirs.leaf(&["127.0.0.1"]), &[b"http/1.1"], None).await;
    let files = tempfile::tempdir().unwrap();
    let ca_file = write(files.path(), "ca.pem", &ours.pem());
    let t = TestLb::start(&pool_yaml(
        addr,
        &format!("    tls: {{ca: {}}}\n", ca_file.display()),
    ))
    .await;
    let answer = get(&client(), &t.url("/")).await;
    assert_eq!(answer.status, 502);
    assert!(!answer.text().contains("secret"), "{}", answer.text());
    assert!(seen.requests.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_name_is_sent_as_sni_and_verified() {
    let ca = Ca::new("internal CA");
    let (addr, seen) = https_backend(&ca.leaf(&["billing.internal"]), &[b"http/1.1"], None).await;
    let files = tempfile::tempdir().unwrap();
    let ca_file = write(files.path(), "ca.pem", &ca.pem());
    let tls = |name: &str| {
        format!(
            "    tls: {{ca: {}, server_name: {name}}}\n",
            ca_file.display()
        )
    };
    let right = TestLb::start(&pool_yaml(addr, &tls("billing.internal"))).await;
    let answer = get(&client(), &right.url("/")).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(
        seen.handshakes.lock().unwrap()[0].0.as_deref(),
        Some("billing.internal")
    );
    // The certificate is not for the name lb is told to expect.
    let wrong = TestLb::start(&pool_yaml(addr, &tls("payments.internal"))).await;
    let answer = get(&client(), &wrong.url("/")).await;
    assert_eq!(answer.status, 502);
    assert!(!answer.text().contains("secret"), "{}", answer.text());
    // Without server_name, the backend's host (127.0.0.1) is verified:
    // the certificate is not for it either.
    let by_host = TestLb::start(&pool_yaml(
        addr,
        &format!("    tls: {{ca: {}}}\n", ca_file.display()),
    ))
    .await;
    assert_eq!(get(&client(), &by_host.url("/")).await.status, 502);
    assert_eq!(seen.requests.lock().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_to_a_backend_that_requires_a_client_certificate() {
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let lb_leaf = client_ca.leaf(&["lb.internal"]);
    let (addr, seen) = https_backend(
        &server_ca.leaf(&["127.0.0.1"]),
        &[b"http/1.1"],
        Some(&client_ca),
    )
    .await;
    let files = tempfile::tempdir().unwrap();
    let ca_file = write(files.path(), "ca.pem", &server_ca.pem());
    let cert = write(files.path(), "lb.crt", &lb_leaf.cert_pem);
    let key = write(files.path(), "lb.key", &lb_leaf.key_pem);
    // Without a client certificate the backend refuses the handshake.
    let without = TestLb::start(&pool_yaml(
        addr,
        &format!("    tls: {{ca: {}}}\n", ca_file.display()),
    ))
    .await;
    let answer = get(&client(), &without.url("/")).await;
    assert_eq!(answer.status, 502, "{}", answer.text());
    let with = TestLb::start(&pool_yaml(
        addr,
        &format!(
            "    tls:\n      ca: {}\n      client_certificate: {{cert: {}, key: {}}}\n",
            ca_file.display(),
            cert.display(),
            key.display()
        ),
    ))
    .await;
    let answer = get(&client(), &with.url("/")).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.text(), "secret from backend");
    assert!(seen
        .handshakes
        .lock()
        .unwrap()
        .iter()
        .any(|(_, cert)| *cert));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_h2_is_http2_over_tls_and_auto_follows_alpn() {
    let ca = Ca::new("internal CA");
    let leaf = ca.leaf(&["127.0.0.1"]);
    let (both, seen_both) = https_backend(&leaf, &[b"h2", b"http/1.1"], None).await;
    let (h1_only, seen_h1) = https_backend(&leaf, &[b"http/1.1"], None).await;
    let files = tempfile::tempdir().unwrap();
    let ca_file = write(files.path(), "ca.pem", &ca.pem());
    let keys = |protocol: &str| {
        format!(
            "    protocol: {protocol}\n    tls: {{ca: {}}}\n",
            ca_file.display()
        )
    };
    let h2 = TestLb::start(&pool_yaml(both, &keys("h2"))).await;
    let answer = get(&client(), &h2.url("/a")).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let auto = TestLb::start(&pool_yaml(both, &keys("auto"))).await;
    assert_eq!(get(&client(), &auto.url("/b")).await.status, 200);
    assert_eq!(
        seen_both.versions(),
        [hyper::Version::HTTP_2, hyper::Version::HTTP_2]
    );
    // A backend that speaks only HTTP/1.1: auto uses it; h2 cannot.
    let auto = TestLb::start(&pool_yaml(h1_only, &keys("auto"))).await;
    assert_eq!(get(&client(), &auto.url("/c")).await.status, 200);
    assert_eq!(seen_h1.versions(), [hyper::Version::HTTP_11]);
    let h2 = TestLb::start(&pool_yaml(h1_only, &keys("h2"))).await;
    let answer = get(&client(), &h2.url("/d")).await;
    assert_eq!(answer.status, 502);
    assert_eq!(seen_h1.versions().len(), 1);
    // An h2c client's request goes the same way.
    let h2 = TestLb::start(&pool_yaml(both, &keys("h2"))).await;
    let answer = get(&h2c_client(), &h2.url("/e")).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_ca_file_applies_to_new_backend_connections() {
    let old = Ca::new("old CA");
    let new = Ca::new("new CA");
    // The backend already serves a certificate of the new CA.
    let (addr, _seen) = https_backend(&new.leaf(&["127.0.0.1"]), &[b"http/1.1"], None).await;
    let files = tempfile::tempdir().unwrap();
    let ca_file = write(files.path(), "ca.pem", &old.pem());
    let t = TestLb::start(&pool_yaml(
        addr,
        &format!("    tls: {{ca: {}}}\n", ca_file.display()),
    ))
    .await;
    assert_eq!(get(&client(), &t.url("/")).await.status, 502);
    // Half a rotation: a file that is no CA keeps the settings that worked.
    std::fs::write(&ca_file, "not a certificate\n").unwrap();
    // Then the new CA, renamed over the file as tools do.
    let tmp = write(
        files.path(),
        ".ca.pem.tmp",
        &format!("{}{}", old.pem(), new.pem()),
    );
    std::fs::rename(&tmp, &ca_file).unwrap();
    let answer = until_status(&t, 200).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.text(), "secret from backend");
    // No config reload was needed: the config never changed.
    assert_eq!(t.applied(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_skip_verify_accepts_any_certificate() {
    let stranger = Ca::new("unknown CA");
    let (addr, _seen) = https_backend(&stranger.leaf(&["elsewhere"]), &[b"http/1.1"], None).await;
    let t = TestLb::start(&pool_yaml(addr, "    tls: {insecure_skip_verify: true}\n")).await;
    let answer = get(&client(), &t.url("/")).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    // Said at load, at the key's line and column.
    let loaded = lb::config::Config::load_with_warnings(&t.path).unwrap();
    let warnings: Vec<String> = loaded.warnings.iter().map(ToString::to_string).collect();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains(":7:33: pools.app.tls.insecure_skip_verify: pool app: backend certificates are NOT verified")),
        "{warnings:?}"
    );
}

/// What the operator reads: the real binary's log names the backend and
/// what is wrong with its TLS (the client's 502 says only 502).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_says_why_a_backend_handshake_failed() {
    let ours = Ca::new("our CA");
    let theirs = Ca::new("someone else's CA");
    let (stranger, _) = https_backend(&theirs.leaf(&["127.0.0.1"]), &[b"http/1.1"], None).await;
    let (h1_only, _) = https_backend(&ours.leaf(&["127.0.0.1"]), &[b"http/1.1"], None).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write(dir.path(), "ca.pem", &ours.pem());
    let config = write_config(
        dir.path(),
        &format!(
            "listen: 127.0.0.1:0\nretry: {{attempts: 1}}\npools:\n  stranger:\n    tls: {{ca: {ca}}}\n    backends: [{{address: \"{stranger}\"}}]\n  old:\n    protocol: h2\n    tls: {{ca: {ca}}}\n    backends: [{{address: \"{h1_only}\"}}]\nroutes:\n  - {{path_prefix: /stranger, pool: stranger}}\n  - {{path_prefix: /old, pool: old}}\n",
            ca = ca_file.display()
        ),
    );
    let lb = LbProcess::spawn(&["--config", config.to_str().unwrap()], &[]);
    let addr = lb.wait_listening().await;
    for path in ["/stranger", "/old"] {
        let answer = get(&client(), &format!("http://{addr}{path}")).await;
        assert_eq!(answer.status, 502, "{path}: {}", answer.text());
    }
    eventually!(
        10,
        lb.log_text().contains(&format!(
            "TLS handshake with {stranger} failed: invalid peer certificate: UnknownIssuer"
        )),
        "{}",
        lb.log_text()
    );
    eventually!(
        10,
        lb.log_text()
            .contains(&format!("{h1_only} does not speak HTTP/2 over TLS")),
        "{}",
        lb.log_text()
    );
}

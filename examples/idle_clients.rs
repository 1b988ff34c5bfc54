//! Opens N keep-alive connections to a proxy, sends one `GET /` on each,
//! reads its answer, then holds them all idle: what `bench/compare.sh`
//! uses to measure memory per idle connection.
//!
//! ```text
//! cargo run --release --example idle_clients -- 127.0.0.1:18080 2000
//! cargo run --release --example idle_clients -- 127.0.0.1:18443 2000 --tls server.crt
//! ```
//!
//! With `--tls ROOTS`, each connection is HTTPS: a full TLS handshake
//! (rustls, no session resumption) verified against the PEM certificates in
//! ROOTS for the address's IP (the certificate needs that IP in its SAN).
//!
//! Prints `ready N` once every connection has had its answer, then sleeps
//! until killed. Exits 1 if a connection fails.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Connections being opened at once: the proxies' accept queues hold this.
const BATCH: usize = 200;

/// A connection held open: only dropped, never read again.
#[allow(dead_code)]
enum Held {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(addr), Some(n)) = (args.next(), args.next()) else {
        usage();
    };
    let tls = match (args.next().as_deref(), args.next()) {
        (None, _) => None,
        (Some("--tls"), Some(roots)) => Some(connector(&roots)),
        _ => usage(),
    };
    let addr: SocketAddr = addr.parse().expect("ADDR is host:port");
    let n: usize = n.parse().expect("N is a number");
    let mut held = Vec::with_capacity(n);
    let mut opened = 0;
    while opened < n {
        let mut batch = JoinSet::new();
        for _ in 0..BATCH.min(n - opened) {
            batch.spawn(one(addr, tls.clone()));
        }
        while let Some(done) = batch.join_next().await {
            match done {
                Ok(Ok(s)) => held.push(s),
                Ok(Err(e)) => {
                    eprintln!("connection {} failed: {e}", held.len());
                    std::process::exit(1);
                }
                Err(e) => panic!("{e}"),
            }
        }
        opened = held.len();
    }
    println!("ready {}", held.len());
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

fn usage() -> ! {
    eprintln!("usage: idle_clients ADDR N [--tls ROOTS_PEM]");
    std::process::exit(2);
}

/// A TLS client trusting the certificates in `roots`, resuming no session:
/// every connection makes a full handshake, and the server keeps whatever
/// state a fresh connection costs it.
fn connector(roots: &str) -> TlsConnector {
    let mut store = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(roots).expect("ROOTS_PEM is readable PEM") {
        store
            .add(cert.expect("ROOTS_PEM holds certificates"))
            .expect("a usable root certificate");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .with_root_certificates(store)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsConnector::from(Arc::new(config))
}

async fn one(addr: SocketAddr, tls: Option<TlsConnector>) -> std::io::Result<Held> {
    let mut s = TcpStream::connect(addr).await?;
    match tls {
        None => {
            exchange(&mut s).await?;
            Ok(Held::Plain(s))
        }
        Some(tls) => {
            let mut s = tls
                .connect(ServerName::IpAddress(addr.ip().into()), s)
                .await?;
            exchange(&mut s).await?;
            Ok(Held::Tls(Box::new(s)))
        }
    }
}

/// One `GET /` and its 200 answer.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> std::io::Result<()> {
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        .await?;
    s.flush().await?;
    let mut buf = [0u8; 4096];
    let mut got = Vec::new();
    // The answers are small: the whole response in a read or two.
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let k = s.read(&mut buf).await?;
        if k == 0 {
            return Err(std::io::Error::other("closed before answering"));
        }
        got.extend_from_slice(&buf[..k]);
    }
    if !got.starts_with(b"HTTP/1.1 200") {
        return Err(std::io::Error::other(
            String::from_utf8_lossy(&got).into_owned(),
        ));
    }
    Ok(())
}

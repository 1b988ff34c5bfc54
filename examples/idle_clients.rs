//! Opens N keep-alive connections to a proxy, sends one `GET /` on each,
//! reads its answer, then holds them all idle: what `bench/compare.sh`
//! uses to measure memory per idle connection.
//!
//! ```text
//! cargo run --release --example idle_clients -- 127.0.0.1:18080 2000
//! ```
//!
//! Prints `ready N` once every connection has had its answer, then sleeps
//! until killed. Exits 1 if a connection fails.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// Connections being opened at once: the proxies' accept queues hold this.
const BATCH: usize = 200;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(addr), Some(n)) = (args.next(), args.next()) else {
        eprintln!("usage: idle_clients ADDR N");
        std::process::exit(2);
    };
    let addr: SocketAddr = addr.parse().expect("ADDR is host:port");
    let n: usize = n.parse().expect("N is a number");
    let mut held = Vec::with_capacity(n);
    let mut opened = 0;
    while opened < n {
        let mut batch = JoinSet::new();
        for _ in 0..BATCH.min(n - opened) {
            batch.spawn(one(addr));
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

async fn one(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        .await?;
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
    Ok(s)
}

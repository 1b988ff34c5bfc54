//! TCP echo backends and load generator for `bench/compare.sh tcp`.
//!
//! ```text
//! tcp_bench echo 19001 19002 19003           # echo servers on 127.0.0.1
//! tcp_bench rate 127.0.0.1:18080 --duration 5s --concurrency 32 --size 1024
//! tcp_bench transfer 127.0.0.1:18080 --bytes 1GiB
//! ```
//!
//! * `echo`: every port echoes what it reads and closes after the client's
//!   FIN (so the proxy in between must pass half-closes on).
//! * `rate`: `--concurrency` loops, each doing connect, write `--size`
//!   bytes, read them back, close, for `--duration`. Prints one line:
//!   `rate conns=N errors=E secs=S conns_per_sec=R`.
//! * `transfer`: one connection writes `--bytes` while reading the echo
//!   back. Prints `transfer bytes=N secs=S mib_per_sec=R`.
//!
//! Loopback only by intent: addresses are whatever you pass, ports on
//! 127.0.0.1 for `echo`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

#[derive(Parser)]
#[command(about = "TCP echo backends and load generator for bench/compare.sh tcp")]
struct Args {
    /// What to run.
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Echo servers on 127.0.0.1, one per port.
    Echo {
        /// Ports on 127.0.0.1, one echo server each.
        ports: Vec<u16>,
    },
    /// Connections per second: connect, echo `size` bytes, close.
    Rate {
        /// The proxy or backend to connect to.
        target: SocketAddr,
        /// How long to keep connecting.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Connect-echo-close loops running at once.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Bytes echoed per connection.
        #[arg(long, default_value_t = 1024)]
        size: usize,
    },
    /// Throughput of one connection echoing `bytes`.
    Transfer {
        /// The proxy or backend to connect to.
        target: SocketAddr,
        /// Bytes sent (and read back): a number or 512MiB, 1GiB.
        #[arg(long, default_value = "1GiB", value_parser = parse_size)]
        bytes: u64,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("bad size {s:?}"))?;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        _ => return Err(format!("bad unit in {s:?}")),
    };
    Ok(n * mult)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    match Args::parse().command {
        Command::Echo { ports } => echo(ports).await,
        Command::Rate {
            target,
            duration,
            concurrency,
            size,
        } => {
            rate(target, duration, concurrency, size).await;
            Ok(())
        }
        Command::Transfer { target, bytes } => transfer(target, bytes).await,
    }
}

async fn echo(ports: Vec<u16>) -> std::io::Result<()> {
    let mut servers = tokio::task::JoinSet::new();
    for port in ports {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        servers.spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    let (mut rx, mut tx) = stream.split();
                    let _ = tokio::io::copy(&mut rx, &mut tx).await;
                    let _ = tx.shutdown().await;
                });
            }
        });
    }
    while servers.join_next().await.is_some() {}
    Ok(())
}

async fn rate(target: SocketAddr, duration: Duration, concurrency: usize, size: usize) {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (done, errors, stop) = (done.clone(), errors.clone(), stop.clone());
        workers.spawn(async move {
            let payload = vec![b'x'; size];
            let mut back = vec![0u8; size];
            while !stop.load(Relaxed) {
                match one_echo(target, &payload, &mut back).await {
                    Ok(()) => done.fetch_add(1, Relaxed),
                    Err(_) => errors.fetch_add(1, Relaxed),
                };
            }
        });
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Relaxed);
    while workers.join_next().await.is_some() {}
    let secs = started.elapsed().as_secs_f64();
    let n = done.load(Relaxed);
    println!(
        "rate conns={n} errors={} secs={secs:.2} conns_per_sec={:.0}",
        errors.load(Relaxed),
        n as f64 / secs
    );
}

async fn one_echo(target: SocketAddr, payload: &[u8], back: &mut [u8]) -> std::io::Result<()> {
    let exchange = async {
        let mut stream = TcpStream::connect(target).await?;
        stream.set_nodelay(true)?;
        stream.write_all(payload).await?;
        stream.read_exact(back).await?;
        Ok::<_, std::io::Error>(())
    };
    match tokio::time::timeout(Duration::from_secs(5), exchange).await {
        Ok(result) => result,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

async fn transfer(target: SocketAddr, bytes: u64) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(target).await?;
    let started = Instant::now();
    let (mut rx, mut tx) = stream.split();
    let write = async {
        let chunk = vec![b'x'; 256 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            tx.write_all(&chunk[..n]).await?;
            left -= n as u64;
        }
        tx.shutdown().await
    };
    let read = async {
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0u64;
        loop {
            let n = rx.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(got);
            }
            got += n as u64;
        }
    };
    let ((), got) = tokio::try_join!(write, read)?;
    let secs = started.elapsed().as_secs_f64();
    if got != bytes {
        eprintln!("transfer: sent {bytes} bytes, read back {got}");
        std::process::exit(1);
    }
    println!(
        "transfer bytes={bytes} secs={secs:.2} mib_per_sec={:.0}",
        bytes as f64 / secs / (1 << 20) as f64
    );
    Ok(())
}

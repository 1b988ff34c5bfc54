//! The floor: the least work a tokio HTTP/1 proxy can do per request, to
//! measure what this machine allows before any proxy logic.
//!
//! ```text
//! cargo run --release --example floor -- 127.0.0.1:18085 127.0.0.1:19001 127.0.0.1:19002
//! ```
//!
//! It is not a proxy anyone should run. Per worker thread (one per CPU, as
//! lb's workers): a `current_thread` runtime and its own `SO_REUSEPORT`
//! listener. Per client connection: one read of a bodiless request head
//! (checked complete with `httparse`), which is written unchanged to the next
//! backend in round-robin order over a connection this client connection
//! keeps for that backend, then one response head parsed for its
//! `Content-Length` and the response relayed in as few reads and writes as
//! it arrives in. No header rewriting, no timeouts, no health, no retries,
//! no accounting, no pool shared between client connections: every cost
//! left is tokio's, the kernel's and the loopback's. `bench/compare.sh`
//! runs it with `FLOOR=1` beside lb, nginx and HAProxy, so that lb's CPU
//! per request can be read against both nginx and this floor.
//!
//! Anything it does not expect (a request body, chunked responses, a
//! backend that closes) ends the client connection.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn main() {
    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = args
        .next()
        .and_then(|a| a.parse().ok())
        .expect("usage: floor LISTEN BACKEND...");
    let backends: Vec<SocketAddr> = args
        .map(|a| a.parse().expect("a backend address"))
        .collect();
    assert!(!backends.is_empty(), "usage: floor LISTEN BACKEND...");
    let backends: &'static [SocketAddr] = backends.leak();
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads: Vec<_> = (0..workers)
        .map(|_| std::thread::spawn(move || worker(listen, backends)))
        .collect();
    for thread in threads {
        thread.join().expect("worker panicked");
    }
}

/// One worker: its own runtime and its own `SO_REUSEPORT` listener.
fn worker(listen: SocketAddr, backends: &'static [SocketAddr]) {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(listen),
        socket2::Type::STREAM,
        None,
    )
    .expect("socket");
    socket.set_reuse_address(true).expect("SO_REUSEADDR");
    socket.set_reuse_port(true).expect("SO_REUSEPORT");
    socket.set_nonblocking(true).expect("O_NONBLOCK");
    socket.bind(&listen.into()).expect("bind");
    socket.listen(4096).expect("listen");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let listener = TcpListener::from_std(socket.into()).expect("listener");
        let mut next = 0usize;
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            let _ = client.set_nodelay(true);
            // Spread client connections' first backend over the pool.
            next = next.wrapping_add(1);
            tokio::spawn(connection(client, backends, next));
        }
    });
}

/// One client connection: request heads out, responses back, until either
/// side closes or sends what the floor does not handle.
async fn connection(mut client: TcpStream, backends: &'static [SocketAddr], mut next: usize) {
    let mut upstreams: Vec<Option<TcpStream>> = backends.iter().map(|_| None).collect();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // The request head, in as many reads as it takes (usually one).
        let mut len = 0;
        loop {
            let Ok(n) = client.read(&mut buf[len..]).await else {
                return;
            };
            if n == 0 {
                return;
            }
            len += n;
            let mut headers = [httparse::EMPTY_HEADER; 32];
            match httparse::Request::new(&mut headers).parse(&buf[..len]) {
                Ok(httparse::Status::Complete(head)) if head == len => break,
                Ok(httparse::Status::Partial) if len < buf.len() => continue,
                _ => return,
            }
        }
        next = next.wrapping_add(1);
        let index = next % backends.len();
        let upstream = match &mut upstreams[index] {
            Some(upstream) => upstream,
            slot => {
                let Ok(stream) = TcpStream::connect(backends[index]).await else {
                    return;
                };
                let _ = stream.set_nodelay(true);
                slot.insert(stream)
            }
        };
        if upstream.write_all(&buf[..len]).await.is_err() {
            return;
        }
        // The response: its head for the length, then relay what arrives.
        let mut len = 0;
        let total = loop {
            let Ok(n) = upstream.read(&mut buf[len..]).await else {
                return;
            };
            if n == 0 {
                return;
            }
            len += n;
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut headers);
            match response.parse(&buf[..len]) {
                Ok(httparse::Status::Complete(head)) => {
                    let Some(body) = response
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                        .and_then(|h| {
                            std::str::from_utf8(h.value)
                                .ok()?
                                .trim()
                                .parse::<usize>()
                                .ok()
                        })
                    else {
                        return;
                    };
                    break head + body;
                }
                Ok(httparse::Status::Partial) if len < buf.len() => continue,
                _ => return,
            }
        };
        let mut sent = 0;
        loop {
            let end = len.min(total);
            if client.write_all(&buf[..end]).await.is_err() {
                return;
            }
            sent += end;
            if sent >= total {
                break;
            }
            let Ok(n) = upstream
                .read(&mut buf[..(total - sent).min(16 * 1024)])
                .await
            else {
                return;
            };
            if n == 0 {
                return;
            }
            len = n;
        }
    }
}

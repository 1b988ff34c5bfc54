//! What one HTTP/2 client connection may hold: a stream whose client never
//! opens its window is reset after `timeouts.client_send` and its backend
//! request released (issue 20, item 1), a client that opens it slowly but
//! steadily is served, and `limits.h2_max_concurrent_streams` caps the
//! streams (and so the backend requests) of one connection.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use hyper::body::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A raw HTTP/1.1 backend answering every request with `len` filler bytes,
/// counting its connections. Its write blocks once lb stops reading.
struct BigBackend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
}

impl BigBackend {
    async fn start(len: usize) -> BigBackend {
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (a, c) = (Arc::clone(&accepted), Arc::clone(&closed));
        let addr = raw_server(move |mut s| {
            let (accepted, closed) = (Arc::clone(&a), Arc::clone(&c));
            async move {
                accepted.fetch_add(1, SeqCst);
                serve_big(&mut s, len).await;
                closed.fetch_add(1, SeqCst);
            }
        })
        .await;
        BigBackend {
            addr,
            accepted,
            closed,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(SeqCst)
    }

    /// Connections lb has not closed yet.
    fn open(&self) -> usize {
        self.accepted() - self.closed.load(SeqCst)
    }
}

/// One response of `len` bytes, then waits for lb to close the connection.
async fn serve_big(s: &mut TcpStream, len: usize) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n");
    if s.write_all(head.as_bytes()).await.is_err() || write_filler(s, len as u64).await.is_err() {
        return;
    }
    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
}

/// An h2c (prior knowledge) client connection whose streams start with
/// `window` bytes of receive window; its frames (PING answers included)
/// are driven on a task of their own.
async fn h2c_connect(addr: SocketAddr, window: u32) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(window)
        .handshake::<_, Bytes>(tcp)
        .await
        .expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// Sends `GET path` on a new stream and waits for the response head.
async fn h2_get(
    client: h2::client::SendRequest<Bytes>,
    lb: &TestLb,
    path: &str,
) -> (h2::client::SendRequest<Bytes>, h2::client::ResponseFuture) {
    let mut client = client.ready().await.expect("connection refused a stream");
    let req = hyper::Request::get(lb.url(path)).body(()).unwrap();
    let (resp, _) = client.send_request(req, true).expect("stream not sent");
    (client, resp)
}

/// Bigger than what lb and the sockets between it and the backend buffer,
/// so a response nobody takes keeps the backend's write blocked.
const BIG: usize = 8 << 20;

#[tokio::test]
async fn h2_stream_whose_window_never_opens_is_reset_and_frees_the_backend() {
    const STREAMS: usize = 20;
    let backend = BigBackend::start(BIG).await;
    let lb = TestLb::start(&format!(
        "timeouts:\n  client_send: 1s\nbackends:\n  - address: {}\n",
        backend.addr
    ))
    .await;
    // SETTINGS_INITIAL_WINDOW_SIZE=0 and never a WINDOW_UPDATE; PINGs are
    // answered (by h2's connection task).
    let mut client = h2c_connect(lb.lb.local_addr(), 0).await;
    let mut pending = Vec::new();
    for _ in 0..STREAMS {
        let (c, resp) = h2_get(client, &lb, "/big").await;
        client = c;
        pending.push(resp);
    }
    let mut bodies = Vec::new();
    for resp in pending {
        let resp = tokio::time::timeout(Duration::from_secs(WAIT), resp)
            .await
            .expect("no response head")
            .expect("stream failed before its head");
        assert_eq!(resp.status(), 200);
        bodies.push(resp.into_body());
    }
    let runtime = lb.lb.runtime();
    let state = Arc::clone(&runtime.snapshot().first_pool().backends[0].state);
    assert_eq!(state.requests(), STREAMS as u64);
    for mut body in bodies {
        match tokio::time::timeout(Duration::from_secs(WAIT), body.data()).await {
            Ok(Some(Err(e))) => assert_eq!(e.reason(), Some(h2::Reason::CANCEL), "{e}"),
            Ok(other) => panic!("expected RST_STREAM, got {other:?}"),
            Err(_) => panic!("stream not reset within {WAIT}s"),
        }
    }
    eventually!(WAIT, state.in_flight() == 0, "backend still held");
    eventually!(
        WAIT,
        backend.open() == 0,
        "{} backend connections kept",
        backend.open()
    );
    assert_eq!(backend.accepted(), STREAMS);
    nobody_blamed(&lb);
    let metrics = lb::admin::exposition::render(runtime);
    assert!(
        metrics.contains(&format!("lb_client_send_timeouts_total {STREAMS}")),
        "{metrics}"
    );
    // The connection itself is not the one cut: a new stream is served.
    let (_client, resp) = h2_get(client, &lb, "/again").await;
    let resp = tokio::time::timeout(Duration::from_secs(WAIT), resp)
        .await
        .expect("no response head on the same connection")
        .expect("connection gone");
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn h2_client_opening_its_window_slowly_gets_the_whole_body() {
    const LEN: usize = 2 << 20;
    let backend = BigBackend::start(LEN).await;
    let lb = TestLb::start(&format!(
        "timeouts:\n  client_send: 3s\n  backend_body: 3s\nbackends:\n  - address: {}\n",
        backend.addr
    ))
    .await;
    const WINDOW: usize = 16 * 1024;
    let client = h2c_connect(lb.lb.local_addr(), WINDOW as u32).await;
    let (_client, resp) = h2_get(client, &lb, "/big").await;
    let resp = tokio::time::timeout(Duration::from_secs(WAIT), resp)
        .await
        .expect("no response head")
        .expect("stream failed");
    let mut body = resp.into_body();
    let (mut got, mut unreleased) = (0, 0);
    // 128 windows of 16 KiB, each opened 50 ms after the last one filled:
    // the whole transfer takes longer than client_send, no wait comes near it.
    loop {
        let chunk = match tokio::time::timeout(Duration::from_secs(WAIT), body.data()).await {
            Ok(Some(chunk)) => chunk.unwrap_or_else(|e| panic!("cut after {got} bytes: {e}")),
            Ok(None) => break,
            Err(_) => panic!("stuck after {got} bytes"),
        };
        got += chunk.len();
        unreleased += chunk.len();
        if unreleased >= WINDOW {
            tokio::time::sleep(Duration::from_millis(50)).await;
            body.flow_control().release_capacity(unreleased).unwrap();
            unreleased = 0;
        }
    }
    assert_eq!(got, LEN);
    nobody_blamed(&lb);
    let metrics = lb::admin::exposition::render(lb.lb.runtime());
    assert!(
        metrics.contains("lb_client_send_timeouts_total 0"),
        "{metrics}"
    );
}

// Raw HTTP/2 frames (RFC 9113 §4), for a client that ignores what the
// server advertises.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
const REFUSED_STREAM: u32 = 0x7;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A `GET path` header block in HPACK (RFC 7541): static-table entries for
/// `:method GET` and `:scheme http`, literals without indexing (no Huffman)
/// for `:path` and `:authority`.
fn get_header_block(authority: &str, path: &str) -> Vec<u8> {
    let mut block = vec![0x82, 0x86];
    for (name_index, value) in [(4u8, path), (1u8, authority)] {
        assert!(value.len() < 127);
        block.push(name_index);
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    block
}

/// Reads one frame: its type, flags, stream and payload.
async fn read_frame(s: &mut TcpStream) -> (u8, u8, u32, Vec<u8>) {
    let mut head = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(WAIT), s.read_exact(&mut head))
        .await
        .expect("no frame from lb")
        .expect("lb closed the connection");
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.expect("frame cut short");
    (head[3], head[4], stream, payload)
}

#[tokio::test]
async fn h2_streams_beyond_the_per_connection_cap_are_refused() {
    const CAP: u32 = 4;
    const SENT: u32 = 6;
    let backend = BigBackend::start(BIG).await;
    let lb = TestLb::start(&format!(
        "limits:\n  h2_max_concurrent_streams: {CAP}\nbackends:\n  - address: {}\n",
        backend.addr
    ))
    .await;
    let addr = lb.lb.local_addr();
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut out = PREFACE.to_vec();
    let mut window_zero = SETTINGS_INITIAL_WINDOW_SIZE.to_be_bytes().to_vec();
    window_zero.extend_from_slice(&0u32.to_be_bytes());
    out.extend(frame(SETTINGS, 0, 0, &window_zero));
    // More streams than advertised, without waiting for the advertisement.
    let block = get_header_block(&addr.to_string(), "/big");
    let streams: Vec<u32> = (0..SENT).map(|i| 1 + 2 * i).collect();
    for &id in &streams {
        out.extend(frame(HEADERS, END_STREAM | END_HEADERS, id, &block));
    }
    s.write_all(&out).await.unwrap();

    let mut advertised = None;
    let (mut answered, mut refused) = (Vec::new(), Vec::new());
    while answered.len() + refused.len() < SENT as usize {
        let (kind, flags, stream, payload) = read_frame(&mut s).await;
        match kind {
            SETTINGS if flags & ACK == 0 => {
                for setting in payload.chunks_exact(6) {
                    let id = u16::from_be_bytes([setting[0], setting[1]]);
                    if id == SETTINGS_MAX_CONCURRENT_STREAMS {
                        let v = [setting[2], setting[3], setting[4], setting[5]];
                        advertised = Some(u32::from_be_bytes(v));
                    }
                }
                s.write_all(&frame(SETTINGS, ACK, 0, &[])).await.unwrap();
            }
            PING if flags & ACK == 0 => {
                s.write_all(&frame(PING, ACK, 0, &payload)).await.unwrap();
            }
            HEADERS => answered.push(stream),
            RST_STREAM => {
                let code = u32::from_be_bytes(payload[..4].try_into().unwrap());
                assert_eq!(code, REFUSED_STREAM, "stream {stream} reset with {code:#x}");
                refused.push(stream);
            }
            GOAWAY => panic!("lb closed the connection: {payload:?}"),
            _ => {}
        }
    }
    assert_eq!(advertised, Some(CAP), "SETTINGS_MAX_CONCURRENT_STREAMS");
    answered.sort_unstable();
    refused.sort_unstable();
    assert_eq!(answered, streams[..CAP as usize], "streams served");
    assert_eq!(refused, streams[CAP as usize..], "streams refused");
    // Only the streams within the cap reached (and hold) a backend.
    let state = Arc::clone(&lb.lb.runtime().snapshot().first_pool().backends[0].state);
    assert_eq!(state.requests(), u64::from(CAP));
    assert_eq!(state.in_flight(), CAP);
    assert_eq!(backend.accepted(), CAP as usize);
    drop(s);
    eventually!(
        WAIT,
        state.in_flight() == 0,
        "backend held after the client left"
    );
    eventually!(WAIT, backend.open() == 0, "backend connections kept");
    nobody_blamed(&lb);
}

//! Issue 7: hostile clients and lying backends. Raw sockets on both sides,
//! because hyper's own client would refuse to send most of these bytes.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `request` and reads until lb closes the connection (or 10 s pass).
async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    read_to_close(&mut s).await
}

/// Everything until EOF, a reset, or a 10 s deadline.
async fn read_to_close(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// True once the peer closes `s` (EOF or reset) within `secs`.
async fn closed_within(s: &mut TcpStream, secs: u64) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

fn status(resp: &str) -> &str {
    resp.get(9..12).unwrap_or(resp)
}

/// No backend of `lb` has a failure on record or is held out.
fn nobody_blamed(lb: &TestLb) {
    let snap = lb.lb.runtime().snapshot();
    let now = lb.lb.runtime().clock.now_ms();
    for b in &snap.backends {
        assert_eq!(b.state.failures(), 0, "{} was blamed", b.addr);
        assert!(b.state.is_available(now), "{} was ejected", b.addr);
    }
}

/// A backend that answers every connection with `response`, verbatim, then closes.
async fn raw_backend(response: &'static [u8]) -> SocketAddr {
    raw_server(move |mut s| async move {
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let _ = s.write_all(response).await;
        let _ = s.shutdown().await;
    })
    .await
}

// ---- 1. Client errors are the client's ----

#[tokio::test]
async fn invalid_chunks_get_400_and_blame_no_backend() {
    let backends = Backend::start_many(3).await;
    let lb = TestLb::start(&backends_yaml(&backends.iter().collect::<Vec<_>>())).await;
    let addr = lb.lb.local_addr();
    let mut tasks = Vec::new();
    for _ in 0..25 {
        tasks.push(tokio::spawn(exchange(
            addr,
            b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nhello\r\n0\r\n\r\n",
        )));
    }
    for t in tasks {
        let resp = t.await.unwrap();
        assert_eq!(status(&resp), "400", "{resp}");
    }
    nobody_blamed(&lb);
    let c = client();
    for _ in 0..6 {
        assert_eq!(get(&c, &lb.url("/")).await.status, 200);
    }
}

#[tokio::test]
async fn aborted_uploads_blame_no_backend() {
    let backends = Backend::start_many(3).await;
    let lb = TestLb::start(&backends_yaml(&backends.iter().collect::<Vec<_>>())).await;
    let addr = lb.lb.local_addr();
    let mut tasks = Vec::new();
    for i in 0..15 {
        // POST streams; PUT (idempotent, small) is buffered first: both paths.
        let method = if i % 2 == 0 { "POST" } else { "PUT" };
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let head =
                format!("{method} /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n");
            s.write_all(head.as_bytes()).await.unwrap();
            s.write_all(&[b'a'; 5000]).await.unwrap();
            // Gone half way.
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let c = client();
    for _ in 0..6 {
        assert_eq!(get(&c, &lb.url("/")).await.status, 200);
    }
    // The aborted requests may still be unwinding: judge once they are done.
    let idle = || {
        let snap = lb.lb.runtime().snapshot();
        snap.backends.iter().all(|b| b.state.in_flight() == 0)
    };
    eventually!(10, idle());
    nobody_blamed(&lb);
}

#[tokio::test]
async fn stalled_upload_is_408_not_504() {
    let b = Backend::start("b").await;
    let lb = TestLb::start(&format!(
        "timeouts:\n  client_body: 300ms\n  request: 30s\n{}",
        backends_yaml(&[&b])
    ))
    .await;
    for method in ["POST", "PUT"] {
        let mut s = TcpStream::connect(lb.lb.local_addr()).await.unwrap();
        let head = format!("{method} /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(b"only part of it").await.unwrap();
        let resp = read_to_close(&mut s).await;
        assert_eq!(status(&resp), "408", "{method}: {resp}");
    }
    nobody_blamed(&lb);
}

#[tokio::test]
async fn slow_but_steady_upload_is_not_cut() {
    let b = Backend::start("b").await;
    let lb = TestLb::start(&format!(
        "timeouts:\n  client_body: 2s\n{}",
        backends_yaml(&[&b])
    ))
    .await;
    let mut s = TcpStream::connect(lb.lb.local_addr()).await.unwrap();
    s.write_all(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 6\r\n\r\n",
    )
    .await
    .unwrap();
    for chunk in [b"ab", b"cd", b"ef"] {
        // Pauses shorter than client_body, each: the sleep is what is tested.
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.write_all(chunk).await.unwrap();
    }
    let resp = read_to_close(&mut s).await;
    assert_eq!(status(&resp), "200", "{resp}");
    assert!(resp.ends_with("abcdef"), "{resp}");
}

#[tokio::test]
async fn passive_ejection_never_takes_more_than_max_ejection_percent() {
    let backends = Backend::start_many(4).await;
    for b in &backends {
        b.set_status(500);
    }
    let lb = TestLb::start(&format!(
        "outlier_detection:\n  consecutive_failures: 1\n  ejection_time: 60s\n  max_ejection_percent: 50\nretry:\n  attempts: 1\n{}",
        backends_yaml(&backends.iter().collect::<Vec<_>>())
    ))
    .await;
    let c = client();
    for _ in 0..20 {
        let a = get(&c, &lb.url("/")).await;
        assert_eq!(a.status, 500, "{}", a.text());
    }
    let snap = lb.lb.runtime().snapshot();
    let now = lb.lb.runtime().clock.now_ms();
    let out = snap
        .backends
        .iter()
        .filter(|b| b.state.is_ejected(now))
        .count();
    assert_eq!(out, 2, "half of four may be out, no more");
}

// ---- 6. Idle and silent connections ----

#[tokio::test]
async fn silent_connection_is_closed_after_client_header() {
    let b = Backend::start("b").await;
    let lb = TestLb::start(&format!(
        "timeouts:\n  client_header: 300ms\n{}",
        backends_yaml(&[&b])
    ))
    .await;
    let mut silent = TcpStream::connect(lb.lb.local_addr()).await.unwrap();
    let mut partial = TcpStream::connect(lb.lb.local_addr()).await.unwrap();
    partial.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
    assert!(
        closed_within(&mut silent, 10).await,
        "silent connection kept"
    );
    assert!(closed_within(&mut partial, 10).await, "slowloris head kept");
    eventually!(10, lb.lb.runtime().connections.open() == 0);
}

#[tokio::test]
async fn idle_keep_alive_lasts_client_idle_not_client_header() {
    let b = Backend::start("b").await;
    let lb = TestLb::start(&format!(
        "timeouts:\n  client_header: 200ms\n  client_idle: 60s\n{}",
        backends_yaml(&[&b])
    ))
    .await;
    let mut s = TcpStream::connect(lb.lb.local_addr()).await.unwrap();
    let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    s.write_all(req).await.unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // Idle for several client_header periods: the idleness is what is tested.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    s.write_all(req).await.unwrap();
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "keep-alive was cut");
}

#[tokio::test]
async fn idle_keep_alive_is_closed_after_client_idle() {
    let b = Backend::start("b").await;
    let lb = TestLb::start(&format!(
        "timeouts:\n  client_idle: 300ms\n{}",
        backends_yaml(&[&b])
    ))
    .await;
    let mut s = TcpStream::connect(lb.lb.local_addr()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    assert!(closed_within(&mut s, 10).await);
}

/// The idle timer is set once per connection and moved only when it fires
/// early: a connection busy for longer than `client_idle`, in short gaps,
/// must never be cut at the first deadline.
#[tokio::test]
async fn keep_alive_busy_past_client_idle_is_not_cut() {
    let b = Backend::start("b").await;
    let lb = TestLb::start(&format!(
        "timeouts:\n  client_header: 1s\n  client_idle: 2s\n{}",
        backends_yaml(&[&b])
    ))
    .await;
    let mut s = TcpStream::connect(lb.lb.local_addr()).await.unwrap();
    let mut buf = [0u8; 4096];
    // 4 s of use in 500 ms gaps: twice client_idle.
    for i in 0..8 {
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "request {i} was cut");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn slow_response_is_not_cut_by_idle_timeouts() {
    let b = Backend::start("b").await;
    b.set_delay(Duration::from_millis(800));
    let lb = TestLb::start(&format!(
        "timeouts:\n  client_header: 200ms\n  client_idle: 200ms\n{}",
        backends_yaml(&[&b])
    ))
    .await;
    let resp = exchange(
        lb.lb.local_addr(),
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&resp), "200", "{resp}");
}

#[tokio::test]
async fn accept_pauses_at_max_connections() {
    let b = Backend::start("b").await;
    let lb = TestLb::start(&format!(
        "limits:\n  max_connections: 3\n{}",
        backends_yaml(&[&b])
    ))
    .await;
    let addr = lb.lb.local_addr();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    eventually!(10, lb.lb.runtime().connections.open() == 3);
    // The kernel completes the handshake; lb does not take it yet.
    let mut fourth = TcpStream::connect(addr).await.unwrap();
    fourth
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_millis(300), fourth.read(&mut buf)).await;
    assert!(early.is_err(), "served past the cap");
    assert_eq!(lb.lb.runtime().connections.open(), 3);
    held.pop();
    let resp = read_to_close(&mut fourth).await;
    assert_eq!(status(&resp), "200", "{resp}");
}

// ---- 7. Heads are bounded ----

#[tokio::test]
async fn oversized_head_is_431_and_normal_one_passes() {
    let b = Backend::start("b").await;
    let lb = TestLb::start(&backends_yaml(&[&b])).await;
    let addr = lb.lb.local_addr();
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let resp = exchange(addr, big.as_bytes()).await;
    assert_eq!(status(&resp), "431", "{resp}");
    let fine = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: {}\r\n\r\n",
        "a".repeat(32 * 1024)
    );
    assert_eq!(status(&exchange(addr, fine.as_bytes()).await), "200");
    assert_eq!(b.hits(), 1);
}

#[tokio::test]
async fn max_header_bytes_is_configurable() {
    let b = Backend::start("b").await;
    let lb = TestLb::start(&format!(
        "limits:\n  max_header_bytes: 16KiB\n{}",
        backends_yaml(&[&b])
    ))
    .await;
    let head = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(32 * 1024)
    );
    let resp = exchange(lb.lb.local_addr(), head.as_bytes()).await;
    assert_eq!(status(&resp), "431", "{resp}");
    assert_eq!(b.hits(), 0);
}

// ---- 8. HTTP correctness ----

#[tokio::test]
async fn backend_content_length_with_chunked_is_relayed_whole() {
    let backend = raw_backend(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let lb = TestLb::start(&format!("backends:\n  - address: {backend}\n")).await;
    let a = get(&client(), &lb.url("/")).await;
    // Either the whole body or a 502; never a clean, truncated 200.
    if a.status == 200 {
        assert_eq!(a.text(), "hello");
    } else {
        assert_eq!(a.status, 502);
    }
}

#[tokio::test]
async fn unrequested_101_is_502() {
    let backend = raw_backend(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    )
    .await;
    let lb = TestLb::start(&format!("backends:\n  - address: {backend}\n")).await;
    let a = get(&client(), &lb.url("/")).await;
    assert_eq!(a.status, 502, "{}", a.text());
}

#[tokio::test]
async fn bad_requests_get_the_right_status_and_never_reach_a_backend() {
    let b = Backend::start("b").await;
    let lb = TestLb::start(&backends_yaml(&[&b])).await;
    let addr = lb.lb.local_addr();
    let cases: &[(&str, &[u8])] = &[
        (
            "405",
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        ),
        ("405", b"TRACE / HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("400", b"GET / HTTP/1.1\r\n\r\n"),
        ("400", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
        ("400", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n"),
        ("400", b"GET / HTTP/1.1\r\nHost: user@a\r\n\r\n"),
        ("400", b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n"),
        ("400", b"GET admin HTTP/1.1\r\nHost: x\r\n\r\n"),
        (
            "501",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        ),
        // The request-smuggling matrix (RFC 9112 §6): hyper's parser refuses these.
        (
            "400",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        ),
        (
            "400",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
        ),
        (
            "400",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        ),
        (
            "400",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n",
        ),
        ("400", b"GET / HTTP/1.1\r\nHost: x\rX-Bare: cr\r\n\r\n"),
    ];
    for (want, request) in cases {
        let resp = exchange(addr, request).await;
        assert_eq!(
            status(&resp),
            *want,
            "{:?}\n=> {resp}",
            String::from_utf8_lossy(request)
        );
    }
    assert_eq!(b.hits(), 0, "a refused request reached the backend");
    nobody_blamed(&lb);
}

#[tokio::test]
async fn content_length_with_chunked_request_uses_chunked_only() {
    // RFC 9112 §6.3: Transfer-Encoding overrides; the Content-Length is dropped
    // before forwarding, so the backend cannot read the framing differently.
    let b = Backend::start("b").await;
    let lb = TestLb::start(&backends_yaml(&[&b])).await;
    let resp = exchange(
        lb.lb.local_addr(),
        b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 50\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status(&resp), "200", "{resp}");
    assert!(resp.ends_with("hello"), "{resp}");
    let seen = b.seen();
    assert_eq!(seen[0].body, "hello");
    assert_ne!(
        seen[0].headers.get("content-length").map(|v| v.as_bytes()),
        Some(&b"50"[..])
    );
}

#[tokio::test]
async fn absolute_form_authority_wins_and_connection_cannot_remove_host() {
    let b = Backend::start("b").await;
    let lb = TestLb::start(&backends_yaml(&[&b])).await;
    let addr = lb.lb.local_addr();
    let resp = exchange(
        addr,
        b"GET http://example.com/x HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&resp), "200", "{resp}");
    let resp = exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: kept.example\r\nConnection: close, host\r\n\r\n",
    )
    .await;
    assert_eq!(status(&resp), "200", "{resp}");
    let seen = b.seen();
    assert_eq!(seen[0].path, "/x");
    assert_eq!(seen[0].headers["host"], "example.com");
    assert_eq!(seen[1].headers["host"], "kept.example");
}

#[tokio::test]
async fn http10_without_host_is_served() {
    let b = Backend::start("b").await;
    let lb = TestLb::start(&backends_yaml(&[&b])).await;
    let resp = exchange(lb.lb.local_addr(), b"GET / HTTP/1.0\r\n\r\n").await;
    assert_eq!(status(&resp), "200", "{resp}");
}

#[tokio::test]
async fn client_errors_under_load_leave_the_pool_whole() {
    // The repro, end to end: a burst of broken uploads, then traffic.
    let backends = Backend::start_many(3).await;
    let lb = Arc::new(TestLb::start(&backends_yaml(&backends.iter().collect::<Vec<_>>())).await);
    let addr = lb.lb.local_addr();
    let mut tasks = Vec::new();
    for i in 0..40 {
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                exchange(
                    addr,
                    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n",
                )
                .await;
            } else {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let c = client();
    for _ in 0..9 {
        assert_eq!(get(&c, &lb.url("/")).await.status, 200);
    }
    for b in &backends {
        assert!(b.hits() >= 3, "{} lost its share", b.name);
    }
}

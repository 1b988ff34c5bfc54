//! HTTP/1 behaviour both paths must share (the suite runs once per path,
//! see `TEST_LB_HTTP1`): pipelining, large bodies streamed with flat memory
//! and a slow reader, either side closing mid-body, HEAD, 204, 304 with a
//! Content-Length, 100-continue.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Everything until EOF or a 10 s silence.
async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A backend answering `GET /big/N` with N bytes (written as the socket
/// takes them), `POST /count` with the number of body bytes it read,
/// `GET /cut` with half of a declared body before it closes, and
/// `GET /endless` with the first piece of a body that never ends.
async fn streaming_backend() -> SocketAddr {
    raw_server(|mut s| async move {
        let mut head = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let end = loop {
                if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            };
            let h = text(&head[..end]).to_ascii_lowercase();
            let mut rest = head.split_off(end);
            head.clear();
            let path = h.split_whitespace().nth(1).unwrap_or("/").to_owned();
            if let Some(n) = path.strip_prefix("/big/") {
                let n: u64 = n.parse().unwrap();
                let resp = format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n");
                if s.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
                if write_filler(&mut s, n).await.is_err() {
                    return;
                }
            } else if path == "/count" {
                let len: u64 = h
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                let mut got = rest.len() as u64;
                rest.clear();
                while got < len {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got += n as u64,
                    }
                }
                let body = got.to_string();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                if s.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
            } else if path == "/endless" {
                // A head promising more than ever comes, a first piece,
                // then silence with the connection open: only lb ends it.
                let head = "HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\nfirst";
                if s.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let _ = s.read(&mut buf).await; // until lb closes it
                return;
            } else if path == "/cut" {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly half")
                    .await;
                return;
            } else if let Some(code) = path.strip_prefix("/status/") {
                let resp = match code {
                    "204" => "HTTP/1.1 204 No Content\r\nX-S: 1\r\n\r\n".to_owned(),
                    "304" => {
                        "HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\nETag: \"e\"\r\n\r\n"
                            .to_owned()
                    }
                    _ => "HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\ncontent".to_owned(),
                };
                if s.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
            } else {
                let body = format!("{path}\n");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                if s.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
            }
            head = rest;
        }
    })
    .await
}

async fn lb_for(backend: SocketAddr) -> TestLb {
    TestLb::start(&format!("backends:\n  - address: {backend}\n")).await
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let lb = lb_for(streaming_backend().await).await;
    let mut s = TcpStream::connect(lb.lb.local_addr()).await.unwrap();
    let mut all = Vec::new();
    for i in 0..20 {
        all.extend_from_slice(format!("GET /p{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
    }
    all.extend_from_slice(b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(&all).await.unwrap();
    let out = text(&read_to_close(&mut s).await);
    let mut at = 0;
    for i in 0..20 {
        let want = format!("\r\n\r\n/p{i}\n");
        let found = out[at..]
            .find(&want)
            .unwrap_or_else(|| panic!("/p{i} missing: {out}"));
        at += found + want.len();
    }
    assert!(out[at..].contains("/last\n"), "{out}");
    assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 21);
}

/// Streams `mib` MiB down (slow reader) and up through lb; lb's memory
/// must not grow with the body.
async fn big_bodies_both_ways(mib: u64) {
    let lb = lb_for(streaming_backend().await).await;
    let addr = lb.lb.local_addr();
    let n = mib * 1024 * 1024;
    let before = rss_kib();
    // Down, read slowly.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET /big/{n} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = 0u64;
    let mut head_done = false;
    let mut buf = vec![0u8; 64 * 1024];
    let mut peak = 0;
    let mut pending = Vec::new();
    while got < n {
        let k = s.read(&mut buf).await.unwrap();
        assert!(k > 0, "closed after {got} bytes");
        if head_done {
            got += k as u64;
        } else {
            pending.extend_from_slice(&buf[..k]);
            if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                assert!(pending.starts_with(b"HTTP/1.1 200"), "{}", text(&pending));
                got += (pending.len() - i - 4) as u64;
                head_done = true;
            }
        }
        if got % (8 * 1024 * 1024) < k as u64 {
            // The slow reader: a pause every 8 MiB is what is tested.
            tokio::time::sleep(Duration::from_millis(20)).await;
            peak = peak.max(rss_kib());
        }
    }
    assert_eq!(got, n);
    // Up: lb hands large uploads to hyper, which streams them.
    s.write_all(
        format!("POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let piece = vec![b'y'; 64 * 1024];
    let mut sent = 0;
    while sent < n {
        s.write_all(&piece).await.unwrap();
        sent += piece.len() as u64;
        if sent % (8 * 1024 * 1024) == 0 {
            peak = peak.max(rss_kib());
        }
    }
    let mut resp = Vec::new();
    while !text(&resp).ends_with(&n.to_string()) {
        let k = s.read(&mut buf).await.unwrap();
        assert!(k > 0, "{}", text(&resp));
        resp.extend_from_slice(&buf[..k]);
    }
    let grew = peak.saturating_sub(before);
    // The whole test process (lb, backend, client) may grow by buffers, not by the body.
    assert!(
        grew < 48 * 1024,
        "RSS grew by {grew} KiB for {mib} MiB each way"
    );
    eprintln!("{mib} MiB each way: RSS {before} KiB → peak {peak} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways_in_flat_memory() {
    big_bodies_both_ways(64).await;
}

/// The figure; slow in debug builds: `cargo test --release --test
/// http1 -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn one_gib_streams_both_ways_in_flat_memory() {
    big_bodies_both_ways(1024).await;
}

#[tokio::test]
async fn backend_closing_mid_body_closes_the_client_connection() {
    let lb = lb_for(streaming_backend().await).await;
    let mut s = TcpStream::connect(lb.lb.local_addr()).await.unwrap();
    s.write_all(b"GET /cut HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let out = text(&read_to_close(&mut s).await);
    // The head went out before the cut: the client sees a short body and a close.
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.ends_with("only half"), "{out}");
}

#[tokio::test]
async fn client_closing_mid_body_leaves_lb_serving() {
    let lb = lb_for(streaming_backend().await).await;
    let addr = lb.lb.local_addr();
    for _ in 0..10 {
        // Mid-download.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /big/50000000 HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await.unwrap();
        drop(s);
        // Mid-upload.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"PUT /count HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nabc")
            .await
            .unwrap();
        drop(s);
    }
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    assert!(text(&read_to_close(&mut s).await).ends_with("/after\n"));
    let idle = || {
        lb.lb.runtime().snapshot().first_pool().backends[0]
            .state
            .in_flight()
            == 0
    };
    eventually!(10, idle());
    assert_eq!(
        lb.lb.runtime().snapshot().first_pool().backends[0]
            .state
            .failures(),
        0
    );
}

#[tokio::test]
async fn head_204_and_304_have_no_body() {
    let lb = lb_for(streaming_backend().await).await;
    let mut s = TcpStream::connect(lb.lb.local_addr()).await.unwrap();
    s.write_all(
        b"HEAD /status/200 HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /status/204 HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /status/304 HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /end HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let out = text(&read_to_close(&mut s).await);
    let parts: Vec<&str> = out.split("HTTP/1.1 ").skip(1).collect();
    assert_eq!(parts.len(), 4, "{out}");
    // HEAD keeps the length of the body it does not get.
    assert!(parts[0].starts_with("200"), "{out}");
    assert!(
        parts[0].to_ascii_lowercase().contains("content-length: 7"),
        "{out}"
    );
    assert!(parts[0].ends_with("\r\n\r\n"), "{out}");
    assert!(
        parts[1].starts_with("204") && parts[1].ends_with("\r\n\r\n"),
        "{out}"
    );
    // 304: no body; hyper drops its Content-Length and so does the fast path.
    assert!(
        parts[2].starts_with("304") && parts[2].ends_with("\r\n\r\n"),
        "{out}"
    );
    assert!(parts[3].ends_with("/end\n"), "{out}");
}

#[tokio::test]
async fn expect_100_continue_gets_its_interim_answer() {
    let lb = lb_for(streaming_backend().await).await;
    let mut s = TcpStream::connect(lb.lb.local_addr()).await.unwrap();
    s.write_all(
        b"POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(
        text(&buf[..n]).starts_with("HTTP/1.1 100 Continue"),
        "{}",
        text(&buf[..n])
    );
    s.write_all(b"hello").await.unwrap();
    let out = text(&read_to_close(&mut s).await);
    assert!(
        out.starts_with("HTTP/1.1 200") && out.ends_with("\r\n\r\n5"),
        "{out}"
    );
}

/// After a 100-continue upload the connection stays on the fast path. The
/// signal: the next request's repeated header reaches the backend
/// interleaved as sent, where hyper's `HeaderMap` groups a name's values (no
/// metric or admin figure tells the paths apart). Under
/// `TEST_LB_HTTP1=hyper` the grouped order is expected, which shows the
/// signal tells them apart.
#[tokio::test]
async fn a_100_continue_upload_leaves_the_connection_on_the_fast_path() {
    let heads: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = Arc::clone(&heads);
    let backend = raw_server(move |mut s| {
        let seen = Arc::clone(&seen);
        async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 8192];
            loop {
                let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    continue;
                };
                let head = text(&buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                while buf.len() < end + 4 + len {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                buf.drain(..end + 4 + len);
                seen.lock().unwrap().push(head);
                if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    })
    .await;
    let lb = lb_for(backend).await;
    let mut s = TcpStream::connect(lb.lb.local_addr()).await.unwrap();
    // Until `want` is at the end of what came.
    async fn answer(s: &mut TcpStream, want: &str) -> String {
        let mut got = Vec::new();
        let mut chunk = [0u8; 1024];
        while !text(&got).ends_with(want) {
            match tokio::time::timeout(Duration::from_secs(WAIT), s.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&chunk[..n]),
                _ => panic!("no {want:?}, got {:?}", text(&got)),
            }
        }
        text(&got)
    }
    s.write_all(
        b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(
        answer(&mut s, "\r\n\r\n").await,
        "HTTP/1.1 100 Continue\r\n\r\n"
    );
    s.write_all(b"hello").await.unwrap();
    let out = answer(&mut s, "\r\n\r\nok").await;
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    s.write_all(b"GET /next HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nX-B: 2\r\nX-A: 3\r\n\r\n")
        .await
        .unwrap();
    let out = answer(&mut s, "\r\n\r\nok").await;
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    let heads = heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 2, "{heads:?}");
    // `Expect` is not hop-by-hop: the backend sees it on both paths.
    assert!(
        heads[0].contains("\r\nexpect: 100-continue"),
        "{}",
        heads[0]
    );
    let order: Vec<&str> = heads[1]
        .lines()
        .filter(|l| l.starts_with("x-a:") || l.starts_with("x-b:"))
        .collect();
    let want = match http1_under_test() {
        lb::http::server::Http1::Fast => ["x-a: 1", "x-b: 2", "x-a: 3"],
        lb::http::server::Http1::Hyper => ["x-a: 1", "x-a: 3", "x-b: 2"],
    };
    assert_eq!(order, want, "{}", heads[1]);
}

/// A response still streaming when shutdown's grace runs out (its backend
/// holds it open, silent) is cut where it stands, visibly incomplete: an
/// HTTP/1.1 client sees its connection close short of the Content-Length,
/// an HTTP/2 client its stream end in an error, never a clean end. And
/// shutdown returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_still_streaming_when_shutdowns_grace_runs_out_is_cut() {
    use http_body_util::{BodyExt, Full};
    const WAIT: Duration = Duration::from_secs(30);
    let t = lb_for(streaming_backend().await).await;
    let mut s = TcpStream::connect(t.lb.local_addr()).await.unwrap();
    s.write_all(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut h1 = Vec::new();
    let mut buf = [0u8; 4096];
    while !h1.ends_with(b"first") {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("the first piece in time")
            .unwrap();
        assert!(n > 0, "closed early: {}", text(&h1));
        h1.extend_from_slice(&buf[..n]);
    }
    let h2 = h2c_client();
    let req = hyper::Request::get(t.url("/endless"))
        .body(Full::default())
        .unwrap();
    let resp = tokio::time::timeout(WAIT, h2.request(req))
        .await
        .expect("an answer in time")
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = tokio::time::timeout(WAIT, body.frame())
        .await
        .expect("the first piece in time")
        .expect("a frame")
        .expect("not an error");
    assert_eq!(first.into_data().unwrap(), &b"first"[..]);

    let TestLb { lb, dir: _dir, .. } = t;
    let shutdown = tokio::spawn(lb.shutdown(Duration::from_secs(1)));
    let rest = tokio::time::timeout(WAIT, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => h1.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(rest.is_ok(), "the HTTP/1.1 connection was closed");
    assert!(
        text(&h1).ends_with("\r\n\r\nfirst"),
        "nothing more came: {}",
        text(&h1)
    );
    let end = tokio::time::timeout(WAIT, body.frame())
        .await
        .expect("the HTTP/2 stream ends once the grace ran out");
    assert!(
        matches!(end, Some(Err(_))),
        "the HTTP/2 stream ends in an error, not as if complete: {end:?}"
    );
    tokio::time::timeout(WAIT, shutdown)
        .await
        .expect("shutdown returns")
        .expect("shutdown did not panic");
}

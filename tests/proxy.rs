//! Issue 2: the proxy end to end — strategies, errors, headers, protocols, bodies.

mod common;

use std::time::Duration;

use common::*;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn weighted(backends: &[(&Backend, u32)]) -> String {
    let mut s = String::from("backends:\n");
    for (b, w) in backends {
        s.push_str(&format!("  - address: {}\n    weight: {w}\n", b.addr));
    }
    s
}

async fn bodies(lb: &TestLb, n: usize) -> String {
    let c = client();
    let mut out = String::new();
    for _ in 0..n {
        out.push_str(&get(&c, &lb.url("/")).await.text());
    }
    out
}

#[tokio::test]
async fn round_robin_exact_order() {
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    let lb = TestLb::start(&format!(
        "strategy: round_robin\n{}",
        backends_yaml(&[&a, &b, &c])
    ))
    .await;
    assert_eq!(bodies(&lb, 9).await, "abcabcabc");
}

#[tokio::test]
async fn weighted_5_1_1_is_smooth() {
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    let yaml = format!(
        "strategy: weighted_round_robin\n{}",
        weighted(&[(&a, 5), (&b, 1), (&c, 1)])
    );
    let lb = TestLb::start(&yaml).await;
    assert_eq!(bodies(&lb, 14).await, "aabacaaaabacaa");
}

#[tokio::test]
async fn weight_zero_receives_nothing() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    for strategy in [
        "round_robin",
        "least_connections",
        "random",
        "power_of_two_choices",
    ] {
        let lb = TestLb::start(&format!(
            "strategy: {strategy}\n{}",
            weighted(&[(&a, 1), (&b, 0)])
        ))
        .await;
        assert!(!bodies(&lb, 20).await.contains('b'), "{strategy}");
    }
}

/// Sends `total` GETs with `concurrency` clients; returns hits per backend name.
async fn load(lb: &TestLb, total: usize, concurrency: usize) {
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let url = lb.url("/");
        tasks.push(tokio::spawn(async move {
            let c = client();
            for _ in 0..total / concurrency {
                assert_eq!(get(&c, &url).await.status, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_steers_away_from_slow_backend() {
    let (slow, fast) = (Backend::start("slow").await, Backend::start("fast").await);
    slow.set_delay(Duration::from_millis(300));
    let lb = TestLb::start(&format!(
        "strategy: least_connections\n{}",
        backends_yaml(&[&slow, &fast])
    ))
    .await;
    load(&lb, 80, 4).await;
    // Round robin would send 40 to each; least connections keeps the slow
    // one at about one request in flight per client at most.
    assert!(slow.hits() <= 12, "slow got {} of 80", slow.hits());
    assert!(fast.hits() >= 68, "fast got {}", fast.hits());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_of_two_choices_spreads_and_avoids_slow() {
    let bs = Backend::start_many(4).await;
    bs[0].set_delay(Duration::from_millis(300));
    let refs: Vec<&Backend> = bs.iter().collect();
    let lb = TestLb::start(&format!(
        "strategy: power_of_two_choices\n{}",
        backends_yaml(&refs)
    ))
    .await;
    load(&lb, 120, 4).await;
    let hits: Vec<usize> = bs.iter().map(Backend::hits).collect();
    assert!(
        hits[1..].iter().all(|&h| h >= 15),
        "fast backends all used: {hits:?}"
    );
    // Less than the even share (30 of 120): how much less depends on how
    // long the fast backends take, which a loaded machine stretches (20
    // failed about once in 15 runs there).
    assert!(hits[0] < 30, "slow backend avoided: {hits:?}");
}

#[tokio::test]
async fn random_follows_weights() {
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    let lb = TestLb::start(&format!(
        "strategy: random\n{}",
        weighted(&[(&a, 2), (&b, 1), (&c, 1)])
    ))
    .await;
    let s = bodies(&lb, 400).await;
    let (na, nb, nc) = (
        s.matches('a').count(),
        s.matches('b').count(),
        s.matches('c').count(),
    );
    assert_eq!(na + nb + nc, 400);
    assert!((150..=250).contains(&na), "a={na} b={nb} c={nc}");
    assert!(nb >= 60 && nc >= 60, "a={na} b={nb} c={nc}");
    // Smooth round robin over 2,1,1 repeats with period 4; random does not.
    let b = s.as_bytes();
    assert!(
        (0..396).any(|i| b[i] != b[i + 4]),
        "periodic like round robin: {s}"
    );
}

async fn dead_addr() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

#[tokio::test]
async fn unreachable_backend_is_502_without_internals() {
    let dead = dead_addr().await;
    let lb = TestLb::start(&format!("backends:\n  - address: {dead}\n")).await;
    let a = get(&client(), &lb.url("/")).await;
    assert_eq!(a.status, 502);
    // The status for the client; the address and the OS error stay in the log.
    assert_eq!(a.text(), "lb: 502 Bad Gateway\n");
}

#[tokio::test]
async fn slow_backend_is_504() {
    let slow = Backend::start("slow").await;
    slow.set_delay(Duration::from_secs(5));
    let lb = TestLb::start(&format!(
        "timeouts:\n  request: 300ms\n{}",
        backends_yaml(&[&slow])
    ))
    .await;
    let started = tokio::time::Instant::now();
    let a = get(&client(), &lb.url("/")).await;
    assert_eq!(a.status, 504, "{}", a.text());
    assert_eq!(a.text(), "lb: 504 Gateway Timeout\n");
    // Well before the backend's 5 s answer, however busy the machine.
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[tokio::test]
async fn forwarding_headers() {
    let b = Backend::start("b").await;
    let lb = TestLb::start(&backends_yaml(&[&b])).await;
    let req = Request::get(lb.url("/headers"))
        .header("host", "shop.example.com")
        .header("x-forwarded-for", "203.0.113.7")
        .body(Full::default())
        .unwrap();
    let a = send(&client(), req).await;
    let seen = &b.seen()[0].headers;
    assert_eq!(seen["host"], "shop.example.com");
    assert_eq!(seen["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "shop.example.com");
    assert_eq!(a.status, 200);
    // Without a prior X-Forwarded-For the client IP starts the list.
    get(&client(), &lb.url("/")).await;
    assert_eq!(b.seen()[1].headers["x-forwarded-for"], "127.0.0.1");
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_both_ways() {
    let b = Backend::start("b").await;
    let lb = TestLb::start(&backends_yaml(&[&b])).await;
    let req = Request::get(lb.url("/"))
        .header("connection", "x-private, keep-alive")
        .header("x-private", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9v")
        .header("te", "trailers")
        .header("x-kept", "yes")
        .body(Full::default())
        .unwrap();
    let a = send(&client(), req).await;
    let seen = &b.seen()[0].headers;
    for h in ["x-private", "keep-alive", "proxy-authorization", "te"] {
        assert!(!seen.contains_key(h), "{h} reached the backend");
    }
    assert_eq!(seen["x-kept"], "yes");
    // The backend's `Connection: x-hop` and `x-hop` never reach the client.
    assert!(!a.headers.contains_key("x-hop"), "{:?}", a.headers);
    assert_eq!(a.headers["x-backend"], "b");
}

#[tokio::test]
async fn h2c_prior_knowledge() {
    let b = Backend::start("b").await;
    let lb = TestLb::start(&backends_yaml(&[&b])).await;
    let c = h2c_client();
    for _ in 0..3 {
        let a = get(&c, &lb.url("/x?y=1")).await;
        assert_eq!((a.status.as_u16(), a.text().as_str()), (200, "b"));
    }
    let seen = &b.seen()[0];
    assert_eq!(seen.path, "/x");
    // The HTTP/2 :authority becomes the HTTP/1.1 Host.
    assert_eq!(
        seen.headers["host"],
        lb.lb.local_addr().to_string().as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mib_body_streams_both_ways() {
    let b = Backend::start("b").await;
    let lb = TestLb::start(&backends_yaml(&[&b])).await;
    let body: Bytes = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    for c in [client(), h2c_client()] {
        for method in ["POST", "PUT"] {
            let req = Request::builder()
                .method(method)
                .uri(lb.url("/echo"))
                .body(Full::new(body.clone()))
                .unwrap();
            let a = send(&c, req).await;
            assert_eq!(a.status, 200);
            assert_eq!(a.body.len(), body.len());
            assert!(a.body == body, "{method} body changed in transit");
        }
    }
}

async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = vec![0; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn malformed_requests_get_4xx_and_harm_no_one() {
    let b = Backend::start("b").await;
    let lb = TestLb::start(&backends_yaml(&[&b])).await;
    let addr = lb.lb.local_addr();
    let c = client();
    assert_eq!(get(&c, &lb.url("/")).await.status, 200);
    let bad = raw_exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nthis is not a header\r\n\r\n",
    )
    .await;
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(512 * 1024)
    );
    let resp = raw_exchange(addr, huge.as_bytes()).await;
    assert!(
        resp.starts_with("HTTP/1.1 431") || resp.starts_with("HTTP/1.1 400"),
        "{resp}"
    );
    let garbage = raw_exchange(
        addr,
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
    )
    .await;
    assert!(
        garbage.is_empty() || garbage.starts_with("HTTP/1.1 400"),
        "{garbage}"
    );
    // The keep-alive connection opened before is unaffected.
    assert_eq!(get(&c, &lb.url("/")).await.status, 200);
    assert_eq!(b.hits(), 2);
}

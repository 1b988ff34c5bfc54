//! Issue 20, items 4, 6 and 7: a backend status line without a reason
//! phrase, stale pooled connections on the hyper client path, and the
//! Host/target gaps (userinfo, `:authority` against `host`, `GET *`, a
//! client naming `X-Forwarded-For` in `Connection`). The HTTP/1 cases that
//! compare the two paths are conversations in tests/differential.rs; these
//! are the ones on the path under test (`TEST_LB_HTTP1`) and over HTTP/2.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads one request from `s` (after what `buf` holds): the head, and the
/// body its `Content-Length` gives; false at EOF.
async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut want: Option<usize> = None;
    loop {
        if want.is_none() {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                let body = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:")?.trim().parse().ok())
                    .unwrap_or(0);
                want = Some(i + 4 + body);
            }
        }
        if let Some(len) = want.filter(|&len| buf.len() >= len) {
            buf.drain(..len);
            return true;
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return false,
        }
    }
}

/// When [`short_keepalive_backend`] closes a connection that has answered.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Closes {
    /// Once it has idled this long (a short keep-alive timeout).
    Idle(Duration),
    /// As the next request arrives, unanswered: the race of a keep-alive
    /// timeout with lb's reuse, every time. Every other such close is a
    /// reset (unread bytes, zero linger), the others a FIN.
    OnReuse,
}

/// A raw backend that answers requests and closes each
/// connection that has answered as `closes` says; `closed` counts those
/// closes (with `Idle`, also the answered connections lb closed first),
/// `heads` the requests that reached it (the unanswered ones too).
struct ShortKeepAlive {
    addr: SocketAddr,
    closed: Arc<AtomicUsize>,
    heads: Arc<AtomicUsize>,
}

async fn short_keepalive_backend(closes: Closes) -> ShortKeepAlive {
    let closed = Arc::new(AtomicUsize::new(0));
    let heads = Arc::new(AtomicUsize::new(0));
    let (c, h) = (Arc::clone(&closed), Arc::clone(&heads));
    let addr = raw_server(move |mut s| {
        let (closed, heads) = (Arc::clone(&c), Arc::clone(&h));
        async move {
            let mut buf = Vec::new();
            let mut answered = false;
            loop {
                if closes == Closes::OnReuse && answered {
                    let mut byte = [0u8; 1];
                    if !matches!(s.peek(&mut byte).await, Ok(n) if n > 0) {
                        return;
                    }
                    heads.fetch_add(1, SeqCst);
                    if closed.fetch_add(1, SeqCst) % 2 == 1 {
                        // Unread bytes and no linger: the close is a reset.
                        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                        return;
                    }
                    read_request(&mut s, &mut buf).await;
                    return;
                }
                if !read_request(&mut s, &mut buf).await {
                    return;
                }
                heads.fetch_add(1, SeqCst);
                let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                if s.write_all(answer).await.is_err() {
                    return;
                }
                answered = true;
                if let Closes::Idle(idle) = closes {
                    let mut byte = [0u8; 1];
                    match tokio::time::timeout(idle, s.peek(&mut byte)).await {
                        Ok(Ok(n)) if n > 0 => {}
                        // Idled out, or lb closed it first (as it does a
                        // connection it will not pool): ended either way.
                        _ => {
                            drop(s);
                            closed.fetch_add(1, SeqCst);
                            return;
                        }
                    }
                }
            }
        }
    })
    .await;
    ShortKeepAlive {
        addr,
        closed,
        heads,
    }
}

/// The `lb_upstream_attempts_total` of `outcome` for the backend at `addr`.
fn attempts(lb: &TestLb, addr: SocketAddr, outcome: &str) -> f64 {
    let text = lb::admin::exposition::render(lb.lb.runtime());
    let labels = format!("backend=\"{addr}\",outcome=\"{outcome}\"");
    text.lines()
        .find(|l| l.starts_with("lb_upstream_attempts_total{") && l.contains(&labels))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Sends `n` GETs through `lb` by an h2c client (the hyper client path
/// serves them) and `n` by an HTTP/1 client (the path under test), one at
/// a time; with `closed`, each waits after its answer until that count has
/// grown since it was sent. The failures, and how many went.
async fn gets_through(lb: &TestLb, n: usize, closed: Option<&AtomicUsize>) -> (Vec<String>, usize) {
    let mut failures = Vec::new();
    let mut sent = 0;
    for (name, client) in [("h2c", h2c_client()), ("http/1", common::client())] {
        for i in 0..n {
            let before = closed.map(|c| c.load(SeqCst));
            let req = Request::get(lb.url(&format!("/{i}")))
                .body(Full::default())
                .unwrap();
            let resp = tokio::time::timeout(Duration::from_secs(WAIT), client.request(req))
                .await
                .expect("request timed out");
            sent += 1;
            match resp {
                Ok(r) if r.status() == StatusCode::OK => {}
                Ok(r) => failures.push(format!("{name} #{i}: {}", r.status())),
                Err(e) => failures.push(format!("{name} #{i}: {e}")),
            }
            if let (Some(closed), Some(before)) = (closed, before) {
                eventually!(WAIT, closed.load(SeqCst) > before);
            }
        }
    }
    (failures, sent)
}

/// One attempt, and the first failure ejects: a stale pooled connection
/// must cost neither a retry nor the backend's health.
fn unforgiving(backend: SocketAddr) -> String {
    format!(
        "retry:\n  attempts: 1\noutlier_detection:\n  consecutive_failures: 1\n  ejection_time: 60s\n\
         backends:\n  - address: {backend}\n"
    )
}

fn assert_not_charged(lb: &TestLb, backend: SocketAddr, sent: usize) {
    assert_eq!(
        attempts(lb, backend, "reset"),
        0.0,
        "the backend was charged"
    );
    assert_eq!(attempts(lb, backend, "success"), sent as f64);
    let rt = lb.lb.runtime();
    assert!(!rt.snapshot().first_pool().backends[0]
        .state
        .is_ejected(rt.clock.now_ms()));
}

/// A request sent on a pooled connection that the backend closes as the
/// request arrives (a keep-alive timeout racing lb's reuse, here every
/// time, by FIN and by reset) fails before any byte of an answer: it is
/// sent again on a new connection, within its one attempt, and the backend
/// is not blamed. Failed on the hyper client path (h2c clients, and HTTP/1
/// under `--http1 hyper`) before the resend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_closed_as_it_is_reused_is_not_a_failure() {
    let backend = short_keepalive_backend(Closes::OnReuse).await;
    let lb = TestLb::start(&unforgiving(backend.addr)).await;
    let (failures, sent) = gets_through(&lb, 12, None).await;
    assert!(
        failures.is_empty(),
        "{} of {sent}: {failures:?}",
        failures.len()
    );
    // The race happened, on both clients' paths.
    assert!(
        backend.closed.load(SeqCst) >= 8,
        "{}",
        backend.closed.load(SeqCst)
    );
    assert_not_charged(&lb, backend.addr, sent);
}

/// The same backend, waited for: each request goes after the backend has
/// closed the idle connection the previous one left, which lb must not
/// reuse (or must resend from).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_backend_closed_while_idle_is_not_a_failure() {
    let backend = short_keepalive_backend(Closes::Idle(Duration::from_millis(50))).await;
    let lb = TestLb::start(&unforgiving(backend.addr)).await;
    let (failures, sent) = gets_through(&lb, 12, Some(&backend.closed)).await;
    assert!(
        failures.is_empty(),
        "{} of {sent}: {failures:?}",
        failures.len()
    );
    assert_not_charged(&lb, backend.addr, sent);
}

/// A POST the backend may have seen is not sent twice: on a pooled
/// connection closed as it arrives, it fails (502), on either path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_that_met_a_closing_connection_is_not_sent_again() {
    let backend = short_keepalive_backend(Closes::OnReuse).await;
    let lb = TestLb::start(&format!(
        "outlier_detection:\n  consecutive_failures: 0\nbackends:\n  - address: {}\n",
        backend.addr
    ))
    .await;
    for client in [h2c_client(), common::client()] {
        let post = || {
            Request::post(lb.url("/"))
                .body(Full::new(Bytes::from_static(b"once")))
                .unwrap()
        };
        // A new connection answers, and goes back to the pool.
        assert_eq!(send(&client, post()).await.status, StatusCode::OK);
        let before = backend.heads.load(SeqCst);
        assert_eq!(send(&client, post()).await.status, StatusCode::BAD_GATEWAY);
        assert_eq!(
            backend.heads.load(SeqCst),
            before + 1,
            "the POST went twice"
        );
    }
}

/// Sends `req` to lb at `addr` on a new HTTP/2 (prior knowledge)
/// connection, whatever its URI's authority (which becomes `:authority`):
/// the status and body.
async fn h2_send(addr: SocketAddr, req: Request<Full<Bytes>>) -> (StatusCode, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = tokio::time::timeout(Duration::from_secs(WAIT), sender.send_request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// HTTP/2's `:authority` is held to `Host`'s rules: user info is refused
/// (RFC 9110 §4.2.4), and a `host` header naming another server makes the
/// request malformed (RFC 9113 §8.3.1); one naming the same server (any
/// case, the default port spelled out or not) passes, and the backend sees
/// it. A `*` target is for OPTIONS only, over HTTP/2 as over HTTP/1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_authority_is_held_to_the_host_rules() {
    let backend = Backend::start("b").await;
    let lb = TestLb::start(&backends_yaml(&[&backend])).await;
    let addr = lb.lb.local_addr();
    let get = |uri: &str, host: Option<&str>| {
        let mut req = Request::get(uri);
        if let Some(host) = host {
            req = req.header("host", host);
        }
        req.body(Full::default()).unwrap()
    };
    let refused = [
        (
            "user:pw in :authority",
            get("http://user:pw@evil.example/headers", None),
        ),
        ("user in :authority", get("http://u@evil/headers", None)),
        (
            "host naming another server",
            get("http://a/headers", Some("other")),
        ),
        (
            "host with another port",
            get("http://a:8080/headers", Some("a:8081")),
        ),
        ("host with user info", get("http://a/headers", Some("u@a"))),
    ];
    let star = |method: &str| {
        let uri = hyper::Uri::builder()
            .scheme("http")
            .authority("a")
            .path_and_query("*")
            .build()
            .unwrap();
        Request::builder()
            .method(method)
            .uri(uri)
            .body(Full::default())
            .unwrap()
    };
    let refused = refused
        .into_iter()
        .chain([("GET *", star("GET")), ("DELETE *", star("DELETE"))]);
    for (name, req) in refused {
        let (status, body) = h2_send(addr, req).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name}: {body}");
    }
    assert_eq!(backend.hits(), 0, "a refused request reached the backend");
    let passed = [
        ("no host", get("http://a/headers", None), "a"),
        ("the same host", get("http://a/headers", Some("a")), "a"),
        (
            "the same host, other case",
            get("http://a/headers", Some("A")),
            "A",
        ),
        (
            "the default port spelled out",
            get("http://a/headers", Some("a:80")),
            "a:80",
        ),
        (
            "the same port",
            get("http://a:8080/headers", Some("A:8080")),
            "A:8080",
        ),
    ];
    for (name, req, host) in passed {
        let (status, body) = h2_send(addr, req).await;
        assert_eq!(status, StatusCode::OK, "{name}: {body}");
        assert!(
            body.contains(&format!("\nhost: {host}\n"))
                || body.starts_with(&format!("host: {host}\n")),
            "{name}: {body}"
        );
    }
}

//! `mode: tcp` (issue 11): layer-4 proxying over the same pool, strategies,
//! health checks, retries and reloads, against real TCP echo backends
//! ([`EchoBackend`]: echoes, and on the client's FIN writes its name).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{timeout, Instant};

/// Generous bound on one exchange; only a hang reaches it.
const LIMIT: Duration = Duration::from_secs(20);

/// A tcp-mode config over `pool` (backend, weight), plus `extra` YAML.
fn tcp_yaml(pool: &[(SocketAddr, u32)], extra: &str) -> String {
    let mut s = String::from("mode: tcp\nbackends:\n");
    for (addr, weight) in pool {
        s.push_str(&format!("  - address: {addr}\n    weight: {weight}\n"));
    }
    s.push_str(extra);
    s
}

/// Sends `payload`, half-closes, reads to EOF (concurrently, so any size
/// works) and returns the name of the backend that echoed it.
async fn exchange(lb: SocketAddr, payload: &[u8]) -> String {
    let mut stream = timeout(LIMIT, TcpStream::connect(lb))
        .await
        .expect("connect timed out")
        .expect("connect failed");
    let (mut rx, mut tx) = stream.split();
    let write = async {
        tx.write_all(payload).await.unwrap();
        tx.shutdown().await.unwrap();
    };
    let read = async {
        let mut out = Vec::new();
        rx.read_to_end(&mut out).await.unwrap();
        out
    };
    let ((), out) = timeout(LIMIT, async { tokio::join!(write, read) })
        .await
        .expect("exchange timed out");
    served_by(&out, payload)
}

/// Checks that `out` is `payload` echoed and returns the backend name after it.
fn served_by(out: &[u8], payload: &[u8]) -> String {
    assert!(
        out.len() >= payload.len(),
        "short echo: {} of {} bytes",
        out.len(),
        payload.len()
    );
    assert!(
        out[..payload.len()] == *payload,
        "echo differs from the payload"
    );
    String::from_utf8_lossy(&out[payload.len()..]).into_owned()
}

/// One round trip on an open connection.
async fn ping(stream: &mut TcpStream, msg: &[u8]) {
    stream.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    timeout(LIMIT, stream.read_exact(&mut back))
        .await
        .expect("echo timed out")
        .unwrap();
    assert_eq!(back, msg);
}

/// Half-closes an open connection and returns the backend name it reads.
async fn finish(mut stream: TcpStream) -> String {
    stream.shutdown().await.unwrap();
    let mut out = Vec::new();
    timeout(LIMIT, stream.read_to_end(&mut out))
        .await
        .expect("read timed out")
        .unwrap();
    String::from_utf8(out).unwrap()
}

/// Waits for lb to close `stream` (EOF or reset) without it sending anything.
async fn closed_by_lb(stream: &mut TcpStream) {
    let mut buf = [0u8; 16];
    let n = timeout(LIMIT, stream.read(&mut buf))
        .await
        .expect("never closed");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
}

/// Is a connection refused (or reset) now?
async fn refused(addr: SocketAddr) -> bool {
    match TcpStream::connect(addr).await {
        Err(_) => true,
        // Accepted by the kernel but closed by lb, or accepted by a listener
        // about to go: reading tells.
        Ok(mut s) => {
            let _ = s.write_all(b"x").await;
            let mut buf = [0u8; 8];
            matches!(
                timeout(Duration::from_secs(1), s.read(&mut buf)).await,
                Ok(Ok(0) | Err(_))
            )
        }
    }
}

#[tokio::test]
async fn echoes_payloads_of_every_size_and_spreads_connections_by_weight() {
    let (a, b, c) = (
        EchoBackend::start("a").await,
        EchoBackend::start("b").await,
        EchoBackend::start("c").await,
    );
    let tlb = TestLb::start(&tcp_yaml(&[(a.addr, 1), (b.addr, 2), (c.addr, 2)], "")).await;
    let lb = tlb.lb.local_addr();
    let sizes = [0, 1, 1500, 16 * 1024 + 3, 300_000, 1 << 20];
    let mut conns = tokio::task::JoinSet::new();
    for i in 0..20usize {
        let size = sizes[i % sizes.len()] + i;
        let payload: Vec<u8> = (0..size).map(|j| (j * 31 + i) as u8).collect();
        conns.spawn(async move { exchange(lb, &payload).await });
    }
    let mut served = std::collections::HashMap::<String, usize>::new();
    while let Some(name) = conns.join_next().await {
        *served.entry(name.unwrap()).or_default() += 1;
    }
    // Smooth weighted round robin: exactly 4 of every 20 to the weight-1 backend.
    assert_eq!(served.get("a"), Some(&4), "{served:?}");
    assert_eq!(served.get("b"), Some(&8), "{served:?}");
    assert_eq!(served.get("c"), Some(&8), "{served:?}");
    assert_eq!(a.accepted() + b.accepted() + c.accepted(), 20);
}

#[tokio::test]
async fn client_half_close_reaches_the_backend_and_the_response_still_flows() {
    let a = EchoBackend::start("a").await;
    let tlb = TestLb::start(&tcp_yaml(&[(a.addr, 1)], "")).await;
    let mut stream = TcpStream::connect(tlb.lb.local_addr()).await.unwrap();
    // Written whole before anything is read: fits in the socket buffers.
    let payload = vec![7u8; 100_000];
    stream.write_all(&payload).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut out = Vec::new();
    timeout(LIMIT, stream.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    // The name comes after the backend read EOF: the FIN went through lb,
    // and lb kept copying the other way after it.
    assert_eq!(served_by(&out, &payload), "a");
    eventually!(10, a.open() == 0);
}

#[tokio::test]
async fn tcp_health_checks_find_a_stopped_backend_which_gets_no_connect() {
    let a = EchoBackend::start("a").await;
    let mut b = EchoBackend::start("b").await;
    // One failed connect takes a backend out: a timeout the loaded machine
    // cannot miss, or `a` could be taken out too.
    let checks = "health_check:\n  interval: 500ms\n  timeout: 500ms\n  healthy_threshold: 1\n  unhealthy_threshold: 1\n";
    let tlb = TestLb::start(&tcp_yaml(&[(a.addr, 1), (b.addr, 1)], checks)).await;
    let lb = tlb.lb.local_addr();
    // The probes are plain TCP connects.
    eventually!(WAIT, a.accepted() >= 2 && b.accepted() >= 2);
    b.stop().await;
    let snap = tlb.lb.runtime().snapshot();
    let state_b = &snap.first_pool().backends[1].state;
    eventually!(WAIT, !state_b.is_healthy(), "b never marked down");
    let attempts_before = state_b.requests();
    for i in 0..10 {
        assert_eq!(exchange(lb, format!("{i}").as_bytes()).await, "a");
    }
    assert_eq!(
        state_b.failures(),
        0,
        "a connect went to the stopped backend"
    );
    assert_eq!(state_b.requests(), attempts_before);
    // Back up: found by the checks and used again.
    b.restart().await;
    eventually!(WAIT, state_b.is_healthy(), "b never marked up");
    let mut names = Vec::new();
    for _ in 0..4 {
        names.push(exchange(lb, b"x").await);
    }
    assert!(names.iter().any(|n| n == "b"), "{names:?}");
}

/// A port nothing listens on: connects are refused.
async fn dead_addr() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

#[tokio::test]
async fn a_failed_connect_goes_to_the_next_backend() {
    let dead = dead_addr().await;
    let a = EchoBackend::start("a").await;
    let tlb = TestLb::start(&tcp_yaml(&[(dead, 1), (a.addr, 1)], "")).await;
    let lb = tlb.lb.local_addr();
    for i in 0..6 {
        assert_eq!(exchange(lb, format!("hello {i}").as_bytes()).await, "a");
    }
    let snap = tlb.lb.runtime().snapshot();
    assert!(
        snap.first_pool().backends[0].state.failures() >= 1,
        "the dead backend was never tried"
    );
    assert_eq!(snap.first_pool().backends[1].state.failures(), 0);
}

#[tokio::test]
async fn a_connect_timeout_goes_to_the_next_backend() {
    // A listener that never accepts, its queue full: the kernel drops
    // further SYNs, so connecting to it times out instead of failing.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let stuck = socket.listen(0).unwrap();
    let stuck_addr = stuck.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = timeout(Duration::from_millis(300), TcpStream::connect(stuck_addr)).await
        {
            fillers.push(s);
        }
    }
    let a = EchoBackend::start("a").await;
    let extra = "timeouts:\n  connect: 200ms\noutlier_detection:\n  consecutive_failures: 0\n";
    let tlb = TestLb::start(&tcp_yaml(&[(stuck_addr, 1), (a.addr, 1)], extra)).await;
    let lb = tlb.lb.local_addr();
    for i in 0..4 {
        assert_eq!(exchange(lb, format!("hello {i}").as_bytes()).await, "a");
    }
    let failures = tlb.lb.runtime().snapshot().first_pool().backends[0]
        .state
        .failures();
    assert!(failures >= 1, "the stuck backend was never tried");
}

#[tokio::test]
async fn open_connections_survive_a_reload_and_new_ones_follow_it() {
    let a = EchoBackend::start("a").await;
    let b = EchoBackend::start("b").await;
    let tlb = TestLb::start(&tcp_yaml(&[(a.addr, 1)], "")).await;
    let lb = tlb.lb.local_addr();
    let mut old = TcpStream::connect(lb).await.unwrap();
    ping(&mut old, b"before").await;
    // The reload removes the backend the open connection uses.
    tlb.rewrite(&tcp_yaml(&[(b.addr, 1)], ""));
    eventually!(10, tlb.applied() == 2);
    assert_eq!(exchange(lb, b"new").await, "b");
    assert_eq!(exchange(lb, b"newer").await, "b");
    ping(&mut old, b"after the reload").await;
    assert_eq!(finish(old).await, "a");
}

#[tokio::test]
async fn least_connections_counts_open_connections() {
    let a = EchoBackend::start("a").await;
    let b = EchoBackend::start("b").await;
    let tlb = TestLb::start(&tcp_yaml(
        &[(a.addr, 1), (b.addr, 1)],
        "strategy: least_connections\n",
    ))
    .await;
    let lb = tlb.lb.local_addr();
    let mut held = Vec::new();
    for _ in 0..6 {
        let mut s = TcpStream::connect(lb).await.unwrap();
        ping(&mut s, b"hold").await;
        held.push(s);
    }
    assert_eq!((a.open(), b.open()), (3, 3));
    let snap = tlb.lb.runtime().snapshot();
    assert_eq!(snap.first_pool().backends[0].state.in_flight(), 3);
    // Client connections count against limits.max_connections as in http mode.
    assert_eq!(tlb.lb.runtime().connections.open(), 6);
    drop(held);
    eventually!(
        10,
        snap.first_pool()
            .backends
            .iter()
            .all(|b| b.state.in_flight() == 0)
    );
    eventually!(10, tlb.lb.runtime().connections.open() == 0);
}

#[tokio::test]
async fn idle_connections_are_closed_after_tcp_idle() {
    let a = EchoBackend::start("a").await;
    let idle = Duration::from_millis(500);
    let tlb = TestLb::start(&tcp_yaml(&[(a.addr, 1)], "timeouts:\n  tcp_idle: 500ms\n")).await;
    let mut s = TcpStream::connect(tlb.lb.local_addr()).await.unwrap();
    // Taken before the last bytes lb reads, so a lower bound on its quiet time.
    let quiet_since = Instant::now();
    ping(&mut s, b"once").await;
    closed_by_lb(&mut s).await;
    // lb's clock counts whole milliseconds.
    assert!(
        quiet_since.elapsed() >= idle - Duration::from_millis(2),
        "closed too early"
    );
    // lb closed the backend side too.
    eventually!(10, a.open() == 0);
}

#[tokio::test]
async fn shutdown_stops_accepting_lets_connections_run_then_closes_them() {
    let a = EchoBackend::start("a").await;
    let tlb = TestLb::start(&tcp_yaml(&[(a.addr, 1)], "")).await;
    let TestLb { lb, dir: _dir, .. } = tlb;
    let addr = lb.local_addr();
    let mut finishing = TcpStream::connect(addr).await.unwrap();
    ping(&mut finishing, b"one").await;
    let mut lingering = TcpStream::connect(addr).await.unwrap();
    ping(&mut lingering, b"two").await;
    let grace = Duration::from_secs(3);
    let started = Instant::now();
    let shutdown = tokio::spawn(lb.shutdown(grace));
    eventually!(
        10,
        refused(addr).await,
        "lb still accepts after shutdown began"
    );
    // Open connections keep working and may finish on their own.
    ping(&mut finishing, b"still here").await;
    assert_eq!(finish(finishing).await, "a");
    ping(&mut lingering, b"still here").await;
    // The other one is closed when the grace runs out, and shutdown returns.
    closed_by_lb(&mut lingering).await;
    timeout(LIMIT, shutdown).await.unwrap().unwrap();
    assert!(
        started.elapsed() >= grace,
        "closed before the grace ran out"
    );
    eventually!(10, a.open() == 0);
}

#[tokio::test]
async fn a_reload_that_changes_the_mode_is_rejected() {
    let a = EchoBackend::start("a").await;
    let tlb = TestLb::start(&tcp_yaml(&[(a.addr, 1)], "")).await;
    tlb.rewrite(&format!("mode: http\nbackends:\n  - address: {}\n", a.addr));
    eventually!(10, tlb.rejected() == 1);
    assert_eq!(tlb.applied(), 1);
    assert_eq!(exchange(tlb.lb.local_addr(), b"still tcp").await, "a");
}

#[tokio::test]
async fn send_proxy_protocol_tells_the_backend_who_the_client_is() {
    let a = EchoBackend::start("a").await;
    let tlb = TestLb::start(&tcp_yaml(&[(a.addr, 1)], "send_proxy_protocol: v1\n")).await;
    let lb = tlb.lb.local_addr();
    // The echo backend sends the header back ahead of the payload.
    let mut s = TcpStream::connect(lb).await.unwrap();
    let client = s.local_addr().unwrap();
    s.write_all(b"payload").await.unwrap();
    let out = finish(s).await;
    let line = format!(
        "PROXY TCP4 127.0.0.1 127.0.0.1 {} {}\r\n",
        client.port(),
        lb.port()
    );
    assert_eq!(out, format!("{line}payloada"));

    tlb.rewrite(&tcp_yaml(&[(a.addr, 1)], "send_proxy_protocol: v2\n"));
    eventually!(10, tlb.applied() == 2);
    let mut s = TcpStream::connect(lb).await.unwrap();
    let client = s.local_addr().unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    timeout(LIMIT, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&out[..16], b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c");
    assert_eq!(&out[24..26], &client.port().to_be_bytes());
    assert_eq!(&out[26..28], &lb.port().to_be_bytes());
    assert_eq!(&out[28..], b"a");
}

/// With `send_proxy_protocol`, a health probe opens with the spec's header
/// for connections of the proxy's own (v1 `UNKNOWN`, v2 `LOCAL`), so a
/// backend that requires the header sees a well-formed probe.
#[tokio::test]
async fn health_probes_send_the_local_proxy_header() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // The first bytes of every connection, until the prober closes it.
    let seen = Arc::new(std::sync::Mutex::new(Vec::<Vec<u8>>::new()));
    let record = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let record = Arc::clone(&record);
            tokio::spawn(async move {
                let mut bytes = Vec::new();
                let _ = timeout(LIMIT, s.read_to_end(&mut bytes)).await;
                record.lock().unwrap().push(bytes);
            });
        }
    });
    let probes = "health_check: {interval: 100ms, timeout: 100ms}\n";
    let tlb = TestLb::start(&tcp_yaml(
        &[(addr, 1)],
        &format!("send_proxy_protocol: v1\n{probes}"),
    ))
    .await;
    let has = |header: &[u8]| seen.lock().unwrap().iter().any(|b| b == header);
    eventually!(10, has(b"PROXY UNKNOWN\r\n"), "no v1 probe header");
    tlb.rewrite(&tcp_yaml(
        &[(addr, 1)],
        &format!("send_proxy_protocol: v2\n{probes}"),
    ));
    eventually!(
        10,
        has(b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00"),
        "no v2 LOCAL probe header"
    );
}

fn parse(yaml: &str) -> Result<lb::config::Config, String> {
    lb::config::Config::parse(yaml.as_bytes(), Path::new("lb.yaml")).map_err(|e| e.to_string())
}

#[test]
fn tcp_config_keys_defaults_and_errors() {
    let c = parse("mode: tcp\nbackends:\n  - address: 127.0.0.1:5432\nhealth_check: {}\n").unwrap();
    assert_eq!(c.listeners[0].mode, lb::config::Mode::Tcp);
    assert_eq!(c.timeouts.tcp_idle, Duration::from_secs(3600));
    assert_eq!(c.first_pool().health_check.clone().unwrap().path, None);
    let c = parse(
        "backends:\n  - address: 127.0.0.1:5432\nhealth_check: {}\ntimeouts: {tcp_idle: 5m}\n",
    )
    .unwrap();
    assert_eq!(
        c.first_pool()
            .health_check
            .clone()
            .unwrap()
            .path
            .unwrap()
            .as_str(),
        "/health"
    );
    assert_eq!(c.timeouts.tcp_idle, Duration::from_secs(300));
    let e = parse(
        "mode: tcp\nbackends:\n  - address: 127.0.0.1:5432\nhealth_check:\n  path: /health\n",
    )
    .unwrap_err();
    assert!(
        e.contains("health_check.path") && e.contains("tcp mode"),
        "{e}"
    );
    let e = parse("send_proxy_protocol: v1\nbackends:\n  - address: 127.0.0.1:80\n").unwrap_err();
    assert!(
        e.contains("send_proxy_protocol") && e.contains("mode: tcp"),
        "{e}"
    );
    let e = parse("mode: udp\nbackends:\n  - address: 127.0.0.1:53\n").unwrap_err();
    assert!(e.contains("udp") && e.contains("tcp"), "{e}");
    let e = parse("mode: tcp\nbackends:\n  - address: 127.0.0.1:1\ntimeouts: {tcp_idle: 0}\n")
        .unwrap_err();
    assert!(e.contains("timeouts.tcp_idle"), "{e}");
}

/// One exchange from a chosen loopback source address.
async fn exchange_from(lb: SocketAddr, source: std::net::IpAddr, payload: &[u8]) -> String {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    let mut stream = timeout(LIMIT, socket.connect(lb))
        .await
        .expect("connect timed out")
        .expect("connect failed");
    stream.write_all(payload).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut out = Vec::new();
    timeout(LIMIT, stream.read_to_end(&mut out))
        .await
        .expect("read timed out")
        .unwrap();
    served_by(&out, payload)
}

#[tokio::test]
async fn consistent_hash_keys_connections_by_client_ip() {
    let backends = [
        EchoBackend::start("e0").await,
        EchoBackend::start("e1").await,
        EchoBackend::start("e2").await,
    ];
    let pool: Vec<_> = backends.iter().map(|b| (b.addr, 1)).collect();
    let lb = TestLb::start(&tcp_yaml(&pool, "strategy: consistent_hash\n")).await;
    let mut used = std::collections::HashSet::new();
    for i in 2..26u8 {
        let source = std::net::IpAddr::from([127, 0, 0, i]);
        let first = exchange_from(lb.lb.local_addr(), source, b"hi").await;
        let again = exchange_from(lb.lb.local_addr(), source, b"hi").await;
        assert_eq!(first, again, "client {source} moved");
        used.insert(first);
    }
    assert!(used.len() > 1, "every client on one backend: {used:?}");
}

#[test]
fn http_only_steering_keys_are_refused_in_tcp_mode() {
    let e = parse(
        "mode: tcp\nstrategy: consistent_hash\nhash_key: header:x-user\nbackends:\n  - address: 127.0.0.1:1\n",
    )
    .unwrap_err();
    assert!(e.contains("hash_key") && e.contains("tcp"), "{e}");
    let e =
        parse("mode: tcp\nsession_affinity: {cookie: lb}\nbackends:\n  - address: 127.0.0.1:1\n")
            .unwrap_err();
    assert!(e.contains("session_affinity") && e.contains("tcp"), "{e}");
}

//! Pools discovered from DNS (issue 19): a real DNS server run by the test
//! on 127.0.0.1 (UDP, and TCP for answers too big for UDP), its records
//! changed while lb runs, `resolver:` pointing at it.

mod common;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use common::*;
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How the server answers every query.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Answer,
    ServFail,
    /// Never answers: a resolver timeout.
    Silent,
}

#[derive(Debug)]
struct Zone {
    /// name (lower case, with the trailing dot) → addresses.
    a: HashMap<String, Vec<Ipv4Addr>>,
    /// name → (weight, port, target).
    srv: HashMap<String, Vec<(u16, u16, String)>>,
    ttl: u32,
    mode: Mode,
}

/// A small authoritative DNS server on 127.0.0.1.
struct Dns {
    addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    queries: Arc<AtomicUsize>,
    tcp_queries: Arc<AtomicUsize>,
}

impl Dns {
    async fn start() -> Dns {
        // The same port over UDP and TCP (for truncated answers): a port
        // free for one may be taken for the other, so try until both bind.
        let (udp, tcp, addr) = loop {
            let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = udp.local_addr().unwrap();
            if let Ok(tcp) = tokio::net::TcpListener::bind(addr).await {
                break (udp, tcp, addr);
            }
        };
        let zone = Arc::new(Mutex::new(Zone {
            a: HashMap::new(),
            srv: HashMap::new(),
            ttl: 30,
            mode: Mode::Answer,
        }));
        let queries = Arc::new(AtomicUsize::new(0));
        let tcp_queries = Arc::new(AtomicUsize::new(0));
        let (z, q) = (Arc::clone(&zone), Arc::clone(&queries));
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, from)) = udp.recv_from(&mut buf).await {
                q.fetch_add(1, SeqCst);
                if let Some(mut answer) = respond(&z, &buf[..n]) {
                    if answer.len() > 512 {
                        // Too big for UDP without EDNS: the header, truncated.
                        let mut m = Message::from_vec(&answer).unwrap();
                        m.take_answers();
                        m.take_additionals();
                        m.set_truncated(true);
                        answer = m.to_vec().unwrap();
                    }
                    let _ = udp.send_to(&answer, from).await;
                }
            }
        });
        let (z, q) = (Arc::clone(&zone), Arc::clone(&tcp_queries));
        tokio::spawn(async move {
            while let Ok((mut s, _)) = tcp.accept().await {
                let (z, q) = (Arc::clone(&z), Arc::clone(&q));
                tokio::spawn(async move {
                    loop {
                        let mut len = [0u8; 2];
                        if s.read_exact(&mut len).await.is_err() {
                            return;
                        }
                        let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
                        if s.read_exact(&mut msg).await.is_err() {
                            return;
                        }
                        q.fetch_add(1, SeqCst);
                        let Some(answer) = respond(&z, &msg) else {
                            continue;
                        };
                        let mut framed = (answer.len() as u16).to_be_bytes().to_vec();
                        framed.extend_from_slice(&answer);
                        if s.write_all(&framed).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Dns {
            addr,
            zone,
            queries,
            tcp_queries,
        }
    }

    fn set(&self, name: &str, addrs: &[Ipv4Addr]) {
        self.zone
            .lock()
            .unwrap()
            .a
            .insert(format!("{name}."), addrs.to_vec());
    }

    fn remove(&self, name: &str) {
        self.zone.lock().unwrap().a.remove(&format!("{name}."));
    }

    fn mode(&self, mode: Mode) {
        self.zone.lock().unwrap().mode = mode;
    }

    fn ttl(&self, ttl: u32) {
        self.zone.lock().unwrap().ttl = ttl;
    }
}

fn respond(zone: &Mutex<Zone>, query: &[u8]) -> Option<Vec<u8>> {
    let query = Message::from_vec(query).ok()?;
    let zone = zone.lock().unwrap();
    let mut m = Message::new();
    m.set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_authoritative(true)
        .set_recursion_available(true);
    for q in query.queries() {
        m.add_query(q.clone());
    }
    match zone.mode {
        Mode::Silent => return None,
        Mode::ServFail => {
            m.set_response_code(ResponseCode::ServFail);
            return m.to_vec().ok();
        }
        Mode::Answer => {}
    }
    let Some(q) = query.queries().first() else {
        m.set_response_code(ResponseCode::FormErr);
        return m.to_vec().ok();
    };
    let name = q.name().to_ascii().to_ascii_lowercase();
    let (a, srv) = (zone.a.get(&name), zone.srv.get(&name));
    if a.is_none() && srv.is_none() {
        m.set_response_code(ResponseCode::NXDomain);
        return m.to_vec().ok();
    }
    match q.query_type() {
        RecordType::A => {
            for ip in a.into_iter().flatten() {
                m.add_answer(Record::from_rdata(
                    q.name().clone(),
                    zone.ttl,
                    RData::A(A(*ip)),
                ));
            }
        }
        RecordType::SRV => {
            for (weight, port, target) in srv.into_iter().flatten() {
                let target = Name::from_ascii(target).unwrap();
                m.add_answer(Record::from_rdata(
                    q.name().clone(),
                    zone.ttl,
                    RData::SRV(SRV::new(0, *weight, *port, target.clone())),
                ));
                for ip in zone.a.get(&target.to_ascii()).into_iter().flatten() {
                    m.add_additional(Record::from_rdata(
                        target.clone(),
                        zone.ttl,
                        RData::A(A(*ip)),
                    ));
                }
            }
        }
        // AAAA and the rest: the name exists, without such records.
        _ => {}
    }
    m.to_vec().ok()
}

/// A backend on `ip` (one of 127.0.0.0/8) at `port`, its body `name`.
async fn backend_on(ip: Ipv4Addr, port: u16, name: &str) -> Backend {
    let listener = tokio::net::TcpListener::bind((ip, port)).await.unwrap();
    Backend::serve(listener, name)
}

fn discovery_yaml(dns: &Dns, name: &str, port: u16, extra: &str) -> String {
    format!(
        "discovery:\n  dns: {name}\n  port: {port}\n  refresh: 1s\n  resolver: {}\n{extra}",
        dns.addr
    )
}

/// A free port on 127.0.0.1 that 127.0.0.2.. can bind too.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The bodies of `n` requests.
async fn bodies(lb: &TestLb, n: usize) -> Vec<String> {
    let c = client();
    let mut out = Vec::new();
    for _ in 0..n {
        let a = get(&c, &lb.url("/")).await;
        out.push(format!(
            "{} {}",
            a.status.as_u16(),
            String::from_utf8_lossy(&a.body)
        ));
    }
    out
}

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

#[tokio::test]
async fn traffic_follows_addresses_added_and_removed() {
    let dns = Dns::start().await;
    let port = free_port();
    let b2 = backend_on(ip(2), port, "two").await;
    let b3 = backend_on(ip(3), port, "three").await;
    dns.set("api.test", &[ip(2)]);
    let lb = TestLb::start(&discovery_yaml(&dns, "api.test", port, "")).await;
    eventually!(WAIT, bodies(&lb, 1).await == ["200 two"]);
    dns.set("api.test", &[ip(2), ip(3)]);
    eventually!(WAIT, {
        let seen = bodies(&lb, 4).await;
        seen.contains(&"200 two".to_owned()) && seen.contains(&"200 three".to_owned())
    });
    dns.set("api.test", &[ip(3)]);
    eventually!(WAIT, bodies(&lb, 4).await.iter().all(|b| b == "200 three"));
    assert!(b2.hits() >= 1 && b3.hits() >= 2);
}

#[tokio::test]
async fn a_resolver_that_fails_or_goes_silent_costs_no_request_and_nxdomain_empties_the_pool() {
    let dns = Dns::start().await;
    let port = free_port();
    let _b = backend_on(ip(4), port, "four").await;
    dns.set("svc.test", &[ip(4)]);
    let lb = TestLb::start(&discovery_yaml(&dns, "svc.test", port, "")).await;
    eventually!(WAIT, bodies(&lb, 1).await == ["200 four"]);
    for mode in [Mode::ServFail, Mode::Silent] {
        dns.mode(mode);
        let asked = dns.queries.load(SeqCst);
        // Several refreshes while the resolver fails: every request served.
        eventually!(
            WAIT,
            dns.queries.load(SeqCst) >= asked + 2 || mode == Mode::Silent
        );
        let served = bodies(&lb, 20).await;
        assert!(
            served.iter().all(|b| b == "200 four"),
            "{mode:?}: {served:?}"
        );
        let rt = lb.lb.runtime();
        eventually!(WAIT, rt.discovered.status()[0].1.result != "ok");
        assert!(rt.discovered.status()[0].2.failed.load(SeqCst) >= 1);
        dns.mode(Mode::Answer);
        eventually!(WAIT, rt.discovered.status()[0].1.result == "ok");
    }
    // NXDOMAIN: the Service has no ready pod: 503 at once.
    dns.remove("svc.test");
    eventually!(WAIT, bodies(&lb, 1).await[0].starts_with("503"));
    // And back.
    dns.set("svc.test", &[ip(4)]);
    eventually!(WAIT, bodies(&lb, 1).await == ["200 four"]);
}

#[tokio::test]
async fn lb_starts_before_the_name_exists_and_serves_once_it_does() {
    let dns = Dns::start().await;
    let port = free_port();
    let _b = backend_on(ip(5), port, "five").await;
    let lb = TestLb::start(&discovery_yaml(&dns, "later.test", port, "")).await;
    assert!(bodies(&lb, 1).await[0].starts_with("503"));
    dns.set("later.test", &[ip(5)]);
    eventually!(WAIT, bodies(&lb, 1).await == ["200 five"]);
}

#[tokio::test]
async fn a_ttl_below_refresh_asks_sooner() {
    let dns = Dns::start().await;
    let port = free_port();
    let _b = backend_on(ip(6), port, "six").await;
    let _c = backend_on(ip(7), port, "seven").await;
    dns.ttl(1);
    dns.set("ttl.test", &[ip(6)]);
    // refresh 1h: only the 1 s TTL can bring the change in time.
    let yaml = discovery_yaml(&dns, "ttl.test", port, "").replace("refresh: 1s", "refresh: 1h");
    let lb = TestLb::start(&yaml).await;
    eventually!(WAIT, bodies(&lb, 1).await == ["200 six"]);
    dns.set("ttl.test", &[ip(7)]);
    eventually!(WAIT, bodies(&lb, 1).await == ["200 seven"]);
}

#[tokio::test]
async fn srv_records_give_ports_and_weights() {
    let dns = Dns::start().await;
    let (p1, p2) = (free_port(), free_port());
    let _heavy = backend_on(ip(8), p1, "heavy").await;
    let _light = backend_on(ip(9), p2, "light").await;
    {
        let mut z = dns.zone.lock().unwrap();
        z.a.insert("h.test.".to_owned(), vec![ip(8)]);
        z.a.insert("l.test.".to_owned(), vec![ip(9)]);
        z.srv.insert(
            "_http._tcp.svc.test.".to_owned(),
            vec![(3, p1, "h.test.".to_owned()), (1, p2, "l.test.".to_owned())],
        );
    }
    let yaml = format!(
        "discovery:\n  srv: _http._tcp.svc.test\n  refresh: 1s\n  resolver: {}\n",
        dns.addr
    );
    let lb = TestLb::start(&yaml).await;
    eventually!(WAIT, bodies(&lb, 1).await[0].starts_with("200"));
    let seen = bodies(&lb, 40).await;
    let heavy = seen.iter().filter(|b| *b == "200 heavy").count();
    let light = seen.iter().filter(|b| *b == "200 light").count();
    // Weighted round robin 3:1 over 40 requests.
    assert_eq!((heavy, light), (30, 10), "{seen:?}");
}

#[tokio::test]
async fn an_address_that_stays_keeps_its_health_and_a_joiner_ramps_up() {
    let dns = Dns::start().await;
    let port = free_port();
    let sick = backend_on(ip(10), port, "sick").await;
    let _well = backend_on(ip(13), port, "well").await;
    let _joins = backend_on(ip(11), port, "joins").await;
    dns.set("hc.test", &[ip(10), ip(13)]);
    let yaml = discovery_yaml(
        &dns,
        "hc.test",
        port,
        "health_check: {path: /health, interval: 100ms, timeout: 50ms, unhealthy_threshold: 1}\nslow_start: 120s\n",
    );
    let lb = TestLb::start(&yaml).await;
    eventually!(WAIT, bodies(&lb, 1).await[0].starts_with("200"));
    // Health checks take `sick` out.
    sick.behavior.health_status.store(503, SeqCst);
    eventually!(WAIT, bodies(&lb, 6).await.iter().all(|b| b == "200 well"));
    // A re-resolution that adds an address keeps `sick` down (its state is
    // kept by pool and address, not made anew) and ramps the joiner.
    dns.set("hc.test", &[ip(10), ip(11), ip(13)]);
    eventually!(
        WAIT,
        lb.lb.runtime().snapshot().pools[0].backends.len() == 3
    );
    let seen = bodies(&lb, 40).await;
    let count = |name: &str| seen.iter().filter(|b| *b == &format!("200 {name}")).count();
    assert_eq!(count("sick"), 0, "{seen:?}");
    assert!(count("joins") < 15, "a joiner ramps up: {seen:?}");
    assert!(count("joins") + count("well") == 40, "{seen:?}");
}

#[tokio::test]
async fn two_thousand_addresses_come_over_tcp_after_a_truncated_udp_answer() {
    let dns = Dns::start().await;
    let port = free_port();
    let _b = backend_on(ip(12), port, "first").await;
    let many: Vec<Ipv4Addr> = (0..2000u32)
        .map(|i| Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250) as u8 + 1))
        .chain([ip(12)])
        .collect();
    dns.set("big.test", &many);
    let lb = TestLb::start(&discovery_yaml(
        &dns,
        "big.test",
        port,
        "strategy: consistent_hash\n",
    ))
    .await;
    eventually!(
        WAIT,
        lb.lb.runtime().snapshot().pools[0].backends.len() == 2001
    );
    assert!(
        dns.tcp_queries.load(SeqCst) >= 1,
        "the whole answer came over TCP"
    );
    let rt = lb.lb.runtime();
    eventually!(WAIT, rt.discovered.status()[0].1.applied_cpu_ms.is_some());
    // Measured, not asserted (a timing bound would fail on a loaded box):
    // `cargo test --release --test discovery two_thousand -- --nocapture`.
    eprintln!(
        "2,001 addresses applied in {:.1} ms of CPU",
        rt.discovered.status()[0].1.applied_cpu_ms.unwrap()
    );
}

#[test]
fn discovery_mistakes_are_errors_at_their_key() {
    let dir = tempfile::tempdir().unwrap();
    for (yaml, want) in [
        ("discovery: {dns: api.test}\n", "discovery.port: missing"),
        (
            "discovery: {dns: api.test, srv: _x._tcp.api.test, port: 80}\n",
            "discovery.srv: a pool follows one name",
        ),
        (
            "discovery: {srv: _x._tcp.api.test, port: 80}\n",
            "discovery.port: SRV records carry",
        ),
        (
            "discovery: {dns: api.test, port: 80, refresh: 100ms}\n",
            "discovery.refresh: 100ms is below",
        ),
        (
            "discovery: {dns: \"api test\", port: 80}\n",
            "discovery.dns: \"api test\" is not a DNS name",
        ),
        (
            "discovery: {dns: api.test, port: 80, resolver: nowhere}\n",
            "discovery.resolver: \"nowhere\"",
        ),
        (
            "discovery: {dns: api.test, port: 80}\nbackends: [{address: 127.0.0.1:1}]\n",
            "discovery: a pool has backends: or discovery:",
        ),
    ] {
        let path = write_config(dir.path(), yaml);
        let err = lb::config::Config::load(&path).unwrap_err().to_string();
        assert!(err.contains(want), "{yaml}\nwant {want}\ngot  {err}");
        assert!(err.contains("config.yaml:"), "{err}");
    }
}

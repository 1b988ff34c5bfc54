//! Several named pools behind one listener, chosen by Host and path: the
//! precedence rules over HTTP/1 (the path under test) and h2c, prefix
//! stripping, the 404 of an unrouted request, per-pool state across
//! reloads, per-pool strategies, retries that stay in their pool, per-pool
//! metrics, and the config's validation of pools and routes.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// Which protocol a probe request speaks to lb.
#[derive(Debug, Clone, Copy)]
enum Proto {
    /// HTTP/1.1 with an explicit `Host` header (the fast or hyper path, as
    /// `TEST_LB_HTTP1` says).
    Http1,
    /// HTTP/2 prior knowledge, the host in `:authority`.
    H2c,
}

/// One request to lb at `addr` for `host` and `path_and_query`: status and body.
async fn ask(
    addr: SocketAddr,
    proto: Proto,
    host: &str,
    path_and_query: &str,
) -> (StatusCode, String) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let io = TokioIo::new(stream);
    let resp = match proto {
        Proto::Http1 => {
            let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            let req = Request::get(path_and_query)
                .header("host", host)
                .body(Full::<Bytes>::default())
                .unwrap();
            send.send_request(req).await.unwrap()
        }
        Proto::H2c => {
            let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(conn);
            let req = Request::get(format!("http://{host}{path_and_query}"))
                .body(Full::<Bytes>::default())
                .unwrap();
            send.send_request(req).await.unwrap()
        }
    };
    let status = resp.status();
    let body = tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect())
        .await
        .expect("body timed out")
        .unwrap()
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The pools of the precedence test, each with one backend named after it.
struct Pools {
    any: Backend,
    exact: Backend,
    v1: Backend,
    wild: Backend,
    deep: Backend,
    admin: Backend,
}

impl Pools {
    async fn start() -> Pools {
        Pools {
            any: Backend::start("any").await,
            exact: Backend::start("exact").await,
            v1: Backend::start("v1").await,
            wild: Backend::start("wild").await,
            deep: Backend::start("deep").await,
            admin: Backend::start("admin").await,
        }
    }

    fn yaml(&self) -> String {
        let pool = |name: &str, b: &Backend| {
            format!("  {name}:\n    backends: [{{address: {}}}]\n", b.addr)
        };
        format!(
            "pools:\n{}{}{}{}{}{}routes:\n\
             # the catch-all first: file order never hides a longer prefix\n\
             - {{pool: any}}\n\
             - {{host: api.example.com, pool: exact}}\n\
             - {{host: api.example.com, path_prefix: /v1, pool: v1}}\n\
             - {{host: \"*.example.com\", pool: wild}}\n\
             - {{host: \"*.deep.example.com\", pool: deep}}\n\
             - {{path_prefix: /admin, strip_prefix: true, pool: admin}}\n",
            pool("any", &self.any),
            pool("exact", &self.exact),
            pool("v1", &self.v1),
            pool("wild", &self.wild),
            pool("deep", &self.deep),
            pool("admin", &self.admin),
        )
    }
}

/// (host, path, the pool that must serve it).
const RULES: &[(&str, &str, &str)] = &[
    ("api.example.com", "/", "exact"),
    // case, port and a trailing dot are ignored
    ("API.Example.COM:8080", "/", "exact"),
    ("api.example.com.", "/x", "exact"),
    // whole segments
    ("api.example.com", "/v1", "v1"),
    ("api.example.com", "/v1/", "v1"),
    ("api.example.com", "/v1/users", "v1"),
    ("api.example.com", "/v1?q=1", "v1"),
    ("api.example.com", "/v10", "exact"),
    // one or more labels before the suffix, never the suffix itself
    ("x.example.com", "/", "wild"),
    ("a.b.example.com", "/v1", "wild"),
    ("example.com", "/", "any"),
    // the longest wildcard suffix wins
    ("q.deep.example.com", "/", "deep"),
    ("DEEP.example.com", "/", "wild"),
    // host specificity comes before the prefix
    ("api.example.com", "/admin", "exact"),
    ("other.org", "/admin", "admin"),
    ("other.org", "/administrator", "any"),
    ("127.0.0.1", "/", "any"),
];

async fn precedence_over(proto: Proto) {
    let pools = Pools::start().await;
    let t = TestLb::start(&pools.yaml()).await;
    let addr = t.lb.local_addr();
    for (host, path, want) in RULES {
        let (status, body) = ask(addr, proto, host, path).await;
        assert_eq!(status, StatusCode::OK, "{proto:?} {host}{path}: {body}");
        assert_eq!(body, *want, "{proto:?} {host}{path} went to the wrong pool");
    }
}

#[tokio::test]
async fn routes_follow_the_precedence_rules_over_http1() {
    precedence_over(Proto::Http1).await;
}

#[tokio::test]
async fn routes_follow_the_precedence_rules_over_h2c() {
    precedence_over(Proto::H2c).await;
}

async fn strip_prefix_over(proto: Proto) {
    let pools = Pools::start().await;
    let t = TestLb::start(&pools.yaml()).await;
    let addr = t.lb.local_addr();
    for (sent, arrived) in [
        ("/admin/users?x=1&y=2", "/users?x=1&y=2"),
        ("/admin", "/"),
        ("/admin/", "/"),
        ("/admin?q", "/?q"),
    ] {
        let (status, body) = ask(addr, proto, "other.org", sent).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "admin"), "{sent}");
        let seen = pools.admin.seen();
        let last = seen.last().expect("the admin backend saw the request");
        assert_eq!(
            last.target, arrived,
            "{proto:?}: {sent} must arrive as {arrived}"
        );
    }
}

#[tokio::test]
async fn strip_prefix_keeps_the_query_over_http1() {
    strip_prefix_over(Proto::Http1).await;
}

#[tokio::test]
async fn strip_prefix_keeps_the_query_over_h2c() {
    strip_prefix_over(Proto::H2c).await;
}

async fn unrouted_is_404_over(proto: Proto) {
    let api = Backend::start("api").await;
    let t = TestLb::start(&format!(
        "pools:\n  api:\n    backends: [{{address: {}}}]\nroutes:\n  - {{host: api.example.com, pool: api}}\n",
        api.addr
    ))
    .await;
    let addr = t.lb.local_addr();
    let (status, body) = ask(addr, proto, "www.example.com", "/").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body, "lb: 404 Not Found\n");
    assert_eq!(
        api.hits(),
        0,
        "no backend is touched by an unrouted request"
    );
    // The routed host still works.
    assert_eq!(ask(addr, proto, "api.example.com", "/").await.1, "api");
}

#[tokio::test]
async fn an_unrouted_request_is_404_and_touches_no_backend_over_http1() {
    unrouted_is_404_over(Proto::Http1).await;
}

#[tokio::test]
async fn an_unrouted_request_is_404_and_touches_no_backend_over_h2c() {
    unrouted_is_404_over(Proto::H2c).await;
}

#[tokio::test]
async fn a_404_keeps_an_http1_connection_open() {
    let api = Backend::start("api").await;
    let t = TestLb::start(&format!(
        "pools:\n  api:\n    backends: [{{address: {}}}]\nroutes:\n  - {{path_prefix: /api, pool: api}}\n",
        api.addr
    ))
    .await;
    let c = client();
    assert_eq!(get(&c, &t.url("/nope")).await.status, StatusCode::NOT_FOUND);
    assert_eq!(get(&c, &t.url("/api/x")).await.text(), "api");
}

#[tokio::test]
async fn a_reload_of_one_pool_keeps_the_other_pools_down_backend_down() {
    let (up, down, api1, api2) = (
        Backend::start("up").await,
        Backend::start("down").await,
        Backend::start("api1").await,
        Backend::start("api2").await,
    );
    down.set_health(503);
    let yaml = |api: &[&Backend]| {
        let list: Vec<String> = api
            .iter()
            .map(|b| format!("{{address: {}}}", b.addr))
            .collect();
        format!(
            "pools:\n  web:\n    health_check: {{path: /health, interval: 100ms, timeout: 100ms, unhealthy_threshold: 1}}\n    backends: [{{address: {}}}, {{address: {}}}]\n  api:\n    backends: [{}]\nroutes:\n  - {{path_prefix: /api, pool: api}}\n  - {{pool: web}}\n",
            up.addr,
            down.addr,
            list.join(", ")
        )
    };
    let t = TestLb::start(&yaml(&[&api1])).await;
    let runtime = t.lb.runtime();
    let down_state = || {
        let snap = runtime.snapshot();
        let web = snap
            .pools
            .iter()
            .find(|p| p.name().as_str() == "web")
            .unwrap();
        std::sync::Arc::clone(&web.backends[1].state)
    };
    eventually!(10, !down_state().is_healthy());
    let before = down_state();
    t.rewrite(&yaml(&[&api1, &api2]));
    eventually!(10, t.applied() == 2);
    assert!(
        std::sync::Arc::ptr_eq(&before, &down_state()),
        "web's backends keep their state when only api changes"
    );
    assert!(
        !down_state().is_healthy(),
        "the down backend is still down after the reload"
    );
    let c = client();
    for _ in 0..20 {
        assert_eq!(get(&c, &t.url("/")).await.text(), "up");
    }
    assert_eq!(
        down.hits(),
        0,
        "the down backend got no request after the reload"
    );
    let mut served = std::collections::HashSet::new();
    for _ in 0..10 {
        served.insert(get(&c, &t.url("/api")).await.text());
    }
    assert_eq!(served.len(), 2, "api's added backend serves: {served:?}");
}

#[tokio::test]
async fn each_pool_has_its_own_strategy_and_weights() {
    let (a, b, h1, h2) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("h1").await,
        Backend::start("h2").await,
    );
    let t = TestLb::start(&format!(
        "strategy: round_robin\n\
         pools:\n  weighted:\n    backends: [{{address: {}, weight: 3}}, {{address: {}, weight: 1}}]\n\
         \x20 hashed:\n    strategy: consistent_hash\n    hash_key: header:x-user\n    backends: [{{address: {}}}, {{address: {}}}]\n\
         routes:\n  - {{path_prefix: /h, pool: hashed}}\n  - {{pool: weighted}}\n",
        a.addr, b.addr, h1.addr, h2.addr
    ))
    .await;
    let c = client();
    for _ in 0..40 {
        get(&c, &t.url("/")).await;
    }
    assert_eq!(
        (a.hits(), b.hits()),
        (30, 10),
        "weights 3:1 in the weighted pool"
    );
    for user in 0..20 {
        let req = |u: i32| {
            Request::get(t.url("/h"))
                .header("x-user", format!("u{u}"))
                .body(Full::default())
                .unwrap()
        };
        let first = send(&c, req(user)).await.text();
        let again = send(&c, req(user)).await.text();
        assert_eq!(
            first, again,
            "a key stays on its backend in the hashed pool"
        );
        assert!(first == "h1" || first == "h2", "{first}");
    }
    assert_eq!(
        a.hits() + b.hits(),
        40,
        "the hashed pool's requests stay in it"
    );
}

/// A port nothing listens on.
async fn closed_port() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

#[tokio::test]
async fn a_retry_never_leaves_its_pool() {
    let other = Backend::start("other").await;
    let (dead1, dead2) = (closed_port().await, closed_port().await);
    let t = TestLb::start(&format!(
        "retry: {{attempts: 5}}\n\
         pools:\n  broken:\n    backends: [{{address: {dead1}}}, {{address: {dead2}}}]\n  fine:\n    backends: [{{address: {}}}]\n\
         routes:\n  - {{path_prefix: /broken, pool: broken}}\n  - {{pool: fine}}\n",
        other.addr
    ))
    .await;
    let c = client();
    for _ in 0..5 {
        let a = get(&c, &t.url("/broken")).await;
        assert!(
            a.status == StatusCode::BAD_GATEWAY || a.status == StatusCode::SERVICE_UNAVAILABLE,
            "{} {}",
            a.status,
            a.text()
        );
    }
    assert_eq!(other.hits(), 0, "no retry went to another pool's backend");
    assert_eq!(get(&c, &t.url("/")).await.text(), "other");
}

#[tokio::test]
async fn metrics_sum_per_pool_to_the_requests_sent() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let dead = closed_port().await;
    let t = TestLb::start(&format!(
        "admin: 127.0.0.1:0\n\
         pools:\n  a:\n    backends: [{{address: {}}}]\n  b:\n    backends: [{{address: {}}}]\n  gone:\n    retry: {{attempts: 1}}\n    backends: [{{address: {dead}}}]\n\
         routes:\n  - {{path_prefix: /a, pool: a}}\n  - {{path_prefix: /b, pool: b}}\n  - {{path_prefix: /gone, pool: gone}}\n",
        a.addr, b.addr
    ))
    .await;
    let c = client();
    for (path, n) in [("/a", 7), ("/b", 5), ("/gone", 2), ("/nowhere", 3)] {
        for _ in 0..n {
            get(&c, &t.url(path)).await;
        }
    }
    let admin = t.lb.admin_addr().unwrap();
    let text = get(&c, &format!("http://{admin}/metrics")).await.text();
    let sum = |needle: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with("lb_requests_total{") && l.contains(needle))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(sum("pool=\"a\""), 7.0, "{text}");
    assert_eq!(sum("pool=\"b\""), 5.0, "{text}");
    assert_eq!(
        sum("pool=\"gone\""),
        2.0,
        "lb's own 502s count in their pool: {text}"
    );
    assert_eq!(sum("pool=\"none\""), 3.0, "404s belong to no pool: {text}");
    assert!(
        text.contains(&format!(
            "lb_backend_healthy{{pool=\"a\",backend=\"{}\"}} 1",
            a.addr
        )),
        "{text}"
    );
    let status: serde_json::Value =
        serde_json::from_slice(&get(&c, &format!("http://{admin}/status")).await.body).unwrap();
    assert_eq!(
        status["pools"]["a"]["backends"][0]["address"],
        a.addr.to_string()
    );
    assert_eq!(status["pools"]["b"]["strategy"], "round_robin");
    assert_eq!(status["backends"][0]["pool"], "a");
}

/// The error `Config::parse` gives for `yaml`.
fn refused(yaml: &str) -> String {
    match lb::config::Config::parse(yaml.as_bytes(), std::path::Path::new("lb.yaml")) {
        Ok(_) => panic!("accepted:\n{yaml}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn pools_and_routes_are_validated_with_their_key_path() {
    let pools = "pools:\n  api: {backends: [{address: 127.0.0.1:1}]}\n  web: {backends: [{address: 127.0.0.1:2}]}\n";
    let cases = [
        (
            format!("{pools}routes:\n  - {{pool: web}}\n  - {{path_prefix: /v1, pool: apii}}\n"),
            "routes[1].pool: no pool named \"apii\"",
        ),
        (
            format!("{pools}routes:\n  - {{host: a.com, path_prefix: /x, pool: web}}\n  - {{host: A.com, path_prefix: /x, pool: api}}\n"),
            "routes[1]: duplicates routes[0]",
        ),
        (
            format!("{pools}routes:\n  - {{host: \"a.*.com\", pool: web}}\n"),
            "routes[0].host:",
        ),
        (
            format!("{pools}routes:\n  - {{path_prefix: v1, pool: web}}\n"),
            "routes[0].path_prefix:",
        ),
        (
            format!("backends: [{{address: 127.0.0.1:3}}]\n{pools}routes:\n  - {{pool: web}}\n"),
            "backends: cannot be used with pools",
        ),
        (
            "backends: [{address: 127.0.0.1:3}]\nroutes:\n  - {pool: default}\n".to_owned(),
            "routes: needs pools",
        ),
        (pools.to_owned(), "routes: missing: with 2 pools"),
        (
            format!("mode: tcp\n{pools}routes:\n  - {{path_prefix: /v1, pool: web}}\n"),
            "routes[0].path_prefix: mode: tcp has no Host or path",
        ),
        (
            format!("{pools}routes:\n  - {{sni: a.test, pool: web}}\n"),
            "routes[0].sni: routes by the TLS server name in mode: tcp only",
        ),
        (
            format!("mode: tcp\n{pools}routes:\n  - {{sni: \"a.*.test\", pool: web}}\n"),
            "routes[0].sni:",
        ),
        (
            "pools:\n  api: {backends: [{address: \"127.0.0.1\"}]}\n".to_owned(),
            "pools.api.backends[0].address:",
        ),
        (
            "pools:\n  api: {strategy: round_robin, hash_key: path, backends: [{address: 127.0.0.1:1}]}\n".to_owned(),
            "pools.api.hash_key:",
        ),
        (
            "pools:\n  \"a b\": {backends: [{address: 127.0.0.1:1}]}\n".to_owned(),
            "is not a pool name",
        ),
        ("pools:\n  api: {}\n".to_owned(), "pools.api.backends: missing"),
    ];
    for (yaml, want) in cases {
        let error = refused(&yaml);
        assert!(
            error.contains(want),
            "for\n{yaml}\nwanted {want:?}, got: {error}"
        );
    }
}

#[test]
fn top_level_keys_are_defaults_each_pool_overrides() {
    let c = lb::config::Config::parse(
        b"strategy: least_connections\nretry: {attempts: 4}\nhash_key: path\n\
          pools:\n  a: {backends: [{address: 127.0.0.1:1}]}\n  b: {strategy: consistent_hash, retry: {attempts: 1}, backends: [{address: 127.0.0.1:2}]}\n\
          routes:\n  - {path_prefix: /b, pool: b}\n  - {pool: a}\n",
        std::path::Path::new("lb.yaml"),
    )
    .unwrap();
    let (a, b) = (c.pool("a").unwrap(), c.pool("b").unwrap());
    assert_eq!(a.strategy.name(), "least_connections");
    assert_eq!(a.retry.attempts.get(), 4);
    assert_eq!(b.strategy.name(), "consistent_hash");
    assert_eq!(b.retry.attempts.get(), 1);
    // hash_key applies to consistent_hash only: inherited by b, not by a.
    assert_eq!(b.steering.hash_key, lb::config::HashKey::Path);
    assert_eq!(a.steering.hash_key, lb::config::HashKey::ClientIp);
}

#[test]
fn check_prints_the_route_table_and_warns_of_an_unreachable_pool() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "pools:\n  api: {backends: [{address: 127.0.0.1:1}]}\n  web: {backends: [{address: 127.0.0.1:2}]}\n  spare: {backends: [{address: 127.0.0.1:3}]}\n\
         routes:\n  - {host: \"*.example.com\", path_prefix: /v1, strip_prefix: true, pool: api}\n  - {pool: web}\n",
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(["--check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("3 pools, 2 routes"), "{stdout}");
    let routes: Vec<&str> = stdout.lines().filter(|l| l.contains("routes[")).collect();
    assert_eq!(routes.len(), 2, "{stdout}");
    assert!(
        routes[0].contains("*.example.com")
            && routes[0].contains("/v1")
            && routes[0].contains("pool api (strip prefix)"),
        "{}",
        routes[0]
    );
    assert!(routes[1].contains("pool web"), "{}", routes[1]);
    assert!(
        stderr.contains("pools.spare: no route sends requests to this pool"),
        "{stderr}"
    );
}

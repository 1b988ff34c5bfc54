//! Every config error a user can make, with the exact message they see
//! (startup, `--check`, the reload log line and `/status` all print it).

use std::path::Path;
use std::time::Duration;

use super::{Config, ConfigError, Position, Strategy};

fn parse(yaml: &str) -> Result<Config, ConfigError> {
    Config::parse(yaml.as_bytes(), Path::new("conf/lb.yaml"))
}

fn error(yaml: &str) -> String {
    parse(yaml)
        .expect_err("config should be rejected")
        .to_string()
}

const MINIMAL: &str = "backends:\n  - address: 127.0.0.1:9001\n";

#[test]
fn minimal_config_gets_defaults() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.listen().to_string(), "127.0.0.1:8080");
    assert_eq!(c.first_pool().strategy, Strategy::RoundRobin);
    assert_eq!(c.first_pool().backends[0].weight, 1);
    assert_eq!(c.timeouts.connect, Duration::from_secs(1));
    assert_eq!(c.timeouts.request, Duration::from_secs(30));
    assert_eq!(c.timeouts.backend_body, Duration::from_secs(60));
    assert_eq!(c.timeouts.client_send, Duration::from_secs(60));
    assert!(c.first_pool().health_check.is_none());
    assert_eq!(c.first_pool().retry.attempts.get(), 3);
    assert_eq!(c.first_pool().retry.buffer_body_limit, 64 * 1024);
    assert!(
        c.first_pool().retry.retry_on.status(503) && c.first_pool().retry.retry_on.connect_failure
    );
    assert_eq!(
        c.first_pool()
            .outlier_detection
            .consecutive_failures
            .map(|n| n.get()),
        Some(5)
    );
}

#[test]
fn full_example_parses() {
    let c = parse(
        "listen: 0.0.0.0:80\nstrategy: weighted_round_robin\nbackends:\n  - address: App.Internal:9001\n    weight: 3\n  - address: 127.0.0.1:9002\n    weight: 0\ntimeouts:\n  connect: 250ms\n  request: 2s\nhealth_check:\n  path: /healthz\n  interval: 1s\n  timeout: 500ms\n  healthy_threshold: 3\n  unhealthy_threshold: 1\nretry:\n  attempts: 2\n  per_try_timeout: 1s\n  retry_on: [connect_failure, 503]\n  buffer_body_limit: 1MiB\n  budget:\n    ratio: 0.5\n    min_retries_per_second: 3\noutlier_detection:\n  consecutive_failures: 0\n  ejection_time: 30s\n",
    )
    .unwrap();
    assert_eq!(c.first_pool().strategy, Strategy::RoundRobin);
    assert_eq!(
        c.first_pool().backends[0].address.as_str(),
        "app.internal:9001"
    );
    assert_eq!(c.first_pool().backends[1].weight, 0);
    assert_eq!(c.timeouts.connect, Duration::from_millis(250));
    let hc = c.first_pool().health_check.clone().unwrap();
    assert_eq!(hc.path.unwrap().as_str(), "/healthz");
    assert_eq!(hc.unhealthy_threshold.get(), 1);
    assert!(!c.first_pool().retry.retry_on.reset && !c.first_pool().retry.retry_on.status(502));
    assert_eq!(c.first_pool().retry.buffer_body_limit, 1 << 20);
    assert_eq!(c.first_pool().outlier_detection.consecutive_failures, None);
}

/// `protocol:` defaults to http1; the top-level value is each pool's default.
#[test]
fn grpc_health_checks_parse() {
    let c = parse(&format!(
        "protocol: h2c\nhealth_check:\n  grpc: true\n  grpc_service: my.Svc\n{MINIMAL}"
    ))
    .unwrap();
    let hc = c.first_pool().health_check.clone().unwrap();
    assert_eq!(hc.grpc.as_deref(), Some("my.Svc"));
    assert!(hc.path.is_none());
    assert!(
        c.summary()
            .contains("health checks gRPC Health/Check \"my.Svc\" every 2s"),
        "{}",
        c.summary()
    );
    let c = parse(&format!(
        "protocol: h2c\nhealth_check: {{grpc: true}}\n{MINIMAL}"
    ))
    .unwrap();
    assert_eq!(
        c.first_pool().health_check.clone().unwrap().grpc.as_deref(),
        Some("")
    );
}

#[test]
fn protocol_is_a_pool_key_with_a_top_level_default() {
    use super::Protocol;
    assert_eq!(
        parse(MINIMAL).unwrap().first_pool().protocol,
        Protocol::Http1
    );
    let c = parse(
        "protocol: h2c\npools:\n  a:\n    backends: [{address: 127.0.0.1:9001}]\n  b:\n    protocol: http1\n    backends: [{address: 127.0.0.1:9002}]\nroutes:\n  - {path_prefix: /a, pool: a}\n  - {path_prefix: /, pool: b}\n",
    )
    .unwrap();
    assert_eq!(c.pools[0].protocol, Protocol::H2c);
    assert_eq!(c.pools[1].protocol, Protocol::Http1);
    assert!(
        c.summary()
            .contains("pool a: strategy round_robin, protocol h2c, 1 backend"),
        "{}",
        c.summary()
    );
    assert!(
        c.summary()
            .contains("pool b: strategy round_robin, 1 backend"),
        "{}",
        c.summary()
    );
}

#[test]
fn response_relay_timeouts_load() {
    let c = parse(&format!(
        "{MINIMAL}timeouts:\n  backend_body: 500ms\n  client_send: 2m\n"
    ))
    .unwrap();
    assert_eq!(c.timeouts.backend_body, Duration::from_millis(500));
    assert_eq!(c.timeouts.client_send, Duration::from_secs(120));
}

#[test]
fn h2_stream_cap_defaults_to_100_and_is_bounded() {
    assert_eq!(
        parse(MINIMAL).unwrap().limits.h2_max_concurrent_streams,
        100
    );
    let c = parse(&format!(
        "{MINIMAL}limits:\n  h2_max_concurrent_streams: 8\n"
    ))
    .unwrap();
    assert_eq!(c.limits.h2_max_concurrent_streams, 8);
    for bad in ["0", "10001", "-1"] {
        let e = error(&format!(
            "{MINIMAL}limits:\n  h2_max_concurrent_streams: {bad}\n"
        ));
        assert!(
            e.starts_with("conf/lb.yaml:")
                && e.ends_with(&format!(
                    ": limits.h2_max_concurrent_streams: {bad} is out of range (1 to 10000)"
                )),
            "{e}"
        );
    }
}

#[test]
fn steering_keys_parse_with_defaults() {
    use super::{HashKey, DEFAULT_PEAK_EWMA_DECAY};
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.first_pool().steering.hash_key, HashKey::ClientIp);
    assert_eq!(
        c.first_pool().steering.peak_ewma_decay,
        DEFAULT_PEAK_EWMA_DECAY
    );
    assert!(
        c.first_pool().steering.session_affinity.is_none()
            && c.first_pool().steering.slow_start.is_none()
    );
    let c = parse(&format!(
        "strategy: consistent_hash\nhash_key: header:X-User\nsession_affinity:\n  cookie: lb_id\n  ttl: 1h\nslow_start: 30s\n{MINIMAL}"
    ))
    .unwrap();
    assert_eq!(c.first_pool().strategy, Strategy::ConsistentHash);
    assert_eq!(
        c.first_pool().steering.hash_key,
        HashKey::Header("x-user".parse().unwrap())
    );
    let a = c.first_pool().steering.session_affinity.clone().unwrap();
    assert_eq!(
        (a.cookie.as_str(), a.ttl),
        ("lb_id", Some(Duration::from_secs(3600)))
    );
    assert_eq!(
        c.first_pool().steering.slow_start,
        Some(Duration::from_secs(30))
    );
    for (key, want) in [
        ("path", HashKey::Path),
        ("client_ip", HashKey::ClientIp),
        ("cookie:sid", HashKey::Cookie("sid".into())),
        ("query:user", HashKey::Query("user".into())),
    ] {
        let c = parse(&format!(
            "strategy: consistent_hash\nhash_key: {key}\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(c.first_pool().steering.hash_key, want);
    }
    let c = parse(&format!(
        "strategy: peak_ewma\npeak_ewma:\n  decay: 2s\nslow_start: 0s\n{MINIMAL}"
    ))
    .unwrap();
    assert_eq!(
        c.first_pool().steering.peak_ewma_decay,
        Duration::from_secs(2)
    );
    assert_eq!(c.first_pool().steering.slow_start, None);
}

/// `(config text, the whole error message)`. Every kind of mistake, at each
/// step that finds it: YAML syntax, unknown keys, wrong types, value checks
/// and rules between keys, each at the line and column of the value.
#[rustfmt::skip]
const BAD_CONFIGS: &[(&str, &str)] = &[
    ("backends:\n  - address: *nope\n",
     "conf/lb.yaml:2:14: unknown anchor: an alias *NAME refers to an &NAME written before it"),
    ("backends:\n  - address: 127.0.0.1:9001\n    weight: 1.5\n",
     "conf/lb.yaml:3:13: backends[0].weight: expected an integer, found 1.5"),
    ("backends: [127.0.0.1:9001]\n",
     "conf/lb.yaml:1:12: backends[0]: expected a mapping like {address: host:port, weight: 1}, found \"127.0.0.1:9001\""),
    ("backends: 127.0.0.1:9001\n",
     "conf/lb.yaml:1:11: backends: expected a list, found \"127.0.0.1:9001\""),
    ("backends:\n  - 127.0.0.1:9001\n",
     "conf/lb.yaml:2:5: backends[0]: expected a mapping like {address: host:port, weight: 1}, found \"127.0.0.1:9001\""),
    ("backends:\n  - address: 127.0.0.1:9001\nretry:\n  attempts: three\n",
     "conf/lb.yaml:4:13: retry.attempts: expected an integer, found \"three\""),
    ("backends:\n  - address: 127.0.0.1:9001\nretry:\n  attempts: 2.5\n",
     "conf/lb.yaml:4:13: retry.attempts: expected an integer, found 2.5"),
    ("backends:\n  - address: 127.0.0.1:9001\nlimits:\n  max_connections: 99999999999999999999999\n",
     "conf/lb.yaml:4:20: limits.max_connections: 99999999999999999999999 is too large"),
    ("listen: 127.0.0.1:8080\nstratgy: random\nbackends:\n  - address: 127.0.0.1:9001\n",
     "conf/lb.yaml:2:1: stratgy: unknown key; expected one of listen, mode, strategy, backends, discovery, timeouts, health_check, outlier_detection, retry, hash_key, session_affinity, peak_ewma, slow_start, protocol, backend_tls, limits, admin, access_log, send_proxy_protocol, pools, routes, tls, listeners"),
    ("backends:\n  - address: 127.0.0.1:9001\n    wieght: 2\n",
     "conf/lb.yaml:3:5: backends[0].wieght: unknown key; expected address or weight"),
    ("backends:\n  - weight: 2\n",
     "conf/lb.yaml:2:5: backends[0].address: missing: this key is required"),
    ("strategy: fastest\nbackends:\n  - address: 127.0.0.1:9001\n",
     "conf/lb.yaml:1:11: strategy: \"fastest\" is not a strategy; expected one of round_robin, weighted_round_robin, least_connections, random, power_of_two_choices, consistent_hash, peak_ewma"),
    ("strategy: [round_robin]\nbackends:\n  - address: 127.0.0.1:9001\n",
     "conf/lb.yaml:1:11: strategy: expected a strategy (one of round_robin, weighted_round_robin, least_connections, random, power_of_two_choices, consistent_hash, peak_ewma), found a list"),
    ("mode: udp\nbackends:\n  - address: 127.0.0.1:9001\n",
     "conf/lb.yaml:1:7: mode: \"udp\" is not a mode; expected http or tcp"),
    ("- listen: 127.0.0.1:8080\n",
     "conf/lb.yaml:1:1: expected a mapping of config keys (like backends: and listen:), found a list"),
    ("backends:\n  - address: 127.0.0.1:9001\n weight: 2\n",
     "conf/lb.yaml:3:2: did not find expected key, while parsing a block mapping"),
    ("backends:\n  - address: 127.0.0.1:9001\nbackends:\n  - address: 127.0.0.1:9002\n",
     "conf/lb.yaml:3:1: backends: written twice in the same mapping (first at line 1)"),
    ("backends:\n  - address: 127.0.0.1:9001\naccess_log: yes please\n",
     "conf/lb.yaml:3:13: access_log: expected true or false, found \"yes please\""),
    ("backends:\n  - address: 127.0.0.1:9001\nretry:\n  budget:\n    ratio: lots\n",
     "conf/lb.yaml:5:12: retry.budget.ratio: expected a number, found \"lots\""),
    ("backends:\n  - address: 127.0.0.1:9001\ntimeouts: 5s\n",
     "conf/lb.yaml:3:11: timeouts: expected a mapping like {connect: 1s}, found \"5s\""),
    ("backends:\n  - address: 127.0.0.1:9001\nlisten: 8080\n",
     "conf/lb.yaml:3:9: listen: expected a string, found 8080"),
    ("backends: []\n",
     "conf/lb.yaml:1:11: backends: is empty: list at least one backend address"),
    ("listen: 127.0.0.1:8080\n",
     "conf/lb.yaml:1:1: backends: missing: list at least one backend address"),
    ("# only a comment\n",
     "conf/lb.yaml:2:1: backends: missing: list at least one backend address"),
    ("backends:\n  - address: 127.0.0.1:9001\n  - address: 127.0.0.1:9001\n",
     "conf/lb.yaml:3:14: backends[1].address: 127.0.0.1:9001 is a duplicate of backends[0]"),
    ("backends:\n  - address: 127.0.0.1:9001\n  - address: 127.0.0.1:9002\n  - address: \"127.0.0.1\"\n",
     "conf/lb.yaml:4:14: backends[2].address: \"127.0.0.1\" is not a host:port address (like 127.0.0.1:9001 or app.internal:80)"),
    ("backends:\n  - address: http://127.0.0.1:9001\n",
     "conf/lb.yaml:2:14: backends[0].address: \"http://127.0.0.1:9001\" is not a host:port address (like 127.0.0.1:9001 or app.internal:80)"),
    ("backends:\n  - address: 127.0.0.1:99999\n",
     "conf/lb.yaml:2:14: backends[0].address: \"127.0.0.1:99999\" is not a host:port address (like 127.0.0.1:9001 or app.internal:80)"),
    ("backends:\n  - address: 127.0.0.1:9001\n    weight: 257\n",
     "conf/lb.yaml:3:13: backends[0].weight: 257 is out of range (0 to 256; 0 drains the backend)"),
    ("backends:\n  - address: 127.0.0.1:9001\n    weight: -1\n",
     "conf/lb.yaml:3:13: backends[0].weight: -1 is out of range (0 to 256; 0 drains the backend)"),
    ("backends:\n  - address: 127.0.0.1:9001\n    weight: 0\n  - address: 127.0.0.1:9002\n    weight: 0\n",
     "conf/lb.yaml:2:3: backends: every weight is 0: no backend could receive traffic"),
    ("backends:\n  - address: 127.0.0.1:9001\ntimeouts:\n  connect: 0s\n",
     "conf/lb.yaml:4:12: timeouts.connect: must be greater than zero"),
    ("backends:\n  - address: 127.0.0.1:9001\ntimeouts:\n  request: 5\n",
     "conf/lb.yaml:4:12: timeouts.request: 5 has no unit; write 5s or 5ms"),
    ("backends:\n  - address: 127.0.0.1:9001\ntimeouts:\n  request: soon\n",
     "conf/lb.yaml:4:12: timeouts.request: \"soon\" is not a duration; write it like 250ms, 2s or 1m 30s"),
    ("backends:\n  - address: 127.0.0.1:9001\ntimeouts:\n  request: 5 parsecs\n",
     "conf/lb.yaml:4:12: timeouts.request: \"5 parsecs\" has an unknown unit \"parsecs\"; write it like 250ms, 2s, 5m or 1h"),
    ("listen: localhost\nbackends:\n  - address: 127.0.0.1:9001\n",
     "conf/lb.yaml:1:9: listen: \"localhost\" is not an IP:port address (like 127.0.0.1:8080 or [::]:80)"),
    ("backends:\n  - address: 127.0.0.1:9001\nhealth_check:\n  interval: 1s\n  timeout: 2s\n",
     "conf/lb.yaml:5:12: health_check.timeout: 2s must not exceed health_check.interval (1s)"),
    ("backends:\n  - address: 127.0.0.1:9001\nhealth_check:\n  path: health\n",
     "conf/lb.yaml:4:9: health_check.path: \"health\" must start with /"),
    ("backends:\n  - address: 127.0.0.1:9001\nhealth_check:\n  healthy_threshold: 0\n",
     "conf/lb.yaml:4:22: health_check.healthy_threshold: 0 is out of range (1 to 1000)"),
    ("backends:\n  - address: 127.0.0.1:9001\nretry:\n  attempts: 0\n",
     "conf/lb.yaml:4:13: retry.attempts: 0 is out of range (1 to 100)"),
    ("backends:\n  - address: 127.0.0.1:9001\nretry:\n  retry_on: [connect_failure, 404]\n",
     "conf/lb.yaml:4:31: retry.retry_on[1]: 404 is not a 5xx status code (only server errors are retried)"),
    ("backends:\n  - address: 127.0.0.1:9001\nretry:\n  retry_on: [sometimes]\n",
     "conf/lb.yaml:4:14: retry.retry_on[0]: expected connect_failure, reset, timeout, unavailable or a 5xx status code, found \"sometimes\""),
    ("backends:\n  - address: 127.0.0.1:9001\nretry:\n  budget:\n    ratio: -1\n",
     "conf/lb.yaml:5:12: retry.budget.ratio: -1 is out of range (0 to 1000)"),
    ("backends:\n  - address: 127.0.0.1:9001\nretry:\n  buffer_body_limit: 1GiB\n",
     "conf/lb.yaml:4:22: retry.buffer_body_limit: must be at most 64MiB (bodies are held in memory while they may be replayed)"),
    ("backends:\n  - address: 127.0.0.1:9001\nlimits:\n  max_header_bytes: 1KiB\n",
     "conf/lb.yaml:4:21: limits.max_header_bytes: 1024 is out of range (8KiB to 16MiB)"),
    ("backends:\n  - address: 127.0.0.1:9001\nlimits:\n  max_header_bytes: 12 parsecs\n",
     "conf/lb.yaml:4:21: limits.max_header_bytes: expected a size in bytes, like 65536 or 64KiB, found \"12 parsecs\""),
    ("backends:\n  - address: 127.0.0.1:9001\noutlier_detection:\n  max_ejection_percent: 101\n",
     "conf/lb.yaml:4:25: outlier_detection.max_ejection_percent: 101 is out of range (0 to 100)"),
    ("strategy: consistent_hash\nhash_key: body\nbackends:\n  - address: 127.0.0.1:9001\n",
     "conf/lb.yaml:2:11: hash_key: \"body\" is not a hash key (client_ip, path, header:NAME, cookie:NAME or query:NAME)"),
    ("hash_key: path\nbackends:\n  - address: 127.0.0.1:9001\n",
     "conf/lb.yaml:1:11: hash_key: applies only to strategy consistent_hash (strategy is round_robin)"),
    ("peak_ewma:\n  decay: 2s\nbackends:\n  - address: 127.0.0.1:9001\n",
     "conf/lb.yaml:2:10: peak_ewma.decay: applies only to strategy peak_ewma (strategy is round_robin)"),
    ("strategy: peak_ewma\npeak_ewma:\n  decay: 1ms\nbackends:\n  - address: 127.0.0.1:9001\n",
     "conf/lb.yaml:3:10: peak_ewma.decay: 1ms is too short (at least 10ms)"),
    ("session_affinity:\n  ttl: 1h\nbackends:\n  - address: 127.0.0.1:9001\n",
     "conf/lb.yaml:2:3: session_affinity.cookie: missing: name the cookie lb sets (like lb_backend)"),
    ("session_affinity:\n  cookie: \"a b\"\nbackends:\n  - address: 127.0.0.1:9001\n",
     "conf/lb.yaml:2:11: session_affinity.cookie: \"a b\" is not a valid cookie name"),
    ("session_affinity:\n  cookie: x\n  tll: 1h\nbackends:\n  - address: 127.0.0.1:9001\n",
     "conf/lb.yaml:3:3: session_affinity.tll: unknown key; expected cookie or ttl"),
    ("health_check:\n  grpc: true\nbackends:\n  - address: 127.0.0.1:9001\n",
     "conf/lb.yaml:2:9: health_check.grpc: a gRPC health check needs protocol: h2c or h2 (gRPC is HTTP/2)"),
    ("protocol: h2c\nhealth_check:\n  grpc: true\n  path: /health\nbackends:\n  - address: 127.0.0.1:9001\n",
     "conf/lb.yaml:4:9: health_check.path: a gRPC health check calls grpc.health.v1.Health/Check: remove the path"),
    ("protocol: h2c\nhealth_check:\n  grpc_service: a.B\nbackends:\n  - address: 127.0.0.1:9001\n",
     "conf/lb.yaml:3:17: health_check.grpc_service: names the service of a gRPC health check: set grpc: true too"),
    ("protocol: h3\nbackends:\n  - address: 127.0.0.1:9001\n",
     "conf/lb.yaml:1:11: protocol: \"h3\" is not a backend protocol; expected one of http1, h2c, h2, auto"),
    ("protocol: h2c\nbackend_tls: {ca: ca.pem}\nbackends:\n  - address: 127.0.0.1:9001\n",
     "conf/lb.yaml:2:14: backend_tls: protocol h2c is HTTP/2 without TLS: for HTTP/2 over TLS use protocol: h2 (or auto, to let ALPN choose)"),
    ("pools:\n  grpc:\n    protocol: h2c\n    tls: {ca: ca.pem}\n    backends:\n      - address: 127.0.0.1:9001\n",
     "conf/lb.yaml:4:10: pools.grpc.tls: protocol h2c is HTTP/2 without TLS: for HTTP/2 over TLS use protocol: h2 (or auto, to let ALPN choose)"),
    ("pools:\n  a:\n    tls: {ca: missing.pem}\n    backends:\n      - address: 127.0.0.1:9001\n",
     "conf/lb.yaml:3:15: pools.a.tls.ca: conf/missing.pem: cannot read: No such file or directory (os error 2)"),
    ("backend_tls: {client_certificate: {cert: lb.crt}}\nbackends:\n  - address: 127.0.0.1:9001\n",
     "conf/lb.yaml:1:35: backend_tls.client_certificate: needs both cert: and key: (PEM files)"),
    ("backend_tls:\n  server_name: \"bad name!\"\nbackends:\n  - address: 127.0.0.1:9001\n",
     "conf/lb.yaml:2:16: backend_tls.server_name: is not a DNS name or IP address a certificate can be for"),
    ("mode: tcp\nbackend_tls: {insecure_skip_verify: true}\nbackends:\n  - address: 127.0.0.1:9001\n",
     "conf/lb.yaml:2:14: backend_tls: TLS to backends needs mode: http (tcp mode relays the client's bytes, TLS or not, as they come)"),
    ("pools:\n  a:\n    tls: {ca: ca.pem, verify: false}\n    backends:\n      - address: 127.0.0.1:9001\n",
     "conf/lb.yaml:3:23: pools.a.tls.verify: unknown key; expected one of server_name, ca, client_certificate, insecure_skip_verify"),
    ("mode: tcp\nprotocol: h2c\nbackends:\n  - address: 127.0.0.1:9001\n",
     "conf/lb.yaml:2:11: protocol: chooses the HTTP version spoken to backends: not available with mode: tcp (bytes are relayed as they come)"),
    ("slow_start: soon\nbackends:\n  - address: 127.0.0.1:9001\n",
     "conf/lb.yaml:1:13: slow_start: \"soon\" is not a duration; write it like 250ms, 2s or 1m 30s"),
    ("listen: 127.0.0.1:8080\nadmin: 127.0.0.1:8080\nbackends:\n  - address: 127.0.0.1:9001\n",
     "conf/lb.yaml:2:8: admin: must differ from listen"),
    ("send_proxy_protocol: v1\nbackends:\n  - address: 127.0.0.1:9001\n",
     "conf/lb.yaml:1:22: send_proxy_protocol: is only supported with mode: tcp (HTTP mode passes the client in X-Forwarded-For)"),
    ("mode: tcp\nsend_proxy_protocol: v3\nbackends:\n  - address: 127.0.0.1:9001\n",
     "conf/lb.yaml:2:22: send_proxy_protocol: \"v3\" is not a PROXY protocol version; expected v1 or v2"),
    ("mode: tcp\nhealth_check:\n  path: /health\nbackends:\n  - address: 127.0.0.1:9001\n",
     "conf/lb.yaml:3:9: health_check.path: \"/health\" cannot be probed in tcp mode: a tcp health check is a TCP connect; remove the path"),
    ("mode: tcp\nsession_affinity:\n  cookie: x\nbackends:\n  - address: 127.0.0.1:9001\n",
     "conf/lb.yaml:3:3: session_affinity: needs HTTP cookies: not available with mode: tcp (consistent_hash on client_ip gives affinity)"),
    ("mode: tcp\nstrategy: consistent_hash\nhash_key: path\nbackends:\n  - address: 127.0.0.1:9001\n",
     "conf/lb.yaml:3:11: hash_key: only client_ip can be hashed with mode: tcp"),
    ("backends:\n\t- address: 127.0.0.1:9001\n",
     "conf/lb.yaml:2:1: found character that cannot start any token, while scanning for the next token (a tab: YAML is indented with spaces only)"),
    ("backends: {address: 127.0.0.1:9001\n",
     "conf/lb.yaml:1:11: backends: expected a list, found a mapping"),
];

#[test]
fn every_bad_config_has_its_exact_message() {
    let mut wrong = Vec::new();
    for (yaml, want) in BAD_CONFIGS {
        let got = error(yaml);
        if got != *want {
            wrong.push(format!("{yaml:?}\n  want {want}\n  got  {got}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert!(BAD_CONFIGS.len() >= 30);
}

/// No serde or Rust wording reaches a user, whatever the mistake.
#[test]
fn no_rust_in_any_message() {
    for (yaml, _) in BAD_CONFIGS {
        let e = error(yaml);
        for rust in [
            "struct ",
            "enum ",
            "Raw",
            "i64",
            "u64",
            "f64",
            "invalid type",
            "invalid value",
            "unknown field",
            "unknown variant",
            "sequence",
            "YAML tag",
        ] {
            assert!(!e.contains(rust), "{rust:?} in {e}");
        }
    }
}

/// Every error but the empty file's starts `file:line:col: `, and the
/// position is also available as a value (for `/status`).
#[test]
fn every_message_starts_with_file_line_and_column() {
    for (yaml, _) in BAD_CONFIGS {
        let e = parse(yaml).unwrap_err();
        let Position { line, column } = e.position().expect("a position");
        assert!(
            e.to_string()
                .starts_with(&format!("conf/lb.yaml:{line}:{column}: ")),
            "{e}"
        );
    }
}

#[test]
fn errors_before_parsing_have_positions_too() {
    assert_eq!(error(""), "conf/lb.yaml: file is empty");
    assert_eq!(error("  \n\n"), "conf/lb.yaml: file is empty");
    let e = parse_bytes(b"backends:\n  - address: caf\xe9:80\n").unwrap_err();
    assert_eq!(
        e.to_string(),
        "conf/lb.yaml:2:17: not UTF-8 text; save the file as UTF-8"
    );
    let e = error(&format!("backends: {}", "[".repeat(100)));
    assert_eq!(e, "conf/lb.yaml:1:75: nesting deeper than 64 levels");
}

fn parse_bytes(bytes: &[u8]) -> Result<Config, ConfigError> {
    Config::parse(bytes, Path::new("conf/lb.yaml"))
}

fn warnings(yaml: &str) -> Vec<String> {
    let (_, warnings) = Config::parse_with_warnings(yaml.as_bytes(), Path::new("conf/lb.yaml"))
        .expect("config should be accepted");
    warnings.iter().map(ToString::to_string).collect()
}

#[test]
fn per_try_timeout_longer_than_the_request_timeout_warns() {
    assert_eq!(
        warnings(&format!(
            "{MINIMAL}timeouts:\n  request: 10s\nretry:\n  per_try_timeout: 1m\n"
        )),
        [
            "conf/lb.yaml:6:20: retry.per_try_timeout: 1m is longer than timeouts.request (10s), \
          which bounds all tries together: a try is cut at 10s anyway"
        ]
    );
    // Against the default request timeout (30s) too.
    assert_eq!(
        warnings(&format!("{MINIMAL}retry:\n  per_try_timeout: 31s\n")).len(),
        1
    );
    for fine in ["10s", "30s"] {
        assert!(
            warnings(&format!("{MINIMAL}retry:\n  per_try_timeout: {fine}\n")).is_empty(),
            "{fine}"
        );
    }
    assert!(warnings(MINIMAL).is_empty());
}

#[test]
fn summary_counts_in_words_and_names_admin_and_access_log() {
    assert_eq!(
        parse(MINIMAL).unwrap().summary(),
        "listen 127.0.0.1:8080 (http), strategy round_robin, 1 backend (total weight 1), \
         health checks off, retry 3 attempts, admin off, access log off"
    );
    let c = parse(&format!(
        "{MINIMAL}  - address: 127.0.0.1:9002\nadmin: 127.0.0.1:9901\naccess_log: true\nretry:\n  attempts: 1\nhealth_check: {{}}\n"
    ))
    .unwrap();
    assert_eq!(
        c.summary(),
        "listen 127.0.0.1:8080 (http), strategy round_robin, 2 backends (total weight 2), \
         health checks /health every 2s, retry off (1 attempt), admin 127.0.0.1:9901, access log on"
    );
}

#[test]
fn admin_on_the_wildcard_of_the_listen_port_says_what_clashes() {
    let with = |listen: &str, admin: &str| format!("listen: {listen}\nadmin: {admin}\n{MINIMAL}");
    let e = error(&with("127.0.0.1:8080", "0.0.0.0:8080"));
    assert!(
        e.contains("admin 0.0.0.0:8080 overlaps listen 127.0.0.1:8080")
            && e.contains("admin is on the wildcard address"),
        "{e}"
    );
    let e = error(&with("0.0.0.0:8080", "127.0.0.1:8080"));
    assert!(e.contains("listen is on the wildcard address"), "{e}");
    // `[::]` is dual-stack: it covers IPv4 addresses too.
    let e = error(&with("127.0.0.1:8080", "\"[::]:8080\""));
    assert!(e.contains("overlaps listen 127.0.0.1:8080"), "{e}");
    // These can all be bound side by side.
    for (listen, admin) in [
        ("127.0.0.1:8080", "127.0.0.2:8080"),
        ("127.0.0.1:8080", "0.0.0.0:9901"),
        ("\"[::1]:8080\"", "0.0.0.0:8080"),
        ("127.0.0.1:0", "0.0.0.0:0"),
    ] {
        parse(&with(listen, admin)).unwrap_or_else(|e| panic!("{listen} {admin}: {e}"));
    }
}

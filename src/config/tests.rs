//! Every config error a user can make, with the message they see.

use std::path::Path;
use std::time::Duration;

use super::{Config, ConfigError, Strategy};

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
    assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.strategy, Strategy::RoundRobin);
    assert_eq!(c.backends[0].weight, 1);
    assert_eq!(c.timeouts.connect, Duration::from_secs(1));
    assert_eq!(c.timeouts.request, Duration::from_secs(30));
    assert_eq!(c.timeouts.backend_body, Duration::from_secs(60));
    assert_eq!(c.timeouts.client_send, Duration::from_secs(60));
    assert!(c.health_check.is_none());
    assert_eq!(c.retry.attempts.get(), 3);
    assert_eq!(c.retry.buffer_body_limit, 64 * 1024);
    assert!(c.retry.retry_on.status(503) && c.retry.retry_on.connect_failure);
    assert_eq!(
        c.outlier_detection.consecutive_failures.map(|n| n.get()),
        Some(5)
    );
}

#[test]
fn full_example_parses() {
    let c = parse(
        "listen: 0.0.0.0:80\nstrategy: weighted_round_robin\nbackends:\n  - address: App.Internal:9001\n    weight: 3\n  - address: 127.0.0.1:9002\n    weight: 0\ntimeouts:\n  connect: 250ms\n  request: 2s\nhealth_check:\n  path: /healthz\n  interval: 1s\n  timeout: 500ms\n  healthy_threshold: 3\n  unhealthy_threshold: 1\nretry:\n  attempts: 2\n  per_try_timeout: 1s\n  retry_on: [connect_failure, 503]\n  buffer_body_limit: 1MiB\n  budget:\n    ratio: 0.5\n    min_retries_per_second: 3\noutlier_detection:\n  consecutive_failures: 0\n  ejection_time: 30s\n",
    )
    .unwrap();
    assert_eq!(c.strategy, Strategy::RoundRobin);
    assert_eq!(c.backends[0].address.as_str(), "app.internal:9001");
    assert_eq!(c.backends[1].weight, 0);
    assert_eq!(c.timeouts.connect, Duration::from_millis(250));
    let hc = c.health_check.unwrap();
    assert_eq!(hc.path.unwrap().as_str(), "/healthz");
    assert_eq!(hc.unhealthy_threshold.get(), 1);
    assert!(!c.retry.retry_on.reset && !c.retry.retry_on.status(502));
    assert_eq!(c.retry.buffer_body_limit, 1 << 20);
    assert_eq!(c.outlier_detection.consecutive_failures, None);
}

#[test]
fn syntax_error_has_file_line_and_column() {
    let e = error("backends:\n  - address: [127.0.0.1:9001\n");
    assert!(e.starts_with("conf/lb.yaml: "), "{e}");
    assert!(e.contains("line 3 column 1") || e.contains("line 2"), "{e}");
}

#[test]
fn unknown_key_is_named_with_its_line() {
    let e = error("stratgy: random\nbackends:\n  - address: 127.0.0.1:9001\n");
    assert!(e.contains("unknown field `stratgy`"), "{e}");
    assert!(e.contains("line 1 column 1"), "{e}");
    let e = error("backends:\n  - address: 127.0.0.1:9001\n    wieght: 2\n");
    assert!(
        e.contains("unknown field `wieght`") && e.contains("line 3"),
        "{e}"
    );
}

#[test]
fn unknown_strategy_lists_the_valid_ones() {
    let e = error("strategy: fastest\nbackends:\n  - address: 127.0.0.1:9001\n");
    assert!(
        e.contains("fastest") && e.contains("round_robin") && e.contains("line 1"),
        "{e}"
    );
}

#[test]
fn empty_file() {
    assert_eq!(error(""), "conf/lb.yaml: file is empty");
    // A file of only comments parses as YAML null: not a config either.
    assert!(error("# only a comment\n").starts_with("conf/lb.yaml: "));
}

#[test]
fn backend_list_errors_name_the_field() {
    assert_eq!(
        error("backends: []\n"),
        "conf/lb.yaml: backends: is empty: list at least one backend address"
    );
    assert!(error("listen: 127.0.0.1:8080\n").contains("backends: missing"));
    let e = error("backends:\n  - address: 127.0.0.1:9001\n  - address: 127.0.0.1:9001\n");
    assert!(
        e.contains("backends[1].address") && e.contains("duplicate of backends[0]"),
        "{e}"
    );
    for bad in [
        "127.0.0.1",
        "http://127.0.0.1:9001",
        "127.0.0.1:99999",
        ":80",
        "a b:80",
    ] {
        let e = error(&format!("backends:\n  - address: \"{bad}\"\n"));
        assert!(
            e.contains("backends[0].address") && e.contains("not a host:port"),
            "{bad}: {e}"
        );
    }
    let e = error("backends:\n  - address: 127.0.0.1:9001\n    weight: 257\n");
    assert!(
        e.contains("backends[0].weight") && e.contains("out of range"),
        "{e}"
    );
    let e = error("backends:\n  - address: 127.0.0.1:9001\n    weight: -1\n");
    assert!(e.contains("backends[0].weight"), "{e}");
    let e = error("backends:\n  - address: 127.0.0.1:9001\n    weight: 0\n  - address: 127.0.0.1:9002\n    weight: 0\n");
    assert!(e.contains("every weight is 0"), "{e}");
}

#[test]
fn duration_errors() {
    let e = error(&format!("{MINIMAL}timeouts:\n  connect: 0s\n"));
    assert_eq!(
        e,
        "conf/lb.yaml: timeouts.connect: must be greater than zero"
    );
    let e = error(&format!("{MINIMAL}timeouts:\n  request: 0\n"));
    assert!(
        e.contains("timeouts.request: must be greater than zero"),
        "{e}"
    );
    let e = error(&format!("{MINIMAL}timeouts:\n  request: 5\n"));
    assert!(e.contains("has no unit") && e.contains("line 4"), "{e}");
    let e = error(&format!("{MINIMAL}timeouts:\n  request: soon\n"));
    assert!(
        e.contains("invalid duration") && e.contains("line 4"),
        "{e}"
    );
}

#[test]
fn response_relay_timeouts_load_and_name_their_key() {
    let c = parse(&format!(
        "{MINIMAL}timeouts:\n  backend_body: 500ms\n  client_send: 2m\n"
    ))
    .unwrap();
    assert_eq!(c.timeouts.backend_body, Duration::from_millis(500));
    assert_eq!(c.timeouts.client_send, Duration::from_secs(120));
    for key in ["backend_body", "client_send"] {
        let e = error(&format!("{MINIMAL}timeouts:\n  {key}: 0s\n"));
        assert_eq!(
            e,
            format!("conf/lb.yaml: timeouts.{key}: must be greater than zero")
        );
        let e = error(&format!("{MINIMAL}timeouts:\n  {key}: 5\n"));
        assert!(e.contains("has no unit") && e.contains("line 4"), "{e}");
        let e = error(&format!("{MINIMAL}timeouts:\n  {key}: forever\n"));
        assert!(e.contains("invalid duration") && e.contains(key), "{e}");
    }
}

#[test]
fn listen_and_section_errors() {
    let e = error(&format!("listen: localhost\n{MINIMAL}"));
    assert!(
        e.contains("listen: ") && e.contains("not an IP:port"),
        "{e}"
    );
    let e = error(&format!(
        "{MINIMAL}health_check:\n  interval: 1s\n  timeout: 2s\n"
    ));
    assert!(e.contains("health_check.timeout"), "{e}");
    let e = error(&format!("{MINIMAL}health_check:\n  path: health\n"));
    assert!(e.contains("health_check.path"), "{e}");
    let e = error(&format!("{MINIMAL}health_check:\n  healthy_threshold: 0\n"));
    assert!(e.contains("health_check.healthy_threshold"), "{e}");
    let e = error(&format!("{MINIMAL}retry:\n  attempts: 0\n"));
    assert!(e.contains("retry.attempts: 0 is out of range"), "{e}");
    let e = error(&format!("{MINIMAL}retry:\n  retry_on: [404]\n"));
    assert!(e.contains("not a 5xx"), "{e}");
    let e = error(&format!("{MINIMAL}retry:\n  retry_on: [sometimes]\n"));
    assert!(e.contains("connect_failure, reset, timeout"), "{e}");
    let e = error(&format!("{MINIMAL}retry:\n  budget:\n    ratio: -1\n"));
    assert!(e.contains("retry.budget.ratio"), "{e}");
}

#[test]
fn steering_keys_parse_with_defaults() {
    use super::{HashKey, DEFAULT_PEAK_EWMA_DECAY};
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.steering.hash_key, HashKey::ClientIp);
    assert_eq!(c.steering.peak_ewma_decay, DEFAULT_PEAK_EWMA_DECAY);
    assert!(c.steering.session_affinity.is_none() && c.steering.slow_start.is_none());
    let c = parse(&format!(
        "strategy: consistent_hash\nhash_key: header:X-User\nsession_affinity:\n  cookie: lb_id\n  ttl: 1h\nslow_start: 30s\n{MINIMAL}"
    ))
    .unwrap();
    assert_eq!(c.strategy, Strategy::ConsistentHash);
    assert_eq!(
        c.steering.hash_key,
        HashKey::Header("x-user".parse().unwrap())
    );
    let a = c.steering.session_affinity.unwrap();
    assert_eq!(
        (a.cookie.as_str(), a.ttl),
        ("lb_id", Some(Duration::from_secs(3600)))
    );
    assert_eq!(c.steering.slow_start, Some(Duration::from_secs(30)));
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
        assert_eq!(c.steering.hash_key, want);
    }
    let c = parse(&format!(
        "strategy: peak_ewma\npeak_ewma:\n  decay: 2s\nslow_start: 0s\n{MINIMAL}"
    ))
    .unwrap();
    assert_eq!(c.steering.peak_ewma_decay, Duration::from_secs(2));
    assert_eq!(c.steering.slow_start, None);
}

#[test]
fn steering_errors_name_the_field() {
    let e = error(&format!(
        "strategy: consistent_hash\nhash_key: body\n{MINIMAL}"
    ));
    assert!(e.contains("hash_key: \"body\" is not a hash key"), "{e}");
    let e = error(&format!(
        "strategy: consistent_hash\nhash_key: \"header:bad header\"\n{MINIMAL}"
    ));
    assert!(
        e.contains("hash_key: \"bad header\" is not a valid header name"),
        "{e}"
    );
    let e = error(&format!("hash_key: path\n{MINIMAL}"));
    assert!(
        e.contains("hash_key: applies only to strategy consistent_hash (strategy is round_robin)"),
        "{e}"
    );
    let e = error(&format!("peak_ewma:\n  decay: 2s\n{MINIMAL}"));
    assert!(
        e.contains("peak_ewma.decay: applies only to strategy peak_ewma"),
        "{e}"
    );
    let e = error(&format!(
        "strategy: peak_ewma\npeak_ewma:\n  decay: 1ms\n{MINIMAL}"
    ));
    assert!(e.contains("peak_ewma.decay: 1ms is too short"), "{e}");
    let e = error(&format!("session_affinity:\n  ttl: 1h\n{MINIMAL}"));
    assert!(e.contains("session_affinity.cookie: missing"), "{e}");
    let e = error(&format!("session_affinity:\n  cookie: \"a b\"\n{MINIMAL}"));
    assert!(
        e.contains("session_affinity.cookie: \"a b\" is not a valid cookie name"),
        "{e}"
    );
    let e = error(&format!(
        "session_affinity:\n  cookie: x\n  ttl: 10ms\n{MINIMAL}"
    ));
    assert!(e.contains("session_affinity.ttl: 10ms is too short"), "{e}");
    let e = error(&format!(
        "session_affinity:\n  cookie: x\n  tll: 1h\n{MINIMAL}"
    ));
    assert!(e.contains("unknown field `tll`"), "{e}");
    let e = error(&format!("slow_start: soon\n{MINIMAL}"));
    assert!(e.contains("invalid duration"), "{e}");
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

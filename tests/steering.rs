//! Issue 10: consistent hashing, session affinity, peak EWMA and slow start,
//! checked through the real proxy with real backends.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::Request;
use tokio::time::Instant;

/// One failed probe takes a backend out, one passing brings it back, so a
/// `/health` status change shows within about a second. The timeout is
/// generous on purpose: with a threshold of one, a probe that a loaded
/// machine answered late would take a healthy backend out and move its keys.
const FAST_CHECKS: &str = "health_check:\n  path: /health\n  interval: 1s\n  timeout: 1s\n  healthy_threshold: 1\n  unhealthy_threshold: 1\n";

/// For tests that assert which backend answers: the default 1 s connect
/// timeout can pass on a loaded machine (a loopback SYN waits for a starved
/// softirq or is retransmitted after 1 s), and lb then correctly fails over
/// to the next backend, which the test would read as a routing change.
const PATIENT: &str = "timeouts:\n  connect: 10s\n";

/// `backends:` with the given weights.
fn weighted(backends: &[&Backend], weights: &[u32]) -> String {
    let mut s = String::from("backends:\n");
    for (b, w) in backends.iter().zip(weights) {
        s.push_str(&format!("  - address: {}\n    weight: {w}\n", b.addr));
    }
    s
}

/// GET `url` with extra headers; returns the answering backend and the answer.
async fn get_with(c: &TestClient, url: &str, headers: &[(&str, &str)]) -> (String, Answer) {
    let mut req = Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let a = send(c, req.body(Full::<Bytes>::default()).unwrap()).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let who = a.headers["x-backend"].to_str().unwrap().to_owned();
    (who, a)
}

/// The backend each `x-user` key reaches, sending `keys` over 8 connections.
async fn route_keys(url: &str, keys: &[String]) -> HashMap<String, String> {
    let chunks: Vec<Vec<String>> = keys
        .chunks(keys.len().div_ceil(8))
        .map(<[_]>::to_vec)
        .collect();
    let mut tasks = Vec::new();
    for chunk in chunks {
        let url = url.to_owned();
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut out = Vec::new();
            for k in chunk {
                let (who, _) = get_with(&c, &url, &[("x-user", &k)]).await;
                out.push((k, who));
            }
            out
        }));
    }
    let mut map = HashMap::new();
    for t in tasks {
        map.extend(t.await.unwrap());
    }
    map
}

/// lb's attempt counters other than successes: what a routing test that
/// failed must look at first (a failover is the usual reason a key moves).
fn failed_attempts(lb: &TestLb) -> String {
    lb::admin::exposition::render(lb.lb.runtime())
        .lines()
        .filter(|l| l.starts_with("lb_upstream_attempts") && !l.contains("\"success\""))
        .collect::<Vec<_>>()
        .join("\n")
}

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("user-{i}")).collect()
}

const HASH_BY_USER: &str = "strategy: consistent_hash\nhash_key: header:x-user\n";
/// [`HASH_BY_USER`] and [`PATIENT`]: the key alone picks the backend.
const STABLE_HASH_BY_USER: &str =
    "strategy: consistent_hash\nhash_key: header:x-user\ntimeouts:\n  connect: 10s\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_is_stable_and_spreads_by_weight() {
    let bs = Backend::start_many(3).await;
    let refs: Vec<&Backend> = bs.iter().collect();
    let lb = TestLb::start(&format!(
        "{STABLE_HASH_BY_USER}{}",
        weighted(&refs, &[1, 1, 2])
    ))
    .await;
    let keys = keys(2000);
    let first = route_keys(&lb.url("/"), &keys).await;
    let second = route_keys(&lb.url("/"), &keys).await;
    let moved: Vec<&String> = keys.iter().filter(|k| first[*k] != second[*k]).collect();
    assert!(
        moved.is_empty(),
        "{} keys changed backend between two requests (e.g. {:?}); failed attempts:\n{}",
        moved.len(),
        &moved[..moved.len().min(5)],
        failed_attempts(&lb)
    );
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for who in first.values() {
        *counts.entry(who).or_default() += 1;
    }
    for (name, share) in [("b0", 0.25), ("b1", 0.25), ("b2", 0.5)] {
        let got = counts.get(name).copied().unwrap_or(0) as f64 / keys.len() as f64;
        assert!(
            (got / share - 1.0).abs() <= 0.15,
            "{name}: {got:.3} of keys, weighted share {share} ({counts:?})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_backend_moves_only_its_keys() {
    let bs = Backend::start_many(5).await;
    let refs: Vec<&Backend> = bs.iter().collect();
    let lb = TestLb::start(&format!("{STABLE_HASH_BY_USER}{}", backends_yaml(&refs))).await;
    let keys = keys(600);
    let before = route_keys(&lb.url("/"), &keys).await;
    lb.rewrite(&format!(
        "{STABLE_HASH_BY_USER}{}",
        backends_yaml(&refs[..4])
    ));
    eventually!(WAIT, lb.applied() == 2);
    let after = route_keys(&lb.url("/"), &keys).await;
    let others: Vec<&String> = keys.iter().filter(|k| before[*k] != "b4").collect();
    let stayed = others.iter().filter(|k| before[**k] == after[**k]).count();
    assert!(
        stayed as f64 >= 0.97 * others.len() as f64,
        "only {stayed} of {} keys of the remaining backends stayed",
        others.len()
    );
    assert!(after.values().all(|w| w != "b4"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_a_down_backend_move_and_come_back() {
    let bs = Backend::start_many(3).await;
    let refs: Vec<&Backend> = bs.iter().collect();
    let lb = TestLb::start(&format!(
        "strategy: consistent_hash\nhash_key: path\n{FAST_CHECKS}{PATIENT}{}",
        backends_yaml(&refs)
    ))
    .await;
    let c = client();
    let paths: Vec<String> = (0..300).map(|i| format!("/item/{i}")).collect();
    let mut home = Vec::new();
    for p in &paths {
        home.push(get_with(&c, &lb.url(p), &[]).await.0);
    }
    assert!(home.iter().any(|h| h == "b1"));
    bs[1].set_health(500);
    let b1 = lb.lb.runtime().snapshot().first_pool().backends[1]
        .state
        .clone();
    eventually!(WAIT, !b1.is_healthy(), "health checks never took b1 down");
    for (p, h) in paths.iter().zip(&home) {
        let (now, _) = get_with(&c, &lb.url(p), &[]).await;
        let (again, _) = get_with(&c, &lb.url(p), &[]).await;
        assert_eq!(now, again, "{p} is not stable while b1 is down");
        if h == "b1" {
            assert_ne!(now, "b1");
        } else {
            assert_eq!(&now, h, "{p} moved although its backend is up");
        }
    }
    bs[1].set_health(200);
    eventually!(WAIT, b1.is_healthy(), "b1 never came back");
    for (p, h) in paths.iter().zip(&home) {
        assert_eq!(
            &get_with(&c, &lb.url(p), &[]).await.0,
            h,
            "{p} did not return"
        );
    }
}

#[tokio::test]
async fn requests_without_a_key_are_round_robin() {
    let bs = Backend::start_many(3).await;
    let refs: Vec<&Backend> = bs.iter().collect();
    let c = client();
    let lb = TestLb::start(&format!("{STABLE_HASH_BY_USER}{}", backends_yaml(&refs))).await;
    let mut seen = Vec::new();
    for _ in 0..6 {
        seen.push(get_with(&c, &lb.url("/"), &[]).await.0);
    }
    assert_eq!(seen, ["b0", "b1", "b2", "b0", "b1", "b2"]);
    // The default key is the client address: one client, one backend.
    let lb = TestLb::start(&format!(
        "strategy: consistent_hash\n{PATIENT}{}",
        backends_yaml(&refs)
    ))
    .await;
    let first = get_with(&c, &lb.url("/"), &[]).await.0;
    for _ in 0..10 {
        assert_eq!(get_with(&c, &lb.url("/"), &[]).await.0, first);
    }
    // query:NAME hashes the parameter; a request without it rotates.
    let lb = TestLb::start(&format!(
        "strategy: consistent_hash\nhash_key: query:user\n{PATIENT}{}",
        backends_yaml(&refs)
    ))
    .await;
    let mut by_user = HashMap::new();
    for round in 0..2 {
        for u in 0..30 {
            let (who, _) = get_with(&c, &lb.url(&format!("/?x=1&user={u}")), &[]).await;
            if round == 0 {
                by_user.insert(u, who);
            } else {
                assert_eq!(by_user[&u], who);
            }
        }
    }
    assert!(
        by_user
            .values()
            .collect::<std::collections::HashSet<_>>()
            .len()
            > 1
    );
}

const STICKY: &str = "session_affinity:\n  cookie: lb_sticky\n  ttl: 1h\n";

/// The `name=value` part of the response's affinity `Set-Cookie`, if any.
fn issued(a: &Answer) -> Option<String> {
    a.headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .find(|v| v.starts_with("lb_sticky="))
        .map(|v| v.split(';').next().unwrap().to_owned())
}

#[tokio::test]
async fn affinity_cookie_is_issued_reused_and_not_forwarded() {
    let bs = Backend::start_many(3).await;
    let refs: Vec<&Backend> = bs.iter().collect();
    let lb = TestLb::start(&format!("{STICKY}{PATIENT}{}", backends_yaml(&refs))).await;
    let c = client();
    let (first, a) = get_with(&c, &lb.url("/"), &[]).await;
    let set = a.headers["set-cookie"].to_str().unwrap();
    assert!(set.starts_with("lb_sticky="), "{set}");
    assert!(set.ends_with("; Path=/; HttpOnly; Max-Age=3600"), "{set}");
    let cookie = issued(&a).unwrap();
    let header = format!("theme=dark; {cookie}; session=abc");
    for _ in 0..10 {
        let (who, a) = get_with(&c, &lb.url("/headers"), &[("cookie", &header)]).await;
        assert_eq!(who, first, "round robin overrode the cookie");
        assert!(issued(&a).is_none(), "cookie re-issued for its own backend");
        let text = a.text();
        assert!(text.contains("cookie: theme=dark; session=abc\n"), "{text}");
        assert!(
            !text.contains("lb_sticky"),
            "lb's cookie reached the backend: {text}"
        );
    }
    // A token no backend has is ignored, stripped and replaced.
    let (who, a) = get_with(&c, &lb.url("/headers"), &[("cookie", "lb_sticky=0000")]).await;
    assert!(!a.text().contains("lb_sticky"));
    assert_eq!(issued(&a), Some(cookie_for(&lb, &who)));
}

/// The cookie lb issues for the backend named `name` (b0, b1, …).
fn cookie_for(lb: &TestLb, name: &str) -> String {
    let i: usize = name[1..].parse().unwrap();
    let addr = lb.lb.runtime().snapshot().first_pool().backends[i]
        .addr
        .clone();
    format!("lb_sticky={}", lb::http::affinity::token(&addr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn affinity_cookie_is_reissued_when_its_backend_is_down() {
    let bs = Backend::start_many(3).await;
    let refs: Vec<&Backend> = bs.iter().collect();
    let lb = TestLb::start(&format!(
        "{STICKY}{FAST_CHECKS}{PATIENT}{}",
        backends_yaml(&refs)
    ))
    .await;
    let c = client();
    let pinned = cookie_for(&lb, "b0");
    assert_eq!(
        get_with(&c, &lb.url("/"), &[("cookie", &pinned)]).await.0,
        "b0"
    );
    bs[0].set_health(500);
    let b0 = lb.lb.runtime().snapshot().first_pool().backends[0]
        .state
        .clone();
    eventually!(WAIT, !b0.is_healthy());
    let (moved, a) = get_with(&c, &lb.url("/"), &[("cookie", &pinned)]).await;
    assert_ne!(moved, "b0");
    let fresh = issued(&a).expect("no new cookie while the pinned backend is down");
    assert_eq!(fresh, cookie_for(&lb, &moved));
    bs[0].set_health(200);
    eventually!(WAIT, b0.is_healthy());
    // The session now lives on its new backend; the old cookie finds b0 again.
    for _ in 0..5 {
        assert_eq!(
            get_with(&c, &lb.url("/"), &[("cookie", &fresh)]).await.0,
            moved
        );
        assert_eq!(
            get_with(&c, &lb.url("/"), &[("cookie", &pinned)]).await.0,
            "b0"
        );
    }
}

#[tokio::test]
async fn affinity_works_with_every_strategy() {
    let bs = Backend::start_many(3).await;
    let refs: Vec<&Backend> = bs.iter().collect();
    let c = client();
    for strategy in [
        "round_robin",
        "least_connections",
        "random",
        "power_of_two_choices",
        "consistent_hash",
        "peak_ewma",
    ] {
        let lb = TestLb::start(&format!(
            "strategy: {strategy}\n{STICKY}{PATIENT}{}",
            backends_yaml(&refs)
        ))
        .await;
        for name in ["b0", "b1", "b2"] {
            let cookie = cookie_for(&lb, name);
            for _ in 0..5 {
                let (who, a) = get_with(&c, &lb.url("/"), &[("cookie", &cookie)]).await;
                assert_eq!(who, name, "{strategy} ignored the cookie");
                assert!(issued(&a).is_none());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_route_keys_and_cookies_identically() {
    let bs = Backend::start_many(5).await;
    let refs: Vec<&Backend> = bs.iter().collect();
    let yaml = format!(
        "listen: 127.0.0.1:0\n{STABLE_HASH_BY_USER}{STICKY}{}",
        backends_yaml(&refs)
    );
    // One replica in this process, the other a separate `lb` process.
    let a = TestLb::start(&yaml).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &yaml);
    let proc = LbProcess::spawn(&["--config", path.to_str().unwrap()], &[]);
    let b_url = format!("http://{}/", proc.wait_listening().await);
    let keys = keys(300);
    let via_a = route_keys(&a.url("/"), &keys).await;
    let via_b = route_keys(&b_url, &keys).await;
    assert_eq!(via_a, via_b, "the replicas disagree on some keys");
    // 50 sessions started on replica A, continued on replica B with another key.
    let c = client();
    for i in 0..50 {
        let (first, ans) = get_with(&c, &a.url("/"), &[("x-user", &format!("s{i}"))]).await;
        let cookie = issued(&ans).expect("replica A set no cookie");
        let other_key = format!("other-{i}");
        let (then, ans) =
            get_with(&c, &b_url, &[("cookie", &cookie), ("x-user", &other_key)]).await;
        assert_eq!(then, first, "replica B sent session {i} elsewhere");
        assert!(issued(&ans).is_none());
    }
}

/// Sends one request at a time until `until` returns true or `secs` pass;
/// returns how many were sent.
async fn sequential(url: &str, secs: u64, mut until: impl FnMut() -> bool) -> usize {
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut sent = 0;
    while !until() {
        assert!(
            Instant::now() < deadline,
            "condition not met within {secs}s ({sent} requests)"
        );
        get_with(&c, url, &[]).await;
        sent += 1;
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_avoids_a_slow_backend() {
    let bs = Backend::start_many(3).await;
    let refs: Vec<&Backend> = bs.iter().collect();
    let lb = TestLb::start(&format!("strategy: peak_ewma\n{}", backends_yaml(&refs))).await;
    bs[0].set_delay(Duration::from_millis(150));
    let total = || bs.iter().map(Backend::hits).sum::<usize>();
    sequential(&lb.url("/"), 60, || total() >= 300).await;
    let slow = bs[0].hits();
    assert!(
        slow * 10 < total(),
        "the slow backend got {slow} of {}",
        total()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_tries_a_recovered_backend_again() {
    let bs = Backend::start_many(3).await;
    let refs: Vec<&Backend> = bs.iter().collect();
    let lb = TestLb::start(&format!(
        "strategy: peak_ewma\npeak_ewma:\n  decay: 2s\n{}",
        backends_yaml(&refs)
    ))
    .await;
    bs[0].set_delay(Duration::from_millis(150));
    // Until the slow backend has been measured, and avoided for a while.
    let total = || bs.iter().map(Backend::hits).sum::<usize>();
    sequential(&lb.url("/"), 30, || bs[0].hits() > 0 && total() > 50).await;
    bs[0].set_delay(Duration::ZERO);
    let recovered = Instant::now();
    let before = bs[0].hits();
    sequential(&lb.url("/"), 20, || bs[0].hits() >= before + 10).await;
    eprintln!(
        "recovered backend back in traffic after {:?}",
        recovered.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_ramps_a_backend_added_by_reload() {
    let bs = Backend::start_many(3).await;
    let refs: Vec<&Backend> = bs.iter().collect();
    let conf = |n: usize| format!("slow_start: 4s\n{}", backends_yaml(&refs[..n]));
    let lb = TestLb::start(&conf(2)).await;
    lb.rewrite(&conf(3));
    eventually!(WAIT, lb.applied() == 2);
    let added = Instant::now();
    // Four clients for six seconds, noting when each answer came and from whom.
    let log: Arc<Mutex<Vec<(Duration, bool)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (log, stop, url) = (log.clone(), stop.clone(), lb.url("/"));
        tasks.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(SeqCst) {
                let (who, _) = get_with(&c, &url, &[]).await;
                log.lock().unwrap().push((added.elapsed(), who == "b2"));
            }
        }));
    }
    eventually!(30, added.elapsed() >= Duration::from_secs(6));
    stop.store(true, SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    let log = log.lock().unwrap();
    let share = |from: f64, to: f64| {
        let window: Vec<bool> = log
            .iter()
            .filter(|(t, _)| (from..to).contains(&t.as_secs_f64()))
            .map(|&(_, new)| new)
            .collect();
        assert!(
            window.len() >= 20,
            "only {} requests in {from}..{to}s",
            window.len()
        );
        window.iter().filter(|&&new| new).count() as f64 / window.len() as f64
    };
    // Full share is 1/3; in its first second the new backend's weight is
    // 10-32 % of the others' (share ≈ 5-14 %); after the window it is full.
    let (early, late) = (share(0.0, 1.0), share(4.5, 6.0));
    eprintln!("new backend's share: first second {early:.3}, after the ramp {late:.3}");
    assert!(early < 0.22, "early share {early}");
    assert!(late > 0.25, "late share {late}");
    assert!(early < late);
}

#[tokio::test]
async fn selector_is_rebuilt_only_when_the_pool_changes() {
    let bs = Backend::start_many(3).await;
    let refs: Vec<&Backend> = bs.iter().collect();
    let lb = TestLb::start(&format!("{HASH_BY_USER}{}", backends_yaml(&refs))).await;
    let first = lb.lb.runtime().snapshot().first_pool().selector.clone();
    lb.rewrite(&format!(
        "{HASH_BY_USER}timeouts:\n  connect: 2s\n{}",
        backends_yaml(&refs)
    ));
    eventually!(WAIT, lb.applied() == 2);
    let same = lb.lb.runtime().snapshot().first_pool().selector.clone();
    assert!(
        Arc::ptr_eq(&first, &same),
        "a timeout change rebuilt the table"
    );
    lb.rewrite(&format!("{HASH_BY_USER}{}", weighted(&refs, &[1, 1, 2])));
    eventually!(WAIT, lb.applied() == 3);
    let rebuilt = lb.lb.runtime().snapshot().first_pool().selector.clone();
    assert!(
        !Arc::ptr_eq(&first, &rebuilt),
        "a weight change kept the old table"
    );
}

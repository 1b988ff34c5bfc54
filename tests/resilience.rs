//! Issue 4: health checks, passive detection and retries. A dead, hung or
//! failing backend must cost the client nothing.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::Request;
use tokio::time::Instant;

/// A status change shows within about a second; the timeout is the whole
/// interval, so a probe a loaded machine answers late does not take a
/// healthy backend out (tests assert which backends serve).
const FAST_CHECKS: &str = "health_check:\n  path: /health\n  interval: 500ms\n  timeout: 500ms\n  healthy_threshold: 2\n  unhealthy_threshold: 2\n";

/// lb over `backends` with fast active health checks.
async fn with_fast_checks(backends: &[&Backend]) -> TestLb {
    TestLb::start(&format!("{FAST_CHECKS}{}", backends_yaml(backends))).await
}

fn state(lb: &TestLb, i: usize) -> Arc<lb::core::state::BackendState> {
    lb.lb.runtime().snapshot().first_pool().backends[i]
        .state
        .clone()
}

/// Clients sending GETs until stopped; counts answers that were not 200.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(url: String, clients: usize) -> Load {
        let (stop, ok, failed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::default(),
            Arc::default(),
        );
        let tasks = (0..clients)
            .map(|_| {
                let (stop, ok, failed, url): (
                    Arc<AtomicBool>,
                    Arc<AtomicUsize>,
                    Arc<AtomicUsize>,
                    _,
                ) = (
                    stop.clone(),
                    Arc::clone(&ok),
                    Arc::clone(&failed),
                    url.clone(),
                );
                tokio::spawn(async move {
                    let c = client();
                    while !stop.load(SeqCst) {
                        let a = get(&c, &url).await;
                        if a.status == 200 {
                            ok.fetch_add(1, SeqCst);
                        } else {
                            eprintln!("client saw {}: {}", a.status, a.text());
                            failed.fetch_add(1, SeqCst);
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            tasks,
        }
    }

    fn ok(&self) -> usize {
        self.ok.load(SeqCst)
    }

    /// Stops the clients; returns (ok, failed).
    async fn finish(self) -> (usize, usize) {
        self.stop.store(true, SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        (self.ok.load(SeqCst), self.failed.load(SeqCst))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_backend_costs_clients_nothing_and_comes_back() {
    let mut bs = Backend::start_many(3).await;
    let refs: Vec<&Backend> = bs.iter().collect();
    let lb = with_fast_checks(&refs).await;
    let load = Load::start(lb.url("/"), 2);
    eventually!(WAIT, load.ok() > 50);
    bs[1].stop().await;
    let b1 = state(&lb, 1);
    eventually!(WAIT, !b1.is_healthy(), "active checks never marked b1 down");
    // A request that picked b1 just before it was marked down may still
    // count its attempt: let every client finish one more request first.
    let seen = load.ok();
    eventually!(WAIT, load.ok() > seen + 10 && b1.in_flight() == 0);
    // From now on lb sends b1 nothing.
    let attempts = b1.requests();
    let seen = load.ok();
    eventually!(WAIT, load.ok() > seen + 100);
    assert_eq!(b1.requests(), attempts, "lb kept sending to a down backend");
    bs[1].restart().await;
    eventually!(WAIT, bs[1].hits() > 0, "restarted backend got no traffic");
    let (ok, failed) = load.finish().await;
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
}

#[tokio::test]
async fn failing_health_endpoint_takes_backend_out() {
    let bs = Backend::start_many(2).await;
    let lb = with_fast_checks(&[&bs[0], &bs[1]]).await;
    bs[0].set_health(503);
    let b0 = state(&lb, 0);
    eventually!(WAIT, !b0.is_healthy());
    let hits = bs[0].hits();
    let c = client();
    for _ in 0..10 {
        let a = get(&c, &lb.url("/")).await;
        assert_eq!(a.text(), "b1");
    }
    assert_eq!(
        bs[0].hits(),
        hits,
        "a backend failing /health still got traffic"
    );
    bs[0].set_health(200);
    eventually!(WAIT, b0.is_healthy());
}

#[tokio::test]
async fn all_backends_unhealthy_is_503_at_once() {
    let bs = Backend::start_many(2).await;
    let lb = with_fast_checks(&[&bs[0], &bs[1]]).await;
    for b in &bs {
        b.set_health(500);
    }
    eventually!(
        20,
        !state(&lb, 0).is_healthy() && !state(&lb, 1).is_healthy()
    );
    let started = Instant::now();
    let a = get(&client(), &lb.url("/")).await;
    assert_eq!(a.status, 503, "{}", a.text());
    assert!(a.text().contains("no healthy backend"));
    // "At once": no backend was tried, so no connect or request timeout was
    // waited out (30 s here); the bound only guards against that.
    assert_eq!(bs[0].hits() + bs[1].hits(), 0);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn added_backend_is_probed_at_once() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let slow_checks = "health_check:\n  interval: 30s\n  timeout: 1s\n";
    let lb = TestLb::start(&format!("{slow_checks}{}", backends_yaml(&[&a]))).await;
    lb.rewrite(&format!("{slow_checks}{}", backends_yaml(&[&a, &b])));
    eventually!(10, b.probes() >= 1, "new backend not probed at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gets_succeed_past_503_reset_and_hung_backends() {
    let bs = Backend::start_many(4).await;
    bs[0].set_status(503);
    bs[1].set_reset(true);
    bs[2].set_delay(Duration::from_secs(5));
    // Passive ejection off so every request meets the bad ones; a generous budget.
    let yaml = format!(
        "outlier_detection:\n  consecutive_failures: 0\nretry:\n  attempts: 4\n  per_try_timeout: 200ms\n  budget:\n    ratio: 5\n{}",
        backends_yaml(&bs.iter().collect::<Vec<_>>())
    );
    let lb = TestLb::start(&yaml).await;
    let c = client();
    for i in 0..12 {
        let a = get(&c, &lb.url("/")).await;
        assert_eq!(
            (a.status.as_u16(), a.text()),
            (200, "b3".to_owned()),
            "request {i}"
        );
    }
    assert!(bs[0].hits() >= 3 && bs[1].hits() >= 3 && bs[2].hits() >= 3);
}

#[tokio::test]
async fn put_answered_503_is_replayed_byte_identical() {
    let bs = Backend::start_many(2).await;
    bs[0].set_status(503);
    let lb = TestLb::start(&backends_yaml(&[&bs[0], &bs[1]])).await;
    let body: Bytes = (0..10 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let req = Request::put(lb.url("/echo"))
        .body(Full::new(body.clone()))
        .unwrap();
    let a = send(&client(), req).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body, body);
    assert_eq!(
        bs[0].seen()[0].body,
        body,
        "first backend saw the whole body"
    );
    assert_eq!(bs[1].seen()[0].body, body, "replay is byte-identical");
}

#[tokio::test]
async fn post_reset_after_sending_is_not_sent_twice() {
    let bs = Backend::start_many(2).await;
    bs[0].set_reset(true);
    let lb = TestLb::start(&backends_yaml(&[&bs[0], &bs[1]])).await;
    let req = Request::post(lb.url("/order"))
        .body(Full::new(Bytes::from("pay 10")))
        .unwrap();
    let a = send(&client(), req).await;
    assert_eq!(a.status, 502, "{}", a.text());
    assert_eq!(
        (bs[0].hits(), bs[1].hits()),
        (1, 0),
        "a POST reached a second backend"
    );
    // An idempotent request in the same situation is retried.
    let req = Request::put(lb.url("/order"))
        .body(Full::new(Bytes::from("pay 10")))
        .unwrap();
    assert_eq!(send(&client(), req).await.status, 200);
}

#[tokio::test]
async fn post_that_could_not_connect_goes_to_the_next_backend() {
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let good = Backend::start("good").await;
    let yaml = format!(
        "backends:\n  - address: {dead}\n  - address: {}\n",
        good.addr
    );
    let lb = TestLb::start(&yaml).await;
    // 100 KiB: above the 64 KiB buffer limit, so it streams and is never buffered.
    let body: Bytes = vec![b'x'; 100 * 1024].into();
    let req = Request::post(lb.url("/echo"))
        .body(Full::new(body.clone()))
        .unwrap();
    let a = send(&client(), req).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.body, body);
}

#[tokio::test]
async fn retry_budget_caps_upstream_attempts() {
    let bs = Backend::start_many(3).await;
    for b in &bs {
        b.set_status(503);
    }
    let yaml = format!(
        "outlier_detection:\n  consecutive_failures: 0\nretry:\n  attempts: 3\n  budget:\n    ratio: 0.2\n    min_retries_per_second: 1\n{}",
        backends_yaml(&bs.iter().collect::<Vec<_>>())
    );
    let lb = TestLb::start(&yaml).await;
    let c = client();
    let started = Instant::now();
    let n = 200;
    for _ in 0..n {
        assert_eq!(get(&c, &lb.url("/")).await.status, 503);
    }
    let attempts: usize = bs.iter().map(Backend::hits).sum();
    let allowed = n + n / 5 + started.elapsed().as_secs() as usize + 2;
    assert!(
        attempts <= allowed,
        "{attempts} upstream attempts for {n} requests (budget {allowed})"
    );
    assert!(attempts > n, "no retry happened at all");
}

#[tokio::test]
async fn passive_detection_ejects_a_crashed_backend_between_checks() {
    let mut bs = Backend::start_many(2).await;
    let lb = TestLb::start(&format!(
        "outlier_detection:\n  consecutive_failures: 3\n  ejection_time: 30s\n{}",
        backends_yaml(&[&bs[0], &bs[1]])
    ))
    .await;
    bs[0].stop().await;
    let c = client();
    for _ in 0..30 {
        assert_eq!(get(&c, &lb.url("/")).await.status, 200);
    }
    assert_eq!(
        state(&lb, 0).requests(),
        3,
        "ejected after 3 consecutive failures"
    );
}

#[tokio::test]
async fn reloaded_interval_applies_without_waiting_out_the_old_one() {
    let b = Backend::start("b").await;
    let lb = TestLb::start(&format!(
        "health_check:\n  interval: 1h\n  timeout: 1s\n{}",
        backends_yaml(&[&b])
    ))
    .await;
    lb.rewrite(&format!(
        "health_check:\n  interval: 100ms\n  timeout: 50ms\n{}",
        backends_yaml(&[&b])
    ));
    eventually!(WAIT, b.probes() >= 3, "probes: {}", b.probes());
}

#[tokio::test]
async fn health_state_survives_a_reload() {
    let bs = Backend::start_many(2).await;
    let lb = with_fast_checks(&[&bs[0], &bs[1]]).await;
    bs[0].set_health(503);
    let before = state(&lb, 0);
    eventually!(WAIT, !before.is_healthy());
    // Reweight and switch strategy: b0 must stay down, with the same state.
    lb.rewrite(&format!(
        "{FAST_CHECKS}strategy: random\nbackends:\n  - address: {}\n    weight: 5\n  - address: {}\n",
        bs[0].addr, bs[1].addr
    ));
    eventually!(WAIT, lb.applied() == 2);
    let after = state(&lb, 0);
    assert!(Arc::ptr_eq(&before, &after));
    assert!(!after.is_healthy());
    let c = client();
    for _ in 0..10 {
        assert_eq!(get(&c, &lb.url("/")).await.text(), "b1");
    }
}

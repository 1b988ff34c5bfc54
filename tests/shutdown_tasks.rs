//! Issue 16: no `abort()` in shutdown. Every background task lb starts
//! (health supervisor and probes, reloader, admin follower) ends on a
//! signal: when `Lb::shutdown` returns, or when a reload removes what a
//! probe checks, nothing of it runs on, even while the caller still holds
//! the runtime (for its counters, as a test or an embedder may).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::time::Instant;

/// Probes every 50 ms: a probe task left running shows within a window of
/// a few intervals.
const CHECKS: &str = "health_check:\n  path: /health\n  interval: 50ms\n  timeout: 50ms\n";

/// How long a stopped probe is watched for: ten intervals.
const WINDOW: Duration = Duration::from_millis(500);

/// Watches `backend` for `WINDOW` from now: at most one more probe arrives
/// (one already on the wire when its task ended may still be read), and
/// none after it.
async fn probed_no_more(backend: &Backend) {
    let from = backend.probes();
    let until = Instant::now() + WINDOW;
    while Instant::now() < until {
        assert!(
            backend.probes() <= from + 1,
            "still probed: {} probes after the probe task should have ended",
            backend.probes() - from
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn health_probes_have_stopped_when_shutdown_returns() {
    let b = Backend::start("b").await;
    let t = TestLb::start(&format!("{CHECKS}{}", backends_yaml(&[&b]))).await;
    eventually!(WAIT, b.probes() >= 3, "probes: {}", b.probes());
    // Kept past shutdown, as a caller reading the counters would: the
    // probes must not live on with it.
    let runtime = Arc::clone(t.lb.runtime());
    let TestLb { lb, dir: _dir, .. } = t;
    lb.shutdown(Duration::from_secs(5)).await;
    probed_no_more(&b).await;
    drop(runtime);
}

#[tokio::test]
async fn a_backend_a_reload_removes_is_probed_no_more() {
    let (kept, removed) = (
        Backend::start("kept").await,
        Backend::start("removed").await,
    );
    let t = TestLb::start(&format!("{CHECKS}{}", backends_yaml(&[&kept, &removed]))).await;
    eventually!(
        WAIT,
        kept.probes() >= 3 && removed.probes() >= 3,
        "probes: kept {}, removed {}",
        kept.probes(),
        removed.probes()
    );
    t.rewrite(&format!("{CHECKS}{}", backends_yaml(&[&kept])));
    eventually!(WAIT, t.applied() == 2, "reload not applied");
    // The kept backend's probes go on: the window below is long enough for
    // several of them, so the removed one's silence means something.
    let (from, removed_from) = (kept.probes(), removed.probes());
    eventually!(WAIT, kept.probes() >= from + 5, "kept: {}", kept.probes());
    probed_no_more(&removed).await;
    assert!(
        removed.probes() <= removed_from + 1,
        "removed backend still probed: {} probes after its removal",
        removed.probes() - removed_from
    );
    t.lb.shutdown(Duration::from_secs(5)).await;
}

/// The caller's runtime runs lb's health checks, reloader and admin
/// listener: once shutdown has returned, its task count is back to what it
/// was before lb started.
#[tokio::test]
async fn every_task_lb_started_on_the_callers_runtime_ends_after_shutdown() {
    let b = Backend::start("b").await;
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let before = tasks();
    let t = TestLb::start(&format!(
        "admin: 127.0.0.1:0\n{CHECKS}{}",
        backends_yaml(&[&b])
    ))
    .await;
    eventually!(WAIT, b.probes() >= 3, "probes: {}", b.probes());
    let admin = t.lb.admin_addr().expect("admin listener");
    let status = get(&client(), &format!("http://{admin}/status")).await;
    assert_eq!(status.status, 200);
    assert!(tasks() > before, "lb started no task on this runtime?");
    let runtime = Arc::clone(t.lb.runtime());
    let TestLb { lb, dir: _dir, .. } = t;
    lb.shutdown(Duration::from_secs(5)).await;
    // The probes' connections (and the backend's side of them) and the
    // admin client's close asynchronously: wait for the count, bounded.
    eventually!(
        WAIT,
        tasks() <= before,
        "{} tasks still alive after shutdown ({} before lb started)",
        tasks(),
        before
    );
    drop(runtime);
}

//! Passive health, decided here for every path (both HTTP/1 paths, h2,
//! tcp): a failed attempt or a response body cut by its backend counts
//! against that backend, and ejects it per its pool's `outlier_detection`.
//! lb's own shortages and a client's faults never reach here.

use crate::core::runtime::{Pool, Runtime};
use crate::core::state::{BackendState, Ejection};

/// Passive health: counts a failure of `state`'s backend and logs an
/// ejection once, per `snap`'s `outlier_detection`. An ejection that would
/// take more than `max_ejection_percent` of `snap`'s pool out (but always
/// allows one) does not happen: a pool-wide problem must not leave clients
/// with nothing.
pub fn note_failure(rt: &Runtime, pool: &Pool, state: &BackendState, why: &str) {
    let outlier = &pool.config.outlier_detection;
    let now_ms = rt.clock.now_ms();
    let may_eject = || {
        let out = pool
            .backends
            .iter()
            .filter(|b| b.state.is_ejected(now_ms))
            .count();
        let cap = (pool.backends.len() * outlier.max_ejection_percent as usize / 100).max(1);
        out < cap
    };
    let ejected = state.record_failure(
        now_ms,
        outlier.consecutive_failures,
        outlier.ejection_time,
        may_eject,
    );
    match ejected {
        Ejection::Ejected => {
            state.metrics.ejected();
            tracing::warn!(
                "backend {} is down (passive: {} consecutive failures, last: {why}; out for {:?})",
                state.addr,
                outlier.consecutive_failures.map_or(0, |n| n.get()),
                outlier.ejection_time
            )
        }
        Ejection::Capped => tracing::debug!(
            "backend {} failed {} times in a row but stays in: max_ejection_percent {} reached",
            state.addr,
            outlier.consecutive_failures.map_or(0, |n| n.get()),
            outlier.max_ejection_percent
        ),
        Ejection::None => {}
    }
}

/// A backend stopped sending a response body it still owed for `limit`
/// (`timeouts.backend_body`), on either HTTP/1 path: the response is being
/// cut. Logged, counted, and charged to the backend like a failed attempt,
/// judged by the current snapshot (the request's may be gone by now).
pub fn backend_stalled(
    rt: &Runtime,
    state: &BackendState,
    method: &dyn std::fmt::Display,
    path: &str,
    limit: std::time::Duration,
) {
    tracing::warn!(
        backend = %state.addr,
        "{method} {path}: backend stalled mid-body (no byte for {limit:?}, timeouts.backend_body): response cut"
    );
    state.metrics.body_stalled();
    note_failure_in_current(rt, state, "stalled mid-body");
}

/// A backend's response body ended early: closed, reset, or framed
/// wrongly (`why`), on either HTTP/1 path or HTTP/2. The response is being
/// cut. Logged, counted, and charged to the backend like a failed attempt,
/// as a stall is: the head counted as a success, so without this a backend
/// that breaks every body would look healthy.
pub fn backend_broke(
    rt: &Runtime,
    state: &BackendState,
    method: &dyn std::fmt::Display,
    path: &str,
    why: &dyn std::fmt::Display,
) {
    tracing::warn!(
        backend = %state.addr,
        "{method} {path}: backend broke the response body ({why}): response cut"
    );
    state.metrics.body_broke();
    note_failure_in_current(rt, state, "broke a response body");
}

/// [`note_failure`] for a backend met outside the attempt loop (a response
/// body that broke after its head): judged by its pool in the current
/// snapshot, and not at all if a reload removed it meanwhile.
fn note_failure_in_current(rt: &Runtime, state: &BackendState, why: &str) {
    let snap = rt.snapshot();
    if let Some(pool) = snap.pools.iter().find(|p| p.name() == &state.pool) {
        note_failure(rt, pool, state, why);
    }
}

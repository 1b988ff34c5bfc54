//! Prometheus metrics: the counters the request path touches. Their
//! exposition, which walks the live pools at scrape time, is
//! `admin::exposition`.
//!
//! Nothing on the request path takes a lock or builds a label map: each
//! backend's counters live in its [`BackendMetrics`], inside the
//! `BackendState` every snapshot already holds (so the "handle" is resolved
//! when the snapshot is built and survives reloads with the backend's
//! address), and the global ones are plain atomics in [`Metrics`]. A scrape
//! walks the *current* snapshot's backends, so a backend removed by a reload
//! disappears from the output with it: labels cannot grow without bound.
//!
//! Names carry no pool: when several named pools arrive, a `pool` label joins
//! `backend` without renaming any series.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Requests by HTTP status code, without a lock: one lazily allocated page of
/// 100 counters per status class, so a backend that only ever answers 2xx
/// carries one page.
#[derive(Debug, Default)]
pub struct StatusCounts {
    /// Index `class - 1` holds codes `class*100 .. class*100+99`.
    pub(crate) pages: [OnceLock<Box<[AtomicU64; 100]>>; 5],
}

impl StatusCounts {
    pub fn count(&self, code: u16) {
        let (class, rest) = (usize::from(code / 100), usize::from(code % 100));
        if let Some(page) = class.checked_sub(1).and_then(|i| self.pages.get(i)) {
            page.get_or_init(|| Box::new(std::array::from_fn(|_| AtomicU64::new(0))))[rest]
                .fetch_add(1, Relaxed);
        }
    }

    /// Every code counted at least once, with its count.
    pub(crate) fn nonzero(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        self.pages.iter().enumerate().flat_map(|(i, page)| {
            page.get().into_iter().flat_map(move |p| {
                p.iter().enumerate().filter_map(move |(j, n)| {
                    let n = n.load(Relaxed);
                    (n > 0).then_some(((i as u16 + 1) * 100 + j as u16, n))
                })
            })
        })
    }
}

/// gRPC calls by the `grpc-status` their client got, for
/// `lb_grpc_requests_total`: codes 0 to 16, then calls that ended without
/// one (the stream broke).
#[derive(Debug, Default)]
pub struct GrpcCounts(pub(crate) [AtomicU64; GrpcCounts::SLOTS]);

impl GrpcCounts {
    /// The 17 codes of grpc/doc/statuscodes.md, and `none`.
    pub(crate) const SLOTS: usize = 18;

    /// Counts one call that ended with `grpc-status` `code` (its text, as
    /// sent); `None`: without one. A code outside the 17 is UNKNOWN (2), as
    /// clients take it.
    pub fn count(&self, code: Option<&[u8]>) {
        let slot = match code {
            None => Self::SLOTS - 1,
            Some(text) => std::str::from_utf8(text)
                .ok()
                .and_then(|t| t.trim().parse::<usize>().ok())
                .filter(|&c| c < Self::SLOTS - 1)
                .unwrap_or(2),
        };
        self.0[slot].fetch_add(1, Relaxed);
    }

    /// The `grpc_status` label of each slot, with its count when nonzero.
    pub(crate) fn nonzero(&self) -> impl Iterator<Item = (String, u64)> + '_ {
        self.0.iter().enumerate().filter_map(|(i, n)| {
            let n = n.load(Relaxed);
            let label = if i == Self::SLOTS - 1 {
                "none".to_owned()
            } else {
                i.to_string()
            };
            (n > 0).then_some((label, n))
        })
    }
}

/// How one upstream attempt ended, for `lb_upstream_attempts_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// A response that is not a 5xx (relayed or not).
    Success,
    /// A 5xx response.
    ServerError,
    Connect,
    Reset,
    Timeout,
    Protocol,
}

impl AttemptOutcome {
    pub(crate) const ALL: [AttemptOutcome; 6] = [
        AttemptOutcome::Success,
        AttemptOutcome::ServerError,
        AttemptOutcome::Connect,
        AttemptOutcome::Reset,
        AttemptOutcome::Timeout,
        AttemptOutcome::Protocol,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            AttemptOutcome::Success => "success",
            AttemptOutcome::ServerError => "server_error",
            AttemptOutcome::Connect => "connect_failure",
            AttemptOutcome::Reset => "reset",
            AttemptOutcome::Timeout => "timeout",
            AttemptOutcome::Protocol => "protocol_error",
        }
    }
}

/// Why a request was tried again, for `lb_retries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    ConnectFailure,
    Reset,
    Timeout,
    /// A status listed in `retry_on`.
    Status,
    /// An HTTP/2 stream the backend refused unprocessed (`REFUSED_STREAM`).
    Refused,
}

impl RetryReason {
    pub(crate) const ALL: [RetryReason; 5] = [
        RetryReason::ConnectFailure,
        RetryReason::Reset,
        RetryReason::Timeout,
        RetryReason::Status,
        RetryReason::Refused,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            RetryReason::ConnectFailure => "connect_failure",
            RetryReason::Reset => "reset",
            RetryReason::Timeout => "timeout",
            RetryReason::Status => "status",
            RetryReason::Refused => "refused_stream",
        }
    }
}

/// One backend's counters; lives in its `BackendState`, so it survives
/// reloads that keep the address and goes away with the backend.
#[derive(Debug, Default)]
pub struct BackendMetrics {
    /// Client requests answered with this backend's response, by status.
    pub(crate) responses: StatusCounts,
    /// Attempts by outcome, indexed like `AttemptOutcome::ALL`.
    pub(crate) attempts: [AtomicU64; 6],
    /// Times passive detection took the backend out.
    pub(crate) ejections: AtomicU64,
    /// Responses cut because the backend sent no body byte for
    /// `timeouts.backend_body`: its attempt counted as a success when the
    /// head came, so this is where the stall shows.
    pub(crate) body_stalls: AtomicU64,
    /// Responses cut because the backend closed, reset or mis-framed the
    /// body after its head: otherwise only a debug line would show it.
    pub(crate) body_errors: AtomicU64,
    /// Active probes passed (`[0]`) and failed (`[1]`).
    pub(crate) health_checks: [AtomicU64; 2],
    /// tcp mode: bytes relayed client → backend (`[0]`) and backend →
    /// client (`[1]`), counted as they move so long connections show up.
    pub(crate) bytes: [AtomicU64; 2],
}

impl BackendMetrics {
    pub fn attempt(&self, outcome: AttemptOutcome) {
        self.attempts[outcome as usize].fetch_add(1, Relaxed);
    }

    pub fn ejected(&self) {
        self.ejections.fetch_add(1, Relaxed);
    }

    pub fn body_stalled(&self) {
        self.body_stalls.fetch_add(1, Relaxed);
    }

    pub fn body_broke(&self) {
        self.body_errors.fetch_add(1, Relaxed);
    }

    /// The counter of bytes relayed toward the backend (`to_backend`) or
    /// toward the client; the tcp relay adds to it per read.
    pub fn bytes(&self, to_backend: bool) -> &AtomicU64 {
        &self.bytes[usize::from(!to_backend)]
    }

    pub fn health_check(&self, passed: bool) {
        self.health_checks[usize::from(!passed)].fetch_add(1, Relaxed);
    }

    pub fn response(&self, code: u16) {
        self.responses.count(code);
    }
}

/// Upper bounds (seconds) of the request duration histogram.
pub(crate) const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A lock-free fixed-bucket histogram (prometheus-client's takes a lock per
/// observation).
#[derive(Debug, Default)]
pub(crate) struct DurationHistogram {
    /// Per-bucket (not cumulative) counts; the last one is `+Inf`.
    pub(crate) buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    /// Sum of observations in microseconds.
    pub(crate) sum_us: AtomicU64,
}

impl DurationHistogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = DURATION_BUCKETS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(DURATION_BUCKETS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(d.as_micros() as u64, Relaxed);
    }
}

/// Process-wide counters (those not tied to a backend).
#[derive(Debug, Default)]
pub struct Metrics {
    /// Client requests lb answered before any pool was chosen (refused
    /// request, no route); a routed request lb answers itself (no backend
    /// available, every attempt failed) counts in its pool's `PoolShared`.
    pub(crate) unrouted: StatusCounts,
    /// gRPC calls lb answered before any pool was chosen (no route).
    pub grpc_unrouted: GrpcCounts,
    /// Client request durations, arrival to response head.
    pub(crate) duration: DurationHistogram,
    /// Retries by reason, indexed like `RetryReason::ALL`.
    pub(crate) retries: [AtomicU64; RetryReason::ALL.len()],
    /// Retries the budget refused.
    pub(crate) budget_exhausted: AtomicU64,
    /// Client connections closed because the client took no response
    /// bytes for `timeouts.client_send`, and HTTP/2 streams reset for it
    /// (no backend is blamed: global).
    pub(crate) client_send_timeouts: AtomicU64,
}

impl Metrics {
    /// Counts one answered client request. `backend` is the one whose
    /// response the client got, if any.
    pub fn request(
        &self,
        backend: Option<&BackendMetrics>,
        pool: Option<&StatusCounts>,
        code: u16,
        took: Duration,
    ) {
        match (backend, pool) {
            (Some(b), _) => b.response(code),
            (None, Some(pool)) => pool.count(code),
            (None, None) => self.unrouted.count(code),
        }
        self.duration.observe(took);
    }

    pub fn retry(&self, reason: RetryReason) {
        self.retries[reason as usize].fetch_add(1, Relaxed);
    }

    pub fn budget_exhausted(&self) {
        self.budget_exhausted.fetch_add(1, Relaxed);
    }

    pub fn client_send_timeout(&self) {
        self.client_send_timeouts.fetch_add(1, Relaxed);
    }
}

/// `SystemTime` as float seconds since the epoch.
pub fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_counts_only_report_codes_seen() {
        let s = StatusCounts::default();
        s.count(200);
        s.count(200);
        s.count(503);
        s.count(99); // out of range: ignored
        s.count(600);
        let seen: Vec<_> = s.nonzero().collect();
        assert_eq!(seen, vec![(200, 2), (503, 1)]);
    }

    #[test]
    fn histogram_buckets_by_upper_bound() {
        let h = DurationHistogram::default();
        h.observe(Duration::from_micros(400));
        h.observe(Duration::from_millis(1));
        h.observe(Duration::from_secs(60));
        assert_eq!(h.buckets[0].load(Relaxed), 1);
        assert_eq!(h.buckets[1].load(Relaxed), 1);
        assert_eq!(h.buckets[DURATION_BUCKETS.len()].load(Relaxed), 1);
    }
}

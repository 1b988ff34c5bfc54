//! Prometheus metrics: the counters the request path touches and their
//! exposition at scrape time.
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
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::core::runtime::Runtime;
use crate::core::selection::Backend;
use crate::http::client::FailureKind;

/// Requests by HTTP status code, without a lock: one lazily allocated page of
/// 100 counters per status class, so a backend that only ever answers 2xx
/// carries one page.
#[derive(Debug, Default)]
pub struct StatusCounts {
    /// Index `class - 1` holds codes `class*100 .. class*100+99`.
    pages: [OnceLock<Box<[AtomicU64; 100]>>; 5],
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
    fn nonzero(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
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
    const ALL: [AttemptOutcome; 6] = [
        AttemptOutcome::Success,
        AttemptOutcome::ServerError,
        AttemptOutcome::Connect,
        AttemptOutcome::Reset,
        AttemptOutcome::Timeout,
        AttemptOutcome::Protocol,
    ];

    fn label(self) -> &'static str {
        match self {
            AttemptOutcome::Success => "success",
            AttemptOutcome::ServerError => "server_error",
            AttemptOutcome::Connect => "connect_failure",
            AttemptOutcome::Reset => "reset",
            AttemptOutcome::Timeout => "timeout",
            AttemptOutcome::Protocol => "protocol_error",
        }
    }

    pub fn of_failure(kind: FailureKind) -> Self {
        match kind {
            // A local shortage is never charged as an attempt (the retry
            // loop returns first); were it ever, it reached no backend.
            FailureKind::Connect | FailureKind::Local(_) => AttemptOutcome::Connect,
            FailureKind::Reset => AttemptOutcome::Reset,
            FailureKind::Timeout => AttemptOutcome::Timeout,
            FailureKind::Protocol => AttemptOutcome::Protocol,
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
}

impl RetryReason {
    const ALL: [RetryReason; 4] = [
        RetryReason::ConnectFailure,
        RetryReason::Reset,
        RetryReason::Timeout,
        RetryReason::Status,
    ];

    fn label(self) -> &'static str {
        match self {
            RetryReason::ConnectFailure => "connect_failure",
            RetryReason::Reset => "reset",
            RetryReason::Timeout => "timeout",
            RetryReason::Status => "status",
        }
    }

    pub fn of_failure(kind: FailureKind) -> Self {
        match kind {
            FailureKind::Connect | FailureKind::Local(_) => RetryReason::ConnectFailure,
            FailureKind::Reset => RetryReason::Reset,
            // Protocol failures are never retried; counted as resets if one ever is.
            FailureKind::Timeout => RetryReason::Timeout,
            FailureKind::Protocol => RetryReason::Reset,
        }
    }
}

/// One backend's counters; lives in its `BackendState`, so it survives
/// reloads that keep the address and goes away with the backend.
#[derive(Debug, Default)]
pub struct BackendMetrics {
    /// Client requests answered with this backend's response, by status.
    responses: StatusCounts,
    /// Attempts by outcome, indexed like `AttemptOutcome::ALL`.
    attempts: [AtomicU64; 6],
    /// Times passive detection took the backend out.
    ejections: AtomicU64,
    /// Responses cut because the backend sent no body byte for
    /// `timeouts.backend_body`: its attempt counted as a success when the
    /// head came, so this is where the stall shows.
    body_stalls: AtomicU64,
    /// Responses cut because the backend closed, reset or mis-framed the
    /// body after its head: otherwise only a debug line would show it.
    body_errors: AtomicU64,
    /// Active probes passed (`[0]`) and failed (`[1]`).
    health_checks: [AtomicU64; 2],
    /// tcp mode: bytes relayed client → backend (`[0]`) and backend →
    /// client (`[1]`), counted as they move so long connections show up.
    bytes: [AtomicU64; 2],
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
const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A lock-free fixed-bucket histogram (prometheus-client's takes a lock per
/// observation).
#[derive(Debug, Default)]
struct DurationHistogram {
    /// Per-bucket (not cumulative) counts; the last one is `+Inf`.
    buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    /// Sum of observations in microseconds.
    sum_us: AtomicU64,
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
    unrouted: StatusCounts,
    /// Client request durations, arrival to response head.
    duration: DurationHistogram,
    /// Retries by reason, indexed like `RetryReason::ALL`.
    retries: [AtomicU64; 4],
    /// Retries the budget refused.
    budget_exhausted: AtomicU64,
    /// Client connections closed because the client took no response
    /// bytes for `timeouts.client_send`, and HTTP/2 streams reset for it
    /// (no backend is blamed: global).
    client_send_timeouts: AtomicU64,
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

/// The OpenMetrics text for `runtime`, as of now.
pub fn render(runtime: &Arc<Runtime>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Exporter(Arc::clone(runtime))));
    let mut out = String::with_capacity(4096);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// Reads the runtime at scrape time.
#[derive(Debug)]
struct Exporter(Arc<Runtime>);

/// The `backend` label of requests lb answered itself.
const NO_BACKEND: &str = "none";

/// Labels of one series.
type Labels = Vec<(&'static str, String)>;

fn backend(b: &Backend) -> Labels {
    vec![
        ("pool", b.state.pool.to_string()),
        ("backend", b.addr.to_string()),
    ]
}

fn backend_and(b: &Backend, key: &'static str, value: impl ToString) -> Labels {
    let mut labels = backend(b);
    labels.push((key, value.to_string()));
    labels
}

/// One family and its series.
fn family<M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    series: impl IntoIterator<Item = (Labels, M)>,
) -> Result<(), std::fmt::Error> {
    let mut e = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, metric) in series {
        metric.encode(e.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for Exporter {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let rt = &self.0;
        let snap = rt.snapshot();
        let backends: Vec<&Backend> = snap.all_backends().collect();
        let now_ms = rt.clock.now_ms();
        let m = &rt.metrics;
        let count = |n: &AtomicU64| ConstCounter::new(n.load(Relaxed));

        // Counter names get `_total` from the encoder.
        let routed = backends.iter().flat_map(|b| {
            b.state
                .metrics
                .responses
                .nonzero()
                .map(move |(code, n)| (backend_and(b, "code", code), ConstCounter::new(n)))
        });
        // lb's own answers: per pool once routed, `pool="none"` before.
        let own = |pool: String, counts: &StatusCounts| {
            counts
                .nonzero()
                .map(move |(code, n)| {
                    let labels = vec![
                        ("pool", pool.clone()),
                        ("backend", NO_BACKEND.to_owned()),
                        ("code", code.to_string()),
                    ];
                    (labels, ConstCounter::new(n))
                })
                .collect::<Vec<_>>()
        };
        let pooled = snap
            .pools
            .iter()
            .flat_map(|p| own(p.name().to_string(), &p.shared.own_answers));
        let unrouted = own(NO_BACKEND.to_owned(), &m.unrouted);
        family(
            &mut enc,
            "lb_requests",
            "Client requests answered, by the backend whose response was relayed and status code",
            MetricType::Counter,
            routed.chain(pooled).chain(unrouted),
        )?;
        {
            let mut e = enc.encode_descriptor(
                "lb_request_duration_seconds",
                "Client request duration, arrival to response head",
                None,
                MetricType::Histogram,
            )?;
            let h = &m.duration;
            let mut buckets: Vec<(f64, u64)> = DURATION_BUCKETS
                .iter()
                .zip(&h.buckets)
                .map(|(&le, n)| (le, n.load(Relaxed)))
                .collect();
            buckets.push((
                f64::INFINITY,
                h.buckets[DURATION_BUCKETS.len()].load(Relaxed),
            ));
            let total = buckets.iter().map(|(_, n)| n).sum();
            let sum = h.sum_us.load(Relaxed) as f64 / 1e6;
            e.encode_histogram::<NoLabelSet>(sum, total, &buckets, None)?;
        }
        family(
            &mut enc,
            "lb_upstream_attempts",
            "Attempts sent to backends, by outcome",
            MetricType::Counter,
            backends.iter().flat_map(|b| {
                AttemptOutcome::ALL.into_iter().map(move |o| {
                    let n = &b.state.metrics.attempts[o as usize];
                    (backend_and(b, "outcome", o.label()), count(n))
                })
            }),
        )?;
        family(
            &mut enc,
            "lb_retries",
            "Requests tried again on another backend, by the previous attempt's failure",
            MetricType::Counter,
            RetryReason::ALL.into_iter().map(|r| {
                let labels = vec![("reason", r.label().to_owned())];
                (labels, count(&m.retries[r as usize]))
            }),
        )?;
        counter(
            &mut enc,
            "lb_retry_budget_exhausted",
            "Retries not made because the retry budget was spent",
            m.budget_exhausted.load(Relaxed),
        )?;
        family(
            &mut enc,
            "lb_backend_healthy",
            "1 when the backend is eligible (active checks pass and not ejected)",
            MetricType::Gauge,
            backends.iter().map(|b| {
                let up = i64::from(b.state.is_available(now_ms));
                (backend(b), ConstGauge::new(up))
            }),
        )?;
        family(
            &mut enc,
            "lb_backend_in_flight",
            "Requests (and upgraded connections) open on the backend",
            MetricType::Gauge,
            backends.iter().map(|b| {
                let n = i64::from(b.state.in_flight());
                (backend(b), ConstGauge::new(n))
            }),
        )?;
        family(
            &mut enc,
            "lb_outlier_ejections",
            "Times passive detection ejected the backend",
            MetricType::Counter,
            backends
                .iter()
                .map(|b| (backend(b), count(&b.state.metrics.ejections))),
        )?;
        family(
            &mut enc,
            "lb_response_body_stalls",
            "Responses cut because the backend sent no body byte for timeouts.backend_body",
            MetricType::Counter,
            backends
                .iter()
                .map(|b| (backend(b), count(&b.state.metrics.body_stalls))),
        )?;
        family(
            &mut enc,
            "lb_response_body_errors",
            "Responses cut because the backend closed, reset or broke the framing of the body",
            MetricType::Counter,
            backends
                .iter()
                .map(|b| (backend(b), count(&b.state.metrics.body_errors))),
        )?;
        counter(
            &mut enc,
            "lb_client_send_timeouts",
            "Client connections closed, and HTTP/2 streams reset, because the client took no response bytes for timeouts.client_send",
            m.client_send_timeouts.load(Relaxed),
        )?;
        family(
            &mut enc,
            "lb_health_checks",
            "Active health probes, by result",
            MetricType::Counter,
            backends.iter().flat_map(|b| {
                ["pass", "fail"]
                    .into_iter()
                    .enumerate()
                    .map(move |(i, result)| {
                        let n = &b.state.metrics.health_checks[i];
                        (backend_and(b, "result", result), count(n))
                    })
            }),
        )?;
        family(
            &mut enc,
            "lb_backend_bytes",
            "tcp mode: bytes relayed, by direction",
            MetricType::Counter,
            backends.iter().flat_map(|b| {
                [("to_backend", true), ("to_client", false)]
                    .into_iter()
                    .map(move |(direction, up)| {
                        let n = b.state.metrics.bytes(up);
                        (backend_and(b, "direction", direction), count(n))
                    })
            }),
        )?;
        gauge(
            &mut enc,
            "lb_connections_active",
            "Open client connections (upgraded ones included)",
            rt.connections.open() as f64,
        )?;
        counter(
            &mut enc,
            "lb_connections",
            "Client connections accepted",
            rt.connections.total(),
        )?;
        let reloads = &rt.reloads;
        let ok = reloads.applied.load(Relaxed).saturating_sub(1);
        let failed = reloads.rejected.load(Relaxed);
        family(
            &mut enc,
            "lb_config_reloads",
            "Config reloads, by result (the initial load is not one)",
            MetricType::Counter,
            [("success", ok), ("failure", failed)]
                .map(|(result, n)| (vec![("result", result.to_owned())], ConstCounter::new(n))),
        )?;
        gauge(
            &mut enc,
            "lb_config_last_reload_successful",
            "1 when the last reload (or the initial load) was applied",
            f64::from(u8::from(reloads.last().ok)),
        )?;
        gauge(
            &mut enc,
            "lb_config_last_reload_success_timestamp_seconds",
            "When a config was last applied, in seconds since the epoch",
            unix_seconds(reloads.last_applied_at()),
        )?;
        {
            let mut e =
                enc.encode_descriptor("lb_config", "The config in use", None, MetricType::Info)?;
            let hash = snap.hash.to_string();
            e.encode_info(&[("hash", hash.as_str())])?;
        }
        counter(
            &mut enc,
            "lb_access_log_dropped",
            "Access log lines dropped because the writer fell behind",
            rt.access_log.dropped(),
        )?;
        family(
            &mut enc,
            "lb_local_errors",
            "lb's own resource shortages (fd limit, buffers, local ports), by what lb was doing; no backend is charged for them",
            MetricType::Counter,
            rt.local_errors.counts().filter(|(_, _, n)| *n > 0).map(|(op, kind, n)| {
                (
                    vec![("op", op.label().to_owned()), ("kind", kind.label().to_owned())],
                    ConstCounter::new(n),
                )
            }),
        )?;
        counter(
            &mut enc,
            "lb_log_lines_dropped",
            "lb's own log lines (stderr) dropped because the writer fell behind",
            rt.log_lines_dropped.get().map_or(0, |d| d.get()),
        )?;
        gauge(
            &mut enc,
            "lb_upgraded_connections_active",
            "Upgraded (WebSocket) connections being relayed",
            rt.upgrades.open() as f64,
        )?;
        Ok(())
    }
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    ConstCounter::new(value).encode(enc.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: f64,
) -> Result<(), std::fmt::Error> {
    ConstGauge::new(value).encode(enc.encode_descriptor(name, help, None, MetricType::Gauge)?)
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

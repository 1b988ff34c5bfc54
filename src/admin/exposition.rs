//! The OpenMetrics exposition: at scrape time, walks the current
//! snapshot's pools and backends and the runtime's counters (kept in
//! `obs::metrics`, touched by the request path without a lock).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::core::runtime::Runtime;
use crate::core::selection::Backend;
use crate::obs::metrics::*;

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
        let grpc = snap
            .pools
            .iter()
            .map(|p| (p.name().to_string(), &p.shared.grpc))
            .chain(std::iter::once((NO_BACKEND.to_owned(), &m.grpc_unrouted)))
            .flat_map(|(pool, counts)| {
                counts.nonzero().map(move |(status, n)| {
                    let labels = vec![("pool", pool.clone()), ("grpc_status", status)];
                    (labels, ConstCounter::new(n))
                })
            });
        family(
            &mut enc,
            "lb_grpc_requests",
            "gRPC calls (content-type application/grpc), by the grpc-status their client got (none: the stream ended without one)",
            MetricType::Counter,
            grpc,
        )?;
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
        let resolutions = rt.discovered.status();
        if !resolutions.is_empty() {
            family(
                &mut enc,
                "lb_dns_resolutions",
                "Lookups of discovered pools' names, by result: ok, empty (NXDOMAIN or no records: the pool emptied), failed (timeout, SERVFAIL, REFUSED: the last good set kept)",
                MetricType::Counter,
                resolutions.iter().flat_map(|(pool, _, counts)| {
                    [
                        ("ok", &counts.ok),
                        ("empty", &counts.empty),
                        ("failed", &counts.failed),
                    ]
                    .map(|(result, n)| {
                        let labels = vec![
                            ("pool", pool.to_string()),
                            ("result", result.to_owned()),
                        ];
                        (labels, count(n))
                    })
                }),
            )?;
        }
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
        let certificates = rt.tls.certificates();
        if !certificates.is_empty() {
            family(
                &mut enc,
                "lb_tls_certificate_expiry_seconds",
                "When each served certificate expires (not-after, Unix seconds), by listener and SAN name",
                MetricType::Gauge,
                certificates.iter().flat_map(|(listener, c)| {
                    let expiry = crate::obs::metrics::unix_seconds(c.not_after);
                    c.names.iter().map(move |name| {
                        (
                            vec![("listener", listener.clone()), ("name", name.clone())],
                            ConstGauge::new(expiry),
                        )
                    })
                }),
            )?;
            counter(
                &mut enc,
                "lb_tls_handshake_failures",
                "TLS handshakes that failed or timed out (timeouts.client_header)",
                rt.tls.handshake_failures.load(Relaxed),
            )?;
            counter(
                &mut enc,
                "lb_tls_certificate_reloads",
                "Certificate pairs applied after their files changed",
                rt.tls.reloads.load(Relaxed),
            )?;
            counter(
                &mut enc,
                "lb_tls_certificate_reload_failures",
                "Certificate file changes not applied (unreadable, unparsable, or key and certificate not a pair); the last good pair kept serving",
                rt.tls.reload_failures.load(Relaxed),
            )?;
        }
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

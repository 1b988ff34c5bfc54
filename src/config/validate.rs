//! `RawConfig` → `Config`: defaults, ranges and cross-field rules. Each error
//! (and each [`warnings`] entry) is `(field path, message)`; the caller adds
//! the file name and the position.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use ::http::uri::{Authority, PathAndQuery};

use super::listeners::{self, ListenerConfig, ListenerName};
use super::pools::{self, PoolConfig, PoolName, RawPool};
use super::raw::{
    HumanDuration, RawBackend, RawConfig, RawHealthCheck, RawLimits, RawMode, RawOutlierDetection,
    RawProtocol, RawProxyProtocol, RawRetry, RawRetryOn, RawStrategy,
};
use super::{
    BackendAddr, BackendConfig, Config, HealthCheck, Limits, Mode, OutlierDetection, Protocol,
    ProxyProtocol, RetryBudgetConfig, RetryOn, RetryPolicy, Strategy, Timeouts,
};

type Invalid = (String, String);

fn invalid<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, Invalid> {
    Err((field.into(), message.into()))
}

/// Why `admin` and `listen` cannot both be bound: the same port with one of
/// them on the wildcard address of a family that covers the other's IP
/// (`0.0.0.0` covers every IPv4 address, `[::]` every address, being
/// dual-stack). The kernel refuses the second bind, and the message would
/// otherwise blame another process.
fn wildcard_overlap(admin: SocketAddr, listen: SocketAddr) -> Option<String> {
    let covers = |wide: SocketAddr, other: SocketAddr| {
        wide.ip().is_unspecified() && (wide.is_ipv6() || other.is_ipv4())
    };
    if admin.port() == 0 || admin.port() != listen.port() || admin == listen {
        return None;
    }
    let which = if covers(admin, listen) {
        "admin"
    } else if covers(listen, admin) {
        "listen"
    } else {
        return None;
    };
    Some(format!(
        "admin {admin} overlaps listen {listen} (the same port, and {which} is on the wildcard address)"
    ))
}

/// HAProxy's range; it keeps the round-robin schedule small (see selection).
pub const MAX_WEIGHT: i64 = 256;

pub fn validate(mut raw: RawConfig) -> Result<Config, Invalid> {
    let raw_listeners = raw.listeners.take();
    let listeners_named = raw_listeners.is_some();
    // The legacy listener's mode decides its pools' too.
    let legacy_mode = match raw.mode.unwrap_or(RawMode::Http) {
        RawMode::Http => Mode::Http,
        RawMode::Tcp => Mode::Tcp,
    };
    if listeners_named {
        for (key, set) in [
            ("listen", raw.listen.is_some()),
            ("mode", raw.mode.is_some()),
            ("tls", raw.tls.is_some()),
        ] {
            if set {
                return invalid(
                    key,
                    "cannot be used with listeners: give each listener its address, mode and tls under listeners:",
                );
            }
        }
    }
    let timeouts = Timeouts {
        connect: positive("timeouts.connect", raw.timeouts.connect, 1_000)?,
        request: positive("timeouts.request", raw.timeouts.request, 30_000)?,
        client_header: positive("timeouts.client_header", raw.timeouts.client_header, 10_000)?,
        client_body: positive("timeouts.client_body", raw.timeouts.client_body, 30_000)?,
        client_idle: positive("timeouts.client_idle", raw.timeouts.client_idle, 60_000)?,
        backend_body: positive("timeouts.backend_body", raw.timeouts.backend_body, 60_000)?,
        client_send: positive("timeouts.client_send", raw.timeouts.client_send, 60_000)?,
        tcp_idle: positive("timeouts.tcp_idle", raw.timeouts.tcp_idle, 3_600_000)?,
    };
    let limits = limits(std::mem::take(&mut raw.limits))?;
    // Listeners first, as written: the pools they reach decide each
    // pool's mode (a pool only tcp listeners reach is a tcp pool).
    let mut drafts = match raw_listeners {
        None => vec![Draft {
            name: ListenerName::from_static(ListenerName::DEFAULT),
            address: match raw.listen.as_deref() {
                None => SocketAddr::from(([127, 0, 0, 1], 8080)),
                Some(s) => listeners::address(s, "listen")?,
            },
            mode: legacy_mode,
            tls: raw.tls.take().map(|t| (t, "tls".to_owned())),
            redirect_https: None,
            routes: None,
            pool_shorthand: false,
            tcp_routes: None,
            at: String::new(),
        }],
        Some(raw_listeners) => {
            if raw_listeners.is_empty() {
                return invalid("listeners", "is empty: list at least one {name, address}");
            }
            let mut drafts = Vec::with_capacity(raw_listeners.len());
            for (i, l) in raw_listeners.into_iter().enumerate() {
                let at = format!("listeners[{i}]");
                let name = listeners::name(l.name, &at)?;
                let Some(address) = l.address else {
                    return invalid(
                        format!("{at}.address"),
                        "missing: the IP:port this listener accepts on",
                    );
                };
                let address = listeners::address(&address, &format!("{at}.address"))?;
                let mode = match l.mode.unwrap_or(RawMode::Http) {
                    RawMode::Http => Mode::Http,
                    RawMode::Tcp => Mode::Tcp,
                };
                let redirect_https = l
                    .redirect_https
                    .map(|p| listeners::redirect_port(p, &format!("{at}.redirect_https")))
                    .transpose()?;
                let pool_shorthand = l.pool.is_some();
                let routes = match mode {
                    Mode::Tcp => {
                        if redirect_https.is_some() {
                            return invalid(
                                format!("{at}.redirect_https"),
                                "redirects HTTP requests: a tcp listener has none (drop it, or mode: http)",
                            );
                        }
                        Some(listeners::tcp_routes(l.pool, l.routes, &at)?)
                    }
                    Mode::Http => {
                        for (key, set) in
                            [("pool", l.pool.is_some()), ("routes", l.routes.is_some())]
                        {
                            if set {
                                return invalid(
                                    format!("{at}.{key}"),
                                    "an http listener is served by the top-level routes: (a route's listeners: [NAME] keeps it to some listeners)",
                                );
                            }
                        }
                        if redirect_https.is_some() && l.tls.is_some() {
                            return invalid(
                                format!("{at}.redirect_https"),
                                "this listener already speaks TLS: redirect_https belongs on a plain-HTTP listener",
                            );
                        }
                        None
                    }
                };
                drafts.push(Draft {
                    name,
                    address,
                    mode,
                    tls: l.tls.map(|t| (t, format!("{at}.tls"))),
                    redirect_https,
                    routes,
                    pool_shorthand,
                    tcp_routes: None,
                    at: format!("{at}."),
                });
            }
            drafts
        }
    };
    let defaults = pools::defaults(&mut raw);
    let raw_routes = raw.routes.take();
    let http_listeners: Vec<ListenerName> = drafts
        .iter()
        .filter(|d| d.mode == Mode::Http && d.redirect_https.is_none())
        .map(|d| d.name.clone())
        .collect();
    if listeners_named && http_listeners.is_empty() && raw_routes.is_some() {
        return invalid(
            "routes",
            "no http listener routes requests: a tcp listener's routes go under its own routes:",
        );
    }
    let merged = pools::merged(defaults, raw.pools.take(), &raw_routes)?;
    let tcp_only: Vec<bool> = merged
        .iter()
        .map(|(name, _, _)| {
            tcp_only_pool(
                &drafts,
                &raw_routes,
                !http_listeners.is_empty(),
                name.as_str(),
            )
        })
        .collect();
    let mut pool_configs = Vec::new();
    for ((name, pool_raw, prefix), tcp_only) in merged.into_iter().zip(tcp_only) {
        let mode = if tcp_only { Mode::Tcp } else { Mode::Http };
        let mut pool = pool(name, pool_raw, mode).map_err(|(field, message)| match &prefix {
            Some(prefix) if !field.starts_with("backend_tls") => {
                (format!("{prefix}{field}"), message)
            }
            _ => (field, message),
        })?;
        if let (Some(tls), Some(prefix)) = (&mut pool.tls, &prefix) {
            if tls.written_at == "tls" {
                tls.written_at = format!("{prefix}tls");
            }
        }
        pool_configs.push(Arc::new(pool));
    }
    let routes = if !listeners_named {
        // The one listener's routes: by SNI in tcp mode.
        let routes = pools::routes(raw_routes, &pool_configs, legacy_mode == Mode::Tcp, None)?;
        if legacy_mode == Mode::Tcp {
            drafts[0].tcp_routes = Some(routes);
            Vec::new()
        } else {
            routes
        }
    } else if http_listeners.is_empty() {
        Vec::new()
    } else {
        if let Some(sni) = raw_routes.iter().flatten().position(|r| r.sni.is_some()) {
            return invalid(
                format!("routes[{sni}].sni"),
                "routes by the TLS server name on a tcp listener: put it in that listener's routes:",
            );
        }
        pools::routes(raw_routes, &pool_configs, false, Some(&http_listeners))?
    };
    let mut listeners = Vec::with_capacity(drafts.len());
    for d in drafts {
        let routes = match (d.tcp_routes, d.routes) {
            (Some(routes), _) => routes,
            (None, Some(raw)) => {
                // `pool: NAME` is written as one key, not a route.
                let shorthand = raw.len() == 1 && raw[0].sni.is_none() && d.pool_shorthand;
                pools::routes(Some(raw), &pool_configs, true, None).map_err(
                    |(field, message)| {
                        if shorthand {
                            (format!("{}pool", d.at), message)
                        } else {
                            (format!("{}{field}", d.at), message)
                        }
                    },
                )?
            }
            (None, None) => Vec::new(),
        };
        let tls = match d.tls {
            None => None,
            Some((raw_tls, key)) => Some(
                super::tls::validate(raw_tls, d.mode == Mode::Tcp)
                    .map_err(|(field, message)| (field.replacen("tls", &key, 1), message))?,
            ),
        };
        listeners.push(ListenerConfig {
            name: d.name,
            address: d.address,
            mode: d.mode,
            tls,
            redirect_https: d.redirect_https,
            routes,
        });
    }
    listeners::check_distinct(&listeners)?;
    let admin: Option<SocketAddr> = match raw.admin.as_deref() {
        None => None,
        Some(s) => Some(s.trim().parse().or_else(|_| {
            invalid(
                "admin",
                format!("{s:?} is not an IP:port address (like 127.0.0.1:9901)"),
            )
        })?),
    };
    if let Some(admin) = admin {
        for l in &listeners {
            let which = if listeners_named {
                format!("listener {}", l.name)
            } else {
                "listen".to_owned()
            };
            if admin == l.address && admin.port() != 0 {
                return invalid("admin", format!("must differ from {which}"));
            }
            if let Some(clash) = wildcard_overlap(admin, l.address) {
                return invalid(
                    "admin",
                    format!("{clash}: lb cannot listen on both; give admin a port of its own"),
                );
            }
        }
    }
    let any_tcp = listeners.iter().any(|l| l.mode == Mode::Tcp);
    let send_proxy_protocol =
        match (raw.send_proxy_protocol, any_tcp) {
            (None, _) => None,
            (Some(_), false) => return invalid(
                "send_proxy_protocol",
                "is only supported with mode: tcp (HTTP mode passes the client in X-Forwarded-For)",
            ),
            (Some(RawProxyProtocol::V1), true) => Some(ProxyProtocol::V1),
            (Some(RawProxyProtocol::V2), true) => Some(ProxyProtocol::V2),
        };
    Ok(Config {
        listeners,
        listeners_named,
        timeouts,
        limits,
        admin,
        access_log: raw.access_log.unwrap_or(false),
        send_proxy_protocol,
        pools: pool_configs,
        routes,
    })
}

/// A listener between its raw form and its validated one: its routes
/// wait for the pools.
struct Draft {
    name: ListenerName,
    address: SocketAddr,
    mode: Mode,
    /// `tls:` as written, with its key path (`listeners[1].tls`).
    tls: Option<(super::tls::RawTls, String)>,
    redirect_https: Option<u16>,
    /// tcp: its routes as written.
    routes: Option<Vec<super::pools::RawRoute>>,
    /// tcp: its routes came from `pool: NAME`.
    pool_shorthand: bool,
    /// tcp: its routes once validated (the legacy listener's, which are
    /// the top-level `routes:`).
    tcp_routes: Option<Vec<super::RouteConfig>>,
    /// The key-path prefix of its keys (`listeners[1].`; none for `listen`).
    at: String,
}

/// Whether only tcp listeners reach `pool`: it is validated as a tcp pool
/// (a connect health check, no cookies). Any other pool is an HTTP pool.
fn tcp_only_pool(
    drafts: &[Draft],
    http_routes: &Option<Vec<super::pools::RawRoute>>,
    http_listeners: bool,
    pool: &str,
) -> bool {
    let legacy_tcp = drafts.len() == 1 && drafts[0].at.is_empty() && drafts[0].mode == Mode::Tcp;
    if legacy_tcp {
        return true;
    }
    let by_tcp = drafts.iter().any(|d| {
        d.routes
            .iter()
            .flatten()
            .any(|r| r.pool.as_deref() == Some(pool))
    });
    let by_http = http_listeners
        && match http_routes {
            // One pool and no routes: it takes every http request.
            None => true,
            Some(routes) => routes.iter().any(|r| r.pool.as_deref() == Some(pool)),
        };
    by_tcp && !by_http
}

/// One pool's keys (already merged over the top-level defaults) → its
/// validated settings. Field paths are relative to the pool.
fn pool(name: PoolName, raw: RawPool, mode: Mode) -> Result<PoolConfig, Invalid> {
    let strategy = match raw.strategy.unwrap_or(RawStrategy::RoundRobin) {
        RawStrategy::RoundRobin => Strategy::RoundRobin,
        RawStrategy::LeastConnections => Strategy::LeastConnections,
        RawStrategy::Random => Strategy::Random,
        RawStrategy::PowerOfTwoChoices => Strategy::PowerOfTwoChoices,
        RawStrategy::ConsistentHash => Strategy::ConsistentHash,
        RawStrategy::PeakEwma => Strategy::PeakEwma,
    };
    let protocol = protocol(raw.protocol, mode)?;
    let tls = backend_tls(raw.tls, raw.tls_from_top, protocol, mode)?;
    let (backends, discovery) = match (raw.backends, raw.discovery) {
        (Some(_), Some(_)) => {
            return invalid(
                "discovery",
                "a pool has backends: or discovery:, not both (a discovered pool's backends are what its name resolves to)",
            )
        }
        (None, Some(d)) => (Vec::new(), Some(super::discovery::validate(d)?)),
        (listed, None) => (backends(listed)?, None),
    };
    let health_check = raw
        .health_check
        .map(|hc| health_check(hc, mode, protocol))
        .transpose()?;
    let outlier_detection = outlier_detection(raw.outlier_detection)?;
    let retry = retry(raw.retry)?;
    let steering = super::steering::validate(
        super::steering::RawSteering {
            hash_key: raw.hash_key,
            session_affinity: raw.session_affinity,
            peak_ewma: raw.peak_ewma,
            slow_start: raw.slow_start,
        },
        strategy,
    )?;
    if mode == Mode::Tcp {
        // A TCP connection has no headers, cookies or paths: only its peer.
        if steering.session_affinity.is_some() {
            return invalid(
                "session_affinity",
                "needs HTTP cookies: not available with mode: tcp (consistent_hash on client_ip gives affinity)",
            );
        }
        if steering.hash_key != super::steering::HashKey::ClientIp {
            return invalid("hash_key", "only client_ip can be hashed with mode: tcp");
        }
    }
    Ok(PoolConfig {
        name,
        strategy,
        backends,
        discovery,
        health_check,
        outlier_detection,
        retry,
        steering,
        protocol,
        tls,
    })
}

/// `protocol:` → what lb speaks to the pool's backends.
fn protocol(raw: Option<RawProtocol>, mode: Mode) -> Result<Protocol, Invalid> {
    let Some(raw) = raw else {
        return Ok(Protocol::Http1);
    };
    if mode == Mode::Tcp {
        return invalid(
            "protocol",
            "chooses the HTTP version spoken to backends: not available with mode: tcp (bytes are relayed as they come)",
        );
    }
    match raw {
        RawProtocol::Http1 => Ok(Protocol::Http1),
        RawProtocol::H2c => Ok(Protocol::H2c),
        RawProtocol::H2 => Ok(Protocol::H2),
        RawProtocol::Auto => Ok(Protocol::Auto),
    }
}

/// A pool's `tls:` against its protocol: `h2` and `auto` are TLS (with the
/// platform's roots when `tls:` is absent), `h2c` never is.
fn backend_tls(
    raw: Option<super::backend_tls::RawBackendTls>,
    from_top: bool,
    protocol: Protocol,
    mode: Mode,
) -> Result<Option<super::backend_tls::BackendTls>, Invalid> {
    // Relative to the pool, as every pool key's path is; the top level's is
    // marked so its errors are not put under the pool.
    let key = if from_top { "backend_tls" } else { "tls" };
    let Some(raw) = raw else {
        return Ok(matches!(protocol, Protocol::H2 | Protocol::Auto)
            .then(|| super::backend_tls::BackendTls::platform_default(key.to_owned())));
    };
    if mode == Mode::Tcp {
        return invalid(
            key,
            "TLS to backends needs mode: http (tcp mode relays the client's bytes, TLS or not, as they come)",
        );
    }
    if protocol == Protocol::H2c {
        return invalid(
            key,
            "protocol h2c is HTTP/2 without TLS: for HTTP/2 over TLS use protocol: h2 (or auto, to let ALPN choose)",
        );
    }
    super::backend_tls::validate(raw, key.to_owned())
        .map(Some)
        .map_err(|(field, message)| (format!("{key}.{field}"), message))
}

/// hyper's smallest read buffer; a head limit below it could not be honoured.
const MIN_HEADER_BYTES: u64 = 8 * 1024;

fn limits(raw: RawLimits) -> Result<Limits, Invalid> {
    let max_connections = raw.max_connections.unwrap_or(10_000);
    if !(1..=10_000_000).contains(&max_connections) {
        return invalid(
            "limits.max_connections",
            format!("{max_connections} is out of range (1 to 10000000)"),
        );
    }
    let max_header_bytes = raw.max_header_bytes.map_or(64 * 1024, |b| b.0);
    if !(MIN_HEADER_BYTES..=16 * 1024 * 1024).contains(&max_header_bytes) {
        return invalid(
            "limits.max_header_bytes",
            format!("{max_header_bytes} is out of range (8KiB to 16MiB)"),
        );
    }
    let h2_max_concurrent_streams = count(
        "limits.h2_max_concurrent_streams",
        raw.h2_max_concurrent_streams,
        100,
        10_000,
    )?;
    Ok(Limits {
        max_connections: max_connections as usize,
        max_header_bytes: max_header_bytes as usize,
        h2_max_concurrent_streams: h2_max_concurrent_streams.get(),
    })
}

/// A duration that must be > 0, with a default in milliseconds.
fn positive(
    field: &str,
    value: Option<HumanDuration>,
    default_ms: u64,
) -> Result<Duration, Invalid> {
    match value {
        None => Ok(Duration::from_millis(default_ms)),
        Some(HumanDuration(d)) if d.is_zero() => invalid(field, "must be greater than zero"),
        Some(HumanDuration(d)) => Ok(d),
    }
}

fn count(field: &str, value: Option<i64>, default: u32, max: u32) -> Result<NonZeroU32, Invalid> {
    let v = value.unwrap_or(i64::from(default));
    match u32::try_from(v).ok().and_then(NonZeroU32::new) {
        Some(n) if n.get() <= max => Ok(n),
        _ => invalid(field, format!("{v} is out of range (1 to {max})")),
    }
}

fn backends(raw: Option<Vec<RawBackend>>) -> Result<Vec<BackendConfig>, Invalid> {
    let Some(raw) = raw else {
        return invalid("backends", "missing: list at least one backend address");
    };
    if raw.is_empty() {
        return invalid("backends", "is empty: list at least one backend address");
    }
    let mut seen: HashMap<BackendAddr, usize> = HashMap::with_capacity(raw.len());
    let mut out = Vec::with_capacity(raw.len());
    for (i, b) in raw.into_iter().enumerate() {
        let address =
            backend_addr(&b.address).map_err(|m| (format!("backends[{i}].address"), m))?;
        if let Some(first) = seen.insert(address.clone(), i) {
            return invalid(
                format!("backends[{i}].address"),
                format!("{address} is a duplicate of backends[{first}]"),
            );
        }
        let weight = b.weight.unwrap_or(1);
        if !(0..=MAX_WEIGHT).contains(&weight) {
            return invalid(
                format!("backends[{i}].weight"),
                format!("{weight} is out of range (0 to {MAX_WEIGHT}; 0 drains the backend)"),
            );
        }
        out.push(BackendConfig {
            address,
            weight: weight as u32,
        });
    }
    if out.iter().all(|b| b.weight == 0) {
        return invalid(
            "backends",
            "every weight is 0: no backend could receive traffic",
        );
    }
    Ok(out)
}

/// `host:port` with an explicit port and nothing else (no scheme, path or user).
fn backend_addr(s: &str) -> Result<BackendAddr, String> {
    let bad =
        || format!("{s:?} is not a host:port address (like 127.0.0.1:9001 or app.internal:80)");
    let s = s.trim();
    if s.contains('/') || s.contains('@') {
        return Err(bad());
    }
    let authority: Authority = s.parse().map_err(|_| bad())?;
    if authority.port_u16().is_none() || authority.host().is_empty() {
        return Err(bad());
    }
    Ok(BackendAddr(Arc::from(
        authority.as_str().to_ascii_lowercase(),
    )))
}

fn health_check(
    raw: RawHealthCheck,
    mode: Mode,
    protocol: Protocol,
) -> Result<HealthCheck, Invalid> {
    let grpc = match (raw.grpc.unwrap_or(false), raw.grpc_service) {
        (false, Some(_)) => {
            return invalid(
                "health_check.grpc_service",
                "names the service of a gRPC health check: set grpc: true too",
            )
        }
        (false, None) => None,
        (true, _) if mode == Mode::Tcp => {
            return invalid(
                "health_check.grpc",
                "a gRPC health check needs mode: http and protocol: h2c or h2",
            )
        }
        (true, _) if !protocol.is_http2() => {
            return invalid(
                "health_check.grpc",
                "a gRPC health check needs protocol: h2c or h2 (gRPC is HTTP/2)",
            )
        }
        (true, _) if raw.path.is_some() => {
            return invalid(
                "health_check.path",
                "a gRPC health check calls grpc.health.v1.Health/Check: remove the path",
            )
        }
        (true, service) => Some(service.unwrap_or_default()),
    };
    let path = match (mode, raw.path) {
        _ if grpc.is_some() => None,
        (Mode::Tcp, Some(path)) => {
            return invalid(
                "health_check.path",
                format!("{path:?} cannot be probed in tcp mode: a tcp health check is a TCP connect; remove the path"),
            )
        }
        (Mode::Tcp, None) => None,
        (Mode::Http, path) => Some(http_health_path(
            path.unwrap_or_else(|| "/health".to_owned()),
        )?),
    };
    let interval = positive("health_check.interval", raw.interval, 2_000)?;
    let timeout = positive("health_check.timeout", raw.timeout, 1_000)?;
    if timeout > interval {
        return invalid(
            "health_check.timeout",
            format!("{timeout:?} must not exceed health_check.interval ({interval:?})"),
        );
    }
    Ok(HealthCheck {
        path,
        grpc,
        interval,
        timeout,
        healthy_threshold: count(
            "health_check.healthy_threshold",
            raw.healthy_threshold,
            2,
            1000,
        )?,
        unhealthy_threshold: count(
            "health_check.unhealthy_threshold",
            raw.unhealthy_threshold,
            2,
            1000,
        )?,
    })
}

fn http_health_path(path: String) -> Result<PathAndQuery, Invalid> {
    if !path.starts_with('/') {
        return invalid("health_check.path", format!("{path:?} must start with /"));
    }
    path.parse().or_else(|_| {
        invalid(
            "health_check.path",
            format!("{path:?} is not a valid URL path"),
        )
    })
}

fn outlier_detection(raw: Option<RawOutlierDetection>) -> Result<OutlierDetection, Invalid> {
    let (failures, ejection, percent) = match raw {
        Some(r) => (
            r.consecutive_failures,
            r.ejection_time,
            r.max_ejection_percent,
        ),
        None => (None, None, None),
    };
    let max_ejection_percent = percent.unwrap_or(50);
    if !(0..=100).contains(&max_ejection_percent) {
        return invalid(
            "outlier_detection.max_ejection_percent",
            format!("{max_ejection_percent} is out of range (0 to 100)"),
        );
    }
    let consecutive_failures = match failures.unwrap_or(5) {
        0 => None,
        n => Some(count(
            "outlier_detection.consecutive_failures",
            Some(n),
            5,
            10_000,
        )?),
    };
    Ok(OutlierDetection {
        consecutive_failures,
        ejection_time: positive("outlier_detection.ejection_time", ejection, 10_000)?,
        max_ejection_percent: max_ejection_percent as u32,
    })
}

fn retry(raw: Option<RawRetry>) -> Result<RetryPolicy, Invalid> {
    let raw = raw.unwrap_or(RawRetry {
        attempts: None,
        per_try_timeout: None,
        retry_on: None,
        buffer_body_limit: None,
        budget: None,
    });
    let attempts = count("retry.attempts", raw.attempts, 3, 100)?;
    let per_try_timeout = match raw.per_try_timeout {
        None => None,
        Some(d) => Some(positive("retry.per_try_timeout", Some(d), 0)?),
    };
    let list = raw.retry_on.unwrap_or_else(|| {
        vec![
            RawRetryOn::ConnectFailure,
            RawRetryOn::Reset,
            RawRetryOn::Timeout,
            RawRetryOn::Status(502),
            RawRetryOn::Status(503),
            RawRetryOn::Status(504),
        ]
    });
    let mut statuses: Vec<u16> = list
        .iter()
        .filter_map(|r| match r {
            RawRetryOn::Status(c) => Some(*c),
            _ => None,
        })
        .collect();
    statuses.sort_unstable();
    statuses.dedup();
    let retry_on = RetryOn {
        connect_failure: list.contains(&RawRetryOn::ConnectFailure),
        reset: list.contains(&RawRetryOn::Reset),
        timeout: list.contains(&RawRetryOn::Timeout),
        unavailable: list.contains(&RawRetryOn::Unavailable),
        statuses,
    };
    let buffer_body_limit = raw.buffer_body_limit.map_or(64 * 1024, |b| b.0);
    if buffer_body_limit > 64 * 1024 * 1024 {
        return invalid(
            "retry.buffer_body_limit",
            "must be at most 64MiB (bodies are held in memory while they may be replayed)",
        );
    }
    let (ratio, min) = match raw.budget {
        Some(b) => (b.ratio, b.min_retries_per_second),
        None => (None, None),
    };
    let ratio = ratio.unwrap_or(0.2);
    if !(0.0..=1000.0).contains(&ratio) {
        return invalid(
            "retry.budget.ratio",
            format!("{ratio} is out of range (0 to 1000)"),
        );
    }
    let min = min.unwrap_or(10);
    let min_retries_per_second = u32::try_from(min)
        .ok()
        .filter(|m| *m <= 1_000_000)
        .map_or_else(
            || {
                invalid(
                    "retry.budget.min_retries_per_second",
                    format!("{min} is out of range (0 to 1000000)"),
                )
            },
            Ok,
        )?;
    Ok(RetryPolicy {
        attempts,
        per_try_timeout,
        retry_on,
        buffer_body_limit,
        budget: RetryBudgetConfig {
            ratio,
            min_retries_per_second,
        },
    })
}

/// Settings that are valid but cannot do what they say, as `(field, message)`.
pub fn warnings(config: &Config) -> Vec<Invalid> {
    let mut warnings = Vec::new();
    for pool in &config.pools {
        if let Some(tls) = pool.tls.as_ref().filter(|t| t.insecure_skip_verify) {
            warnings.push((
                format!("{}.insecure_skip_verify", tls.written_at),
                format!(
                    "pool {}: backend certificates are NOT verified: anyone on the path can impersonate these backends",
                    pool.name
                ),
            ));
        }
        let Some(per_try) = pool.retry.per_try_timeout else {
            continue;
        };
        let request = config.timeouts.request;
        if per_try > request {
            warnings.push((
                format!("{}retry.per_try_timeout", pool_key_prefix(config, pool)),
                format!(
                    "{} is longer than timeouts.request ({}), which bounds all tries together: \
                     a try is cut at {} anyway",
                    humantime::format_duration(per_try),
                    humantime::format_duration(request),
                    humantime::format_duration(request),
                ),
            ));
        }
    }
    warnings
}

/// The key-path prefix of a pool's own keys: none for the implicit pool of
/// a file without `pools:`, `pools.NAME.` otherwise.
pub(super) fn pool_key_prefix(config: &Config, pool: &PoolConfig) -> String {
    if config.pools.len() == 1 && pool.name.as_str() == PoolName::DEFAULT {
        String::new()
    } else {
        format!("pools.{}.", pool.name)
    }
}

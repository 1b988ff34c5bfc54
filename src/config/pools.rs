//! `pools:` and `routes:`: several named pools behind one listener, and the
//! table that picks one per request by Host and path.
//!
//! The top-level pool keys (`backends`, `strategy`, `health_check`, `retry`,
//! `outlier_detection`, `hash_key`, `session_affinity`, `peak_ewma`,
//! `slow_start`, `protocol`) are each pool's defaults: a pool that sets a key replaces
//! the default's value for that key whole (as an nginx `location` replaces
//! a `server`'s directive), one that does not inherits it. A file without
//! `pools` is one pool named `default` with a catch-all route, so every
//! single-pool file keeps its meaning.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::Deserialize;

use super::listeners::ListenerName;
use super::raw::{
    HumanDuration, RawBackend, RawConfig, RawHealthCheck, RawOutlierDetection, RawProtocol,
    RawRetry, RawStrategy,
};
use super::steering::{RawPeakEwma, RawSessionAffinity};
use super::{check_path_prefix, HostMatch};
use super::{
    BackendConfig, HealthCheck, OutlierDetection, Protocol, RetryPolicy, Steering, Strategy,
};

type Invalid = (String, String);

/// One entry of `pools:` as written: every key optional, defaulting to the
/// top-level key of the same name.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub backends: Option<Vec<RawBackend>>,
    pub discovery: Option<super::discovery::RawDiscovery>,
    pub strategy: Option<RawStrategy>,
    pub health_check: Option<RawHealthCheck>,
    pub outlier_detection: Option<RawOutlierDetection>,
    pub retry: Option<RawRetry>,
    pub hash_key: Option<String>,
    pub session_affinity: Option<RawSessionAffinity>,
    pub peak_ewma: Option<RawPeakEwma>,
    pub slow_start: Option<HumanDuration>,
    pub protocol: Option<RawProtocol>,
    /// HTTPS to the backends.
    pub tls: Option<super::backend_tls::RawBackendTls>,
    /// `tls` came from the top-level `backend_tls:` (its errors name that).
    #[serde(skip)]
    pub tls_from_top: bool,
}

/// One entry of `routes:` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// `api.example.com` or `*.example.com`; absent matches any host.
    pub host: Option<String>,
    /// Whole-segment path prefix; absent is `/`.
    pub path_prefix: Option<String>,
    /// Remove the prefix before forwarding (`/admin/users` → `/users`).
    pub strip_prefix: Option<bool>,
    /// `mode: tcp`: the TLS server name (SNI) this route takes, read from
    /// the ClientHello without terminating; absent takes the rest.
    pub sni: Option<String>,
    /// The pool that serves what this route matches.
    pub pool: Option<String>,
    /// With `listeners:`, the http listeners this route applies to; absent
    /// means every one.
    pub listeners: Option<Vec<String>>,
}

/// A pool's name: `[A-Za-z0-9_-]+`, the key of its runtime state together
/// with each backend's address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolName(Arc<str>);

impl PoolName {
    /// The pool of a file without `pools:`.
    pub const DEFAULT: &'static str = "default";

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// For tests and examples; real names come from `validate`.
    pub fn from_static(s: &'static str) -> Self {
        PoolName(Arc::from(s))
    }
}

impl fmt::Display for PoolName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One validated pool: its members and every policy that decides how a
/// request is served by them.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    pub name: PoolName,
    /// How a backend is chosen for each request.
    pub strategy: Strategy,
    /// The members, in file order (order matters for round robin). A
    /// discovered pool's are the addresses its name has now (empty as
    /// validated; filled by the runtime from the last resolution).
    pub backends: Vec<BackendConfig>,
    /// Where the members come from when DNS says: `None` for `backends:`.
    pub discovery: Option<super::discovery::Discovery>,
    /// Active probing; `None` means every backend is eligible unless passive
    /// detection has ejected it.
    pub health_check: Option<HealthCheck>,
    /// Passive health: ejection after consecutive failed requests.
    pub outlier_detection: OutlierDetection,
    /// When and how a failed request is tried on another backend of this pool.
    pub retry: RetryPolicy,
    /// Hash key, sticky cookie, peak-EWMA decay and slow start.
    pub steering: Steering,
    /// What lb speaks to the backends.
    pub protocol: Protocol,
    /// HTTPS to the backends: always set for `protocol: h2` and `auto`.
    pub tls: Option<super::backend_tls::BackendTls>,
}

impl PoolConfig {
    /// Sum of all weights; > 0 in a valid config.
    pub fn total_weight(&self) -> u64 {
        self.backends.iter().map(|b| u64::from(b.weight)).sum()
    }
}

/// One validated route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// `None` matches every host.
    pub host: Option<HostMatch>,
    /// Starts with `/`; `/` matches every path.
    pub path_prefix: String,
    pub strip_prefix: bool,
    /// Index into `Config::pools`.
    pub pool: usize,
    /// The listeners it applies to; empty: every http listener.
    pub listeners: Vec<ListenerName>,
}

impl RouteConfig {
    /// Whether requests on `listener` may take this route.
    pub fn applies_on(&self, listener: &ListenerName) -> bool {
        self.listeners.is_empty() || self.listeners.contains(listener)
    }
}

impl fmt::Display for RouteConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Some(host) => write!(f, "{host}{}", self.path_prefix)?,
            None => write!(f, "*{}", self.path_prefix)?,
        }
        if self.strip_prefix {
            f.write_str(" (strip prefix)")?;
        }
        if !self.listeners.is_empty() {
            let names: Vec<&str> = self.listeners.iter().map(ListenerName::as_str).collect();
            write!(f, " on {}", names.join(","))?;
        }
        Ok(())
    }
}

/// The pool keys of `RawConfig`, taken out so they can serve as defaults.
pub(super) fn defaults(raw: &mut RawConfig) -> RawPool {
    RawPool {
        backends: raw.backends.take(),
        discovery: raw.discovery.take(),
        strategy: raw.strategy.take(),
        health_check: raw.health_check.take(),
        outlier_detection: raw.outlier_detection.take(),
        retry: raw.retry.take(),
        hash_key: raw.hash_key.take(),
        session_affinity: raw.session_affinity.take(),
        peak_ewma: raw.peak_ewma.take(),
        slow_start: raw.slow_start.take(),
        protocol: raw.protocol.take(),
        tls_from_top: raw.backend_tls.is_some(),
        tls: raw.backend_tls.take(),
    }
}

/// The pools as written, each merged over the defaults, with the key-path
/// prefix its own errors carry: `None` for the implicit `default` pool
/// (errors name top-level keys, as they did before pools existed).
pub(super) fn merged(
    defaults: RawPool,
    pools: Option<BTreeMap<String, RawPool>>,
    routes: &Option<Vec<RawRoute>>,
) -> Result<Vec<(PoolName, RawPool, Option<String>)>, Invalid> {
    let Some(pools) = pools else {
        if routes.is_some() {
            return Err((
                "routes".to_owned(),
                "needs pools: a route names the pool it sends to (define pools:, or drop routes:)"
                    .to_owned(),
            ));
        }
        return Ok(vec![(
            PoolName::from_static(PoolName::DEFAULT),
            defaults,
            None,
        )]);
    };
    if defaults.backends.is_some() {
        return Err((
            "backends".to_owned(),
            "cannot be used with pools: list each pool's backends under pools.NAME.backends"
                .to_owned(),
        ));
    }
    if defaults.discovery.is_some() {
        return Err((
            "discovery".to_owned(),
            "cannot be used with pools: give each pool its own pools.NAME.discovery".to_owned(),
        ));
    }
    if pools.is_empty() {
        return Err((
            "pools".to_owned(),
            "is empty: define at least one pool".to_owned(),
        ));
    }
    let mut out = Vec::with_capacity(pools.len());
    for (name, pool) in pools {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err((
                format!("pools.{name}"),
                format!("{name:?} is not a pool name (letters, digits, _ and - only)"),
            ));
        }
        let merged = inherit(pool, &defaults);
        out.push((
            PoolName(Arc::from(name.as_str())),
            merged,
            Some(format!("pools.{name}.")),
        ));
    }
    Ok(out)
}

/// `pool` with every key it leaves out taken from `defaults`. A default
/// steering key that applies only to another strategy than the pool's is
/// left out instead of being an error: it was meant for other pools.
fn inherit(pool: RawPool, defaults: &RawPool) -> RawPool {
    let strategy = pool.strategy.or(defaults.strategy);
    let applies = |wanted: RawStrategy| strategy == Some(wanted);
    RawPool {
        backends: pool.backends,
        discovery: pool.discovery,
        health_check: pool.health_check.or_else(|| defaults.health_check.clone()),
        outlier_detection: pool
            .outlier_detection
            .or_else(|| defaults.outlier_detection.clone()),
        retry: pool.retry.or_else(|| defaults.retry.clone()),
        hash_key: pool.hash_key.or_else(|| {
            defaults
                .hash_key
                .clone()
                .filter(|_| applies(RawStrategy::ConsistentHash))
        }),
        session_affinity: pool
            .session_affinity
            .or_else(|| defaults.session_affinity.clone()),
        peak_ewma: pool.peak_ewma.or_else(|| {
            defaults
                .peak_ewma
                .clone()
                .filter(|_| applies(RawStrategy::PeakEwma))
        }),
        slow_start: pool.slow_start.or(defaults.slow_start),
        protocol: pool.protocol.or(defaults.protocol),
        tls_from_top: pool.tls.is_none() && defaults.tls.is_some(),
        tls: pool.tls.or_else(|| defaults.tls.clone()),
        strategy,
    }
}

/// Routes validated against the pools, or the implicit catch-all when the
/// file has one pool and no `routes:`.
///
/// `http_listeners` is `None` for a file without `listeners:` (no route may
/// name one), else the names a route's `listeners:` may take.
pub(super) fn routes(
    raw: Option<Vec<RawRoute>>,
    pools: &[Arc<PoolConfig>],
    tcp: bool,
    http_listeners: Option<&[ListenerName]>,
) -> Result<Vec<RouteConfig>, Invalid> {
    let Some(raw) = raw else {
        if pools.len() > 1 {
            return Err((
                "routes".to_owned(),
                format!(
                    "missing: with {} pools, routes must say which pool serves a request",
                    pools.len()
                ),
            ));
        }
        return Ok(vec![RouteConfig {
            host: None,
            path_prefix: "/".to_owned(),
            strip_prefix: false,
            pool: 0,
            listeners: Vec::new(),
        }]);
    };
    if raw.is_empty() {
        return Err((
            "routes".to_owned(),
            "is empty: list at least one route".to_owned(),
        ));
    }
    let mut out: Vec<RouteConfig> = Vec::with_capacity(raw.len());
    for (i, mut r) in raw.into_iter().enumerate() {
        let at = |key: &str| format!("routes[{i}].{key}");
        // mode: tcp routes by the ClientHello's server name alone; the
        // name follows the Host rules (exact, then the longest wildcard).
        if tcp {
            for (key, set) in [
                ("host", r.host.is_some()),
                ("path_prefix", r.path_prefix.is_some()),
                ("strip_prefix", r.strip_prefix.is_some()),
            ] {
                if set {
                    return Err((
                        at(key),
                        "mode: tcp has no Host or path to route by: route by sni: (the TLS server name) or use one pool".to_owned(),
                    ));
                }
            }
            r.host = r.sni.take();
        } else if r.sni.is_some() {
            return Err((
                at("sni"),
                "routes by the TLS server name in mode: tcp only; an http route matches host:"
                    .to_owned(),
            ));
        }
        let host_key = if tcp { "sni" } else { "host" };
        let host = r
            .host
            .as_deref()
            .map(HostMatch::parse)
            .transpose()
            .map_err(|m| (at(host_key), m))?;
        let path_prefix = r.path_prefix.unwrap_or_else(|| "/".to_owned());
        check_path_prefix(&path_prefix).map_err(|m| (at("path_prefix"), m))?;
        let Some(name) = r.pool else {
            return Err((
                at("pool"),
                "missing: name the pool this route sends to".to_owned(),
            ));
        };
        let Some(pool) = pools.iter().position(|p| p.name.as_str() == name) else {
            let known: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
            return Err((
                at("pool"),
                format!("no pool named {name:?} (pools: {})", known.join(", ")),
            ));
        };
        let listeners = match (r.listeners, http_listeners) {
            (None, _) => Vec::new(),
            (Some(_), None) => {
                return Err((
                    at("listeners"),
                    "needs listeners: at the top level (a file with one listen: has one listener)"
                        .to_owned(),
                ))
            }
            (Some(names), Some(known)) => {
                if names.is_empty() {
                    return Err((
                        at("listeners"),
                        "is empty: name at least one listener, or drop the key (every http listener)".to_owned(),
                    ));
                }
                let mut out = Vec::with_capacity(names.len());
                for name in names {
                    let Some(l) = known.iter().find(|l| l.as_str() == name) else {
                        let known: Vec<&str> = known.iter().map(ListenerName::as_str).collect();
                        return Err((
                            at("listeners"),
                            format!(
                                "no http listener named {name:?} that routes requests (those are: {})",
                                known.join(", ")
                            ),
                        ));
                    };
                    out.push(l.clone());
                }
                out
            }
        };
        let route = RouteConfig {
            host,
            path_prefix,
            strip_prefix: r.strip_prefix.unwrap_or(false),
            pool,
            listeners,
        };
        // The same host and prefix twice on a listener both reach: the
        // second could never match there.
        let overlap = |o: &RouteConfig| {
            o.listeners.is_empty()
                || route.listeners.is_empty()
                || o.listeners.iter().any(|l| route.listeners.contains(l))
        };
        if let Some(first) = out
            .iter()
            .position(|o| o.host == route.host && o.path_prefix == route.path_prefix && overlap(o))
        {
            return Err((
                format!("routes[{i}]"),
                format!(
                    "duplicates routes[{first}] (same host and path_prefix: {}); the second could never match",
                    route
                ),
            ));
        }
        out.push(route);
    }
    Ok(out)
}

/// Pools that no route reaches: a warning, not an error (a pool may be
/// kept while its routes are edited).
pub fn unreachable_pools<'r>(
    pools: &[Arc<PoolConfig>],
    routes: impl Iterator<Item = &'r RouteConfig> + Clone,
) -> Vec<PoolName> {
    pools
        .iter()
        .enumerate()
        .filter(|(i, _)| !routes.clone().any(|r| r.pool == *i))
        .map(|(_, p)| p.name.clone())
        .collect()
}

//! The config file exactly as written: serde structs that mirror the YAML,
//! with `deny_unknown_fields` everywhere so a typo like `stratgy:` is an
//! error that names the key, and leaf types ([`HumanDuration`], [`ByteSize`])
//! that parse while deserializing so a bad value keeps its line and column.
//!
//! Nothing here is checked beyond its syntax; [`super::validate`] turns a
//! [`RawConfig`] into a [`super::Config`].

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// Top level of `config.yaml`.
///
/// Each struct's `expecting` is what a type error says is expected (serde
/// would otherwise name the Rust struct).
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping of config keys (like backends: and listen:)"
)]
pub struct RawConfig {
    /// Address the proxy accepts clients on.
    pub listen: Option<String>,
    /// Protocol the listener speaks: `http` or `tcp`.
    pub mode: Option<RawMode>,
    /// Load-balancing strategy name.
    pub strategy: Option<RawStrategy>,
    /// The pool. Required (or `discovery`): a proxy with nowhere to send
    /// traffic is a mistake.
    pub backends: Option<Vec<RawBackend>>,
    /// The pool's backends from DNS instead of `backends`.
    pub discovery: Option<super::discovery::RawDiscovery>,
    #[serde(default)]
    pub timeouts: RawTimeouts,
    /// Active health checks; absent means every backend is eligible.
    pub health_check: Option<RawHealthCheck>,
    /// Passive health (outlier detection); on with defaults when absent.
    pub outlier_detection: Option<RawOutlierDetection>,
    /// Retry policy; defaults when absent.
    pub retry: Option<RawRetry>,
    /// What `consistent_hash` hashes (`client_ip`, `header:NAME`, …).
    pub hash_key: Option<String>,
    /// Sticky sessions by cookie; off when absent.
    pub session_affinity: Option<super::steering::RawSessionAffinity>,
    /// `peak_ewma` parameters; defaults when absent.
    pub peak_ewma: Option<super::steering::RawPeakEwma>,
    /// Ramp-up window for joining backends; off when absent.
    pub slow_start: Option<HumanDuration>,
    /// What lb speaks to the backends (`http1`, `h2c`, `h2`, `auto`);
    /// http1 when absent.
    pub protocol: Option<RawProtocol>,
    /// HTTPS to the backends: every pool's default `tls:` (the top-level
    /// `tls:` is the listener's).
    pub backend_tls: Option<super::backend_tls::RawBackendTls>,
    /// Caps on client connections and request heads.
    #[serde(default)]
    pub limits: RawLimits,
    /// Address of the admin listener (metrics, status, probes); absent = none.
    pub admin: Option<String>,
    /// One line per proxied request on stdout; off when absent.
    pub access_log: Option<bool>,
    /// tcp mode: PROXY protocol header sent to backends (`v1` or `v2`).
    pub send_proxy_protocol: Option<RawProxyProtocol>,
    /// Named pools; the top-level pool keys are their defaults.
    pub pools: Option<std::collections::BTreeMap<String, super::pools::RawPool>>,
    /// Which pool serves a request, by Host and path.
    pub routes: Option<Vec<super::pools::RawRoute>>,
    /// TLS termination on the listener; plain TCP when absent.
    pub tls: Option<super::tls::RawTls>,
    /// Several listeners, each with its own address, mode and TLS (instead
    /// of `listen`, `mode` and `tls`).
    pub listeners: Option<Vec<super::listeners::RawListener>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping like {max_connections: 10000}"
)]
pub struct RawLimits {
    pub max_connections: Option<i64>,
    pub max_header_bytes: Option<ByteSize>,
    pub h2_max_concurrent_streams: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawProxyProtocol {
    V1,
    V2,
}

impl<'de> Deserialize<'de> for RawProxyProtocol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use RawProxyProtocol::*;
        d.deserialize_str(Named {
            what: "a PROXY protocol version",
            names: &[("v1", V1), ("v2", V2)],
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawMode {
    Http,
    Tcp,
}

impl<'de> Deserialize<'de> for RawMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(Named {
            what: "a mode",
            names: &[("http", RawMode::Http), ("tcp", RawMode::Tcp)],
        })
    }
}

/// `protocol:`: what lb speaks to a pool's backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawProtocol {
    Http1,
    H2c,
    /// HTTP/2 over TLS (ALPN h2).
    H2,
    /// TLS, ALPN choosing h2 or http/1.1.
    Auto,
}

impl<'de> Deserialize<'de> for RawProtocol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use RawProtocol::*;
        d.deserialize_str(Named {
            what: "a backend protocol",
            names: &[("http1", Http1), ("h2c", H2c), ("h2", H2), ("auto", Auto)],
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawStrategy {
    RoundRobin,
    LeastConnections,
    Random,
    PowerOfTwoChoices,
    ConsistentHash,
    PeakEwma,
}

/// Every name `strategy:` accepts, aliases included, in the order the docs
/// list them.
pub const STRATEGIES: &[(&str, RawStrategy)] = &[
    ("round_robin", RawStrategy::RoundRobin),
    ("weighted_round_robin", RawStrategy::RoundRobin),
    ("least_connections", RawStrategy::LeastConnections),
    ("random", RawStrategy::Random),
    ("power_of_two_choices", RawStrategy::PowerOfTwoChoices),
    ("consistent_hash", RawStrategy::ConsistentHash),
    ("peak_ewma", RawStrategy::PeakEwma),
];

impl<'de> Deserialize<'de> for RawStrategy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(Named {
            what: "a strategy",
            names: STRATEGIES,
        })
    }
}

/// One of a fixed set of names. Hand-written rather than derived so a wrong
/// name or type is answered with the list of names, never with serde's
/// derive wording (`expected enum RawMode`, `a YAML tag starting with '!'`).
struct Named<T: 'static> {
    /// What the names are, for messages: "a strategy".
    what: &'static str,
    names: &'static [(&'static str, T)],
}

impl<T: 'static> Named<T> {
    fn list(&self) -> String {
        let names: Vec<&str> = self.names.iter().map(|(n, _)| *n).collect();
        match names.as_slice() {
            [a, b] => format!("{a} or {b}"),
            _ => format!("one of {}", names.join(", ")),
        }
    }
}

impl<T: Copy + 'static> Visitor<'_> for Named<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{} ({})", self.what, self.list())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        match self.names.iter().find(|(name, _)| *name == v) {
            Some((_, value)) => Ok(*value),
            None => Err(E::custom(format_args!(
                "{v:?} is not {}; expected {}",
                self.what,
                self.list()
            ))),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping like {address: host:port, weight: 1}"
)]
pub struct RawBackend {
    pub address: String,
    pub weight: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping like {connect: 1s}")]
pub struct RawTimeouts {
    pub connect: Option<HumanDuration>,
    pub request: Option<HumanDuration>,
    pub client_header: Option<HumanDuration>,
    pub client_body: Option<HumanDuration>,
    pub client_idle: Option<HumanDuration>,
    pub backend_body: Option<HumanDuration>,
    pub client_send: Option<HumanDuration>,
    pub tcp_idle: Option<HumanDuration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping like {path: /health}")]
pub struct RawHealthCheck {
    pub path: Option<String>,
    /// `true`: grpc.health.v1.Health/Check instead of a GET.
    pub grpc: Option<bool>,
    /// The service the gRPC check asks about; default "" (the server).
    pub grpc_service: Option<String>,
    pub interval: Option<HumanDuration>,
    pub timeout: Option<HumanDuration>,
    pub healthy_threshold: Option<i64>,
    pub unhealthy_threshold: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping like {consecutive_failures: 5}"
)]
pub struct RawOutlierDetection {
    pub consecutive_failures: Option<i64>,
    pub ejection_time: Option<HumanDuration>,
    pub max_ejection_percent: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping like {attempts: 3}")]
pub struct RawRetry {
    pub attempts: Option<i64>,
    pub per_try_timeout: Option<HumanDuration>,
    pub retry_on: Option<Vec<RawRetryOn>>,
    pub buffer_body_limit: Option<ByteSize>,
    pub budget: Option<RawRetryBudget>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping like {ratio: 0.2}")]
pub struct RawRetryBudget {
    pub ratio: Option<f64>,
    pub min_retries_per_second: Option<i64>,
}

/// One entry of `retry_on`: a failure class name or an HTTP status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawRetryOn {
    ConnectFailure,
    Reset,
    Timeout,
    /// A trailers-only gRPC answer with `grpc-status: 14`.
    Unavailable,
    Status(u16),
}

impl<'de> Deserialize<'de> for RawRetryOn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawRetryOn;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("connect_failure, reset, timeout, unavailable or a 5xx status code")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawRetryOn, E> {
                match u16::try_from(v) {
                    Ok(code @ 500..=599) => Ok(RawRetryOn::Status(code)),
                    _ => Err(E::custom(format_args!(
                        "{v} is not a 5xx status code (only server errors are retried)"
                    ))),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawRetryOn, E> {
                self.visit_u64(u64::try_from(v).unwrap_or(0))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawRetryOn, E> {
                match v {
                    "connect_failure" => Ok(RawRetryOn::ConnectFailure),
                    "reset" => Ok(RawRetryOn::Reset),
                    "timeout" => Ok(RawRetryOn::Timeout),
                    "unavailable" => Ok(RawRetryOn::Unavailable),
                    // Environment overrides arrive as strings.
                    other => match other.parse::<u64>() {
                        Ok(n) => self.visit_u64(n),
                        Err(_) => Err(E::invalid_value(de::Unexpected::Str(other), &self)),
                    },
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration written the way people write them: `250ms`, `2s`, `1m 30s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration with a unit, like 250ms or 2s")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HumanDuration, E> {
                humantime::parse_duration(v.trim())
                    .map(HumanDuration)
                    .map_err(|e| E::custom(duration_error(v, &e)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<HumanDuration, E> {
                // A bare 0 is unambiguous; any other bare number is a unit-less guess.
                if v == 0 {
                    Ok(HumanDuration(Duration::ZERO))
                } else {
                    Err(E::custom(format_args!(
                        "{v} has no unit; write {v}s or {v}ms"
                    )))
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<HumanDuration, E> {
                self.visit_u64(u64::try_from(v).unwrap_or(u64::MAX))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<HumanDuration, E> {
                Err(E::custom(format_args!(
                    "{v} has no unit; write it like 250ms or 2s"
                )))
            }
        }
        d.deserialize_any(V)
    }
}

/// Why `v` is not a duration, without humantime's parser positions
/// (`expected number at 0`).
fn duration_error(v: &str, e: &humantime::DurationError) -> String {
    use humantime::DurationError;
    match e {
        DurationError::UnknownUnit { unit, .. } => {
            format!("{v:?} has an unknown unit {unit:?}; write it like 250ms, 2s, 5m or 1h")
        }
        DurationError::NumberOverflow => format!("{v:?} is too long a duration"),
        _ => format!("{v:?} is not a duration; write it like 250ms, 2s or 1m 30s"),
    }
}

/// A size in bytes: a plain integer, or with a unit (`64KiB`, `1MiB`, `512B`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    fn parse(s: &str) -> Option<u64> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().ok()?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            _ => return None,
        };
        n.checked_mul(mult)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size in bytes, like 65536 or 64KiB")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format_args!("{v} is negative; a size is 0 or more")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v)
                    .map(ByteSize)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::ByteSize;

    #[test]
    fn byte_sizes() {
        assert_eq!(ByteSize::parse("64KiB"), Some(65536));
        assert_eq!(ByteSize::parse("1 MiB"), Some(1 << 20));
        assert_eq!(ByteSize::parse("512"), Some(512));
        assert_eq!(ByteSize::parse("12 parsecs"), None);
        assert_eq!(ByteSize::parse("KiB"), None);
    }
}

//! `discovery:`: a pool whose backends are the addresses a DNS name has
//! now (A and AAAA, or SRV targets with their ports and weights), followed
//! while lb runs. The name and how to ask are config; the asking is
//! `crate::discovery`'s, off the request path.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::raw::HumanDuration;

type Invalid = (String, String);

/// `discovery:` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping like {dns: api.default.svc.cluster.local, port: 8080}"
)]
pub struct RawDiscovery {
    pub dns: Option<String>,
    pub srv: Option<String>,
    pub port: Option<i64>,
    pub refresh: Option<HumanDuration>,
    pub resolver: Option<String>,
    pub weight: Option<i64>,
}

/// What is looked up.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Lookup {
    /// A and AAAA records: every address is a backend at the port.
    Addresses { name: String, port: u16 },
    /// SRV records: each target's addresses at the record's port, with the
    /// record's weight.
    Service { name: String },
}

/// A validated `discovery:`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Discovery {
    pub lookup: Lookup,
    /// How often the name is asked again at most; a shorter TTL asks
    /// sooner, never more than once a second.
    pub refresh: Duration,
    /// The nameserver asked; `None`: the system's (`/etc/resolv.conf`).
    pub resolver: Option<SocketAddr>,
    /// Each discovered backend's weight (A/AAAA; SRV records carry theirs).
    pub weight: u32,
}

impl Discovery {
    /// The name asked, as written (lower case, without a trailing dot).
    pub fn name(&self) -> &str {
        match &self.lookup {
            Lookup::Addresses { name, .. } | Lookup::Service { name } => name,
        }
    }

    /// `dns api.svc:8080` / `srv _http._tcp.api.svc`, for logs.
    pub fn describe(&self) -> String {
        match &self.lookup {
            Lookup::Addresses { name, port } => format!("dns {name} port {port}"),
            Lookup::Service { name } => format!("srv {name}"),
        }
    }
}

/// The least time between two lookups of one name: a zero TTL must not
/// turn into a query storm.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);

pub(super) fn validate(raw: RawDiscovery) -> Result<Discovery, Invalid> {
    let err = |key: &str, message: String| Err((format!("discovery.{key}"), message));
    let lookup =
        match (raw.dns, raw.srv) {
            (Some(_), Some(_)) => return err(
                "srv",
                "a pool follows one name: dns: (A/AAAA records) or srv: (SRV records), not both"
                    .to_owned(),
            ),
            (None, None) => {
                return Err((
                    "discovery".to_owned(),
                    "needs dns: NAME (with port:) or srv: NAME".to_owned(),
                ))
            }
            (Some(name), None) => {
                let name = dns_name(&name).map_err(|m| ("discovery.dns".to_owned(), m))?;
                let Some(port) = raw.port else {
                    return err(
                        "port",
                        "missing: the port every address of the name serves on".to_owned(),
                    );
                };
                let port = u16::try_from(port)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| {
                        (
                            "discovery.port".to_owned(),
                            format!("{port} is not a port (1 to 65535)"),
                        )
                    })?;
                Lookup::Addresses { name, port }
            }
            (None, Some(name)) => {
                let name = dns_name(&name).map_err(|m| ("discovery.srv".to_owned(), m))?;
                if raw.port.is_some() {
                    return err(
                        "port",
                        "SRV records carry each target's port: drop port:".to_owned(),
                    );
                }
                if raw.weight.is_some() {
                    return err(
                        "weight",
                        "SRV records carry each target's weight: drop weight:".to_owned(),
                    );
                }
                Lookup::Service { name }
            }
        };
    let refresh = raw.refresh.map_or(Duration::from_secs(5), |d| d.0);
    if refresh < MIN_REFRESH {
        return err(
            "refresh",
            format!(
                "{} is below the least refresh, 1s (a resolver is not asked more often)",
                humantime::format_duration(refresh)
            ),
        );
    }
    let resolver = match raw.resolver.as_deref().map(str::trim) {
        None => None,
        Some(s) => Some(
            s.parse::<SocketAddr>()
                .or_else(|_| {
                    s.parse::<std::net::IpAddr>()
                        .map(|ip| SocketAddr::new(ip, 53))
                })
                .map_err(|_| {
                    (
                        "discovery.resolver".to_owned(),
                        format!(
                            "{s:?} is not a nameserver address (like 10.96.0.10 or 10.96.0.10:53)"
                        ),
                    )
                })?,
        ),
    };
    let weight = raw.weight.unwrap_or(1);
    if !(1..=super::validate::MAX_WEIGHT).contains(&weight) {
        return err(
            "weight",
            format!(
                "{weight} is out of range (1 to {})",
                super::validate::MAX_WEIGHT
            ),
        );
    }
    Ok(Discovery {
        lookup,
        refresh,
        resolver,
        weight: weight as u32,
    })
}

/// A DNS name as lb asks it: letters, digits, `-` and `_` in labels of at
/// most 63, 253 in all; lower case, no trailing dot.
fn dns_name(raw: &str) -> Result<String, String> {
    let name = raw.trim().trim_end_matches('.').to_ascii_lowercase();
    let bad = || format!("{raw:?} is not a DNS name (like api.default.svc.cluster.local)");
    if name.is_empty() || name.len() > 253 {
        return Err(bad());
    }
    for label in name.split('.') {
        if label.is_empty()
            || label.len() > 63
            || !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(bad());
        }
    }
    Ok(name)
}

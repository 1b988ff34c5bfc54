//! `listeners:`: several listening addresses in one file, each with its
//! own protocol (`mode`), TLS, plain-HTTP redirect or, for tcp, its pool or
//! SNI routes. A file without `listeners:` has one listener named
//! `default`, made of the top-level `listen`, `mode` and `tls`, so every
//! earlier file keeps its meaning.
//!
//! A listener is known by its name across reloads: a reload that changes a
//! listener's address moves it (as `listen` moves today), one that adds or
//! removes a name opens or closes a listener.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::Deserialize;

use super::pools::RawRoute;
use super::raw::RawMode;
use super::tls::{RawTls, TlsSettings};
use super::{Mode, RouteConfig};

type Invalid = (String, String);

/// One entry of `listeners:` as written.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping like {name: web, address: 0.0.0.0:8080}"
)]
pub struct RawListener {
    pub name: Option<String>,
    pub address: Option<String>,
    pub mode: Option<RawMode>,
    pub tls: Option<RawTls>,
    /// Answer every request with a 308 to `https://host:PORT/path?query`.
    pub redirect_https: Option<i64>,
    /// tcp: the one pool every connection goes to.
    pub pool: Option<String>,
    /// tcp: pools by the TLS server name (`sni:`), read without terminating.
    pub routes: Option<Vec<RawRoute>>,
}

/// A listener's name: `[A-Za-z0-9_-]+`, what it is known by across reloads
/// and in `/status`, `/metrics` and routes' `listeners: [..]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerName(Arc<str>);

impl ListenerName {
    /// The listener of a file without `listeners:`.
    pub const DEFAULT: &'static str = "default";

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn from_static(s: &'static str) -> Self {
        ListenerName(Arc::from(s))
    }

    /// The name as a shared string, for the connections accepted on it.
    pub fn shared(&self) -> Arc<str> {
        Arc::clone(&self.0)
    }
}

impl fmt::Display for ListenerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One validated listener.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    pub name: ListenerName,
    pub address: SocketAddr,
    pub mode: Mode,
    /// TLS termination; `None` serves plain TCP.
    pub tls: Option<TlsSettings>,
    /// http: every request is answered with a 308 to this HTTPS port.
    pub redirect_https: Option<u16>,
    /// tcp: this listener's routes (by SNI; a listener that names one pool
    /// has one catch-all). Empty for http: the top-level routes apply,
    /// each to the listeners its `listeners:` names (all when absent).
    pub routes: Vec<RouteConfig>,
}

impl ListenerConfig {
    /// Whether requests on it are routed to pools (an http listener that
    /// does not redirect them all).
    pub fn routes_requests(&self) -> bool {
        self.mode == Mode::Http && self.redirect_https.is_none()
    }

    /// `web 0.0.0.0:8080 http+tls`, for `--check` and logs.
    pub fn summary(&self) -> String {
        let tls = if self.tls.is_some() { "+tls" } else { "" };
        let redirect = self
            .redirect_https
            .map_or_else(String::new, |p| format!(" (redirect to https port {p})"));
        format!(
            "{} {} {}{tls}{redirect}",
            self.name, self.address, self.mode
        )
    }
}

/// Checks a listener's name.
pub(super) fn name(raw: Option<String>, at: &str) -> Result<ListenerName, Invalid> {
    let Some(name) = raw else {
        return Err((
            format!("{at}.name"),
            "missing: every listener has a name (it is what reloads, routes and /status know it by)".to_owned(),
        ));
    };
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err((
            format!("{at}.name"),
            format!("{name:?} is not a listener name (letters, digits, _ and - only)"),
        ));
    }
    Ok(ListenerName(Arc::from(name.as_str())))
}

/// Parses a listening address.
pub(super) fn address(raw: &str, key: &str) -> Result<SocketAddr, Invalid> {
    raw.trim().parse().map_err(|_| {
        (
            key.to_owned(),
            format!("{raw:?} is not an IP:port address (like 127.0.0.1:8080 or [::]:80)"),
        )
    })
}

/// `redirect_https` as a port.
pub(super) fn redirect_port(raw: i64, key: &str) -> Result<u16, Invalid> {
    u16::try_from(raw).ok().filter(|p| *p != 0).ok_or_else(|| {
        (
            key.to_owned(),
            format!("{raw} is not a port (1 to 65535): the HTTPS port clients are sent to"),
        )
    })
}

/// Two listeners on one address: the second bind would share the first's
/// connections (`SO_REUSEPORT`) instead of failing.
pub(super) fn check_distinct(listeners: &[ListenerConfig]) -> Result<(), Invalid> {
    for (i, l) in listeners.iter().enumerate() {
        if let Some(first) = listeners[..i].iter().find(|o| o.name == l.name) {
            return Err((
                format!("listeners[{i}].name"),
                format!(
                    "{:?} names two listeners (the other at {})",
                    l.name.as_str(),
                    first.address
                ),
            ));
        }
        if l.address.port() == 0 {
            continue;
        }
        if let Some(first) = listeners[..i].iter().find(|o| o.address == l.address) {
            return Err((
                format!("listeners[{i}].address"),
                format!(
                    "{} is also the address of listener {}: each listener needs its own",
                    l.address, first.name
                ),
            ));
        }
    }
    Ok(())
}

/// Builds a tcp listener's routes from `pool:` or `routes:` (validated
/// by `routes`, which knows the pools).
pub(super) fn tcp_routes(
    pool: Option<String>,
    routes: Option<Vec<RawRoute>>,
    at: &str,
) -> Result<Vec<RawRoute>, Invalid> {
    match (pool, routes) {
        (Some(_), Some(_)) => Err((
            format!("{at}.pool"),
            "a tcp listener takes pool: (every connection to one pool) or routes: (by SNI), not both".to_owned(),
        )),
        (Some(pool), None) => Ok(vec![RawRoute {
            host: None,
            path_prefix: None,
            strip_prefix: None,
            sni: None,
            pool: Some(pool),
            listeners: None,
        }]),
        (None, Some(routes)) => {
            if let Some(i) = routes.iter().position(|r| r.listeners.is_some()) {
                return Err((
                    format!("{at}.routes[{i}].listeners"),
                    "a tcp listener's routes are its own: listeners: belongs on a top-level route".to_owned(),
                ));
            }
            Ok(routes)
        }
        (None, None) => Err((
            at.to_owned(),
            "a tcp listener needs pool: NAME (every connection to one pool) or routes: [{sni: NAME, pool: NAME}, ...]".to_owned(),
        )),
    }
}

impl fmt::Display for RawMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RawMode::Http => "http",
            RawMode::Tcp => "tcp",
        })
    }
}

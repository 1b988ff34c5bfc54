//! What differs between two configs, key by key: the reload log line names
//! every setting that changed (`timeouts.connect 1s→2s`) and what joined or
//! left the pool, instead of "settings changed".
//!
//! Data-driven: [`SECTIONS`] lists each section (a top-level key, or the
//! scalars at the top) with its settings, each a dotted key and a rendering
//! of its value; a section that may be absent (`health_check`) is reported
//! as added or removed as a whole. A new setting is one line in its
//! section; a new section one entry. Keyed lists (today the backend pool;
//! pools and routes later) are compared by identity: added, removed, and
//! changed in place ([`ListDiff`]).

use std::fmt;
use std::time::Duration;

use super::{Config, HashKey, ListenerName, PoolConfig, PoolName, RouteConfig};

/// What changed from one config to the next.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ConfigDiff {
    /// Settings whose value differs, in [`SECTIONS`] order, then each
    /// kept pool's in [`POOL_SECTIONS`] order.
    pub changed: Vec<Changed>,
    /// Every pool's backends, by (pool, address).
    pub backends: ListDiff,
    /// The pools, by name.
    pub pools: ListDiff,
    /// The routes, by host and prefix.
    pub routes: ListDiff,
    /// The listeners, by name, when either file names them.
    pub listeners: ListDiff,
}

/// One setting (or optional section) whose value differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    /// The pool the setting belongs to, when the file names its pools
    /// (`pools.api.retry.attempts`); `None` for listener-wide settings and
    /// the implicit pool's.
    pub pool: Option<PoolName>,
    /// Dotted path as in the file: `timeouts.connect`, `health_check`.
    pub key: &'static str,
    /// The value before and after; `none` when absent.
    pub old: String,
    pub new: String,
}

/// Members of a keyed list that joined, left or changed in place.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ListDiff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// `member what old→new`, e.g. `127.0.0.1:9001 weight 1→3`.
    pub changed: Vec<String>,
}

impl ListDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }

    /// `pools +1 -0 (added api)`.
    fn describe(&self, what: &str) -> String {
        let mut detail = Vec::new();
        if !self.added.is_empty() {
            detail.push(format!("added {}", self.added.join(", ")));
        }
        if !self.removed.is_empty() {
            detail.push(format!("removed {}", self.removed.join(", ")));
        }
        if !self.changed.is_empty() {
            detail.push(self.changed.join(", "));
        }
        format!(
            "{what} +{} -{} ({})",
            self.added.len(),
            self.removed.len(),
            detail.join("; ")
        )
    }
}

/// A setting of a `T` (the config, or one pool): its dotted key and its
/// value, rendered as the file says it.
type Setting<T> = (&'static str, fn(&T) -> String);

/// A group of settings that is present in every config (`present: None`)
/// or only when configured.
struct Section<T: 'static> {
    /// The top-level key; `""` for the scalars at the top of the file.
    name: &'static str,
    present: Option<fn(&T) -> bool>,
    settings: &'static [Setting<T>],
}

/// Every listener-wide setting a reload can change, grouped as in the
/// file. Settings of an optional section are only compared when both
/// configs have it.
const SECTIONS: &[Section<Config>] = &[
    Section {
        name: "",
        present: None,
        settings: &[
            ("listen", |c| opt(c.sole_listener().map(|l| l.address))),
            ("mode", |c| opt(c.sole_listener().map(|l| l.mode))),
            ("admin", |c| opt(c.admin.as_ref())),
            ("access_log", |c| c.access_log.to_string()),
            ("send_proxy_protocol", |c| {
                opt(c
                    .send_proxy_protocol
                    .map(|v| format!("{v:?}").to_lowercase()))
            }),
        ],
    },
    Section {
        name: "timeouts",
        present: None,
        settings: &[
            ("timeouts.connect", |c| dur(c.timeouts.connect)),
            ("timeouts.request", |c| dur(c.timeouts.request)),
            ("timeouts.client_header", |c| dur(c.timeouts.client_header)),
            ("timeouts.client_body", |c| dur(c.timeouts.client_body)),
            ("timeouts.client_idle", |c| dur(c.timeouts.client_idle)),
            ("timeouts.backend_body", |c| dur(c.timeouts.backend_body)),
            ("timeouts.client_send", |c| dur(c.timeouts.client_send)),
            ("timeouts.tcp_idle", |c| dur(c.timeouts.tcp_idle)),
        ],
    },
    Section {
        name: "tls",
        present: Some(|c| sole_tls(c).is_some()),
        settings: &[
            ("tls.certificates", |c| {
                sole_tls(c).map_or_else(String::new, |t| {
                    let pairs: Vec<String> = t
                        .certificates
                        .iter()
                        .map(|p| format!("{}+{}", p.cert.display(), p.key.display()))
                        .collect();
                    pairs.join(", ")
                })
            }),
            ("tls.min_version", |c| {
                opt(sole_tls(c).map(|t| format!("{:?}", t.min_version)))
            }),
            ("tls.alpn", |c| {
                opt(sole_tls(c).map(|t| {
                    let ids: Vec<&str> = t
                        .alpn
                        .iter()
                        .map(|a| std::str::from_utf8(a.id()).unwrap_or("?"))
                        .collect();
                    ids.join(",")
                }))
            }),
            ("tls.client_auth", |c| {
                opt(sole_tls(c)
                    .and_then(|t| t.client_auth.as_ref())
                    .map(|a| format!("{} required={}", a.ca.display(), a.required)))
            }),
        ],
    },
    Section {
        name: "limits",
        present: None,
        settings: &[
            ("limits.max_connections", |c| {
                c.limits.max_connections.to_string()
            }),
            ("limits.max_header_bytes", |c| {
                c.limits.max_header_bytes.to_string()
            }),
        ],
    },
];

/// Every setting of one pool (a file without `pools:` has its one pool's
/// settings at the top level, and they are named so).
const POOL_SECTIONS: &[Section<PoolConfig>] = &[
    Section {
        name: "",
        present: None,
        settings: &[
            ("strategy", |c| c.strategy.to_string()),
            ("protocol", |c| c.protocol.to_string()),
            ("hash_key", |c| hash_key(&c.steering.hash_key)),
            ("peak_ewma.decay", |c| dur(c.steering.peak_ewma_decay)),
            ("slow_start", |c| opt(c.steering.slow_start.map(dur))),
        ],
    },
    Section {
        name: "health_check",
        present: Some(|c| c.health_check.is_some()),
        settings: &[
            ("health_check.path", |c| {
                opt(c.health_check.as_ref().and_then(|h| h.path.as_ref()))
            }),
            ("health_check.grpc_service", |c| {
                opt(c
                    .health_check
                    .as_ref()
                    .and_then(|h| h.grpc.as_ref())
                    .map(|s| format!("{s:?}")))
            }),
            ("health_check.interval", |c| {
                opt(c.health_check.as_ref().map(|h| dur(h.interval)))
            }),
            ("health_check.timeout", |c| {
                opt(c.health_check.as_ref().map(|h| dur(h.timeout)))
            }),
            ("health_check.healthy_threshold", |c| {
                opt(c.health_check.as_ref().map(|h| h.healthy_threshold))
            }),
            ("health_check.unhealthy_threshold", |c| {
                opt(c.health_check.as_ref().map(|h| h.unhealthy_threshold))
            }),
        ],
    },
    Section {
        name: "outlier_detection",
        present: None,
        settings: &[
            ("outlier_detection.consecutive_failures", |c| {
                opt(c.outlier_detection.consecutive_failures)
            }),
            ("outlier_detection.ejection_time", |c| {
                dur(c.outlier_detection.ejection_time)
            }),
            ("outlier_detection.max_ejection_percent", |c| {
                c.outlier_detection.max_ejection_percent.to_string()
            }),
        ],
    },
    Section {
        name: "retry",
        present: None,
        settings: &[
            ("retry.attempts", |c| c.retry.attempts.to_string()),
            ("retry.per_try_timeout", |c| {
                opt(c.retry.per_try_timeout.map(dur))
            }),
            ("retry.retry_on", |c| {
                let on = &c.retry.retry_on;
                let classes = [
                    (on.connect_failure, "connect_failure"),
                    (on.reset, "reset"),
                    (on.timeout, "timeout"),
                    (on.unavailable, "unavailable"),
                ];
                let mut names: Vec<String> = classes
                    .iter()
                    .filter(|(set, _)| *set)
                    .map(|(_, name)| (*name).to_owned())
                    .collect();
                names.extend(on.statuses.iter().map(u16::to_string));
                format!("[{}]", names.join(", "))
            }),
            ("retry.buffer_body_limit", |c| {
                c.retry.buffer_body_limit.to_string()
            }),
            ("retry.budget.ratio", |c| c.retry.budget.ratio.to_string()),
            ("retry.budget.min_retries_per_second", |c| {
                c.retry.budget.min_retries_per_second.to_string()
            }),
        ],
    },
    Section {
        name: "session_affinity",
        present: Some(|c| c.steering.session_affinity.is_some()),
        settings: &[
            ("session_affinity.cookie", |c| {
                opt(c.steering.session_affinity.as_ref().map(|a| &a.cookie))
            }),
            ("session_affinity.ttl", |c| {
                opt(c
                    .steering
                    .session_affinity
                    .as_ref()
                    .and_then(|a| a.ttl)
                    .map(dur))
            }),
        ],
    },
];

fn dur(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn opt(value: Option<impl fmt::Display>) -> String {
    value.map_or_else(|| "none".to_owned(), |v| v.to_string())
}

fn hash_key(key: &HashKey) -> String {
    match key {
        HashKey::ClientIp => "client_ip".to_owned(),
        HashKey::Path => "path".to_owned(),
        HashKey::Header(name) => format!("header:{name}"),
        HashKey::Cookie(name) => format!("cookie:{name}"),
        HashKey::Query(name) => format!("query:{name}"),
    }
}

impl ConfigDiff {
    /// What `new` changes relative to `old`.
    pub fn between(old: &Config, new: &Config) -> ConfigDiff {
        let mut changed = Vec::new();
        compare(SECTIONS, old, new, None, &mut changed);
        let named = named_pools(old) || named_pools(new);
        let mut pools = ListDiff::default();
        for pool in &new.pools {
            match old.pool(pool.name.as_str()) {
                Some(before) => {
                    let which = named.then(|| pool.name.clone());
                    compare(POOL_SECTIONS, before, pool, which, &mut changed);
                }
                None => pools.added.push(pool.name.to_string()),
            }
        }
        for pool in &old.pools {
            if new.pool(pool.name.as_str()).is_none() {
                pools.removed.push(pool.name.to_string());
            }
        }
        let mut diff = ConfigDiff {
            changed,
            backends: backends(old, new, named),
            pools,
            routes: routes(old, new),
            listeners: listeners(old, new),
        };
        if diff.is_empty() && old != new {
            // A setting missing from SECTIONS: say that something changed
            // rather than claim nothing did.
            diff.changed.push(Changed {
                pool: None,
                key: "settings",
                old: String::new(),
                new: String::new(),
            });
        }
        diff
    }

    pub fn is_empty(&self) -> bool {
        self.changed.is_empty()
            && self.backends.is_empty()
            && self.pools.is_empty()
            && self.routes.is_empty()
            && self.listeners.is_empty()
    }
}

/// Whether a config names its pools (then settings and backends are
/// named with their pool).
fn named_pools(c: &Config) -> bool {
    !(c.pools.len() == 1 && c.pools[0].name.as_str() == PoolName::DEFAULT)
}

/// The settings of `sections` whose value differs between `old` and `new`.
fn compare<T>(
    sections: &[Section<T>],
    old: &T,
    new: &T,
    pool: Option<PoolName>,
    changed: &mut Vec<Changed>,
) {
    for section in sections {
        if let Some(present) = section.present {
            match (present(old), present(new)) {
                (false, false) => continue,
                (true, true) => {}
                (was, is) => {
                    let word = |on: bool| if on { "set" } else { "none" }.to_owned();
                    changed.push(Changed {
                        pool: pool.clone(),
                        key: section.name,
                        old: word(was),
                        new: word(is),
                    });
                    continue;
                }
            }
        }
        for (key, render) in section.settings {
            let (before, after) = (render(old), render(new));
            if before != after {
                changed.push(Changed {
                    pool: pool.clone(),
                    key,
                    old: before,
                    new: after,
                });
            }
        }
    }
}

/// Every pool's members by (pool, address), named `pool/address` when the
/// file names its pools: order alone (round robin's order) counts as a
/// change in place of the list.
fn backends(old: &Config, new: &Config, named: bool) -> ListDiff {
    let weight_in = |c: &Config, pool: &PoolName, addr| {
        c.pool(pool.as_str())?
            .backends
            .iter()
            .find(|b| &b.address == addr)
            .map(|b| b.weight)
    };
    let name = |pool: &PoolName, addr: &super::BackendAddr| {
        if named {
            format!("{pool}/{addr}")
        } else {
            addr.to_string()
        }
    };
    let mut diff = ListDiff::default();
    for (pool, b) in new.all_backends() {
        match weight_in(old, &pool.name, &b.address) {
            None => diff.added.push(name(&pool.name, &b.address)),
            Some(w) if w != b.weight => diff.changed.push(format!(
                "{} weight {w}→{}",
                name(&pool.name, &b.address),
                b.weight
            )),
            Some(_) => {}
        }
    }
    for (pool, b) in old.all_backends() {
        if weight_in(new, &pool.name, &b.address).is_none() {
            diff.removed.push(name(&pool.name, &b.address));
        }
    }
    if diff.is_empty() {
        for pool in &new.pools {
            if old
                .pool(pool.name.as_str())
                .is_some_and(|before| before.backends != pool.backends)
            {
                diff.changed.push(if named {
                    format!("{} order", pool.name)
                } else {
                    "order".to_owned()
                });
            }
        }
    }
    diff
}

/// The routes by host and prefix: a route whose pool or stripping changed
/// is changed in place.
/// Every route with the tcp listener that owns it (`None`: an http route).
fn owned_routes(c: &Config) -> Vec<(Option<&ListenerName>, &RouteConfig)> {
    c.routes
        .iter()
        .map(|r| (None, r))
        .chain(
            c.listeners
                .iter()
                .flat_map(|l| l.routes.iter().map(move |r| (Some(&l.name), r))),
        )
        .collect()
}

fn routes(old: &Config, new: &Config) -> ListDiff {
    let key = |(owner, r): &(Option<&ListenerName>, &RouteConfig)| {
        (
            owner.cloned(),
            r.host.clone(),
            r.path_prefix.clone(),
            r.listeners.clone(),
        )
    };
    let describe = |c: &Config, (owner, r): &(Option<&ListenerName>, &RouteConfig)| {
        let on = match owner {
            Some(l) if c.listeners_named => format!(" (listener {l})"),
            _ => String::new(),
        };
        format!("{r}{on} -> {}", c.pools[r.pool].name)
    };
    let (old_routes, new_routes) = (owned_routes(old), owned_routes(new));
    let mut diff = ListDiff::default();
    for r in &new_routes {
        match old_routes.iter().find(|o| key(o) == key(r)) {
            None => diff.added.push(describe(new, r)),
            Some(o) if describe(old, o) != describe(new, r) => {
                diff.changed
                    .push(format!("{}→{}", describe(old, o), describe(new, r)))
            }
            Some(_) => {}
        }
    }
    for r in &old_routes {
        if !new_routes.iter().any(|n| key(n) == key(r)) {
            diff.removed.push(describe(old, r));
        }
    }
    diff
}

/// The listeners by name, when either file names them (a file with one
/// `listen:` reports `listen`, `mode` and `tls.*` as settings).
fn listeners(old: &Config, new: &Config) -> ListDiff {
    let mut diff = ListDiff::default();
    if !(old.listeners_named || new.listeners_named) {
        return diff;
    }
    for l in &new.listeners {
        let Some(o) = old.listener(l.name.as_str()) else {
            diff.added.push(format!("{} at {}", l.name, l.address));
            continue;
        };
        if o.address != l.address {
            diff.changed
                .push(format!("{} address {}→{}", l.name, o.address, l.address));
        }
        if o.mode != l.mode {
            diff.changed
                .push(format!("{} mode {}→{}", l.name, o.mode, l.mode));
        }
        if o.tls != l.tls {
            diff.changed.push(format!("{} tls", l.name));
        }
        if o.redirect_https != l.redirect_https {
            diff.changed.push(format!(
                "{} redirect_https {}→{}",
                l.name,
                opt(o.redirect_https),
                opt(l.redirect_https)
            ));
        }
    }
    for o in &old.listeners {
        if new.listener(o.name.as_str()).is_none() {
            diff.removed.push(format!("{} at {}", o.name, o.address));
        }
    }
    diff
}

fn sole_tls(c: &Config) -> Option<&super::tls::TlsSettings> {
    c.sole_listener().and_then(|l| l.tls.as_ref())
}

impl fmt::Display for Changed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(pool) = &self.pool {
            write!(f, "pools.{pool}.")?;
        }
        match (self.old.as_str(), self.new.as_str()) {
            ("", "") => f.write_str(self.key),
            ("none", "set") => write!(f, "{} added", self.key),
            ("set", "none") => write!(f, "{} removed", self.key),
            (old, new) => write!(f, "{} {old}→{new}", self.key),
        }
    }
}

/// `changed timeouts.connect 1s→2s, access_log false→true; backends +1 -0
/// (added 127.0.0.1:9004)`, or `no effective change`.
impl fmt::Display for ConfigDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if !self.changed.is_empty() {
            let keys: Vec<String> = self.changed.iter().map(Changed::to_string).collect();
            parts.push(format!("changed {}", keys.join(", ")));
        }
        for (what, list) in [
            ("listeners", &self.listeners),
            ("pools", &self.pools),
            ("routes", &self.routes),
        ] {
            if !list.is_empty() {
                parts.push(list.describe(what));
            }
        }
        if !self.backends.is_empty() {
            parts.push(self.backends.describe("backends"));
        }
        if parts.is_empty() {
            parts.push("no effective change".to_owned());
        }
        f.write_str(&parts.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn config(yaml: &str) -> Config {
        Config::parse(yaml.as_bytes(), Path::new("c.yaml")).expect("valid config")
    }

    const BASE: &str = "\
backends:
  - address: 127.0.0.1:9001
  - address: 127.0.0.1:9002
admin: 127.0.0.1:9901
health_check:
  path: /health
";

    fn diff(old: &str, new: &str) -> String {
        ConfigDiff::between(&config(old), &config(new)).to_string()
    }

    #[test]
    fn names_listeners_added_removed_and_moved() {
        let file = |listeners: &str| {
            format!(
                "listeners:\n{listeners}pools:\n  a: {{backends: [{{address: 127.0.0.1:9001}}]}}\n"
            )
        };
        let old = file(
            "  - {name: web, address: 127.0.0.1:8080}\n  - {name: old, address: 127.0.0.1:8081}\n",
        );
        let new = file("  - {name: web, address: 127.0.0.1:9090}\n  - {name: new, address: 127.0.0.1:8082, redirect_https: 443}\n");
        assert_eq!(
            diff(&old, &new),
            "listeners +1 -1 (added new at 127.0.0.1:8082; removed old at 127.0.0.1:8081; web address 127.0.0.1:8080→127.0.0.1:9090)"
        );
    }

    #[test]
    fn names_each_changed_key_with_old_and_new_value() {
        let new = format!("{BASE}timeouts:\n  connect: 2s\naccess_log: true\n");
        assert_eq!(
            diff(BASE, &new),
            "changed access_log false→true, timeouts.connect 1s→2s"
        );
    }

    #[test]
    fn a_removed_or_added_section_is_named_as_a_whole() {
        let without_admin_and_checks =
            "backends:\n  - address: 127.0.0.1:9001\n  - address: 127.0.0.1:9002\n";
        assert_eq!(
            diff(BASE, without_admin_and_checks),
            "changed admin 127.0.0.1:9901→none, health_check removed"
        );
        assert_eq!(
            diff(without_admin_and_checks, BASE),
            "changed admin none→127.0.0.1:9901, health_check added"
        );
        let other_path = BASE.replace("/health", "/ready");
        assert_eq!(
            diff(BASE, &other_path),
            "changed health_check.path /health→/ready"
        );
    }

    #[test]
    fn a_changed_protocol_is_named() {
        let new = format!("protocol: h2c\n{BASE}");
        assert_eq!(diff(BASE, &new), "changed protocol http1→h2c");
    }

    #[test]
    fn the_pool_is_compared_by_address() {
        let new = "\
backends:
  - address: 127.0.0.1:9001
    weight: 3
  - address: 127.0.0.1:9003
admin: 127.0.0.1:9901
health_check:
  path: /health
";
        assert_eq!(
            diff(BASE, new),
            "backends +1 -1 (added 127.0.0.1:9003; removed 127.0.0.1:9002; 127.0.0.1:9001 weight 1→3)"
        );
        let swapped = BASE
            .replace("9001", "900X")
            .replace("9002", "9001")
            .replace("900X", "9002");
        assert_eq!(diff(BASE, &swapped), "backends +0 -0 (order)");
    }

    #[test]
    fn settings_and_pool_in_one_line_and_nothing_when_equal() {
        let new = BASE.replace(
            "admin:",
            "  - address: 127.0.0.1:9004\nretry:\n  per_try_timeout: 5s\nadmin:",
        );
        assert_eq!(
            diff(BASE, &new),
            "changed retry.per_try_timeout none→5s; backends +1 -0 (added 127.0.0.1:9004)"
        );
        let comment_only = format!("# a comment\n{BASE}");
        assert_eq!(diff(BASE, &comment_only), "no effective change");
        assert!(ConfigDiff::between(&config(BASE), &config(&comment_only)).is_empty());
    }
}

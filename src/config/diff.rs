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

use super::{Config, HashKey};

/// What changed from one config to the next.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ConfigDiff {
    /// Settings whose value differs, in [`SECTIONS`] order.
    pub changed: Vec<Changed>,
    /// The backend pool, by address.
    pub backends: ListDiff,
}

/// One setting (or optional section) whose value differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
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
}

/// A setting: its dotted key and its value, rendered as the file says it.
type Setting = (&'static str, fn(&Config) -> String);

/// A group of settings that is present in every config (`present: None`)
/// or only when configured.
struct Section {
    /// The top-level key; `""` for the scalars at the top of the file.
    name: &'static str,
    present: Option<fn(&Config) -> bool>,
    settings: &'static [Setting],
}

/// Every setting a reload can change, grouped as in the file. Settings of
/// an optional section are only compared when both configs have it.
const SECTIONS: &[Section] = &[
    Section {
        name: "",
        present: None,
        settings: &[
            ("listen", |c| c.listen.to_string()),
            ("mode", |c| c.mode.to_string()),
            ("strategy", |c| c.strategy.to_string()),
            ("admin", |c| opt(c.admin.as_ref())),
            ("access_log", |c| c.access_log.to_string()),
            ("send_proxy_protocol", |c| {
                opt(c
                    .send_proxy_protocol
                    .map(|v| format!("{v:?}").to_lowercase()))
            }),
            ("hash_key", |c| hash_key(&c.steering.hash_key)),
            ("peak_ewma.decay", |c| dur(c.steering.peak_ewma_decay)),
            ("slow_start", |c| opt(c.steering.slow_start.map(dur))),
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
        name: "health_check",
        present: Some(|c| c.health_check.is_some()),
        settings: &[
            ("health_check.path", |c| {
                opt(c.health_check.as_ref().and_then(|h| h.path.as_ref()))
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
        for section in SECTIONS {
            if let Some(present) = section.present {
                match (present(old), present(new)) {
                    (false, false) => continue,
                    (true, true) => {}
                    (was, is) => {
                        let word = |on: bool| if on { "set" } else { "none" }.to_owned();
                        changed.push(Changed {
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
                        key,
                        old: before,
                        new: after,
                    });
                }
            }
        }
        let mut diff = ConfigDiff {
            changed,
            backends: backends(old, new),
        };
        if diff.is_empty() && old != new {
            // A setting missing from SECTIONS: say that something changed
            // rather than claim nothing did.
            diff.changed.push(Changed {
                key: "settings",
                old: String::new(),
                new: String::new(),
            });
        }
        diff
    }

    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.backends.is_empty()
    }
}

/// The pool by address: order alone (round robin's order) counts as a
/// change in place of the list.
fn backends(old: &Config, new: &Config) -> ListDiff {
    let weight_in = |c: &Config, addr| {
        c.backends
            .iter()
            .find(|b| &b.address == addr)
            .map(|b| b.weight)
    };
    let mut diff = ListDiff::default();
    for b in &new.backends {
        match weight_in(old, &b.address) {
            None => diff.added.push(b.address.to_string()),
            Some(w) if w != b.weight => diff
                .changed
                .push(format!("{} weight {w}→{}", b.address, b.weight)),
            Some(_) => {}
        }
    }
    for b in &old.backends {
        if weight_in(new, &b.address).is_none() {
            diff.removed.push(b.address.to_string());
        }
    }
    if diff.is_empty() && old.backends != new.backends {
        diff.changed.push("order".to_owned());
    }
    diff
}

impl fmt::Display for Changed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
        let b = &self.backends;
        if !b.is_empty() {
            let mut detail = Vec::new();
            if !b.added.is_empty() {
                detail.push(format!("added {}", b.added.join(", ")));
            }
            if !b.removed.is_empty() {
                detail.push(format!("removed {}", b.removed.join(", ")));
            }
            if !b.changed.is_empty() {
                detail.push(b.changed.join(", "));
            }
            parts.push(format!(
                "backends +{} -{} ({})",
                b.added.len(),
                b.removed.len(),
                detail.join("; ")
            ));
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

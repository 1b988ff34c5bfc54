//! Traffic-steering keys: `hash_key`, `session_affinity`, `peak_ewma` and
//! `slow_start`, from their raw YAML form to the typed [`Steering`].
//!
//! They live apart from `raw.rs`/`validate.rs` so the rest of the config
//! grows without touching them; those files only hold one field and one call.

use std::time::Duration;

use ::http::header::HeaderName;
use serde::Deserialize;

use super::raw::HumanDuration;
use super::Strategy;

type Invalid = (String, String);

/// `session_affinity:` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping like {cookie: lb_backend}")]
pub struct RawSessionAffinity {
    /// Cookie name; required.
    pub cookie: Option<String>,
    /// Cookie lifetime (`Max-Age`); a session cookie when absent.
    pub ttl: Option<HumanDuration>,
}

/// `peak_ewma:` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping like {decay: 10s}")]
pub struct RawPeakEwma {
    /// Time constant of the latency estimate; 10s when absent.
    pub decay: Option<HumanDuration>,
}

/// The steering keys of `config.yaml`, as written (top-level keys of
/// `RawConfig`, gathered here so `validate()` hands them over in one piece).
#[derive(Debug, Default)]
pub struct RawSteering {
    /// `hash_key:`, parsed here so the error can say what is allowed.
    pub hash_key: Option<String>,
    /// `session_affinity:`.
    pub session_affinity: Option<RawSessionAffinity>,
    /// `peak_ewma:`.
    pub peak_ewma: Option<RawPeakEwma>,
    /// `slow_start:`; 0 turns it off like absence does.
    pub slow_start: Option<HumanDuration>,
}

/// How requests are tied to backends beyond the strategy's own choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Steering {
    /// What `consistent_hash` hashes; `ClientIp` for other strategies (unused).
    pub hash_key: HashKey,
    /// Sticky sessions by cookie, with any strategy; `None` means off.
    pub session_affinity: Option<SessionAffinity>,
    /// Time constant of `peak_ewma`'s latency estimate (also used to keep the
    /// estimate warm under other strategies, so a switch starts informed).
    pub peak_ewma_decay: Duration,
    /// Ramp-up window for a backend that joins or comes back; `None` means off.
    pub slow_start: Option<Duration>,
}

impl Default for Steering {
    fn default() -> Self {
        Steering {
            hash_key: HashKey::ClientIp,
            session_affinity: None,
            peak_ewma_decay: DEFAULT_PEAK_EWMA_DECAY,
            slow_start: None,
        }
    }
}

/// `peak_ewma.decay` when absent: Linkerd's and Finagle's default.
pub const DEFAULT_PEAK_EWMA_DECAY: Duration = Duration::from_secs(10);

/// The part of a request `consistent_hash` hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// The peer address of the client connection.
    ClientIp,
    /// The value of a request header (all values, comma-joined, if repeated).
    Header(HeaderName),
    /// The value of a request cookie.
    Cookie(String),
    /// The raw (undecoded) value of a query parameter.
    Query(String),
    /// The request path, without the query.
    Path,
}

/// `session_affinity`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionAffinity {
    /// Name of the cookie lb sets and reads (and never forwards).
    pub cookie: String,
    /// `Max-Age` of the cookie; `None` makes it a session cookie.
    pub ttl: Option<Duration>,
}

/// RFC 6265 cookie-name (an RFC 7230 token).
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

pub fn validate(raw: RawSteering, strategy: Strategy) -> Result<Steering, Invalid> {
    let only_for = |field: &str, wanted: Strategy| -> Result<(), Invalid> {
        if strategy == wanted {
            Ok(())
        } else {
            Err((
                field.to_owned(),
                format!("applies only to strategy {wanted} (strategy is {strategy})"),
            ))
        }
    };
    let hash_key = match raw.hash_key {
        None => HashKey::ClientIp,
        Some(s) => {
            only_for("hash_key", Strategy::ConsistentHash)?;
            hash_key(&s).map_err(|m| ("hash_key".to_owned(), m))?
        }
    };
    let peak_ewma_decay = match raw.peak_ewma.and_then(|p| p.decay) {
        None => DEFAULT_PEAK_EWMA_DECAY,
        Some(HumanDuration(d)) => {
            only_for("peak_ewma.decay", Strategy::PeakEwma)?;
            if d < Duration::from_millis(10) {
                return Err((
                    "peak_ewma.decay".to_owned(),
                    format!("{d:?} is too short (at least 10ms)"),
                ));
            }
            d
        }
    };
    let session_affinity = match raw.session_affinity {
        None => None,
        Some(a) => {
            let Some(cookie) = a.cookie else {
                return Err((
                    "session_affinity.cookie".to_owned(),
                    "missing: name the cookie lb sets (like lb_backend)".to_owned(),
                ));
            };
            if !is_token(&cookie) {
                return Err((
                    "session_affinity.cookie".to_owned(),
                    format!("{cookie:?} is not a valid cookie name"),
                ));
            }
            let ttl = match a.ttl {
                None => None,
                Some(HumanDuration(d)) if d < Duration::from_secs(1) => {
                    return Err((
                        "session_affinity.ttl".to_owned(),
                        format!("{d:?} is too short (at least 1s; omit it for a session cookie)"),
                    ))
                }
                Some(HumanDuration(d)) => Some(d),
            };
            Some(SessionAffinity { cookie, ttl })
        }
    };
    let slow_start = match raw.slow_start {
        None => None,
        Some(HumanDuration(d)) if d.is_zero() => None,
        Some(HumanDuration(d)) => Some(d),
    };
    Ok(Steering {
        hash_key,
        session_affinity,
        peak_ewma_decay,
        slow_start,
    })
}

fn hash_key(s: &str) -> Result<HashKey, String> {
    let s = s.trim();
    let bad = || {
        format!("{s:?} is not a hash key (client_ip, path, header:NAME, cookie:NAME or query:NAME)")
    };
    match s.split_once(':') {
        None => match s {
            "client_ip" => Ok(HashKey::ClientIp),
            "path" => Ok(HashKey::Path),
            _ => Err(bad()),
        },
        Some((kind, name)) => {
            let name = name.trim();
            if name.is_empty() {
                return Err(bad());
            }
            match kind.trim() {
                "header" => HeaderName::from_bytes(name.as_bytes())
                    .map(HashKey::Header)
                    .map_err(|_| format!("{name:?} is not a valid header name")),
                "cookie" if is_token(name) => Ok(HashKey::Cookie(name.to_owned())),
                "cookie" => Err(format!("{name:?} is not a valid cookie name")),
                "query" => Ok(HashKey::Query(name.to_owned())),
                _ => Err(bad()),
            }
        }
    }
}

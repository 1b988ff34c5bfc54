//! The `session_affinity` cookie's tables, built once per pool change: the
//! token naming each backend, the `Set-Cookie` value pinning a client to
//! it, and the parsing of a `Cookie` value (bytes, the same on either
//! HTTP/1 path). `http::affinity` applies them to requests and responses.

use std::borrow::Cow;
use std::collections::HashMap;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::config::{BackendAddr, SessionAffinity};
use crate::core::selection::Backend;

/// Per-snapshot cookie tables for `session_affinity`.
#[derive(Debug)]
pub struct AffinityCookies {
    /// The cookie's name.
    name: String,
    /// Ready-made `Set-Cookie` value for each backend, by index.
    set_cookie: Vec<Bytes>,
    /// Token → backend index, for the request side.
    by_token: HashMap<String, usize>,
}

/// The cookie value that names `addr`: a function of the address alone.
pub fn token(addr: &BackendAddr) -> String {
    let digest = Sha256::digest(format!("lb session affinity\0{addr}").as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

impl AffinityCookies {
    pub fn build(cfg: &SessionAffinity, backends: &[Backend]) -> Self {
        let max_age = cfg
            .ttl
            .map(|t| format!("; Max-Age={}", t.as_secs()))
            .unwrap_or_default();
        let tokens: Vec<String> = backends.iter().map(|b| token(&b.addr)).collect();
        let set_cookie = tokens
            .iter()
            .map(|t| {
                let v = format!("{}={t}; Path=/; HttpOnly{max_age}", cfg.cookie);
                // Name is a validated token, value is hex, the rest is
                // ASCII: a valid header value, for either HTTP/1 path.
                Bytes::from(v)
            })
            .collect();
        let by_token = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, i))
            .collect();
        AffinityCookies {
            name: cfg.cookie.clone(),
            set_cookie,
            by_token,
        }
    }

    /// Whether one `Cookie` value carries lb's cookie.
    pub fn carries(&self, value: &[u8]) -> bool {
        visible_ascii(value).is_some_and(|v| v.split(';').any(|pair| self.is_ours(pair)))
    }

    fn is_ours(&self, pair: &str) -> bool {
        pair.split_once('=')
            .is_some_and(|(n, _)| n.trim() == self.name)
    }

    /// One `Cookie` value without lb's cookie, for a request where some
    /// value [`carries`](Self::carries) it (every value then goes through
    /// here, as both HTTP/1 paths must forward the same bytes): the other
    /// pairs trimmed and joined by `"; "`, the value as is when it is not
    /// text, `None` when nothing is left. The first of lb's tokens sets
    /// `pinned` to the backend it names, if one of this pool.
    pub fn strip<'v>(&self, value: &'v [u8], pinned: &mut Option<usize>) -> Option<Cow<'v, [u8]>> {
        let Some(text) = visible_ascii(value) else {
            return Some(Cow::Borrowed(value));
        };
        let mut others = Vec::new();
        for pair in text.split(';') {
            if self.is_ours(pair) {
                if pinned.is_none() {
                    let token = pair.split_once('=').map_or("", |(_, v)| v.trim());
                    *pinned = self.by_token.get(token.trim_matches('"')).copied();
                }
            } else if !pair.trim().is_empty() {
                others.push(pair.trim());
            }
        }
        (!others.is_empty()).then(|| Cow::Owned(others.join("; ").into_bytes()))
    }

    /// The `Set-Cookie` value that pins a client to backend `index`.
    pub fn set_cookie(&self, index: usize) -> Option<&Bytes> {
        self.set_cookie.get(index)
    }
}

/// A header value as text when it is visible ASCII (and tabs), the test
/// `HeaderValue::to_str` makes: a cookie is read the same from either path.
pub fn visible_ascii(value: &[u8]) -> Option<&str> {
    value
        .iter()
        .all(|&b| b == b'\t' || (32..127).contains(&b))
        .then(|| std::str::from_utf8(value).ok())
        .flatten()
}

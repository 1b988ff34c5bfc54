//! What ties a request to a backend beyond the strategy's own choice: the
//! `hash_key` of `consistent_hash` and the `session_affinity` cookie.
//!
//! # The cookie
//! * Its value is a token derived only from the backend's address (the first
//!   8 bytes of SHA-256 of it, in hex), so every replica reading the same
//!   config issues and understands the same tokens, a reweight or reorder
//!   keeps sessions, and the address itself is not revealed.
//! * A request carrying a known token goes to that backend while it is
//!   eligible (healthy, not ejected, not already tried by this request;
//!   weight 0 included, as draining keeps existing sessions). Otherwise the
//!   strategy picks, and the response sets the cookie for the backend that
//!   answered. A response from the pinned backend sets nothing, so the
//!   cookie's `Max-Age` counts from when it was issued.
//! * lb's cookie is removed from the `Cookie` header before forwarding;
//!   the other cookies are passed on unchanged.

use std::borrow::Cow;
use std::net::IpAddr;

use hyper::header::{HeaderMap, HeaderValue, COOKIE, SET_COOKIE};
use hyper::http::request::Parts;
use hyper::Response;

use crate::config::{HashKey, Strategy};
pub use crate::core::affinity::{token, visible_ascii, AffinityCookies};
use crate::core::runtime::Pool;
use crate::core::selection::hash;
use crate::core::selection::Steer;
use crate::http::proxy::HeadView;

/// The backend (index into the snapshot's pool) that produced a response;
/// set by the retry loop on every backend response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServedBy(pub usize);

/// Removes lb's cookie from `headers` and returns the backend it names,
/// if it names one of this pool.
pub fn take(cookies: &AffinityCookies, headers: &mut HeaderMap) -> Option<usize> {
    if !headers
        .get_all(COOKIE)
        .iter()
        .any(|v| cookies.carries(v.as_bytes()))
    {
        return None;
    }
    let mut pinned = None;
    let kept: Vec<HeaderValue> = headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| match cookies.strip(v.as_bytes(), &mut pinned)? {
            Cow::Borrowed(_) => Some(v.clone()),
            // Pieces of a valid header value joined by "; ": still valid.
            Cow::Owned(rest) => HeaderValue::from_bytes(&rest).ok(),
        })
        .collect();
    headers.remove(COOKIE);
    for v in kept {
        headers.append(COOKIE, v);
    }
    pinned
}

/// Request side: the hash key (for `consistent_hash`) and the backend the
/// affinity cookie names, which is taken out of the headers. Call before
/// the head is rewritten, so a `header:` key sees what the client sent.
pub fn steer(pool: &Pool, parts: &mut Parts, client_ip: IpAddr) -> Steer {
    let key = match pool.config.strategy {
        Strategy::ConsistentHash => request_key(&pool.config.steering.hash_key, parts, client_ip),
        _ => None,
    };
    let pinned = pool
        .affinity
        .as_ref()
        .and_then(|c| take(c, &mut parts.headers));
    Steer { key, pinned }
}

/// Response side: (re-)issues the cookie when the backend that answered is
/// not the one the request's cookie named.
pub fn on_response<B>(pool: &Pool, steer: &Steer, resp: &mut Response<B>) {
    let Some(cookies) = &pool.affinity else {
        return;
    };
    let Some(&ServedBy(i)) = resp.extensions().get::<ServedBy>() else {
        return;
    };
    if steer.pinned != Some(i) {
        if let Some(v) = cookies.set_cookie(i) {
            if let Ok(v) = HeaderValue::from_maybe_shared(v.clone()) {
                resp.headers_mut().append(SET_COOKIE, v);
            }
        }
    }
}

/// Stable hash of the request's `hash_key`, or `None` when it has none
/// (then the strategy falls back to round robin). Either HTTP/1 path's head.
pub(crate) fn request_key(key: &HashKey, head: &impl HeadView, client_ip: IpAddr) -> Option<u64> {
    let h = |bytes: &[u8]| (!bytes.is_empty()).then(|| hash::stable(bytes, 0));
    match key {
        HashKey::ClientIp => Some(hash::client_ip(client_ip)),
        HashKey::Path => h(head.uri().path().as_bytes()),
        HashKey::Header(name) => {
            let mut values = head.values(name.as_str());
            let first = values.next()?;
            match values.next() {
                None => h(first),
                Some(second) => {
                    let mut all = first.to_vec();
                    for v in std::iter::once(second).chain(values) {
                        all.extend_from_slice(b", ");
                        all.extend_from_slice(v);
                    }
                    h(&all)
                }
            }
        }
        HashKey::Cookie(name) => head
            .values("cookie")
            .filter_map(visible_ascii)
            .flat_map(|v| v.split(';'))
            .find_map(|pair| {
                let (n, v) = pair.split_once('=')?;
                (n.trim() == name).then(|| v.trim())
            })
            .and_then(|v| h(v.as_bytes())),
        HashKey::Query(name) => head
            .uri()
            .query()?
            .split('&')
            .find_map(|pair| {
                let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
                (n == name).then_some(v)
            })
            .and_then(|v| h(v.as_bytes())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendAddr, SessionAffinity};
    use crate::core::selection::testing::pool;
    use hyper::Request;

    fn cookies() -> AffinityCookies {
        AffinityCookies::build(
            &SessionAffinity {
                cookie: "lb".to_owned(),
                ttl: Some(std::time::Duration::from_secs(3600)),
            },
            &pool(&[1, 1]),
        )
    }

    #[test]
    fn token_depends_on_the_address_only() {
        let a = BackendAddr::from_static("10.0.0.1:80");
        assert_eq!(token(&a), token(&BackendAddr::from_static("10.0.0.1:80")));
        assert_ne!(token(&a), token(&BackendAddr::from_static("10.0.0.2:80")));
        assert_eq!(token(&a).len(), 16);
    }

    #[test]
    fn takes_our_cookie_and_keeps_the_others() {
        let c = cookies();
        let t1 = token(&BackendAddr::from_static("b1:1"));
        let mut h = HeaderMap::new();
        h.append(
            COOKIE,
            HeaderValue::from_str(&format!("a=1; lb={t1}; b=2")).unwrap(),
        );
        h.append(COOKIE, HeaderValue::from_static("c=3"));
        assert_eq!(take(&c, &mut h), Some(1));
        let left: Vec<_> = h
            .get_all(COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(left, ["a=1; b=2", "c=3"]);
        // Only ours: the header goes.
        let mut h = HeaderMap::new();
        h.insert(COOKIE, HeaderValue::from_static("lb=unknown"));
        assert_eq!(take(&c, &mut h), None);
        assert!(h.get(COOKIE).is_none());
        // Not ours: untouched, even a cookie whose name ends like ours.
        let mut h = HeaderMap::new();
        h.insert(COOKIE, HeaderValue::from_static("xlb=1;  y=2"));
        assert_eq!(take(&c, &mut h), None);
        assert_eq!(h.get(COOKIE).unwrap(), "xlb=1;  y=2");
    }

    #[test]
    fn set_cookie_carries_path_httponly_and_max_age() {
        let c = cookies();
        let t0 = token(&BackendAddr::from_static("b0:1"));
        assert_eq!(
            c.set_cookie(0).unwrap(),
            format!("lb={t0}; Path=/; HttpOnly; Max-Age=3600").as_str()
        );
    }

    #[test]
    fn request_keys() {
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let parts = |uri: &str, headers: &[(&str, &str)]| {
            let mut r = Request::get(uri);
            for (k, v) in headers {
                r = r.header(*k, *v);
            }
            r.body(()).unwrap().into_parts().0
        };
        let p = parts("/a/b?user=7&x", &[("x-user", "42"), ("cookie", "s=9; t=1")]);
        let key = |k: HashKey| request_key(&k, &p, ip);
        assert_eq!(key(HashKey::Path), Some(hash::stable(b"/a/b", 0)));
        assert_eq!(
            key(HashKey::Query("user".into())),
            Some(hash::stable(b"7", 0))
        );
        assert_eq!(key(HashKey::Query("x".into())), None);
        assert_eq!(key(HashKey::Query("nope".into())), None);
        assert_eq!(
            key(HashKey::Header("x-user".parse().unwrap())),
            Some(hash::stable(b"42", 0))
        );
        assert_eq!(key(HashKey::Header("x-none".parse().unwrap())), None);
        assert_eq!(
            key(HashKey::Cookie("t".into())),
            Some(hash::stable(b"1", 0))
        );
        assert_eq!(key(HashKey::Cookie("u".into())), None);
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(
            key(HashKey::ClientIp),
            request_key(&HashKey::ClientIp, &p, mapped)
        );
    }
}

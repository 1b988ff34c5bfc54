//! The HTTP request handler: turns a client request into an upstream one
//! (forwarding headers, hop-by-hop stripping, HTTP/2 → HTTP/1.1), hands it to
//! the retry loop, and cleans the response on the way back.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};

use crate::affinity;
use crate::body::{RequestBody, ResponseBody};
use crate::retry::{self, is_idempotent};
use crate::runtime::Runtime;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1),
/// plus the non-standard `proxy-connection`.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Serves one client request.
pub async fn handle(
    rt: Arc<Runtime>,
    client_ip: IpAddr,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let snap = rt.snapshot();
    let (mut parts, body) = req.into_parts();
    let steer = affinity::steer(&snap, &mut parts, client_ip);
    if let Err(message) = rewrite_head(&mut parts, client_ip) {
        return Ok(retry::text(
            StatusCode::BAD_REQUEST,
            format!("lb: {message}\n"),
        ));
    }
    let policy = &snap.config.retry;
    let replay = policy.attempts.get() > 1 && is_idempotent(&parts.method);
    let body = match RequestBody::prepare(body, policy.buffer_body_limit, replay).await {
        Ok(body) => body,
        Err(e) => {
            tracing::debug!(%e, "bad request body");
            return Ok(retry::text(StatusCode::BAD_REQUEST, format!("lb: {e}\n")));
        }
    };
    let mut resp = retry::forward(&rt, &snap, &steer, parts, body).await;
    affinity::on_response(&snap, &steer, &mut resp);
    Ok(resp)
}

/// Prepares the client's head for the backend: keeps `Host` (taken from the
/// URI for HTTP/2), strips hop-by-hop headers, adds `X-Forwarded-*`.
fn rewrite_head(
    parts: &mut hyper::http::request::Parts,
    client_ip: IpAddr,
) -> Result<(), &'static str> {
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers);
    if !headers.contains_key(header::HOST) {
        if let Some(authority) = parts.uri.authority() {
            let value =
                HeaderValue::from_str(authority.as_str()).map_err(|_| "invalid :authority")?;
            headers.insert(header::HOST, value);
        }
    }
    if let Some(host) = headers.get(header::HOST).cloned() {
        headers.insert(X_FORWARDED_HOST.clone(), host);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    let xff = match headers.get(&X_FORWARDED_FOR).map(HeaderValue::to_str) {
        Some(Ok(prior)) if !prior.trim().is_empty() => format!("{prior}, {client_ip}"),
        Some(Err(_)) => return Err("invalid X-Forwarded-For header"),
        _ => client_ip.to_string(),
    };
    // Built from a valid header value and an IP address: always valid.
    let xff = HeaderValue::from_str(&xff).map_err(|_| "invalid X-Forwarded-For header")?;
    headers.insert(X_FORWARDED_FOR.clone(), xff);
    Ok(())
}

/// Removes hop-by-hop headers and every header the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }
}

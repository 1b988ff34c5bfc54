//! The HTTP request handler: turns a client request into an upstream one
//! (forwarding headers, hop-by-hop stripping, HTTP/2 → HTTP/1.1, or either
//! to HTTP/2 for an h2c pool), hands it to the retry loop, and cleans the
//! response on the way back.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::http::uri::{Authority, Scheme, Uri};
use hyper::{Method, Request, Response, StatusCode, Version};

use crate::config::Protocol;
use crate::core::runtime::{Runtime, Snapshot};
use crate::http::affinity;
use crate::http::body::{RequestBody, ResponseBody};
use crate::http::grpc;
use crate::http::retry::{self, is_idempotent, Trace};
use crate::http::upgrade;
use crate::obs::access_log::Entry;

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

/// Headers `Connection` may not remove: they define the message itself.
static PROTECTED: [HeaderName; 3] = [header::HOST, header::CONTENT_LENGTH, header::CONTENT_TYPE];

/// Serves one client request, then counts it and logs it.
pub async fn handle(
    rt: Arc<Runtime>,
    client_ip: IpAddr,
    listener: Arc<str>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let snap = rt.snapshot();
    let arrival = Arrival::new(
        tokio::time::Instant::now(),
        &snap,
        req.method(),
        req.uri().path(),
    );
    let mut trace = Trace::default();
    let grpc = grpc::is_grpc(req.headers());
    let mut resp = respond(&rt, &snap, client_ip, &listener, req, &mut trace).await;
    // lb's own answer (no backend relayed it) to a gRPC call: in gRPC's terms.
    if grpc && trace.relayed.is_none() {
        resp = grpc::own_answer(resp);
        let counts = trace
            .pool
            .and_then(|p| snap.pools.get(p))
            .map_or(&rt.metrics.grpc_unrouted, |p| &p.shared.grpc);
        counts.count(resp.headers().get("grpc-status").map(|v| v.as_bytes()));
    }
    arrival.done(&rt, &snap, client_ip, resp.status().as_u16(), &trace);
    Ok(resp)
}

/// A request as it arrived, for counting and logging it once answered (by
/// either HTTP/1 path).
pub(crate) struct Arrival {
    /// When its head was in.
    at: tokio::time::Instant,
    /// Only what the access log needs, copied only when it is on.
    logged: Option<(std::time::SystemTime, Method, String)>,
}

impl Arrival {
    pub(crate) fn new(
        at: tokio::time::Instant,
        snap: &Snapshot,
        method: &Method,
        path: &str,
    ) -> Self {
        Arrival {
            at,
            logged: snap.config.access_log.then(|| {
                (
                    std::time::SystemTime::now(),
                    method.clone(),
                    path.to_owned(),
                )
            }),
        }
    }

    /// The response head is ready: counts the request and logs it.
    pub(crate) fn done(
        self,
        rt: &Runtime,
        snap: &Snapshot,
        client_ip: IpAddr,
        status: u16,
        trace: &Trace,
    ) {
        // The retry loop's last reading, when it has one.
        let took = trace
            .ended
            .map_or_else(|| self.at.elapsed(), |ended| ended - self.at);
        let pool = trace.pool.and_then(|p| snap.pools.get(p));
        let backend = pool.and_then(|pool| trace.relayed.and_then(|i| pool.backends.get(i)));
        rt.metrics.request(
            backend.map(|b| &b.state.metrics),
            pool.map(|p| &p.shared.own_answers),
            status,
            took,
        );
        if let Some((time, method, path)) = self.logged {
            rt.access_log.log(Entry {
                time,
                client: client_ip,
                method,
                path,
                status,
                backend: backend.map(|b| b.addr.clone()),
                pool: pool.map(|p| p.name().clone()),
                attempts: trace.attempts,
                upstream: trace.upstream,
                duration: took,
            });
        }
    }
}

async fn respond(
    rt: &Arc<Runtime>,
    snap: &Snapshot,
    client_ip: IpAddr,
    listener: &str,
    req: Request<Incoming>,
    trace: &mut Trace,
) -> Response<ResponseBody> {
    let (mut parts, body) = req.into_parts();
    let upgrade = upgrade::requested(&parts)
        .then(|| parts.headers.get(header::UPGRADE).cloned())
        .flatten();
    // `TE` is hop-by-hop, but `trailers` in it is the message's: gRPC
    // servers want it, and an HTTP/2 backend is told so.
    let te_trailers = accepts_trailers(&parts.headers);
    if let Err(refusal) = check_request(&parts) {
        tracing::debug!(%client_ip, method = %parts.method, status = %refusal.status, "refused: {}", refusal.reason);
        return refusal.response();
    }
    let uri = parts.uri.clone();
    let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
    if let Some(port) = snap.listener(listener).and_then(|l| l.redirect_https) {
        return redirect_https(route_host(&parts), port, path_and_query);
    }
    let Some(routed) = snap.route(listener, route_host(&parts), path_and_query) else {
        return no_route(client_ip, &parts.method, path_and_query).response();
    };
    let pool = routed.pool;
    trace.pool = Some(routed.index);
    // `auto` too: ALPN may choose HTTP/2, which has no Upgrade (RFC 8441's
    // extended CONNECT is not implemented).
    let http2 = pool.config.protocol.may_be_http2();
    if http2 && upgrade.is_some() {
        let reason = match pool.config.protocol {
            Protocol::H2 => "protocol upgrades (WebSocket) are not supported to an h2 pool",
            Protocol::Auto => "protocol upgrades (WebSocket) are not supported to an auto pool (ALPN may choose HTTP/2)",
            _ => "protocol upgrades (WebSocket) are not supported to an h2c pool",
        };
        let refusal = Refusal::new(StatusCode::NOT_IMPLEMENTED, reason);
        tracing::debug!(%client_ip, method = %parts.method, pool = %pool.name(), "refused: {}", refusal.reason);
        return refusal.response();
    }
    if let Some(path) = routed.rewritten {
        match rewrite_path(&uri, &path) {
            Some(uri) => parts.uri = uri,
            None => return Refusal::new(StatusCode::BAD_REQUEST, "400 Bad Request").response(),
        }
    }
    let steer = affinity::steer(pool, &mut parts, client_ip);
    if let Err(refusal) = rewrite_head(&mut parts, client_ip) {
        tracing::debug!(%client_ip, method = %parts.method, status = %refusal.status, "refused: {}", refusal.reason);
        return refusal.response();
    }
    if let Some(value) = upgrade {
        upgrade::restore_headers(&mut parts.headers, value);
    }
    if http2 && te_trailers {
        parts
            .headers
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    let policy = &pool.config.retry;
    // An HTTP/2 backend may refuse a stream unprocessed (REFUSED_STREAM),
    // which is retried whatever the method: a small body is kept for that.
    let replay = policy.attempts.get() > 1 && (http2 || is_idempotent(&parts.method));
    let stall = snap.config.timeouts.client_body;
    let mut body = match RequestBody::prepare(body, policy.buffer_body_limit, replay, stall).await {
        Ok(body) => body,
        Err(e) => {
            tracing::debug!(%client_ip, %e, "bad request body");
            return retry::client_fault(e.fault);
        }
    };
    if http2 && policy.attempts.get() > 1 {
        // A streamed body (a gRPC call's) is kept as it goes, up to the
        // same limit, for a stream the backend refuses unprocessed.
        body.keep_for_refusals(policy.buffer_body_limit);
    }
    let call = retry::Call {
        snap,
        pool,
        steer: &steer,
        deadline: grpc::timeout(&parts.headers),
    };
    let mut resp = retry::forward(rt, call, parts, body, trace).await;
    affinity::on_response(pool, &steer, &mut resp);
    resp
}

/// The host a request is routed by: the authority of an absolute-form or
/// HTTP/2 target, else the `Host` header (either HTTP/1 path's head).
pub(crate) fn route_host(head: &impl HeadView) -> Option<&str> {
    match head.uri().authority() {
        Some(authority) => Some(authority.as_str()),
        None => head
            .values("host")
            .next()
            .and_then(|v| std::str::from_utf8(v).ok()),
    }
}

/// A plain-HTTP listener's answer to every request: `308 Permanent
/// Redirect` to the same host and target over HTTPS on `port` (308, not
/// 301: the method and body are kept, as Traefik's and Caddy's redirects
/// do). A request without a host cannot be sent anywhere: 400.
fn redirect_https(host: Option<&str>, port: u16, path_and_query: &str) -> Response<ResponseBody> {
    let Some(host) = host.map(strip_port).filter(|h| !h.is_empty()) else {
        return Refusal::new(
            StatusCode::BAD_REQUEST,
            "400 Bad Request (no Host to redirect to)",
        )
        .response();
    };
    let location = if port == 443 {
        format!("https://{host}{path_and_query}")
    } else {
        format!("https://{host}:{port}{path_and_query}")
    };
    let Ok(location) = HeaderValue::try_from(location) else {
        return Refusal::new(StatusCode::BAD_REQUEST, "400 Bad Request").response();
    };
    let mut resp = retry::text(
        StatusCode::PERMANENT_REDIRECT,
        "lb: 308 Permanent Redirect to HTTPS\n".to_owned(),
    );
    resp.headers_mut().insert(header::LOCATION, location);
    resp
}

/// `host` without its `:port` (an IPv6 literal keeps its brackets).
fn strip_port(host: &str) -> &str {
    if let Some(end) = host.strip_prefix('[').and_then(|h| h.find(']')) {
        return &host[..end + 2];
    }
    host.split(':').next().unwrap_or(host)
}

/// The 404 of a request no route matches: nothing was sent to any backend.
pub(crate) fn no_route(client_ip: IpAddr, method: &Method, path: &str) -> Refusal {
    tracing::debug!(%client_ip, %method, path, "no route matches: 404");
    Refusal::not_found()
}

/// `uri` with its path and query replaced by `path_and_query` (a route
/// that strips its prefix); `None` if the result is not a valid target.
fn rewrite_path(uri: &Uri, path_and_query: &str) -> Option<Uri> {
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().ok()?);
    Uri::from_parts(parts).ok()
}

/// A request lb answers itself, with why.
#[derive(Debug)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: &'static str,
}

impl Refusal {
    pub(crate) fn new(status: StatusCode, reason: &'static str) -> Self {
        Refusal { status, reason }
    }

    /// No route matches the request. The connection stays usable: the
    /// request was well formed.
    pub(crate) fn not_found() -> Self {
        Refusal::new(StatusCode::NOT_FOUND, "404 Not Found")
    }

    pub fn response(&self) -> Response<ResponseBody> {
        let mut resp = retry::text(self.status, format!("lb: {}\n", self.reason));
        if self.status == StatusCode::METHOD_NOT_ALLOWED {
            resp.headers_mut().insert(
                header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"),
            );
        }
        // After a refused head the rest of the connection cannot be trusted;
        // a 404 refuses nothing of the message.
        if self.status != StatusCode::NOT_FOUND {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// A request head as either HTTP/1 path holds it: hyper's [`Parts`] or the
/// fast path's raw head. The checks below read heads only through this.
pub(crate) trait HeadView {
    fn method(&self) -> &Method;
    fn uri(&self) -> &Uri;
    fn version(&self) -> Version;
    /// Every value of header `name` (given in lower case), in order.
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a;
}

impl HeadView for Parts {
    fn method(&self) -> &Method {
        &self.method
    }

    fn uri(&self) -> &Uri {
        &self.uri
    }

    fn version(&self) -> Version {
        self.version
    }

    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers.get_all(name).iter().map(HeaderValue::as_bytes)
    }
}

/// The checks RFC 9110/9112 ask of a proxy before anything is forwarded
/// (hyper has already refused broken framing: CL+TE, bad Content-Length,
/// obs-fold, bare CR; the fast path hands those to hyper).
pub(crate) fn check_request(head: &impl HeadView) -> Result<(), Refusal> {
    let bad = |reason| Err(Refusal::new(StatusCode::BAD_REQUEST, reason));
    // CONNECT would make lb an open tunnel; TRACE reflects credentials (XST).
    if *head.method() == Method::CONNECT || *head.method() == Method::TRACE {
        return Err(Refusal::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed",
        ));
    }
    // A coding lb would silently drop on the way to the backend (RFC 9112 §6.1).
    let mut codings = head.values("transfer-encoding");
    if let Some(first) = codings.next() {
        let only_chunked = codings.next().is_none()
            && std::str::from_utf8(first).is_ok_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
        if !only_chunked {
            return Err(Refusal::new(
                StatusCode::NOT_IMPLEMENTED,
                "transfer coding not implemented (only chunked)",
            ));
        }
    }
    // The target must be origin-form (`/path`), absolute-form or `*`.
    let uri = head.uri();
    if uri.scheme().is_none()
        && (uri.authority().is_some() || !(uri.path().starts_with('/') || uri.path() == "*"))
    {
        return bad("invalid request target");
    }
    // `*` names the server itself: only OPTIONS asks it anything (RFC 9112
    // §3.2.4; HTTP/2's `:path: *` too, RFC 9113 §8.3.1).
    if uri.path() == "*" && *head.method() != Method::OPTIONS {
        return bad("asterisk-form target with a method other than OPTIONS");
    }
    // An absolute-form target's authority, or HTTP/2's `:authority`, becomes
    // `Host`: held to the same rule (RFC 9110 §4.2.4: user info is an error).
    let authority = uri.authority();
    if authority.is_some_and(|a| !valid_host(a.as_str().as_bytes())) {
        return bad("invalid authority in the request target");
    }
    let mut hosts = head.values("host");
    let host = match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return bad("more than one Host header"),
        (Some(host), None) => {
            if !valid_host(host) {
                return bad("invalid Host header");
            }
            host
        }
        (None, _) if head.version() == Version::HTTP_11 => {
            return bad("HTTP/1.1 request without a Host header")
        }
        (None, _) => return Ok(()),
    };
    // HTTP/2: a `host` naming another server than `:authority` makes the
    // request malformed (RFC 9113 §8.3.1). (HTTP/1's absolute-form target
    // replaces `Host` instead: RFC 9112 §3.2.2.)
    if let Some(authority) = authority.filter(|_| head.version() == Version::HTTP_2) {
        let default_port = if uri.scheme() == Some(&Scheme::HTTPS) {
            443
        } else {
            80
        };
        if !same_server(authority, host, default_port) {
            return bad(":authority and Host name different servers");
        }
    }
    Ok(())
}

/// Whether `host` (a valid `Host` value) names the server `authority` does:
/// the same host in any case, the same port once defaults are filled in.
fn same_server(authority: &Authority, host: &[u8], default_port: u16) -> bool {
    if authority.as_str().as_bytes().eq_ignore_ascii_case(host) {
        return true;
    }
    let Some(host) = std::str::from_utf8(host)
        .ok()
        .and_then(|h| h.parse::<Authority>().ok())
    else {
        return false;
    };
    let port = |a: &Authority| a.port_u16().unwrap_or(default_port);
    authority.host().eq_ignore_ascii_case(host.host()) && port(authority) == port(&host)
}

/// `host[:port]` as RFC 9110 §7.2 allows: no user info, path or spaces.
fn valid_host(value: &[u8]) -> bool {
    // The common shape (a name or IPv4 address, an optional port) is
    // accepted without parsing an `Authority`, which allocates: letters,
    // digits, `.` and `-` before at most one `:` are all characters
    // `Authority` takes, so this answers yes only where it would.
    if let Some(name_len) = plain_host_len(value) {
        return name_len > 0;
    }
    valid_authority(value)
}

/// [`valid_host`] by parsing an `Authority`: any shape.
fn valid_authority(value: &[u8]) -> bool {
    let Ok(s) = std::str::from_utf8(value) else {
        return false;
    };
    !s.is_empty()
        && s.bytes().all(|b| b.is_ascii_graphic())
        && !s.contains('@')
        && s.parse::<Authority>()
            .is_ok_and(|a| a.as_str().len() == s.len() && !a.host().is_empty())
}

/// For `name[:port]` made of letters, digits, `.` and `-` only (one `:`
/// at most, the port digits only), the length of `name`; `None` for any
/// other shape.
fn plain_host_len(value: &[u8]) -> Option<usize> {
    let name_len = value.iter().position(|&b| b == b':').unwrap_or(value.len());
    let (name, port) = value.split_at(name_len);
    let name_ok = name
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    let port_ok = port.is_empty() || port[1..].iter().all(u8::is_ascii_digit);
    (name_ok && port_ok).then_some(name_len)
}

/// The `X-Forwarded-For` lb sends: the client's `prior` value (its first
/// one) with `client_ip` appended.
pub(crate) fn forwarded_for(
    prior: Option<&[u8]>,
    client_ip: IpAddr,
) -> Result<HeaderValue, Refusal> {
    let invalid_xff = || Refusal::new(StatusCode::BAD_REQUEST, "invalid X-Forwarded-For header");
    let xff = match prior.map(|p| {
        HeaderValue::from_bytes(p)
            .map_err(|_| ())
            .and_then(|v| v.to_str().map(str::to_owned).map_err(|_| ()))
    }) {
        Some(Ok(prior)) if !prior.trim().is_empty() => format!("{prior}, {client_ip}"),
        Some(Err(())) => return Err(invalid_xff()),
        _ => client_ip.to_string(),
    };
    HeaderValue::from_str(&xff).map_err(|_| invalid_xff())
}

/// The `X-Forwarded-For` lb sends when the client sent one (`None` when it
/// did not: then the client IP alone), by one rule for every path: the
/// client's first value with `client_ip` appended, unless the client's
/// `Connection` names `X-Forwarded-For` among the headers it `named`: a
/// hop-by-hop header is dropped, value and all, and lb's entry is the whole
/// header.
pub(crate) fn client_forwarded_for(
    head: &impl HeadView,
    named: &[HeaderName],
    client_ip: IpAddr,
) -> Result<Option<HeaderValue>, Refusal> {
    if named.contains(&X_FORWARDED_FOR) {
        return Ok(None);
    }
    head.values(X_FORWARDED_FOR.as_str())
        .next()
        .map(|prior| forwarded_for(Some(prior), client_ip))
        .transpose()
}

/// Prepares the client's head for the backend: `Host` from an absolute-form
/// target or HTTP/2's `:authority`, hop-by-hop headers stripped,
/// `X-Forwarded-*` added.
fn rewrite_head(parts: &mut Parts, client_ip: IpAddr) -> Result<(), Refusal> {
    let named = connection_named(parts.values(header::CONNECTION.as_str()));
    let xff = match client_forwarded_for(&*parts, &named, client_ip)? {
        Some(xff) => xff,
        None => forwarded_for(None, client_ip)?,
    };
    let headers = &mut parts.headers;
    strip_named_and_hop_by_hop(headers, &named);
    // RFC 9112 §3.2.2: an absolute-form target's authority replaces Host.
    if let Some(authority) = parts.uri.authority() {
        if parts.version != Version::HTTP_2 || !headers.contains_key(header::HOST) {
            let value = HeaderValue::from_str(authority.as_str())
                .map_err(|_| Refusal::new(StatusCode::BAD_REQUEST, "invalid authority"))?;
            headers.insert(header::HOST, value);
        }
    }
    if let Some(host) = headers.get(header::HOST).cloned() {
        headers.insert(X_FORWARDED_HOST.clone(), host);
    }
    let proto = if parts.extensions.get::<OverTls>().is_some() {
        "https"
    } else {
        "http"
    };
    parts
        .headers
        .insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    let headers = &mut parts.headers;
    headers.insert(X_FORWARDED_FOR.clone(), xff);
    Ok(())
}

/// Whether a `TE` header lists `trailers`.
fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            coding
                .split(';')
                .next()
                .is_some_and(|c| c.trim().eq_ignore_ascii_case("trailers"))
        })
}

/// Marks a request that came over a TLS connection lb terminated
/// (`X-Forwarded-Proto: https`).
#[derive(Debug, Clone, Copy)]
pub struct OverTls;

/// Whether `name` (lower case) describes the connection, not the message.
/// The names of [`HOP_BY_HOP`], matched as strings: this runs for every
/// header of every message on the fast path.
pub(crate) fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// The headers `Connection` values name (lower case), except those that
/// define the message itself: `Connection: host` must not unmake it.
pub(crate) fn connection_named<'a>(values: impl Iterator<Item = &'a [u8]>) -> Vec<HeaderName> {
    values
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| !PROTECTED.contains(name))
        .collect()
}

/// Removes hop-by-hop headers and every header the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named = connection_named(
        headers
            .get_all(header::CONNECTION)
            .iter()
            .map(HeaderValue::as_bytes),
    );
    strip_named_and_hop_by_hop(headers, &named);
}

/// Removes hop-by-hop headers and `named` (what `Connection` names).
fn strip_named_and_hop_by_hop(headers: &mut HeaderMap, named: &[HeaderName]) {
    for name in named {
        headers.remove(name);
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

    #[test]
    fn hop_by_hop_names_are_the_hop_by_hop_headers() {
        for h in &HOP_BY_HOP {
            assert!(is_hop_by_hop(h.as_str()), "{h}");
        }
        let matched = [
            "connection",
            "keep-alive",
            "proxy-connection",
            "proxy-authenticate",
            "proxy-authorization",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
        ];
        assert_eq!(matched.len(), HOP_BY_HOP.len());
        for name in [
            "host",
            "content-length",
            "x-te",
            "Connection",
            "upgrade-insecure-requests",
        ] {
            assert!(!is_hop_by_hop(name), "{name}");
        }
    }

    #[test]
    fn same_server_fills_in_default_ports_and_ignores_case() {
        let a = |s: &'static str| Authority::from_static(s);
        assert!(same_server(&a("a"), b"a", 80));
        assert!(same_server(&a("a"), b"A:80", 80));
        assert!(same_server(&a("a:443"), b"a", 443));
        assert!(same_server(&a("[::1]:8080"), b"[::1]:8080", 80));
        assert!(!same_server(&a("a"), b"a:443", 80));
        assert!(!same_server(&a("a"), b"b", 80));
        assert!(!same_server(&a("a:8080"), b"a:8081", 80));
        assert!(!same_server(&a("a"), b"a b", 80));
    }

    /// The allocation-free Host check answers as the `Authority` parse
    /// wherever it answers at all.
    #[test]
    fn plain_host_check_agrees_with_the_authority_parse() {
        let mut samples: Vec<Vec<u8>> = [
            "example.com",
            "example.com:8080",
            "a",
            "a:",
            ":",
            ":80",
            "",
            "127.0.0.1",
            "127.0.0.1:1",
            "x-y.z:0",
            "EXAMPLE.COM",
            "a:b",
            "a:8x",
            "a::80",
            "[::1]:80",
            "[::1]",
            "u@h",
            "h/p",
            "h?q",
            "h#f",
            "h%20",
            "h h",
            "h\tx",
            "-.",
            "..:99999999999",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
        // Every one- and two-byte value, and each byte after a name and a port.
        for a in 0..=255u8 {
            samples.push(vec![a]);
            samples.push(vec![b'h', a]);
            samples.push(vec![b'h', b':', a]);
            samples.push(vec![b'h', b':', b'1', a]);
            for b in [b'a', b'0', b':', b'.', b'-', b'@', b'[', b']', b'%', b'/'] {
                samples.push(vec![a, b]);
            }
        }
        let mut fast = 0;
        for value in &samples {
            if let Some(name_len) = plain_host_len(value) {
                fast += 1;
                assert_eq!(
                    name_len > 0,
                    valid_authority(value),
                    "{:?}",
                    String::from_utf8_lossy(value)
                );
            }
        }
        assert!(fast > 300, "the fast check answered only {fast} samples");
    }
}

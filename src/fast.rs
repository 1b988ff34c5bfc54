//! The HTTP/1 fast path: lb's own HTTP/1.1 serving for the common case,
//! without hyper's per-request machinery.
//!
//! A request head is parsed with `httparse` straight from the connection's
//! read buffer, checked by the same code as the hyper path
//! ([`proxy::check_request`] over [`HeadView`]), rewritten into one buffer
//! (hop-by-hop headers out, `X-Forwarded-*` in) and sent with one write on a
//! connection from this worker's own pool. The response head is parsed the
//! same way, rewritten the way hyper would write it, and the body streamed
//! to the client with backpressure (re-chunked when the backend chunks).
//! Attempts, retries, budgets, passive health and timeouts are decided by
//! [`retry::run`], the loop the hyper path uses.
//!
//! The fast path takes only what it can answer exactly as hyper would:
//! HTTP/1.1, an origin-form target, no body or a `Content-Length` body of at
//! most `retry.buffer_body_limit` (read whole before it is sent), no
//! `Upgrade` or `Expect`, and no steering (`consistent_hash` keys and
//! `session_affinity` cookies are read from hyper's heads). Anything else — an h2c preface, HTTP/1.0, chunked
//! or large uploads, every malformed or refused head (the request-smuggling
//! matrix included), a head over `limits.max_header_bytes` — is handed to
//! hyper with the bytes read so far, and hyper serves the rest of that
//! connection: the answer is hyper's by construction.
//!
//! Memory: a connection waiting for its next request holds no buffer; one
//! is allocated when bytes arrive and dropped when the exchange is done.

use std::cell::RefCell;
use std::io::Write as _;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use fnv::FnvHashMap;
use hyper::body::Bytes;
use hyper::http::uri::Uri;
use hyper::{Method, StatusCode, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{timeout, timeout_at, Instant};

use crate::body::{ClientFault, ResponseBody};
use crate::config::{BackendAddr, Strategy};
use crate::proxy::{self, HeadView};
use crate::retry::{self, Attempts, Outcome, Trace};
use crate::runtime::Snapshot;
use crate::selection::Steer;
use crate::server::{ConnContext, ConnectionGuard};
use crate::upstream::FailureKind;

/// httparse's header slots; hyper's default cap too (more is hyper's 431).
const MAX_HEADERS: usize = 100;
/// hyper refuses longer targets with 414; such heads go to hyper.
const MAX_URI_LEN: usize = (u16::MAX - 1) as usize;
/// First allocation for a message's buffer; grown as needed.
const READ_CHUNK: usize = 8 * 1024;
/// Largest backend response head lb reads (hyper's client buffer bound).
const MAX_RESPONSE_HEAD: usize = 400 * 1024;
/// Idle upstream connections are closed after this long (as the hyper
/// path's pool does).
const POOL_IDLE: Duration = Duration::from_secs(3);
/// Idle upstream connections kept per backend and worker.
const POOL_MAX_IDLE: usize = 256;

/// A growable byte buffer (hyper's own).
type Buf = bytes::BytesMut;

/// Serves one client connection on the fast path, handing it to hyper
/// when a message needs hyper.
pub(crate) async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    ctx: ConnContext,
    mut drain: watch::Receiver<bool>,
    guard: ConnectionGuard,
) {
    let rt = Arc::clone(&ctx.runtime);
    // Empty (no allocation) while the connection is idle.
    let mut buf = Buf::new();
    let mut served = false;
    // The idle wait's deadline counts from here: the connection's opening,
    // then the end of each exchange.
    let mut idle_since = Instant::now();
    // One timer for all of the connection's waits, re-armed only when it
    // fires before the current deadline: setting a timer per request costs a
    // lock and a timer-wheel insert and removal.
    let first_wait = rt.worker_snapshot().config.timeouts.client_header;
    let idle_timer = tokio::time::sleep_until(idle_since + first_wait);
    tokio::pin!(idle_timer);
    loop {
        if buf.is_empty() {
            // Read per wait (reloadable), not held: an idle connection pins no config.
            let wait = {
                let timeouts = &rt.worker_snapshot().config.timeouts;
                if served {
                    timeouts.client_idle
                } else {
                    timeouts.client_header
                }
            };
            let deadline = idle_since + wait;
            if idle_timer.deadline() > deadline || idle_timer.is_elapsed() {
                idle_timer.as_mut().reset(deadline);
            }
            loop {
                tokio::select! {
                    biased;
                    () = crate::server::draining(&mut drain) => return,
                    ready = stream.readable() => match ready {
                        Ok(()) => break,
                        Err(_) => return,
                    },
                    () = &mut idle_timer => {
                        if idle_timer.deadline() >= deadline {
                            return;
                        }
                        // Set for an earlier wait: the connection was busy since.
                        idle_timer.as_mut().reset(deadline);
                    }
                }
            }
        }
        let snap = rt.worker_snapshot();
        // Boxed: an idle connection's task then holds only the state above.
        let step = Box::pin(serve_one(&mut stream, &mut buf, peer, &rt, &snap, &drain)).await;
        drop(snap);
        match step {
            Step::Next(done_at) => {
                served = true;
                idle_since = done_at;
            }
            Step::Close => return,
            Step::Hyper(prefix) => {
                return crate::server::serve_hyper(stream, prefix, peer, guard, &ctx, drain)
            }
        }
        if buf.is_empty() {
            // Idle from here: give the buffer back.
            buf = Buf::new();
        }
    }
}

/// How one exchange on a fast-path connection ended.
enum Step {
    /// Served at this instant; the connection waits for the next request.
    Next(Instant),
    Close,
    /// hyper serves the rest of the connection, starting with these bytes.
    Hyper(Bytes),
}

/// Reads one request head (and body) and answers it.
async fn serve_one(
    stream: &mut TcpStream,
    buf: &mut Buf,
    peer: SocketAddr,
    rt: &crate::runtime::Runtime,
    snap: &Snapshot,
    drain: &watch::Receiver<bool>,
) -> Step {
    // Hash keys and affinity cookies are read from (and written to) hyper's
    // heads: a steered config is served by hyper.
    if snap.config.strategy == Strategy::ConsistentHash || snap.affinity.is_some() {
        return Step::Hyper(std::mem::take(buf).freeze());
    }
    let timeouts = &snap.config.timeouts;
    // The one clock reading before the answer: the head's deadline, the
    // request's arrival and the pool's idle check all use it.
    let now = Instant::now();
    let head_deadline = now + timeouts.client_header;
    let max_head = snap.config.limits.max_header_bytes;
    let body_limit = snap.config.retry.buffer_body_limit;
    let head = loop {
        match parse_request(buf, max_head, body_limit) {
            Parsed::Partial if buf.len() < max_head => {
                if buf.capacity() - buf.len() < 1024 {
                    buf.reserve(READ_CHUNK.max(buf.len()));
                }
                match timeout_at(head_deadline, stream.read_buf(buf)).await {
                    Ok(Ok(n)) if n > 0 => continue,
                    _ => return Step::Close,
                }
            }
            // Too large, refused, or not ours: hyper answers from here on.
            Parsed::Partial | Parsed::Hyper => return Step::Hyper(std::mem::take(buf).freeze()),
            Parsed::Fast(head) => break head,
        }
    };
    let Some(request) = head.rewrite(peer.ip()) else {
        // The rewrite refused it (bad X-Forwarded-For): hyper's answer.
        let mut all = Buf::from(&head.bytes[..]);
        all.extend_from_slice(buf);
        return Step::Hyper(all.freeze());
    };
    let method_head = head.method == Method::HEAD;
    let arrival = proxy::Arrival::new(now, snap, &head.method, head.uri.path());
    let mut trace = Trace::default();
    // The body, whole, before anything is sent (it is at most
    // `buffer_body_limit`): every attempt can replay it.
    let outcome = match read_body(stream, buf, request, head.body_len, timeouts.client_body).await {
        Ok(request) => {
            let mut attempts = FastAttempts {
                request,
                method_head,
                idempotent: retry::is_idempotent(&head.method),
                now,
            };
            let steer = Steer::default();
            let path = head.uri.path();
            retry::run(
                rt,
                snap,
                &steer,
                &head.method,
                path,
                &mut attempts,
                &mut trace,
            )
            .await
        }
        Err(fault) => Outcome::ClientFault(fault),
    };
    // When the answer's head was ready (the retry loop's last reading).
    let answered = trace.ended.unwrap_or(now);
    let keep_alive = head.keep_alive && !*drain.borrow();
    let own = match outcome {
        Outcome::Relay(resp, in_flight, index) => {
            arrival.done(rt, snap, peer.ip(), resp.head.status.as_u16(), &trace);
            // A body that came whole with the head goes in the head's write.
            let whole = resp.is_whole();
            let kept = relay(
                stream,
                resp,
                &head,
                keep_alive,
                &snap.backends[index].addr,
                answered,
            )
            .await;
            drop(in_flight);
            return match kept {
                true if whole => Step::Next(answered),
                true => Step::Next(Instant::now()),
                false => Step::Close,
            };
        }
        // Not reached: a request with `Upgrade` is hyper's.
        Outcome::Switched(..) => {
            retry::text(StatusCode::BAD_GATEWAY, "lb: 502 Bad Gateway\n".to_owned())
        }
        Outcome::Own(status, text) => retry::text(status, text),
        Outcome::ClientFault(fault) => retry::client_fault(fault),
    };
    arrival.done(rt, snap, peer.ip(), own.status().as_u16(), &trace);
    // lb's own answers that end the exchange say `Connection: close`.
    let keep_alive = keep_alive && !own.headers().contains_key(hyper::header::CONNECTION);
    let mut out = Vec::with_capacity(256);
    encode_own(&mut out, &own, keep_alive, method_head, answered);
    if stream.write_all(&out).await.is_ok() && keep_alive {
        Step::Next(Instant::now())
    } else {
        Step::Close
    }
}

/// What parsing the bytes so far gave.
enum Parsed {
    /// The head is not complete yet.
    Partial,
    /// A complete head the fast path serves; its bytes left the buffer.
    Fast(Head),
    /// hyper must see this message (and the rest of the connection).
    Hyper,
}

/// A parsed request head, pointing into its bytes.
struct Head {
    /// The head exactly as received.
    bytes: Bytes,
    /// Parsed once for the checks, the retry policy and the metrics.
    method: Method,
    /// The origin-form target, sharing `bytes`.
    uri: Uri,
    /// `(name, value)` ranges into `bytes`, in order.
    headers: Vec<(Range<usize>, Range<usize>)>,
    /// `Content-Length`, 0 when absent.
    body_len: u64,
    /// Neither `Connection: close` nor anything else ends the connection.
    keep_alive: bool,
}

impl HeadView for Head {
    fn method(&self) -> &Method {
        &self.method
    }

    fn uri(&self) -> &Uri {
        &self.uri
    }

    fn version(&self) -> Version {
        Version::HTTP_11
    }

    fn values<'a>(&'a self, name: &'static str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| self.bytes[n.clone()].eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| &self.bytes[v.clone()])
    }
}

/// Digits only, as hyper reads a `Content-Length` (no sign, no spaces).
fn content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit()
            .then_some(())
            .and_then(|()| n.checked_mul(10)?.checked_add(u64::from(b - b'0')))
    })
}

/// Whether a comma-separated header value has `token`.
fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

fn parse_request(buf: &mut Buf, max_head: usize, body_limit: u64) -> Parsed {
    if buf.starts_with(b"PRI ") {
        return Parsed::Hyper;
    }
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Hyper,
    };
    if len > max_head || req.version != Some(1) {
        return Parsed::Hyper;
    }
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return Parsed::Hyper;
    };
    if !path.starts_with('/') || path.len() > MAX_URI_LEN {
        return Parsed::Hyper;
    }
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Hyper;
    };
    let range = |s: &[u8]| range_in(buf, s);
    let mut body_len: Option<u64> = None;
    let mut keep_alive = true;
    let mut headers = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            match (content_length(h.value), body_len) {
                (Some(n), None) => body_len = Some(n),
                // hyper keeps one of equal values.
                (Some(n), Some(prev)) if n == prev => continue,
                _ => return Parsed::Hyper,
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"upgrade")
            || name.eq_ignore_ascii_case(b"expect")
        {
            return Parsed::Hyper;
        } else if name.eq_ignore_ascii_case(b"connection") && has_token(h.value, "close") {
            keep_alive = false;
        }
        headers.push((range(name), range(h.value)));
    }
    let path = range(path.as_bytes());
    let body_len = body_len.unwrap_or(0);
    if body_len > body_limit {
        return Parsed::Hyper;
    }
    let bytes = buf.split_to(len).freeze();
    let Ok(uri) = Uri::from_maybe_shared(bytes.slice(path)) else {
        return unread(buf, &bytes);
    };
    let head = Head {
        bytes,
        method,
        uri,
        headers,
        body_len,
        keep_alive,
    };
    if proxy::check_request(&head).is_err() {
        return unread(buf, &head.bytes);
    }
    Parsed::Fast(head)
}

/// Where `part` (a slice of `whole`, as httparse returns) lies in `whole`.
fn range_in(whole: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - whole.as_ptr() as usize;
    start..start + part.len()
}

/// `raw` in lower case, in `scratch` when it fits (header names lb must
/// recognise all do), else in `long`.
fn lower<'a>(raw: &[u8], scratch: &'a mut [u8; 64], long: &'a mut Vec<u8>) -> &'a [u8] {
    if raw.len() <= scratch.len() {
        let l = &mut scratch[..raw.len()];
        l.copy_from_slice(raw);
        l.make_ascii_lowercase();
        l
    } else {
        *long = raw.to_ascii_lowercase();
        long
    }
}

/// A header that does not travel to the other side: hop-by-hop, or named
/// by the message's `Connection`.
fn dropped_hop(name: &str, named: &[hyper::header::HeaderName]) -> bool {
    proxy::is_hop_by_hop(name) || named.iter().any(|h| h.as_str() == name)
}

/// Puts a head taken from `buf` back in front of it, for hyper.
fn unread(buf: &mut Buf, head: &[u8]) -> Parsed {
    let mut all = Buf::with_capacity(head.len() + buf.len());
    all.extend_from_slice(head);
    all.extend_from_slice(buf);
    *buf = all;
    Parsed::Hyper
}

impl Head {
    /// The head lb sends upstream, as the hyper path's rewrite and hyper's
    /// client would write it; `None` when the hyper path would refuse it.
    fn rewrite(&self, client_ip: std::net::IpAddr) -> Option<Vec<u8>> {
        // With a prior X-Forwarded-For, the hyper path's rules (and refusal).
        let prior = match self.values("x-forwarded-for").next() {
            Some(prior) => Some(proxy::forwarded_for(Some(prior), client_ip).ok()?),
            None => None,
        };
        let named = proxy::connection_named(self.values("connection"));
        let pq = self.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut out = Vec::with_capacity(self.bytes.len() + 128 + self.body_len as usize);
        out.extend_from_slice(self.method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(pq.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        let mut host: Option<Range<usize>> = None;
        let (mut scratch, mut long) = ([0u8; 64], Vec::new());
        for (n, v) in &self.headers {
            let name = lower(&self.bytes[n.clone()], &mut scratch, &mut long);
            let name_str = std::str::from_utf8(name).unwrap_or("");
            if dropped_hop(name_str, &named)
                || matches!(
                    name_str,
                    "x-forwarded-for" | "x-forwarded-proto" | "x-forwarded-host"
                )
            {
                continue;
            }
            if name_str == "host" {
                host = Some(v.clone());
            }
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(&self.bytes[v.clone()]);
            out.extend_from_slice(b"\r\n");
        }
        if let Some(host) = host {
            out.extend_from_slice(b"x-forwarded-host: ");
            out.extend_from_slice(&self.bytes[host]);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"x-forwarded-proto: http\r\nx-forwarded-for: ");
        match prior {
            Some(xff) => out.extend_from_slice(xff.as_bytes()),
            None => write_ip(&mut out, client_ip),
        }
        out.extend_from_slice(b"\r\n\r\n");
        Some(out)
    }
}

/// Appends `ip` as `Display` writes it, without the formatting machinery
/// for the common IPv4 case (once per request).
fn write_ip(out: &mut Vec<u8>, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                if octet >= 100 {
                    out.push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    out.push(b'0' + octet / 10 % 10);
                }
                out.push(b'0' + octet % 10);
            }
        }
        std::net::IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// Appends the request body (`len` bytes: what `buf` holds, then reads)
/// to `request`. Each wait for the client is bounded by `stall`.
async fn read_body(
    stream: &mut TcpStream,
    buf: &mut Buf,
    mut request: Vec<u8>,
    len: u64,
    stall: Duration,
) -> Result<Vec<u8>, ClientFault> {
    let mut left = len as usize;
    let take = left.min(buf.len());
    request.extend_from_slice(&buf.split_to(take));
    left -= take;
    while left > 0 {
        let before = request.len();
        request.reserve(left);
        let mut limited = (&mut *stream).take(left as u64);
        match timeout(stall, limited.read_buf(&mut request)).await {
            Err(_) => return Err(ClientFault::Stalled),
            Ok(Ok(0)) | Ok(Err(_)) => return Err(ClientFault::Aborted),
            Ok(Ok(_)) => left -= request.len() - before,
        }
    }
    Ok(request)
}

/// How a backend's response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body (HEAD, 204, 304).
    Empty,
    Length(u64),
    Chunked,
    /// Until the backend closes.
    Close,
}

/// A backend's response head, parsed (ranges into the read buffer).
struct ResponseHead {
    /// Bytes of the head in the read buffer; the body follows.
    head_len: usize,
    /// Judged by the retry loop, relayed to the client.
    status: StatusCode,
    /// HTTP/1.1 (else 1.0).
    http11: bool,
    /// The reason phrase as sent.
    reason: Range<usize>,
    /// `(name, value)` ranges into the read buffer, in order.
    headers: Vec<(Range<usize>, Range<usize>)>,
    /// How the body is delimited (RFC 9112 §6.3).
    framing: Framing,
    /// The backend may keep the connection open after this response.
    reusable: bool,
}

/// A backend's response head, with the connection its body comes on.
struct UpstreamResponse {
    /// The body comes on it; back to the pool once it is all read.
    conn: TcpStream,
    /// The head and any body bytes read with it.
    buf: Buf,
    /// Parsed from the start of `buf`.
    head: ResponseHead,
}

impl UpstreamResponse {
    /// The whole body (if any) came with the head: relaying it is one write.
    fn is_whole(&self) -> bool {
        let body = (self.buf.len() - self.head.head_len) as u64;
        match self.head.framing {
            Framing::Empty => true,
            Framing::Length(n) => body >= n,
            Framing::Chunked | Framing::Close => false,
        }
    }
}

/// The fast path's attempts: the whole request in one buffer, sent on a
/// connection from this worker's pool.
struct FastAttempts {
    /// Rewritten head and body.
    request: Vec<u8>,
    /// The request is a HEAD: its response has no body.
    method_head: bool,
    /// The method may be sent twice (a stale pooled connection is retried).
    idempotent: bool,
    /// When the request arrived: judges how long pooled connections idled.
    now: Instant,
}

impl Attempts for FastAttempts {
    type Response = UpstreamResponse;

    fn next_attempt(&mut self) -> bool {
        true
    }

    async fn send(
        &mut self,
        snap: &Snapshot,
        index: usize,
        _last: bool,
    ) -> Result<UpstreamResponse, (FailureKind, String)> {
        let backend = &snap.backends[index].addr;
        // A pooled connection the backend closed meanwhile fails before any
        // byte of an answer: then the request goes once more on a new one
        // (hyper's pool does the same).
        if let Some(conn) = pool_take(backend, !self.idempotent, self.now) {
            match exchange(conn, &self.request, self.method_head).await {
                Ok(resp) => return Ok(resp),
                Err(Exchange::Unsent) => {}
                Err(Exchange::Stale) if self.idempotent => {}
                Err(e) => return Err(e.failure()),
            }
        }
        let conn = connect(backend, snap.config.timeouts.connect).await?;
        exchange(conn, &self.request, self.method_head)
            .await
            .map_err(Exchange::failure)
    }

    fn status(response: &UpstreamResponse) -> StatusCode {
        response.head.status
    }

    fn is_replayable(&self) -> bool {
        true
    }

    fn can_resend(&mut self) -> bool {
        true
    }

    fn client_fault(&self, _timed_out: bool) -> Option<ClientFault> {
        None
    }

    fn wants_upgrade(&self) -> bool {
        // Requests with `Upgrade` go to hyper.
        false
    }
}

async fn connect(
    backend: &BackendAddr,
    limit: Duration,
) -> Result<TcpStream, (FailureKind, String)> {
    match timeout(limit, TcpStream::connect(backend.as_str())).await {
        Ok(Ok(conn)) => {
            let _ = conn.set_nodelay(true);
            Ok(conn)
        }
        Ok(Err(e)) => Err((FailureKind::Connect, e.to_string())),
        Err(_) => Err((FailureKind::Connect, "connect timed out".to_owned())),
    }
}

/// How one exchange on one connection failed.
enum Exchange {
    /// The request could not be written: on a reused connection, nothing
    /// reached the backend; send it again on a new one.
    Unsent,
    /// Closed after the request was written, before any byte of an answer:
    /// on a reused connection most likely closed while idle, but the backend
    /// may have seen the request, so only an idempotent one goes again.
    Stale,
    Failed(FailureKind, String),
}

impl Exchange {
    fn failure(self) -> (FailureKind, String) {
        match self {
            Exchange::Unsent | Exchange::Stale => (
                FailureKind::Reset,
                "connection closed before message completed".to_owned(),
            ),
            Exchange::Failed(kind, detail) => (kind, detail),
        }
    }
}

/// Writes the request and reads the response head (skipping 1xx).
async fn exchange(
    mut conn: TcpStream,
    request: &[u8],
    method_head: bool,
) -> Result<UpstreamResponse, Exchange> {
    if conn.write_all(request).await.is_err() {
        return Err(Exchange::Unsent);
    }
    let mut buf = Buf::with_capacity(READ_CHUNK);
    let mut answered = false;
    loop {
        match parse_response(&buf, method_head) {
            Ok(Some(head)) => {
                if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS
                {
                    let _ = buf.split_to(head.head_len);
                    answered = true;
                    continue;
                }
                return Ok(UpstreamResponse { conn, buf, head });
            }
            Ok(None) if buf.len() < MAX_RESPONSE_HEAD => {}
            Ok(None) => {
                return Err(Exchange::Failed(
                    FailureKind::Reset,
                    "response head too large".to_owned(),
                ))
            }
            Err(why) => return Err(Exchange::Failed(FailureKind::Reset, why.to_owned())),
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(READ_CHUNK);
        }
        match conn.read_buf(&mut buf).await {
            Ok(0) | Err(_) if buf.is_empty() && !answered => return Err(Exchange::Stale),
            Ok(0) => {
                return Err(Exchange::Failed(
                    FailureKind::Reset,
                    "connection closed before message completed".to_owned(),
                ))
            }
            Err(e) => return Err(Exchange::Failed(FailureKind::Reset, e.to_string())),
            Ok(_) => {}
        }
    }
}

/// Parses a response head as hyper's client would (RFC 9112 §6.3 framing).
fn parse_response(buf: &[u8], method_head: bool) -> Result<Option<ResponseHead>, &'static str> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut slots);
    let head_len = match res.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err("invalid response head"),
    };
    let status = res
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or("invalid status")?;
    let http11 = res.version == Some(1);
    let range = |s: &[u8]| range_in(buf, s);
    let reason = range(res.reason.unwrap_or("").as_bytes());
    let (mut te, mut chunked, mut close) = (false, false, !http11);
    let mut length: Option<u64> = None;
    let mut bad_length = false;
    let mut headers = Vec::with_capacity(res.headers.len());
    for h in res.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            te = true;
            chunked = h
                .value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"content-length") {
            for v in h.value.split(|&b| b == b',') {
                match (content_length(v.trim_ascii()), length) {
                    (Some(n), None) => length = Some(n),
                    (Some(n), Some(prev)) if n == prev => {}
                    _ => bad_length = true,
                }
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            if has_token(h.value, "close") {
                close = true;
            } else if !http11 && has_token(h.value, "keep-alive") {
                close = false;
            }
        }
        headers.push((range(name), range(h.value)));
    }
    let framing = if matches!(status.as_u16(), 101..=199 | 204 | 304) || method_head {
        Framing::Empty
    } else if te {
        if !http11 {
            return Err("HTTP/1.0 response with Transfer-Encoding");
        }
        if chunked {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else if bad_length {
        return Err("invalid Content-Length");
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::Close
    };
    Ok(Some(ResponseHead {
        head_len,
        status,
        http11,
        reason,
        headers,
        reusable: !close && framing != Framing::Close,
        framing,
    }))
}

/// The response head lb writes to the client, the way hyper's server
/// writes a relayed response (lower-case names, framing, `date`).
fn encode_relayed(
    out: &mut Vec<u8>,
    resp: &UpstreamResponse,
    method_head: bool,
    keep_alive: bool,
    now: Instant,
) {
    let head = &resp.head;
    let b = &resp.buf[..];
    let reason = &b[head.reason.clone()];
    out.extend_from_slice(if head.http11 {
        b"HTTP/1.1 "
    } else {
        b"HTTP/1.0 "
    });
    out.extend_from_slice(head.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason);
    out.extend_from_slice(b"\r\n");
    let named = proxy::connection_named(
        head.headers
            .iter()
            .filter(|(n, _)| b[n.clone()].eq_ignore_ascii_case(b"connection"))
            .map(|(_, v)| &b[v.clone()]),
    );
    let no_body_status = matches!(head.status.as_u16(), 204 | 304);
    let mut wrote_len = false;
    let mut wrote_date = false;
    let (mut scratch, mut long) = ([0u8; 64], Vec::new());
    for (n, v) in &head.headers {
        let name = lower(&b[n.clone()], &mut scratch, &mut long);
        let name_str = std::str::from_utf8(name).unwrap_or("");
        if dropped_hop(name_str, &named) {
            continue;
        }
        if name_str == "content-length" {
            // A chunked or close-delimited body has none; 204/304 never; a
            // repeated value once; an empty body gets hyper's implicit one.
            let relayed = match head.framing {
                Framing::Length(n) => n > 0 && !no_body_status,
                // hyper's server relays a HEAD's length whatever the status.
                Framing::Empty => method_head,
                _ => false,
            };
            if !relayed || wrote_len {
                continue;
            }
            wrote_len = true;
        }
        if name_str == "date" {
            wrote_date = true;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(&b[v.clone()]);
        out.extend_from_slice(b"\r\n");
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if !wrote_len {
        match head.framing {
            Framing::Chunked | Framing::Close if head.http11 => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n")
            }
            Framing::Length(0) | Framing::Empty if !method_head && !no_body_status => {
                out.extend_from_slice(b"content-length: 0\r\n")
            }
            _ => {}
        }
    }
    if !wrote_date {
        out.extend_from_slice(b"date: ");
        date::extend(out, now);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes the response to the client and streams its body; true when the
/// client connection can serve another request.
async fn relay(
    client: &mut TcpStream,
    mut resp: UpstreamResponse,
    head: &Head,
    keep_alive: bool,
    backend: &BackendAddr,
    now: Instant,
) -> bool {
    let method_head = head.method == Method::HEAD;
    // hyper's server ends a response whose length only the close tells
    // (HTTP/1.0 backend) by closing.
    let close_delimited = resp.head.framing == Framing::Close && !resp.head.http11;
    let keep_alive = keep_alive && !close_delimited;
    let mut out = Vec::with_capacity(resp.head.head_len + 128);
    encode_relayed(&mut out, &resp, method_head, keep_alive, now);
    let _ = resp.buf.split_to(resp.head.head_len);
    let rechunk = resp.head.http11;
    let done = match resp.head.framing {
        Framing::Empty => client.write_all(&out).await.is_ok(),
        Framing::Length(n) => copy_length(client, &mut resp, out, n).await,
        Framing::Chunked => copy_chunked(client, &mut resp, out).await,
        Framing::Close => copy_to_close(client, &mut resp, out, rechunk).await,
    };
    if done && resp.head.reusable && resp.buf.is_empty() {
        pool_put(backend, resp.conn, now);
    }
    done && keep_alive
}

/// `n` body bytes, the first with the head in one write.
async fn copy_length(
    client: &mut TcpStream,
    resp: &mut UpstreamResponse,
    mut out: Vec<u8>,
    n: u64,
) -> bool {
    let mut left = n;
    let take = (left as usize).min(resp.buf.len());
    out.extend_from_slice(&resp.buf.split_to(take));
    left -= take as u64;
    if client.write_all(&out).await.is_err() {
        return false;
    }
    drop(out);
    let mut chunk = Buf::with_capacity(READ_CHUNK.min(left as usize).max(1));
    while left > 0 {
        chunk.clear();
        let mut limited = (&mut resp.conn).take(left.min(READ_CHUNK as u64 * 8));
        match limited.read_buf(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(got) => left -= got as u64,
        }
        if client.write_all(&chunk).await.is_err() {
            return false;
        }
        if chunk.capacity() < READ_CHUNK * 8 && left > chunk.capacity() as u64 {
            chunk.reserve(READ_CHUNK * 8);
        }
    }
    true
}

/// Until the backend closes, re-chunked for an HTTP/1.1 response.
async fn copy_to_close(
    client: &mut TcpStream,
    resp: &mut UpstreamResponse,
    mut out: Vec<u8>,
    rechunk: bool,
) -> bool {
    let mut pending = std::mem::take(&mut resp.buf);
    loop {
        if !pending.is_empty() {
            if rechunk {
                write_chunk(&mut out, &pending);
            } else {
                out.extend_from_slice(&pending);
            }
            pending.clear();
        }
        if !out.is_empty() && client.write_all(&out).await.is_err() {
            return false;
        }
        out.clear();
        if pending.capacity() < READ_CHUNK {
            pending.reserve(READ_CHUNK * 8);
        }
        match resp.conn.read_buf(&mut pending).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    resp.head.reusable = false;
    if rechunk {
        client.write_all(b"0\r\n\r\n").await.is_ok()
    } else {
        false
    }
}

fn write_chunk(out: &mut Vec<u8>, data: &[u8]) {
    let _ = write!(out, "{:X}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// A chunked body, decoded and re-chunked (extensions and trailers dropped,
/// as hyper does).
async fn copy_chunked(
    client: &mut TcpStream,
    resp: &mut UpstreamResponse,
    mut out: Vec<u8>,
) -> bool {
    loop {
        // The size line.
        let line_end = loop {
            if let Some(i) = resp.buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            if resp.buf.len() > 4096 || !fill(resp).await {
                return false;
            }
        };
        let line = &resp.buf[..line_end];
        let digits = line
            .split(|&b| b == b';')
            .next()
            .unwrap_or(b"")
            .trim_ascii();
        let Some(size) = std::str::from_utf8(digits)
            .ok()
            .filter(|d| !d.is_empty() && d.len() <= 16)
            .and_then(|d| u64::from_str_radix(d, 16).ok())
        else {
            return false;
        };
        let _ = resp.buf.split_to(line_end + 2);
        if size == 0 {
            // Trailers, up to the empty line.
            loop {
                if let Some(i) = resp.buf.windows(2).position(|w| w == b"\r\n") {
                    let _ = resp.buf.split_to(i + 2);
                    if i == 0 {
                        out.extend_from_slice(b"0\r\n\r\n");
                        return client.write_all(&out).await.is_ok();
                    }
                    continue;
                }
                if resp.buf.len() > 64 * 1024 || !fill(resp).await {
                    return false;
                }
            }
        }
        let mut left = size;
        while left > 0 {
            if resp.buf.is_empty() {
                if !out.is_empty() {
                    if client.write_all(&out).await.is_err() {
                        return false;
                    }
                    out.clear();
                }
                if !fill(resp).await {
                    return false;
                }
            }
            let take = (left as usize).min(resp.buf.len());
            write_chunk(&mut out, &resp.buf.split_to(take));
            left -= take as u64;
        }
        while resp.buf.len() < 2 {
            if !fill(resp).await {
                return false;
            }
        }
        if &resp.buf[..2] != b"\r\n" {
            return false;
        }
        let _ = resp.buf.split_to(2);
        if out.len() >= READ_CHUNK * 8 {
            if client.write_all(&out).await.is_err() {
                return false;
            }
            out.clear();
        }
    }
}

/// Reads more of the backend's body; false on EOF or error.
async fn fill(resp: &mut UpstreamResponse) -> bool {
    if resp.buf.capacity() - resp.buf.len() < 1024 {
        resp.buf.reserve(READ_CHUNK * 8);
    }
    matches!(resp.conn.read_buf(&mut resp.buf).await, Ok(n) if n > 0)
}

/// One of lb's own responses (built by the same functions as on the hyper
/// path), written the way hyper's server writes it.
fn encode_own(
    out: &mut Vec<u8>,
    resp: &hyper::Response<ResponseBody>,
    keep_alive: bool,
    method_head: bool,
    now: Instant,
) {
    let status = resp.status();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut close = false;
    for (name, value) in resp.headers() {
        if name == hyper::header::CONNECTION {
            close = true;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !keep_alive && !close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    let body = match resp.body() {
        ResponseBody::Text(Some(t)) => t.clone(),
        _ => Bytes::new(),
    };
    let _ = write!(out, "content-length: {}\r\n", body.len());
    out.extend_from_slice(b"date: ");
    date::extend(out, now);
    out.extend_from_slice(b"\r\n\r\n");
    if !method_head {
        out.extend_from_slice(&body);
    }
}

thread_local! {
    /// This worker's idle upstream connections by backend, newest last.
    /// Worker-local by construction (each worker is one thread), so no lock
    /// and no cross-thread wake-up; keyed by address, so it survives reloads.
    /// FNV: the key is a short address string hashed twice per request.
    static POOL: RefCell<FnvHashMap<BackendAddr, Vec<(TcpStream, Instant)>>> =
        RefCell::new(FnvHashMap::default());
}

/// An idle connection to `backend` that has idled less than [`POOL_IDLE`]
/// at `now`, if any. With `probe`, one the backend closed meanwhile is
/// skipped (a read that does not block means closed): a request that must
/// not be sent twice cannot count on the resend after a stale connection.
fn pool_take(backend: &BackendAddr, probe: bool, now: Instant) -> Option<TcpStream> {
    POOL.with_borrow_mut(|pool| {
        let idle = pool.get_mut(backend)?;
        while let Some((conn, since)) = idle.pop() {
            if now.saturating_duration_since(since) > POOL_IDLE {
                // The rest are older still.
                idle.clear();
                return None;
            }
            if !probe {
                return Some(conn);
            }
            // Readable while idle means closed (or garbage): not reusable.
            let mut byte = [0u8; 1];
            match conn.try_read(&mut byte) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Some(conn),
                _ => continue,
            }
        }
        None
    })
}

/// Keeps `conn` for the next request to `backend`, idle since `now`.
fn pool_put(backend: &BackendAddr, conn: TcpStream, now: Instant) {
    POOL.with_borrow_mut(|pool| {
        let idle = match pool.get_mut(backend) {
            Some(idle) => idle,
            None => pool.entry(backend.clone()).or_default(),
        };
        if idle.len() < POOL_MAX_IDLE {
            idle.push((conn, now));
        }
    });
}

/// Closes this worker's pooled connections that idled out, and forgets
/// backends with none left (a backend a reload removed among them); run by
/// the worker's tick, so a connection idles at most [`POOL_IDLE`] plus a
/// tick whether or not its backend is asked for again.
pub(crate) fn sweep_pool() {
    let now = Instant::now();
    POOL.with_borrow_mut(|pool| {
        pool.retain(|_, idle| {
            idle.retain(|(_, since)| now.saturating_duration_since(*since) <= POOL_IDLE);
            !idle.is_empty()
        });
    });
}

/// The `date` header value, formatted once per second per worker.
mod date {
    use std::cell::RefCell;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use tokio::time::Instant;

    thread_local! {
        /// The IMF-fixdate text, and the instant it stops being right (the
        /// next second of the wall clock).
        static CACHED: RefCell<(Option<Instant>, String)> = const { RefCell::new((None, String::new())) };
    }

    /// Appends the date at `now` (a reading the caller already took: the
    /// wall clock is read once a second, not per response).
    pub(super) fn extend(out: &mut Vec<u8>, now: Instant) {
        CACHED.with_borrow_mut(|(until, text)| {
            if until.is_none_or(|until| now >= until) {
                let wall = SystemTime::now();
                let into_second = wall
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos());
                *until =
                    Some(now + (Duration::from_secs(1) - Duration::from_nanos(into_second.into())));
                *text = httpdate::fmt_http_date(wall);
            }
            out.extend_from_slice(text.as_bytes());
        });
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn the_wall_clock_second_cached_until_it_ends() {
            let now = Instant::now();
            let mut text = Vec::new();
            extend(&mut text, now);
            let parsed = httpdate::parse_http_date(std::str::from_utf8(&text).unwrap()).unwrap();
            let off = SystemTime::now().duration_since(parsed).unwrap_or_default();
            assert!(off < Duration::from_secs(3), "{off:?} off");
            let until = CACHED.with_borrow(|(until, _)| until.unwrap());
            assert!(until > now && until <= now + Duration::from_secs(1));
            // Past it, the wall clock is read again and a new end is set.
            extend(&mut Vec::new(), now + Duration::from_secs(2));
            let next = CACHED.with_borrow(|(until, _)| until.unwrap());
            assert!(next > now + Duration::from_secs(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_ip_matches_display() {
        let ips = [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "9.99.100.255",
            "255.255.255.255",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:192.0.2.1",
        ];
        for ip in ips {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            let mut out = Vec::new();
            write_ip(&mut out, ip);
            assert_eq!(String::from_utf8(out).unwrap(), ip.to_string());
        }
    }

    #[tokio::test]
    async fn pool_gives_the_newest_connection_and_drops_idled_out_ones() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backend = BackendAddr::from_static("pool-test:1");
        let t0 = Instant::now();
        let old = TcpStream::connect(addr).await.unwrap();
        let new = TcpStream::connect(addr).await.unwrap();
        let new_port = new.local_addr().unwrap().port();
        pool_put(&backend, old, t0);
        pool_put(&backend, new, t0 + Duration::from_secs(2));
        let at = t0 + Duration::from_secs(4);
        // Newest first; then the older one is past POOL_IDLE at `at`.
        let got = pool_take(&backend, false, at).unwrap();
        assert_eq!(got.local_addr().unwrap().port(), new_port);
        assert!(pool_take(&backend, false, at).is_none());
        // The sweep forgets a backend with nothing left.
        let long_ago = Instant::now().checked_sub(Duration::from_secs(10)).unwrap();
        pool_put(&backend, got, long_ago);
        sweep_pool();
        POOL.with_borrow(|pool| assert!(!pool.contains_key(&backend)));
    }
}

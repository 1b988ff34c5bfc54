//! The fast path's side of the backend: attempts for the retry loop (one
//! write and one parsed response head per attempt) and this worker's
//! upstream connection pool.

use std::cell::RefCell;
use std::ops::Range;
use std::time::Duration;

use fnv::FnvHashMap;
use hyper::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

use super::request::PendingBody;
use super::{
    content_length, has_token, range_in, Buf, HeaderRanges, MAX_HEADERS, MAX_RESPONSE_HEAD,
    POOL_IDLE, POOL_MAX_IDLE, READ_CHUNK,
};
use crate::config::BackendAddr;
use crate::core::failure::FailureKind;
use crate::core::runtime::{Pool, Snapshot};
use crate::http::body::ClientFault;
use crate::http::retry::Attempts;

/// How a backend's response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// No body (HEAD, 204, 304).
    Empty,
    Length(u64),
    Chunked,
    /// Until the backend closes.
    Close,
}

/// A backend's response head, parsed (ranges into the read buffer).
pub(super) struct ResponseHead {
    /// Bytes of the head in the read buffer; the body follows.
    pub(super) head_len: usize,
    /// Judged by the retry loop, relayed to the client.
    pub(super) status: StatusCode,
    /// HTTP/1.1 (else 1.0).
    pub(super) http11: bool,
    /// The reason phrase as sent; empty when there is none, or when it has
    /// bytes outside ASCII (httparse's rule, which hyper's client follows).
    pub(super) reason: Range<usize>,
    /// `(name, value)` ranges into the read buffer, in order.
    pub(super) headers: HeaderRanges,
    /// How the body is delimited (RFC 9112 §6.3).
    pub(super) framing: Framing,
    /// The backend may keep the connection open after this response.
    pub(super) reusable: bool,
}

impl Drop for ResponseHead {
    fn drop(&mut self) {
        super::spare::give_ranges(std::mem::take(&mut self.headers));
    }
}

/// A backend's response head, with the connection its body comes on.
pub(super) struct UpstreamResponse {
    /// The body comes on it; back to the pool once it is all read.
    pub(super) conn: TcpStream,
    /// The head and any body bytes read with it.
    pub(super) buf: Buf,
    /// Parsed from the start of `buf`.
    pub(super) head: ResponseHead,
}

impl UpstreamResponse {
    /// The whole body (if any) came with the head: relaying it is one write.
    pub(super) fn is_whole(&self) -> bool {
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
pub(super) struct FastAttempts<'a> {
    /// Rewritten head and body.
    pub(super) request: Vec<u8>,
    /// The request is a HEAD: its response has no body.
    pub(super) method_head: bool,
    /// The method may be sent twice (a stale pooled connection is retried).
    pub(super) idempotent: bool,
    /// When the request arrived: judges how long pooled connections idled,
    /// for the first attempt only (a retry reads the clock: the first may
    /// have taken up to the request timeout).
    pub(super) now: Option<Instant>,
    /// A body the client sends only after `100 Continue`, when the hyper
    /// path would stream it: read by the first attempt that has a backend
    /// connection, when hyper's client would first ask for it, so that lb's
    /// own answers (no backend, none reachable) come without a `100`.
    pub(super) awaited: Option<PendingBody<'a>>,
    /// How reading `awaited` failed: the client's fault, not the backend's.
    pub(super) body_fault: Option<ClientFault>,
    /// An attempt is waiting for the client's body: a timeout then is the
    /// client's stall.
    pub(super) reading_body: bool,
}

impl FastAttempts<'_> {
    /// Appends the awaited body, if any, to the request.
    async fn receive_body(&mut self) -> Result<(), (FailureKind, String)> {
        let Some(body) = self.awaited.take() else {
            return Ok(());
        };
        self.reading_body = true;
        let read = body.read_into(&mut self.request).await;
        self.reading_body = false;
        read.map_err(|fault| {
            self.body_fault = Some(fault);
            // Not judged: `client_fault` tells the retry loop first.
            (FailureKind::Reset, "the client's body failed".to_owned())
        })
    }
}

impl Attempts for FastAttempts<'_> {
    type Response = UpstreamResponse;

    fn next_attempt(&mut self) -> bool {
        true
    }

    async fn send(
        &mut self,
        snap: &Snapshot,
        pool: &Pool,
        index: usize,
    ) -> Result<UpstreamResponse, (FailureKind, String)> {
        let backend = &pool.backends[index].addr;
        // A pooled connection the backend closed meanwhile fails before any
        // byte of an answer: then the request goes once more on a new one
        // (hyper's pool does the same).
        let now = self.now.take().unwrap_or_else(Instant::now);
        if let Some(conn) = pool_take(backend, !self.idempotent, now) {
            self.receive_body().await?;
            match exchange(conn, &self.request, self.method_head).await {
                Ok(resp) => return Ok(resp),
                Err(Exchange::Unsent) => {}
                Err(Exchange::Stale) if self.idempotent => {}
                Err(e) => return Err(e.failure()),
            }
        }
        let conn = connect(backend, snap.config.timeouts.connect).await?;
        self.receive_body().await?;
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

    fn client_fault(&self, timed_out: bool) -> Option<ClientFault> {
        self.body_fault
            .or((timed_out && self.reading_body).then_some(ClientFault::Stalled))
    }

    fn wants_upgrade(&self) -> bool {
        // Requests with `Upgrade` go to hyper.
        false
    }
}

pub(super) async fn connect(
    backend: &BackendAddr,
    limit: Duration,
) -> Result<TcpStream, (FailureKind, String)> {
    match timeout(limit, TcpStream::connect(backend.as_str())).await {
        Ok(Ok(conn)) => {
            let _ = conn.set_nodelay(true);
            Ok(conn)
        }
        Ok(Err(e)) => Err((crate::core::failure::connect_failure(&e), e.to_string())),
        Err(_) => Err((FailureKind::Connect, "connect timed out".to_owned())),
    }
}

/// How one exchange on one connection failed.
pub(super) enum Exchange {
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
pub(super) async fn exchange(
    mut conn: TcpStream,
    request: &[u8],
    method_head: bool,
) -> Result<UpstreamResponse, Exchange> {
    if conn.write_all(request).await.is_err() {
        return Err(Exchange::Unsent);
    }
    let mut buf = super::spare::buf();
    let mut answered = false;
    loop {
        match parse_response(&buf, method_head) {
            Ok(Some(head)) => {
                if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS
                {
                    bytes::Buf::advance(&mut buf, head.head_len);
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
pub(super) fn parse_response(
    buf: &[u8],
    method_head: bool,
) -> Result<Option<ResponseHead>, &'static str> {
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
    // Every offset into `buf` comes from here (see `range_in`: a missing
    // reason phrase is a static "", not a slice of `buf`).
    let range = |s: &[u8]| range_in(buf, s).ok_or("invalid response head");
    let reason = range(res.reason.unwrap_or("").as_bytes())?;
    let (mut te, mut chunked, mut close) = (false, false, !http11);
    let mut length: Option<u64> = None;
    let mut bad_length = false;
    let mut headers = super::spare::ranges(res.headers.len());
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
        headers.push((range(name)?, range(h.value)?));
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
pub(super) fn pool_take(backend: &BackendAddr, probe: bool, now: Instant) -> Option<TcpStream> {
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
pub(super) fn pool_put(backend: &BackendAddr, conn: TcpStream, now: Instant) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every range a parsed head holds lies in its buffer: httparse's
    /// static `""` for a missing reason gave one that did not.
    #[test]
    fn a_missing_or_dropped_reason_is_an_empty_range_in_the_buffer() {
        let heads: [(&[u8], &[u8]); 5] = [
            (b"HTTP/1.1 200\r\nX-Empty:\r\n\r\n", b""),
            (b"HTTP/1.1 204\n\n", b""),
            (b"HTTP/1.1 200 \r\n\r\n", b""),
            (b"HTTP/1.1 200 Caf\xc3\xa9\r\n\r\n", b""),
            (b"HTTP/1.1 201 Made Up\r\nA: b\r\n\r\n", b"Made Up"),
        ];
        for (raw, reason) in heads {
            let head = parse_response(raw, false).unwrap().unwrap();
            assert_eq!(&raw[head.reason.clone()], reason);
            for (n, v) in &head.headers {
                assert!(n.end <= raw.len() && v.end <= raw.len());
            }
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

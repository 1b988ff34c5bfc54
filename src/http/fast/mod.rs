//! The HTTP/1 fast path: lb's own HTTP/1.1 serving for the common case,
//! without hyper's per-request machinery.
//!
//! A request head is parsed with `httparse` straight from the connection's
//! read buffer, checked by the same code as the hyper path
//! (`proxy::check_request` over `HeadView`), rewritten into one buffer
//! (hop-by-hop headers out, `X-Forwarded-*` in) and sent with one write on a
//! connection from this worker's own pool. The response head is parsed the
//! same way, rewritten the way hyper would write it, and the body streamed
//! to the client with backpressure (re-chunked when the backend chunks).
//! Attempts, retries, budgets, passive health and timeouts are decided by
//! `retry::run`, the loop the hyper path uses.
//!
//! The fast path takes only what it can answer exactly as hyper would:
//! HTTP/1.1, an origin-form target, no body or a `Content-Length` body of at
//! most `retry.buffer_body_limit` (read whole before it is sent), no
//! `Upgrade`, and no `Expect` but a single `Expect: 100-continue` (any case).
//! For that one it sends hyper's `HTTP/1.1 100 Continue` when the hyper path
//! would first read the body: before the attempts when they may replay it
//! (`retry.attempts` > 1 and an idempotent method), else once the first
//! attempt has a backend connection; never for an empty body. lb's own
//! answer given before that (no backend, none reachable) comes without a
//! `100`, and, as from hyper's server, without `Connection: close` but the
//! connection then ends unless the whole body had come with the head. The
//! `Expect` header is forwarded, and the body sent with the head, without
//! waiting for the backend's own `100` (hyper's client neither waits nor
//! relays it; the fast path skips it).
//!
//! Steering reads the head through the hyper path's own functions
//! (`consistent_hash` keys, the `session_affinity` cookie and its
//! `Set-Cookie`). Anything else — an h2c preface, HTTP/1.0, another or a
//! repeated `Expect`, chunked or large uploads, every malformed or refused
//! head (the request-smuggling matrix included), a head over
//! `limits.max_header_bytes` — is handed to
//! hyper with the bytes read so far, and hyper serves the rest of that
//! connection: the answer is hyper's by construction.
//!
//! Memory: a connection waiting for its next request holds no buffer; one
//! is allocated when bytes arrive and dropped when the exchange is done.
//!
//! Per request the path reads the clock twice (head in, answer ready),
//! touches no timer (the connection's idle timer is re-armed only when it
//! fires early) and no cache line another worker writes, beyond the
//! backend's shared counters and the round-robin cursor.
//!
//! # Layout
//! * this file: the connection loop (`serve`) and one exchange;
//! * `request`: the client's head parsed, checked and rewritten, its body;
//! * `upstream`: attempts for `retry::run`, response heads, the pool;
//! * `relay`: the answer written to the client, body streamed;
//! * `date`: the `date` header, formatted once a second;
//! * `spare`: this worker's spare message buffers.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Bytes;
use hyper::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{timeout_at, Instant};

mod date;
mod relay;
mod request;
mod spare;
mod upstream;

pub(crate) use upstream::sweep_pool;

use relay::{encode_own, relay, Answer, Cut};
use request::{parse_request, skip_unread_body, Parsed, PendingBody};
use upstream::FastAttempts;

use crate::config::{Protocol, Strategy};
use crate::core::conns::ConnectionGuard;
use crate::core::passive;
use crate::core::runtime::Snapshot;
use crate::core::selection::Steer;
use crate::http::affinity;
use crate::http::grpc;
use crate::http::proxy::{self, HeadView};
use crate::http::retry::{self, Outcome, Trace};
use crate::http::server::ClientStream;
use crate::http::server::ConnContext;
use crate::io::stall::Stall;

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

/// A parsed head's `(name, value)` ranges into its bytes, in order (from
/// and back to [`spare`]).
type HeaderRanges = Vec<(Range<usize>, Range<usize>)>;

/// What a request body is read from: either kind of client stream.
pub(crate) trait ClientIo:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send
{
}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> ClientIo for T {}

/// A client connection the fast path serves: plain TCP, or TLS over it.
/// The fast path waits for readability before it takes a buffer, so an
/// idle connection holds none: these are that wait and the read that
/// does not wait.
pub(crate) trait FastStream: ClientStream {
    /// The connection is TLS lb terminated (`X-Forwarded-Proto: https`).
    const OVER_TLS: bool;

    /// Resolves when a read may have bytes (or the end) to give.
    fn readable(&mut self) -> impl std::future::Future<Output = std::io::Result<()>> + Send;

    /// Reads what is there now into `buf`; `WouldBlock` when nothing is.
    fn try_read_buf(&mut self, buf: &mut Buf) -> std::io::Result<usize>;
}

impl FastStream for TcpStream {
    const OVER_TLS: bool = false;

    async fn readable(&mut self) -> std::io::Result<()> {
        TcpStream::readable(self).await
    }

    fn try_read_buf(&mut self, buf: &mut Buf) -> std::io::Result<usize> {
        TcpStream::try_read_buf(self, buf)
    }
}

impl FastStream for tokio_rustls::server::TlsStream<TcpStream> {
    const OVER_TLS: bool = true;

    async fn readable(&mut self) -> std::io::Result<()> {
        // Plaintext the session decrypted already (a read that filled its
        // buffer left the rest there): the socket may have nothing more.
        let (tcp, session) = self.get_mut();
        match session.process_new_packets() {
            Ok(state) if state.plaintext_bytes_to_read() > 0 || state.peer_has_closed() => {
                return Ok(())
            }
            Ok(_) => {}
            // The read reports it (and the alert goes out).
            Err(_) => return Ok(()),
        }
        tcp.readable().await
    }

    fn try_read_buf(&mut self, buf: &mut Buf) -> std::io::Result<usize> {
        use std::future::Future;
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let read = tokio::io::AsyncReadExt::read_buf(self, buf);
        match std::pin::pin!(read).poll(&mut cx) {
            std::task::Poll::Ready(result) => result,
            std::task::Poll::Pending => Err(std::io::ErrorKind::WouldBlock.into()),
        }
    }
}

/// Serves one client connection on the fast path, handing it to hyper
/// when a message needs hyper.
pub(crate) async fn serve<S: FastStream>(
    mut stream: S,
    peer: SocketAddr,
    ctx: ConnContext,
    drain: watch::Receiver<bool>,
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
    // One wait for the drain for the connection's life, on its own receiver:
    // a wait made per request registers and unregisters a waiter each time.
    let mut drain_wait = drain.clone();
    let drained = async move { crate::http::server::draining(&mut drain_wait).await };
    tokio::pin!(drained);
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
                // The socket first: woken by a request, the drain wait is not
                // polled again (a registered wait's poll takes a lock); a
                // request that arrived as the drain began is answered, with
                // `Connection: close`.
                tokio::select! {
                    biased;
                    ready = stream.readable() => match ready {
                        Ok(()) => break,
                        Err(_) => return,
                    },
                    () = &mut drained => return,
                    () = &mut idle_timer => {
                        if idle_timer.deadline() >= deadline {
                            return;
                        }
                        // Set for an earlier wait: the connection was busy since.
                        idle_timer.as_mut().reset(deadline);
                    }
                }
            }
            // The first bytes are read here, not in the exchange: readiness
            // can be stale (a read that filled its buffer, as a body read
            // limited to `Content-Length` does, leaves it set), and a
            // connection with nothing to say must go back to the idle wait
            // (`client_idle`, the drain) without a buffer, not wait for a
            // head on `client_header` holding one.
            let mut first = spare::buf();
            match stream.try_read_buf(&mut first) {
                Ok(0) => return,
                Ok(_) => buf = first,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    spare::give_buf(first);
                    continue;
                }
                Err(_) => return,
            }
        }
        let snap = rt.worker_snapshot();
        // Boxed: an idle connection's task then holds only the state above.
        let step = Box::pin(serve_one(
            &mut stream,
            &mut buf,
            peer,
            &ctx.listener,
            &rt,
            &snap,
            &drain,
        ))
        .await;
        drop(snap);
        match step {
            Step::Next(done_at) => {
                served = true;
                idle_since = done_at;
            }
            Step::Close => return,
            Step::Hyper(prefix) => {
                return crate::http::server::serve_hyper(
                    stream,
                    S::OVER_TLS,
                    prefix,
                    peer,
                    guard,
                    &ctx,
                    drain,
                )
            }
        }
        if buf.is_empty() {
            // Idle from here: give the buffer back.
            spare::give_buf(std::mem::take(&mut buf));
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
async fn serve_one<S: FastStream>(
    stream: &mut S,
    buf: &mut Buf,
    peer: SocketAddr,
    listener: &str,
    rt: &crate::core::runtime::Runtime,
    snap: &Snapshot,
    drain: &watch::Receiver<bool>,
) -> Step {
    let timeouts = &snap.config.timeouts;
    // The one clock reading before the answer: the head's deadline, the
    // request's arrival and the pool's idle check all use it.
    let now = Instant::now();
    let head_deadline = now + timeouts.client_header;
    let max_head = snap.config.limits.max_header_bytes;
    // The pool is known once the head is in: parse against the largest
    // limit, and hand a body over its own pool's limit to hyper below.
    let body_limit = snap.max_buffer_body_limit;
    let head = loop {
        match parse_request(buf, max_head, body_limit) {
            Parsed::Partial if buf.len() < max_head => {
                if buf.capacity() == 0 {
                    *buf = spare::buf();
                } else if buf.capacity() - buf.len() < 1024 {
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
    let to_hyper = |buf: &mut Buf| {
        let mut all = Buf::from(&head.bytes[..]);
        all.extend_from_slice(buf);
        Step::Hyper(all.freeze())
    };
    let path_and_query = head.uri.path_and_query().map_or("/", |p| p.as_str());
    let Some(routed) = snap.route(listener, proxy::route_host(&head), path_and_query) else {
        // hyper's path answers it alike (404, or a redirecting listener's
        // 308; nothing sent upstream); the fast path has no own-answer
        // writer for a request with a body.
        return to_hyper(buf);
    };
    let pool = routed.pool;
    // (gRPC calls are POSTs: other methods skip the header scan.)
    let grpc = head.method == Method::POST
        && head
            .values("content-type")
            .next()
            .is_some_and(grpc::is_grpc_content_type);
    if pool.config.protocol != Protocol::Http1 || pool.tls.is_some() || grpc {
        // HTTP/2 or TLS to the backend (protocol translation, hyper's
        // client), or a gRPC call whose every own answer is a gRPC one:
        // hyper's path serves them.
        return to_hyper(buf);
    }
    if head.body_len > pool.config.retry.buffer_body_limit {
        // Larger than this pool replays: hyper streams it.
        return to_hyper(buf);
    }
    let rewrite = head.rewrite(
        peer.ip(),
        pool.affinity.as_ref(),
        routed.rewritten.as_deref(),
        S::OVER_TLS,
    );
    let Some((request, pinned)) = rewrite else {
        // The rewrite refused it (bad X-Forwarded-For): hyper's answer.
        return to_hyper(buf);
    };
    let method_head = head.method == Method::HEAD;
    let arrival = proxy::Arrival::new(now, snap, &head.method, head.uri.path());
    let mut trace = Trace {
        pool: Some(routed.index),
        ..Trace::default()
    };
    let mut request = request;
    let idempotent = retry::is_idempotent(&head.method);
    // The body is read whole before it is sent (it is at most
    // `buffer_body_limit`): every attempt can replay it. When the client
    // waits for `100 Continue`, it is read (and the `100` sent) when the
    // hyper path reads it: before the attempts if they may replay it (hyper's
    // path buffers it then), else once the first attempt has a backend
    // connection (hyper's client streams it from there).
    let body = PendingBody {
        client: &mut *stream,
        buf: &mut *buf,
        len: head.body_len,
        expect_continue: head.expect_continue,
        stall: timeouts.client_body,
    };
    let replay = pool.config.retry.attempts.get() > 1 && idempotent;
    let (read, awaited) = if head.expect_continue && !replay {
        (Ok(()), Some(body))
    } else {
        (body.read_into(&mut request).await, None)
    };
    // `spent`: the rewritten request's buffer, once the attempts are over
    // (the answer's head is written into it); `unread`: lb answered without
    // ever reading the body.
    let (outcome, spent, unread) = match read {
        Ok(()) => {
            let mut attempts = FastAttempts {
                request,
                method_head,
                idempotent,
                now: Some(now),
                awaited,
                body_fault: None,
                reading_body: false,
            };
            let steer = Steer {
                key: match pool.config.strategy {
                    Strategy::ConsistentHash => {
                        affinity::request_key(&pool.config.steering.hash_key, &head, peer.ip())
                    }
                    _ => None,
                },
                pinned,
            };
            let path = head.uri.path();
            let call = retry::Call {
                snap,
                pool,
                steer: &steer,
                // gRPC calls, whose `grpc-timeout` this is, go to hyper.
                deadline: None,
            };
            let outcome = retry::run(rt, call, &head.method, path, &mut attempts, &mut trace).await;
            (outcome, attempts.request, attempts.awaited.is_some())
        }
        Err(fault) => (Outcome::ClientFault(fault), request, false),
    };
    // When the answer's head was ready (the retry loop's last reading).
    let answered = trace.ended.unwrap_or(now);
    let keep_alive = head.keep_alive && !*drain.borrow();
    let own = match outcome {
        Outcome::Relay(resp, in_flight, index) => {
            arrival.done(rt, snap, peer.ip(), resp.head.status.as_u16(), &trace);
            // A body that came whole with the head goes in the head's write.
            let whole = resp.is_whole();
            let backend = &pool.backends[index];
            let answer = Answer {
                keep_alive,
                now: answered,
                // Set when the backend that answered is not the one the
                // cookie named, as on the hyper path.
                set_cookie: pool
                    .affinity
                    .as_ref()
                    .filter(|_| pinned != Some(index))
                    .and_then(|cookies| cookies.set_cookie(index)),
            };
            let relayed = relay(stream, resp, &head, &backend.addr, answer, timeouts, spent).await;
            drop(in_flight);
            return match relayed {
                Ok(true) if whole => Step::Next(answered),
                Ok(true) => Step::Next(Instant::now()),
                Ok(false) => Step::Close,
                Err(cut) => {
                    let path = head.uri.path();
                    match cut {
                        Cut::BackendStalled => passive::backend_stalled(
                            rt,
                            &backend.state,
                            &head.method,
                            path,
                            timeouts.backend_body,
                        ),
                        Cut::ClientStalled => {
                            crate::http::server::client_stalled(rt, peer, timeouts.client_send)
                        }
                        Cut::BackendBroke(why) => {
                            passive::backend_broke(rt, &backend.state, &head.method, path, &why)
                        }
                        Cut::ClientGone => {}
                    }
                    Step::Close
                }
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
    let mut out = spent;
    out.clear();
    encode_own(&mut out, &own, keep_alive, method_head, answered);
    let limit = timeouts.client_send;
    let written = Stall::default().bound(limit, stream.write_all(&out)).await;
    spare::give_vec(out);
    // As hyper's server: its answer did not say so, but the connection ends
    // unless the unread body is all in already.
    let keep_alive = keep_alive && (!unread || skip_unread_body(stream, buf, head.body_len));
    match written {
        Some(Ok(())) if keep_alive => Step::Next(Instant::now()),
        Some(_) => Step::Close,
        None => {
            crate::http::server::client_stalled(rt, peer, limit);
            Step::Close
        }
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

/// Where `part`, one of the slices httparse returns for `whole`, lies in
/// `whole`; `None` if it does not lie there. An empty `part` is `0..0`
/// wherever it points: httparse returns a static `""` for some empty
/// values (a status line without a reason phrase, or a reason with
/// non-ASCII bytes), whose address says nothing about the buffer.
fn range_in(whole: &[u8], part: &[u8]) -> Option<Range<usize>> {
    if part.is_empty() {
        return Some(0..0);
    }
    let start = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    (end <= whole.len()).then_some(start..end)
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

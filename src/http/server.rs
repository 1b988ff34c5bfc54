//! One client connection: a hyper connection task (HTTP/1.1 with upgrades,
//! and h2c prior knowledge), the HTTP/1 fast path ([`crate::http::fast`]), or in
//! tcp mode one [`crate::tcp`] task. An upgraded HTTP connection leaves its
//! task for a relay (see [`crate::http::upgrade`]) that keeps the connection's
//! slot until it closes. Listening sockets and accept loops are
//! [`crate::net::listen`]'s.
//!
//! What a client can hold is bounded: a head of at most
//! `limits.max_header_bytes`, and no connection sits silent for long: the
//! first byte of each head within `timeouts.client_header` of the
//! connection's start, the whole head within `client_header` of its first
//! byte, and the next request within `timeouts.client_idle` of the last
//! response (see `Activity`); a client that takes no response bytes for
//! `timeouts.client_send` is closed (see `Watched`), and an HTTP/2 stream
//! whose window it does not open for as long is reset (see
//! [`crate::http::h2_stream`]). One HTTP/2 connection holds at most
//! `limits.h2_max_concurrent_streams` streams.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Bytes, Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{Config, Timeouts};
use crate::core::conns::ConnectionGuard;
use crate::core::runtime::Runtime;
use crate::core::state::Clock;
use crate::http::body::{BoxError, ResponseBody};
use crate::http::h2_stream::{self, Pacer, StreamExecutor};
use crate::http::proxy;
use crate::http::upgrade::Hold;
use crate::io::stall::{SendNow, Stall};

/// The hyper server settings for client connections; part of each snapshot
/// because the limits are reloadable. hyper's own header-read timeout is off:
/// it runs from the moment a connection goes idle, which would cut idle
/// keep-alive at `client_header`; `Activity` times heads and idleness.
/// HTTP/2 streams run under the `client_send` watchdog ([`StreamExecutor`]),
/// and one connection holds at most `limits.h2_max_concurrent_streams` of
/// them, each with at most [`h2_stream::MAX_SEND_BUF`] queued.
pub fn http_server(config: &Config) -> auto::Builder<StreamExecutor> {
    let mut builder = auto::Builder::new(StreamExecutor);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(config.limits.max_header_bytes)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(config.limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(config.limits.h2_max_concurrent_streams)
        .max_send_buf_size(h2_stream::MAX_SEND_BUF)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    builder
}

/// Which code serves an HTTP/1 connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Http1 {
    /// lb's own HTTP/1 path (`httparse`, one buffer per message); anything
    /// it does not handle (h2c, `Upgrade`, …) goes to hyper.
    #[default]
    Fast,
    /// hyper for every connection, for comparison and debugging.
    Hyper,
}

/// What every connection of one worker needs.
#[derive(Debug, Clone)]
pub(crate) struct ConnContext {
    /// Snapshot, shared state, counters.
    pub runtime: Arc<Runtime>,
    /// Index of the worker running this connection (for its logs; worker 0
    /// reports for all).
    pub worker: usize,
    /// `--http1`: the fast path or hyper for every connection.
    pub http1: Http1,
    /// The name of the listener that accepted the connection: its routes
    /// serve the connection's requests.
    pub listener: Arc<str>,
}

/// Serves a connection with hyper (HTTP/1.1 or h2c), `prefix` being bytes
/// already read from it (by the fast path, which handed it over).
pub(crate) fn serve_hyper<S: ClientStream>(
    stream: S,
    over_tls: bool,
    prefix: Bytes,
    peer: SocketAddr,
    guard: ConnectionGuard,
    ctx: &ConnContext,
    mut drain: watch::Receiver<bool>,
) {
    let runtime = &ctx.runtime;
    let snap = runtime.snapshot();
    // The connection's slot and drain receiver, shared with an upgraded
    // connection's relay, which outlives this connection's task.
    let hold = Hold(Arc::new((guard, drain.clone())));
    let clock = runtime.clock;
    let activity = Arc::new(Activity::new(clock.now_ms()));
    let rt = Arc::clone(runtime);
    let for_service = Arc::clone(&activity);
    let for_upgrade = hold.clone();
    let listener = Arc::clone(&ctx.listener);
    let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        if over_tls {
            req.extensions_mut().insert(proxy::OverTls);
        }
        if req.headers().contains_key(hyper::header::UPGRADE) {
            req.extensions_mut().insert(for_upgrade.clone());
        }
        let request = RequestGuard::start(&for_service, clock);
        // Boxed: the request's future is large (the attempt loop, bodies,
        // retries), and hyper moves the service's future into each HTTP/2
        // stream's task; a pointer moves, the state stays put.
        let response = Box::pin(proxy::handle(
            Arc::clone(&rt),
            peer.ip(),
            Arc::clone(&listener),
            req,
        ));
        let rt = Arc::clone(&rt);
        async move {
            let resp = response.await?;
            if resp.status() == hyper::StatusCode::SWITCHING_PROTOCOLS {
                // The upgraded relay has its own bound (`timeouts.tcp_idle`).
                request.activity.upgraded.store(true, Relaxed);
            }
            // Here, in the stream's own task on HTTP/2: its watchdog's.
            let h2 = Pacer::for_current_stream(&rt, peer);
            Ok::<_, std::convert::Infallible>(resp.map(|body| Tracked {
                body,
                _request: request,
                h2,
            }))
        }
    });
    let io = TokioIo::new(Watched {
        prefix,
        stream,
        activity: Arc::clone(&activity),
        clock,
        send: Stall::default(),
        send_limit: Duration::ZERO,
        runtime: Arc::clone(runtime),
        peer,
    });
    // Built per connection from the snapshot's limits and timeouts (a few
    // small allocations, next to the connection's own buffers).
    let conn = http_server(&snap.config)
        .serve_connection_with_upgrades(io, service)
        .into_owned();
    let runtime = Arc::clone(runtime);
    drop(snap);
    tokio::spawn(async move {
        tokio::pin!(conn);
        let mut check = Box::pin(tokio::time::sleep(Duration::ZERO));
        let mut draining_now = false;
        let result = loop {
            tokio::select! {
                result = conn.as_mut() => break result,
                () = draining(&mut drain), if !draining_now => {
                    draining_now = true;
                    conn.as_mut().graceful_shutdown();
                }
                () = &mut check => {
                    let now = clock.now_ms();
                    let timeouts = runtime.snapshot().config.timeouts.clone();
                    match activity.deadline_ms(&timeouts) {
                        Some(due) if due <= now => {
                            tracing::debug!(%peer, "closing a connection that sent nothing in time");
                            break Ok(());
                        }
                        Some(due) => check.as_mut().reset(clock.instant(due)),
                        // Busy: look again after the shortest limit.
                        None => check.as_mut().reset(Instant::now() + timeouts.client_header.min(timeouts.client_idle)),
                    }
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "client connection ended with an error");
        }
        drop(drain);
        drop(hold);
    });
}

/// A client connection hyper can serve: plain TCP, or TLS over it.
pub trait ClientStream:
    AsyncRead + AsyncWrite + SendNow + Unpin + Send + std::fmt::Debug + 'static
{
}

impl<S: AsyncRead + AsyncWrite + SendNow + Unpin + Send + std::fmt::Debug + 'static> ClientStream
    for S
{
}

/// What a client connection is doing, for the idle and head timeouts.
/// Written by the socket wrapper and the request guards, read by the
/// connection task when its check timer fires.
#[derive(Debug)]
struct Activity {
    /// Requests being served (HTTP/2 may have many at once).
    requests: AtomicU32,
    /// Whether any request has started: before the first, the wait for a
    /// byte is bounded by `client_header`; after, by `client_idle`.
    served: AtomicBool,
    /// `Clock` ms when the connection last went idle (accepted, or its last
    /// response finished).
    idle_since_ms: AtomicU64,
    /// `Clock` ms of the first byte read while idle: a head has begun and
    /// must be complete within `client_header`. 0 when none.
    head_since_ms: AtomicU64,
    /// HTTP/2 (seen from the preface): its pings are bytes but no head.
    http2: AtomicBool,
    /// The connection was handed to an upgraded relay (a 101 went out):
    /// its writes are the relay's, which has its own idle handling, so
    /// `timeouts.client_send` no longer applies.
    upgraded: AtomicBool,
}

impl Activity {
    fn new(now_ms: u64) -> Self {
        Activity {
            requests: AtomicU32::new(0),
            served: AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(now_ms),
            head_since_ms: AtomicU64::new(0),
            http2: AtomicBool::new(false),
            upgraded: AtomicBool::new(false),
        }
    }

    /// When the connection must be closed if nothing changes; `None` while
    /// a request is being served.
    fn deadline_ms(&self, t: &Timeouts) -> Option<u64> {
        if self.requests.load(Relaxed) > 0 {
            return None;
        }
        let head = self.head_since_ms.load(Relaxed);
        if head != 0 {
            return Some(head + t.client_header.as_millis() as u64);
        }
        let limit = if self.served.load(Relaxed) {
            t.client_idle
        } else {
            t.client_header
        };
        Some(self.idle_since_ms.load(Relaxed) + limit.as_millis() as u64)
    }

    /// Bytes arrived from the client.
    fn on_read(&self, bytes: &[u8], clock: Clock) {
        if !self.served.load(Relaxed) && bytes.starts_with(b"PRI * HTTP/2") {
            self.http2.store(true, Relaxed);
        }
        if self.requests.load(Relaxed) == 0
            && self.head_since_ms.load(Relaxed) == 0
            && !self.http2.load(Relaxed)
        {
            self.head_since_ms.store(clock.now_ms(), Relaxed);
        }
    }
}

/// One request in progress on a connection, until its response body is done.
#[derive(Debug)]
struct RequestGuard {
    activity: Arc<Activity>,
    clock: Clock,
}

impl RequestGuard {
    fn start(activity: &Arc<Activity>, clock: Clock) -> Self {
        activity.requests.fetch_add(1, Relaxed);
        activity.served.store(true, Relaxed);
        activity.head_since_ms.store(0, Relaxed);
        RequestGuard {
            activity: Arc::clone(activity),
            clock,
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if self.activity.requests.fetch_sub(1, Relaxed) == 1 {
            self.activity
                .idle_since_ms
                .store(self.clock.now_ms(), Relaxed);
            self.activity.head_since_ms.store(0, Relaxed);
        }
    }
}

/// The response body, holding its request's guard until hyper drops it.
#[derive(Debug)]
struct Tracked {
    body: ResponseBody,
    _request: RequestGuard,
    /// HTTP/2: paces the body in pieces for the stream's `client_send`
    /// watchdog (see [`crate::http::h2_stream`]).
    h2: Option<Pacer>,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match &mut this.h2 {
            Some(pacer) => pacer.poll_frame(Pin::new(&mut this.body), cx),
            None => Pin::new(&mut this.body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.h2.as_ref().is_none_or(|p| p.held() == 0) && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let held = self.h2.as_ref().map_or(0, |p| p.held() as u64);
        let inner = self.body.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + held);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + held);
        }
        hint
    }
}

/// The client socket, noting reads in the connection's [`Activity`] and
/// bounding each wait for the client to take response bytes by
/// `timeouts.client_send`. A socket write pends only when the client has
/// stopped taking bytes and lb's send buffer is full (HTTP/2 flow control
/// waits above the socket, without writing: [`crate::http::h2_stream`] bounds
/// that per stream), so a client that stops reading fails its connection
/// and nothing else does.
#[derive(Debug)]
struct Watched<S> {
    /// Bytes read before hyper took the connection over; read first.
    prefix: Bytes,
    stream: S,
    activity: Arc<Activity>,
    clock: Clock,
    /// Counts the current wait for the client to take bytes.
    send: Stall,
    /// `timeouts.client_send` as read when the current wait began.
    send_limit: Duration,
    /// Whose snapshot gives `client_send` (read per wait, so a reload
    /// applies from the next one) and whose metrics count the timeout.
    runtime: Arc<Runtime>,
    /// For the log line of a client that stopped reading.
    peer: SocketAddr,
}

impl<S: ClientStream> Watched<S> {
    /// Writes `bufs`, failing once the client has taken nothing for
    /// `timeouts.client_send`.
    fn bounded_write(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = match bufs {
            [one] => Pin::new(&mut self.stream).poll_write(cx, one),
            _ => Pin::new(&mut self.stream).poll_write_vectored(cx, bufs),
        };
        if self.activity.upgraded.load(Relaxed) {
            return polled;
        }
        let (runtime, send_limit) = (&self.runtime, &mut self.send_limit);
        let limit = || {
            *send_limit = runtime.worker_snapshot().config.timeouts.client_send;
            *send_limit
        };
        match self.send.poll(cx, polled, limit) {
            Poll::Ready(Some(written)) => return Poll::Ready(written),
            Poll::Pending => return Poll::Pending,
            // The wait ran out: the client may have made room all the same.
            Poll::Ready(None) => {}
        }
        if let Some(sent) = self.send.send_now(&mut self.stream, bufs) {
            return Poll::Ready(sent);
        }
        let limit = self.send_limit;
        client_stalled(&self.runtime, self.peer, limit);
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client took no response bytes for {limit:?}"),
        )))
    }
}

impl<S: ClientStream> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            let taken = this.prefix.split_to(n);
            this.activity.on_read(&taken, this.clock);
            buf.put_slice(&taken);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.on_read(&buf.filled()[before..], this.clock);
        }
        polled
    }
}

impl<S: ClientStream> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().bounded_write(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().bounded_write(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// A client took no response bytes for `limit` (`timeouts.client_send`)
/// and its connection is being closed, on either HTTP/1 path: its doing, so
/// nothing is charged to the backend.
pub(crate) fn client_stalled(rt: &Runtime, peer: SocketAddr, limit: Duration) {
    tracing::debug!(%peer, "closing a client connection that took no response bytes for {limit:?} (timeouts.client_send)");
    rt.metrics.client_send_timeout();
}

/// Resolves once shutdown has begun (or the sender is gone).
pub(crate) async fn draining(drain: &mut watch::Receiver<bool>) {
    let _ = drain.wait_for(|draining| *draining).await;
}

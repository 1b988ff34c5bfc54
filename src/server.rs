//! Accepting clients: the listening socket, its accept loop, and one hyper
//! connection task per client (HTTP/1.1 with upgrades, and h2c prior
//! knowledge), or in tcp mode one [`crate::tcp`] task per client. An
//! upgraded HTTP connection leaves its task for a relay (see
//! [`crate::upgrade`]) that keeps the connection's slot until it closes.
//!
//! The listening address is reloadable. [`Listeners::replace`] starts an
//! accept loop on an already-bound new socket before it stops the old one,
//! so there is no moment without a listener; connections accepted on the old
//! socket carry on until their clients are done.
//!
//! What a client can hold is bounded: at most `limits.max_connections`
//! connections (accept pauses at the cap), a head of at most
//! `limits.max_header_bytes`, and no connection sits silent for long: the
//! first byte of each head within `timeouts.client_header` of the
//! connection's start, the whole head within `client_header` of its first
//! byte, and the next request within `timeouts.client_idle` of the last
//! response (see `Activity`); a client that takes no response bytes for
//! `timeouts.client_send` is closed (see `Watched`).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Bytes, Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch, Notify};
use tokio::time::Instant;

use crate::body::{BoxError, ResponseBody};
use crate::config::{Config, Mode, Timeouts};
use crate::proxy;
use crate::runtime::Runtime;
use crate::stall::Stall;
use crate::state::Clock;
use crate::upgrade::Hold;
use crate::workers::Workers;

/// Pending connections the kernel queues before lb accepts them: bursts of
/// thousands of connects must not wait on SYN retransmits (nginx uses 511,
/// HAProxy its maxconn).
const LISTEN_BACKLOG: i32 = 1024;

/// Binds a listening socket the way lb wants it: `SO_REUSEADDR` (a restart
/// does not wait out TIME_WAIT), `SO_REUSEPORT` (every worker binds its own
/// socket on the same address, and a reload may move to another IP on the
/// same port) and a deep accept queue. Non-blocking, ready for any runtime.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// One listening socket per worker on the address `first` is bound to:
/// `first` itself for worker 0, a new `SO_REUSEPORT` socket for each other
/// one. When `first` was bound without `SO_REUSEPORT` the others share it.
fn per_worker(first: std::net::TcpListener, workers: usize) -> Vec<std::net::TcpListener> {
    let local = first.local_addr();
    let mut sockets = Vec::with_capacity(workers);
    for _ in 1..workers {
        let own = local
            .as_ref()
            .map_err(|e| io::Error::new(e.kind(), e.to_string()));
        match own
            .and_then(|addr| bind(*addr))
            .or_else(|_| first.try_clone())
        {
            Ok(s) => sockets.push(s),
            Err(e) => tracing::warn!("a worker shares no listener: {e}"),
        }
    }
    sockets.insert(0, first);
    sockets
}

/// The hyper server settings for client connections; part of each snapshot
/// because the limits are reloadable. hyper's own header-read timeout is off:
/// it runs from the moment a connection goes idle, which would cut idle
/// keep-alive at `client_header`; `Activity` times heads and idleness.
pub fn http_server(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
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
        .keep_alive_interval(Some(Duration::from_secs(30)));
    builder
}

/// Open client connections, against `limits.max_connections`. Lives in the
/// runtime, so a listener moved by a reload counts the same connections.
#[derive(Debug, Default)]
pub struct ConnectionCount {
    /// Connections accepted and not yet closed.
    open: AtomicUsize,
    /// Connections accepted since start.
    total: AtomicU64,
    /// Woken when a connection closes, for an accept loop paused at the cap.
    closed: Notify,
}

impl ConnectionCount {
    pub fn open(&self) -> usize {
        self.open.load(Relaxed)
    }

    pub fn total(&self) -> u64 {
        self.total.load(Relaxed)
    }

    /// Counts a new connection until the guard drops.
    fn admit(self: &Arc<Self>) -> ConnectionGuard {
        self.open.fetch_add(1, Relaxed);
        self.total.fetch_add(1, Relaxed);
        ConnectionGuard(Arc::clone(self))
    }

    /// Counts a new connection if fewer than `cap` are open: workers accept
    /// concurrently, so the check and the count are one atomic step.
    fn try_admit(self: &Arc<Self>, cap: usize) -> Option<ConnectionGuard> {
        self.open
            .fetch_update(Relaxed, Relaxed, |n| (n < cap).then_some(n + 1))
            .ok()?;
        self.total.fetch_add(1, Relaxed);
        Some(ConnectionGuard(Arc::clone(self)))
    }

    /// Returns once fewer than `cap` connections are open. Re-checks every
    /// second too, so a reload that raises the cap is seen.
    async fn below(&self, cap: &(dyn Fn() -> usize + Sync)) {
        loop {
            let closed = self.closed.notified();
            if self.open() < cap() {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), closed).await;
        }
    }
}

/// One open client connection, counted until dropped (tcp mode holds it
/// in its connection task too).
#[derive(Debug)]
pub(crate) struct ConnectionGuard(Arc<ConnectionCount>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
        self.0.closed.notify_waiters();
    }
}

/// The sockets currently accepting clients, one per worker.
#[derive(Debug)]
struct Active {
    /// The `listen` value they were bound for (may be port 0).
    configured: SocketAddr,
    /// What the OS actually bound.
    local: SocketAddr,
    /// Dropping or firing these stops the accept loops (each drains its
    /// socket's queue before closing it).
    stop: Vec<oneshot::Sender<()>>,
    /// Handed to each connection: `true` asks it to finish its current
    /// requests and close; the sender's `closed()` resolves when all have.
    /// Taken on shutdown, so only live connections hold one.
    drain: Option<watch::Receiver<bool>>,
}

/// Owner of the accept loops; shared by `Lb` and the reloader.
#[derive(Debug)]
pub struct Listeners {
    runtime: Arc<Runtime>,
    /// Where accept loops and their connections run.
    workers: Arc<Workers>,
    /// Which code serves HTTP/1 connections (`--http1`).
    http1: Http1,
    /// Touched only on reload and shutdown.
    active: Mutex<Active>,
}

impl Listeners {
    pub fn start(
        listener: std::net::TcpListener,
        configured: SocketAddr,
        runtime: Arc<Runtime>,
        workers: Arc<Workers>,
        http1: Http1,
        drain: watch::Receiver<bool>,
    ) -> Arc<Self> {
        let local = listener.local_addr().unwrap_or(configured);
        let listeners = Arc::new(Listeners {
            runtime,
            workers,
            http1,
            active: Mutex::new(Active {
                configured,
                local,
                stop: Vec::new(),
                drain: Some(drain.clone()),
            }),
        });
        let stop = listeners.spawn_accept_loops(listener, &drain);
        listeners.active().stop = stop;
        listeners
    }

    fn active(&self) -> std::sync::MutexGuard<'_, Active> {
        self.active.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The configured `listen` currently served.
    pub fn configured(&self) -> SocketAddr {
        self.active().configured
    }

    /// The address clients can connect to now.
    pub fn local_addr(&self) -> SocketAddr {
        self.active().local
    }

    /// Serves `listener` (and a sibling socket per other worker) from now
    /// on, then stops accepting on the previous sockets, draining their
    /// accept queues first.
    pub fn replace(&self, listener: std::net::TcpListener, configured: SocketAddr) {
        let local = listener.local_addr().unwrap_or(configured);
        let mut active = self.active();
        let Some(drain) = active.drain.clone() else {
            return; // shutting down
        };
        let stop = self.spawn_accept_loops(listener, &drain);
        for old in std::mem::replace(&mut active.stop, stop) {
            let _ = old.send(());
        }
        active.configured = configured;
        active.local = local;
    }

    /// Stops accepting new connections (shutdown).
    pub fn stop(&self) {
        let mut active = self.active();
        active.drain = None;
        for stop in active.stop.drain(..) {
            let _ = stop.send(());
        }
    }

    fn spawn_accept_loops(
        &self,
        listener: std::net::TcpListener,
        drain: &watch::Receiver<bool>,
    ) -> Vec<oneshot::Sender<()>> {
        let sockets = per_worker(listener, self.workers.len());
        let mut stops = Vec::with_capacity(sockets.len());
        for (worker, (socket, handle)) in
            sockets.into_iter().zip(self.workers.handles()).enumerate()
        {
            let (tx, rx) = oneshot::channel();
            let ctx = ConnContext {
                runtime: Arc::clone(&self.runtime),
                worker,
                http1: self.http1,
            };
            handle.spawn(accept_loop(socket, ctx, drain.clone(), rx));
            stops.push(tx);
        }
        stops
    }
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
    /// Index of the worker running this connection: picks its upstream pool.
    pub worker: usize,
    /// `--http1`: the fast path or hyper for every connection.
    pub http1: Http1,
}

/// How often a persistent accept error is logged, at most.
const ACCEPT_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

async fn accept_loop(
    socket: std::net::TcpListener,
    ctx: ConnContext,
    drain: watch::Receiver<bool>,
    mut rx: oneshot::Receiver<()>,
) {
    let listener = match TcpListener::from_std(socket) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("worker {} cannot listen: {e}", ctx.worker);
            return;
        }
    };
    let drain = worker_drain(drain);
    let runtime = &ctx.runtime;
    let addr = listener
        .local_addr()
        .map_or_else(|e| format!("? ({e})"), |a| a.to_string());
    if ctx.worker == 0 {
        tracing::info!("listening on {addr}");
    }
    let cap = || runtime.snapshot().config.limits.max_connections;
    // Accept errors since the last one logged, and when that was.
    let mut unlogged_errors = 0u64;
    let mut last_error_log: Option<Instant> = None;
    loop {
        if runtime.connections.open() >= cap() {
            tracing::warn!(
                "{} client connections open (limits.max_connections): pausing accept on {addr}",
                runtime.connections.open()
            );
            tokio::select! {
                biased;
                _ = &mut rx => break,
                () = runtime.connections.below(&cap) => {}
            }
            tracing::info!("accepting again on {addr}");
        }
        tokio::select! {
            biased;
            _ = &mut rx => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Another worker may have taken the last slot since the
                    // check above: hold this one until there is room.
                    let guard = loop {
                        if let Some(guard) = runtime.connections.try_admit(cap()) {
                            break Some(guard);
                        }
                        tokio::select! {
                            biased;
                            _ = &mut rx => break None,
                            () = runtime.connections.below(&cap) => {}
                        }
                    };
                    match guard {
                        Some(guard) => serve(stream, peer, guard, &ctx, drain.clone()),
                        None => break,
                    }
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off, don't
                    // spin or die, and say so once in a while, not per try.
                    unlogged_errors += 1;
                    if last_error_log.is_none_or(|t| t.elapsed() >= ACCEPT_ERROR_LOG_EVERY) {
                        tracing::warn!(error = %e, "accept failed ({unlogged_errors} times since the last report)");
                        unlogged_errors = 0;
                        last_error_log = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    // Closing a socket resets the connections still in its accept queue:
    // take them first (their clients connected before the stop).
    if let Ok(std) = listener.into_std() {
        while let Ok((stream, peer)) = std.accept() {
            let stream = stream
                .set_nonblocking(true)
                .and_then(|()| TcpStream::from_std(stream));
            if let Ok(stream) = stream {
                // Already connected: past the cap rather than reset.
                let guard = ctx.runtime.connections.admit();
                serve(stream, peer, guard, &ctx, drain.clone());
            }
        }
    }
    if ctx.worker == 0 {
        tracing::info!("stopped accepting on {addr}");
    }
}

fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    guard: ConnectionGuard,
    ctx: &ConnContext,
    drain: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let snap = ctx.runtime.snapshot();
    if snap.config.mode == Mode::Tcp {
        return crate::tcp::serve(stream, peer, &ctx.runtime, snap, drain, guard);
    }
    drop(snap);
    match ctx.http1 {
        Http1::Fast => {
            tokio::spawn(crate::fast::serve(stream, peer, ctx.clone(), drain, guard));
        }
        Http1::Hyper => serve_hyper(stream, Bytes::new(), peer, guard, ctx, drain),
    }
}

/// Serves a connection with hyper (HTTP/1.1 or h2c), `prefix` being bytes
/// already read from it (by the fast path, which handed it over).
pub(crate) fn serve_hyper(
    stream: TcpStream,
    prefix: Bytes,
    peer: SocketAddr,
    guard: ConnectionGuard,
    ctx: &ConnContext,
    mut drain: watch::Receiver<bool>,
) {
    let runtime = &ctx.runtime;
    let worker = ctx.worker;
    let snap = runtime.snapshot();
    // The connection's slot and drain receiver, shared with an upgraded
    // connection's relay, which outlives this connection's task.
    let hold = Hold(Arc::new((guard, drain.clone())));
    let clock = runtime.clock;
    let activity = Arc::new(Activity::new(clock.now_ms()));
    let rt = Arc::clone(runtime);
    let for_service = Arc::clone(&activity);
    let for_upgrade = hold.clone();
    let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        if req.headers().contains_key(hyper::header::UPGRADE) {
            req.extensions_mut().insert(for_upgrade.clone());
        }
        let request = RequestGuard::start(&for_service, clock);
        let response = proxy::handle(Arc::clone(&rt), worker, peer.ip(), req);
        async move {
            let resp = response.await?;
            if resp.status() == hyper::StatusCode::SWITCHING_PROTOCOLS {
                // The upgraded relay has its own bound (`timeouts.tcp_idle`).
                request.activity.upgraded.store(true, Relaxed);
            }
            Ok::<_, std::convert::Infallible>(resp.map(|body| Tracked {
                body,
                _request: request,
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
    let conn = snap
        .server
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
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The client socket, noting reads in the connection's [`Activity`] and
/// bounding each wait for the client to take response bytes by
/// `timeouts.client_send`. A socket write pends only when the client has
/// stopped taking bytes and lb's send buffer is full (HTTP/2 flow control
/// waits above the socket, without writing), so a client that stops reading
/// fails its connection and nothing else does.
#[derive(Debug)]
struct Watched {
    /// Bytes read before hyper took the connection over; read first.
    prefix: Bytes,
    stream: TcpStream,
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

impl Watched {
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
        if let Some(sent) = self.send.send_now(&self.stream, bufs) {
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

impl AsyncRead for Watched {
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

impl AsyncWrite for Watched {
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

/// This worker's copy of the drain signal, for the connections it accepts.
/// A keep-alive connection waits on it between requests; registering with
/// the one watch every worker shares would take a lock that other cores
/// contend on, once per request.
///
/// The copy mirrors both things the shared one says: `true` when shutdown
/// begins, and the sender's drop when the grace ends (tcp connections and
/// upgrades run until then). It holds the shared receiver while any of its
/// own is alive, so shutdown still sees this worker's connections as open.
fn worker_drain(mut drain: watch::Receiver<bool>) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(*drain.borrow());
    tokio::spawn(async move {
        tokio::select! {
            () = draining(&mut drain) => {
                let _ = tx.send(true);
            }
            // The listener and all its connections are gone.
            () = tx.closed() => return,
        }
        tokio::select! {
            () = async { while drain.changed().await.is_ok() {} } => {}
            () = tx.closed() => {}
        }
    });
    rx
}

/// Resolves once shutdown has begun (or the sender is gone).
pub(crate) async fn draining(drain: &mut watch::Receiver<bool>) {
    let _ = drain.wait_for(|draining| *draining).await;
}

//! Listening: one `SO_REUSEPORT` socket per worker with its accept loop,
//! the connection cap, and the drain signal each worker's connections wait
//! on. Each accepted connection goes to [`crate::http::server`].
//!
//! The listening address is reloadable. [`Listeners::replace`] starts an
//! accept loop on an already-bound new socket before it stops the old one,
//! so there is no moment without a listener; connections accepted on the old
//! socket carry on until their clients are done.
//!
//! At most `limits.max_connections` client connections are open: accept
//! pauses at the cap, across every worker.

use std::io;
use std::net::SocketAddr;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use crate::config::Mode;
use crate::core::conns::ConnectionGuard;
use crate::core::runtime::Runtime;
use crate::http::fast;
use crate::http::server::{draining, serve_hyper, ConnContext, Http1};
use crate::net::tls::TlsSlot;
use crate::net::workers::Workers;
use crate::tcp;
use bytes::Bytes;
use std::sync::atomic::Ordering::Relaxed;

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

/// [`bind`], refusing an address another process already listens on.
///
/// `SO_REUSEPORT` lets any process of the same user bind a port lb listens
/// on: a second lb started by mistake (a stale unit, a second terminal)
/// would silently take a share of the first one's new connections, each
/// serving with its own config. A probe bind without `SO_REUSEPORT` fails
/// on such an address, as nginx's bind does. Only for an address no socket
/// of this lb may share (at startup, or a port it does not listen on):
/// the probe would also fail on lb's own listener.
pub fn bind_alone(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    if addr.port() != 0 {
        let probe = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        // Sockets in TIME_WAIT from an earlier run do not count.
        probe.set_reuse_address(true)?;
        if let Err(e) = probe.bind(&addr.into()) {
            return Err(if e.kind() == io::ErrorKind::AddrInUse {
                io::Error::new(
                    e.kind(),
                    "address already in use by another process (another lb?)",
                )
            } else {
                e
            });
        }
    }
    bind(addr)
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
    /// TLS termination, when `tls:` is set; read per connection.
    tls: Arc<TlsSlot>,
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
        tls: Arc<TlsSlot>,
        drain: watch::Receiver<bool>,
    ) -> Arc<Self> {
        let local = listener.local_addr().unwrap_or(configured);
        let listeners = Arc::new(Listeners {
            runtime,
            workers,
            http1,
            tls,
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

    /// The listener's TLS (swapped by reloads).
    pub fn tls(&self) -> &Arc<TlsSlot> {
        &self.tls
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
            handle.spawn(accept_loop(
                socket,
                ctx,
                Arc::clone(&self.tls),
                drain.clone(),
                rx,
            ));
            stops.push(tx);
        }
        stops
    }
}

/// How often a persistent accept error is logged, at most.
const ACCEPT_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

async fn accept_loop(
    socket: std::net::TcpListener,
    ctx: ConnContext,
    tls: Arc<TlsSlot>,
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
                        Some(guard) => serve(stream, peer, guard, &ctx, &tls, drain.clone()),
                        None => break,
                    }
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off, don't
                    // spin or die, and say so once in a while, not per try.
                    if let Some(shortage) = crate::obs::local::Shortage::of(&e) {
                        runtime.local_errors.count(crate::obs::local::Op::Accept, shortage);
                    }
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
                serve(stream, peer, guard, &ctx, &tls, drain.clone());
            }
        }
    }
    if ctx.worker == 0 {
        tracing::info!("stopped accepting on {addr}");
    }
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

/// Serves one accepted connection: `mode: tcp` relays it, else the
/// HTTP side (the fast path or hyper, by `--http1`).
pub(crate) fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    guard: ConnectionGuard,
    ctx: &ConnContext,
    tls: &TlsSlot,
    drain: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let snap = ctx.runtime.snapshot();
    let tcp_mode = snap.config.mode == Mode::Tcp;
    if tcp_mode && tls.current().is_none() {
        let local = stream.local_addr().unwrap_or(peer);
        let conn = tcp::Accepted {
            peer,
            local,
            terminated: None,
        };
        return tcp::serve(stream, conn, &ctx.runtime, snap, drain, guard);
    }
    if let Some(terminator) = tls.current() {
        let limit = snap.config.timeouts.client_header;
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let local = stream.local_addr().unwrap_or(peer);
            let handshake = tokio::time::timeout(limit, terminator.acceptor().accept(stream));
            match handshake.await {
                Ok(Ok(stream)) if tcp_mode => {
                    let server_name = stream.get_ref().1.server_name().map(str::to_owned);
                    let conn = tcp::Accepted {
                        peer,
                        local,
                        terminated: Some(server_name),
                    };
                    tcp::serve(stream, conn, &ctx.runtime, snap, drain, guard);
                }
                // h2 goes to hyper; HTTP/1.1 to the path `--http1` names.
                Ok(Ok(stream)) => {
                    // The connection outlives reloads: it must not pin this config.
                    drop(snap);
                    match (ctx.http1, stream.get_ref().1.alpn_protocol()) {
                        (Http1::Fast, None | Some(b"http/1.1")) => {
                            fast::serve(stream, peer, ctx, drain, guard).await;
                        }
                        _ => serve_hyper(stream, true, Bytes::new(), peer, guard, &ctx, drain),
                    }
                }
                Ok(Err(e)) => {
                    ctx.runtime.tls.handshake_failures.fetch_add(1, Relaxed);
                    tracing::debug!(%peer, "TLS handshake failed: {e}");
                }
                Err(_) => {
                    ctx.runtime.tls.handshake_failures.fetch_add(1, Relaxed);
                    tracing::debug!(%peer, "TLS handshake took longer than {limit:?} (timeouts.client_header)");
                }
            }
        });
        return;
    }
    drop(snap);
    match ctx.http1 {
        Http1::Fast => {
            tokio::spawn(fast::serve(stream, peer, ctx.clone(), drain, guard));
        }
        Http1::Hyper => serve_hyper(stream, false, Bytes::new(), peer, guard, ctx, drain),
    }
}

//! Listening: one `SO_REUSEPORT` socket per worker with its accept loop,
//! the connection cap, and the drain signal each worker's connections wait
//! on. Each accepted connection goes to [`crate::http::server`].
//!
//! Listeners are reloadable, each known by its name: [`Listeners::plan`]
//! binds what a new config adds or moves (and loads its certificates)
//! before anything changes, so a reload that cannot have its listeners is
//! refused whole; [`Listeners::commit`] then starts the new accept loops
//! before it stops the old ones, so there is no moment without a listener.
//! Connections accepted on a moved listener's old socket carry on until
//! their clients are done; a removed listener's are drained.
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

use crate::config::{Config, ListenerConfig, ListenerName, Mode};
use crate::core::conns::ConnectionGuard;
use crate::core::runtime::Runtime;
use crate::http::fast;
use crate::http::server::{draining, serve_hyper, ConnContext, Http1};
use crate::net::tls::{Terminator, TlsSlot};
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

/// One listener as it serves now: its sockets (one per worker), and what
/// its connections need.
#[derive(Debug)]
struct Active {
    name: ListenerName,
    /// The address it was bound for (may be port 0).
    configured: SocketAddr,
    /// What the OS actually bound.
    local: SocketAddr,
    mode: Mode,
    /// Its TLS termination, if any: swapped by reloads, read per connection.
    tls: Arc<TlsSlot>,
    /// Dropping or firing these stops the accept loops (each drains its
    /// socket's queue before closing it).
    stop: Vec<oneshot::Sender<()>>,
    /// `true` when a reload removes the listener: its connections finish
    /// their requests and close, as on shutdown.
    retire: watch::Sender<bool>,
}

#[derive(Debug)]
struct Set {
    /// In the config's order.
    listeners: Vec<Active>,
    /// Handed to each connection: `true` asks it to finish its current
    /// requests and close; the sender's `closed()` resolves when all have.
    /// Taken on shutdown, so only live connections hold one.
    drain: Option<watch::Receiver<bool>>,
}

/// Owner of every listener's accept loops; shared by `Lb` and the reloader.
#[derive(Debug)]
pub struct Listeners {
    runtime: Arc<Runtime>,
    /// Where accept loops and their connections run.
    workers: Arc<Workers>,
    /// Which code serves HTTP/1 connections (`--http1`).
    http1: Http1,
    /// Touched only on reload and shutdown.
    set: Mutex<Set>,
}

/// What a reload changes about the listeners, made ready (sockets bound,
/// certificates loaded) before the new config applies, so that a reload
/// that cannot have its listeners is refused whole.
#[derive(Debug)]
pub struct Plan {
    steps: Vec<Step>,
    /// Names of the listeners the new config no longer has.
    removed: Vec<ListenerName>,
}

#[derive(Debug)]
enum Step {
    /// A listener kept by name: its TLS as the new config has it, and a new
    /// socket when its address changed.
    Keep {
        name: ListenerName,
        tls: Option<Arc<Terminator>>,
        moved: Option<(std::net::TcpListener, SocketAddr)>,
    },
    /// A listener the new config adds.
    Add(Ready),
}

/// A listener bound and with its TLS loaded, not yet accepting.
#[derive(Debug)]
pub struct Ready {
    name: ListenerName,
    configured: SocketAddr,
    socket: std::net::TcpListener,
    mode: Mode,
    tls: Arc<TlsSlot>,
}

impl Ready {
    /// `socket` (bound for `config`) with the listener's TLS loaded. `Err`
    /// names the file that cannot serve.
    pub fn new(
        config: &ListenerConfig,
        socket: std::net::TcpListener,
        rt: &Runtime,
    ) -> Result<Ready, String> {
        let tls = Arc::new(TlsSlot::new(config.name.clone()));
        let terminator = tls.prepare(config.tls.as_ref(), rt)?;
        tls.set(terminator, rt);
        Ok(Ready {
            name: config.name.clone(),
            configured: config.address,
            socket,
            mode: config.mode,
            tls,
        })
    }
}

impl Listeners {
    /// Starts accepting on every listener of `ready`.
    pub fn start(
        ready: Vec<Ready>,
        runtime: Arc<Runtime>,
        workers: Arc<Workers>,
        http1: Http1,
        drain: watch::Receiver<bool>,
    ) -> Arc<Self> {
        let listeners = Arc::new(Listeners {
            runtime,
            workers,
            http1,
            set: Mutex::new(Set {
                listeners: Vec::new(),
                drain: Some(drain.clone()),
            }),
        });
        let active = ready
            .into_iter()
            .map(|r| listeners.activate(r, &drain))
            .collect();
        listeners.set().listeners = active;
        listeners
    }

    fn set(&self) -> std::sync::MutexGuard<'_, Set> {
        self.set.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every listener's TLS termination, for the certificate follower and
    /// reloads.
    pub fn terminators(&self) -> Vec<Arc<Terminator>> {
        self.set()
            .listeners
            .iter()
            .filter_map(|l| l.tls.current())
            .collect()
    }

    /// Where clients can connect to the first listener now.
    pub fn local_addr(&self) -> SocketAddr {
        let set = self.set();
        set.listeners
            .first()
            .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |l| l.local)
    }

    /// Where clients can connect to the listener named `name` now.
    pub fn local_addr_of(&self, name: &str) -> Option<SocketAddr> {
        self.set()
            .listeners
            .iter()
            .find(|l| l.name.as_str() == name)
            .map(|l| l.local)
    }

    /// Each listener's name, configured and bound address.
    pub fn addresses(&self) -> Vec<(ListenerName, SocketAddr, SocketAddr)> {
        self.set()
            .listeners
            .iter()
            .map(|l| (l.name.clone(), l.configured, l.local))
            .collect()
    }

    /// Binds what `config` adds or moves and loads its certificates,
    /// changing nothing yet. `Err` says why the reload cannot have its
    /// listeners (a bind that failed, a certificate that cannot serve, a
    /// listener's mode changed).
    pub fn plan(&self, config: &Config) -> Result<Plan, String> {
        let set = self.set();
        // A port this lb listens on is shared with its own sockets
        // (`SO_REUSEPORT`); on any other, no socket of this lb is in the way.
        let ours = |port: u16| {
            set.listeners
                .iter()
                .any(|l| l.configured.port() == port || l.local.port() == port)
        };
        let bind_for = |addr: SocketAddr| {
            let bind = if addr.port() != 0 && ours(addr.port()) {
                bind
            } else {
                bind_alone
            };
            bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))
        };
        let mut steps = Vec::with_capacity(config.listeners.len());
        for (i, l) in config.listeners.iter().enumerate() {
            let Some(current) = set.listeners.iter().find(|a| a.name == l.name) else {
                let socket = bind_for(l.address)?;
                steps.push(Step::Add(Ready::new(l, socket, &self.runtime)?));
                continue;
            };
            if current.mode != l.mode {
                // Clients already connected speak the old protocol, and
                // the pool of one mode is rarely a pool for the other.
                return Err(if config.listeners_named {
                    format!(
                        "listeners[{i}].mode: listener {} cannot change from {} to {} while lb runs; give it a new name (a new listener) or restart lb",
                        l.name, current.mode, l.mode
                    )
                } else {
                    format!(
                        "mode: cannot change from {} to {} while lb runs; restart lb to switch",
                        current.mode, l.mode
                    )
                });
            }
            let moved = if l.address == current.configured {
                None
            } else {
                Some((bind_for(l.address)?, l.address))
            };
            let tls = current
                .tls
                .prepare(l.tls.as_ref(), &self.runtime)
                .map_err(|e| format!("tls: {e}"))?;
            steps.push(Step::Keep {
                name: l.name.clone(),
                tls,
                moved,
            });
        }
        let removed = set
            .listeners
            .iter()
            .filter(|a| config.listener(a.name.as_str()).is_none())
            .map(|a| a.name.clone())
            .collect();
        Ok(Plan { steps, removed })
    }

    /// Carries out `plan` (once its config is the current one): new TLS
    /// for new handshakes, moved and added listeners accepting before the
    /// old sockets stop, removed ones closed and their connections drained.
    pub fn commit(&self, plan: Plan) {
        let mut set = self.set();
        let Some(drain) = set.drain.clone() else {
            return; // shutting down
        };
        let mut old = std::mem::take(&mut set.listeners);
        let mut next = Vec::with_capacity(plan.steps.len());
        for step in plan.steps {
            match step {
                Step::Add(ready) => next.push(self.activate(ready, &drain)),
                Step::Keep { name, tls, moved } => {
                    let Some(at) = old.iter().position(|a| a.name == name) else {
                        continue;
                    };
                    let mut active = old.remove(at);
                    active.tls.set(tls, &self.runtime);
                    if let Some((socket, configured)) = moved {
                        let local = socket.local_addr().unwrap_or(configured);
                        let stop = self.spawn_accept_loops(
                            socket,
                            &active.name,
                            active.mode,
                            &active.tls,
                            &drain,
                            &active.retire,
                        );
                        for previous in std::mem::replace(&mut active.stop, stop) {
                            let _ = previous.send(());
                        }
                        active.configured = configured;
                        active.local = local;
                    }
                    next.push(active);
                }
            }
        }
        for gone in old {
            debug_assert!(plan.removed.contains(&gone.name));
            self.retire(gone);
        }
        set.listeners = next;
    }

    /// Stops accepting new connections on every listener (shutdown).
    pub fn stop(&self) {
        let mut set = self.set();
        set.drain = None;
        for l in &mut set.listeners {
            for stop in l.stop.drain(..) {
                let _ = stop.send(());
            }
        }
    }

    /// A removed listener: accept stops, its connections are asked to
    /// finish and close, its certificates leave `/status`.
    fn retire(&self, gone: Active) {
        tracing::info!(
            "listener {} removed: no longer accepting on {}",
            gone.name,
            gone.local
        );
        for stop in gone.stop {
            let _ = stop.send(());
        }
        let _ = gone.retire.send(true);
        gone.tls.set(None, &self.runtime);
    }

    fn activate(&self, ready: Ready, drain: &watch::Receiver<bool>) -> Active {
        let local = ready.socket.local_addr().unwrap_or(ready.configured);
        let (retire, _) = watch::channel(false);
        let stop = self.spawn_accept_loops(
            ready.socket,
            &ready.name,
            ready.mode,
            &ready.tls,
            drain,
            &retire,
        );
        Active {
            name: ready.name,
            configured: ready.configured,
            local,
            mode: ready.mode,
            tls: ready.tls,
            stop,
            retire,
        }
    }

    fn spawn_accept_loops(
        &self,
        listener: std::net::TcpListener,
        name: &ListenerName,
        mode: Mode,
        tls: &Arc<TlsSlot>,
        drain: &watch::Receiver<bool>,
        retire: &watch::Sender<bool>,
    ) -> Vec<oneshot::Sender<()>> {
        let sockets = per_worker(listener, self.workers.len());
        let mut stops = Vec::with_capacity(sockets.len());
        let named = self.runtime.snapshot().config.listeners_named;
        for (worker, (socket, handle)) in
            sockets.into_iter().zip(self.workers.handles()).enumerate()
        {
            let (tx, rx) = oneshot::channel();
            let ctx = ConnContext {
                runtime: Arc::clone(&self.runtime),
                worker,
                http1: self.http1,
                listener: name.shared(),
            };
            let own = Own {
                mode,
                tls: Arc::clone(tls),
                // Said in the logs when the file names its listeners.
                label: if named {
                    format!("listener {name} ")
                } else {
                    String::new()
                },
            };
            handle.spawn(accept_loop(
                socket,
                ctx,
                own,
                drain.clone(),
                retire.subscribe(),
                rx,
            ));
            stops.push(tx);
        }
        stops
    }
}

/// What an accept loop knows of its listener.
struct Own {
    mode: Mode,
    tls: Arc<TlsSlot>,
    /// `listener web ` in its log lines, or nothing for a file's one listener.
    label: String,
}

/// How often a persistent accept error is logged, at most.
const ACCEPT_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

async fn accept_loop(
    socket: std::net::TcpListener,
    ctx: ConnContext,
    own: Own,
    drain: watch::Receiver<bool>,
    retire: watch::Receiver<bool>,
    mut rx: oneshot::Receiver<()>,
) {
    let listener = match TcpListener::from_std(socket) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("worker {} cannot listen: {e}", ctx.worker);
            return;
        }
    };
    let drain = worker_drain(drain, retire);
    let runtime = &ctx.runtime;
    let addr = listener
        .local_addr()
        .map_or_else(|e| format!("? ({e})"), |a| a.to_string());
    let label = &own.label;
    if ctx.worker == 0 {
        tracing::info!("{label}listening on {addr}");
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
                        Some(guard) => serve(stream, peer, guard, &ctx, &own, drain.clone()),
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
                serve(stream, peer, guard, &ctx, &own, drain.clone());
            }
        }
    }
    if ctx.worker == 0 {
        tracing::info!("{label}stopped accepting on {addr}");
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
fn worker_drain(
    mut drain: watch::Receiver<bool>,
    mut retire: watch::Receiver<bool>,
) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(*drain.borrow() || *retire.borrow());
    tokio::spawn(async move {
        tokio::select! {
            () = draining(&mut drain) => {
                let _ = tx.send(true);
            }
            // The listener was removed by a reload: as a drain, for its
            // connections only.
            Ok(_) = retire.wait_for(|gone| *gone) => {
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

/// Serves one accepted connection: a tcp listener relays it, an http one
/// hands it to the HTTP side (the fast path or hyper, by `--http1`); TLS
/// first when the listener terminates it.
fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    guard: ConnectionGuard,
    ctx: &ConnContext,
    own: &Own,
    drain: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let tcp_mode = own.mode == Mode::Tcp;
    let Some(terminator) = own.tls.current() else {
        if tcp_mode {
            let local = stream.local_addr().unwrap_or(peer);
            let conn = tcp::Accepted {
                peer,
                local,
                terminated: None,
                listener: Arc::clone(&ctx.listener),
            };
            let snap = ctx.runtime.snapshot();
            return tcp::serve(stream, conn, &ctx.runtime, snap, drain, guard);
        }
        return match ctx.http1 {
            Http1::Fast => {
                tokio::spawn(fast::serve(stream, peer, ctx.clone(), drain, guard));
            }
            Http1::Hyper => serve_hyper(stream, false, Bytes::new(), peer, guard, ctx, drain),
        };
    };
    let limit = ctx.runtime.snapshot().config.timeouts.client_header;
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
                    listener: Arc::clone(&ctx.listener),
                };
                let snap = ctx.runtime.snapshot();
                tcp::serve(stream, conn, &ctx.runtime, snap, drain, guard);
            }
            // h2 goes to hyper; HTTP/1.1 to the path `--http1` names.
            Ok(Ok(stream)) => match (ctx.http1, stream.get_ref().1.alpn_protocol()) {
                (Http1::Fast, None | Some(b"http/1.1")) => {
                    fast::serve(stream, peer, ctx, drain, guard).await;
                }
                _ => serve_hyper(stream, true, Bytes::new(), peer, guard, &ctx, drain),
            },
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
}

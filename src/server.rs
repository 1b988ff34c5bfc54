//! Accepting clients: the listening socket, its accept loop, and one hyper
//! connection task per client (HTTP/1.1 and h2c prior knowledge), or in
//! tcp mode one [`crate::tcp`] task per client.
//!
//! The listening address is reloadable. [`Listeners::replace`] starts an
//! accept loop on an already-bound new socket before it stops the old one,
//! so there is no moment without a listener; connections accepted on the old
//! socket carry on until their clients are done.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

use crate::config::{Mode, Timeouts};
use crate::proxy;
use crate::runtime::Runtime;

/// The hyper server settings for client connections; part of each snapshot
/// because `timeouts.client_header` is reloadable.
pub fn http_server(timeouts: &Timeouts) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.client_header)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)));
    builder
}

/// The socket currently accepting clients.
#[derive(Debug)]
struct Active {
    /// The `listen` value it was bound for (may be port 0).
    configured: SocketAddr,
    /// What the OS actually bound.
    local: SocketAddr,
    /// Dropping or firing this stops its accept loop.
    stop: Option<oneshot::Sender<()>>,
    /// Handed to each connection: `true` asks it to finish its current
    /// requests and close; the sender's `closed()` resolves when all have.
    /// Taken on shutdown, so only live connections hold one.
    drain: Option<watch::Receiver<bool>>,
}

/// Owner of the accept loop; shared by `Lb` and the reloader.
#[derive(Debug)]
pub struct Listeners {
    runtime: Arc<Runtime>,
    /// Touched only on reload and shutdown.
    active: Mutex<Active>,
}

impl Listeners {
    pub fn start(
        listener: TcpListener,
        configured: SocketAddr,
        runtime: Arc<Runtime>,
        drain: watch::Receiver<bool>,
    ) -> Arc<Self> {
        let local = listener.local_addr().unwrap_or(configured);
        let stop = spawn_accept_loop(listener, Arc::clone(&runtime), drain.clone());
        Arc::new(Listeners {
            runtime,
            active: Mutex::new(Active {
                configured,
                local,
                stop: Some(stop),
                drain: Some(drain),
            }),
        })
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

    /// Serves `listener` from now on and stops accepting on the previous one.
    pub fn replace(&self, listener: TcpListener, configured: SocketAddr) {
        let local = listener.local_addr().unwrap_or(configured);
        let mut active = self.active();
        let Some(drain) = active.drain.clone() else {
            return; // shutting down
        };
        let stop = spawn_accept_loop(listener, Arc::clone(&self.runtime), drain);
        if let Some(old) = active.stop.replace(stop) {
            let _ = old.send(());
        }
        active.configured = configured;
        active.local = local;
    }

    /// Stops accepting new connections (shutdown).
    pub fn stop(&self) {
        let mut active = self.active();
        active.drain = None;
        if let Some(stop) = active.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn spawn_accept_loop(
    listener: TcpListener,
    runtime: Arc<Runtime>,
    drain: watch::Receiver<bool>,
) -> oneshot::Sender<()> {
    let (tx, mut rx) = oneshot::channel();
    tokio::spawn(async move {
        let addr = listener
            .local_addr()
            .map_or_else(|e| format!("? ({e})"), |a| a.to_string());
        tracing::info!("listening on {addr}");
        loop {
            tokio::select! {
                biased;
                _ = &mut rx => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => serve(stream, peer, &runtime, drain.clone()),
                    Err(e) => {
                        // Out of file descriptors and the like: back off, don't spin or die.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        tracing::info!("stopped accepting on {addr}");
    });
    tx
}

fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    runtime: &Arc<Runtime>,
    mut drain: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let snap = runtime.snapshot();
    if snap.config.mode == Mode::Tcp {
        return crate::tcp::serve(stream, peer, runtime, snap, drain);
    }
    let rt = Arc::clone(runtime);
    let service = service_fn(move |req| proxy::handle(Arc::clone(&rt), peer.ip(), req));
    let conn = snap
        .server
        .serve_connection(TokioIo::new(stream), service)
        .into_owned();
    tokio::spawn(async move {
        tokio::pin!(conn);
        let result = tokio::select! {
            result = conn.as_mut() => result,
            () = draining(&mut drain) => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "client connection ended with an error");
        }
        drop(drain);
    });
}

/// Resolves once shutdown has begun (or the sender is gone).
async fn draining(drain: &mut watch::Receiver<bool>) {
    let _ = drain.wait_for(|draining| *draining).await;
}

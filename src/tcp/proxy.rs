//! One client connection in tcp mode: connect to a backend via the
//! configured strategy (the next eligible backend after a failed or slow
//! connect), then copy bytes both ways with half-close preserved.
//!
//! * A connect failure or timeout is counted against the backend (passive
//!   detection) and, within `retry.attempts` and the retry budget, tried on
//!   another eligible backend, never the same one twice. Once connected,
//!   nothing is retried: bytes may have reached the backend. A connect
//!   that fails on lb's own shortage ([`crate::obs::local`]: its fd limit…)
//!   closes the client connection and charges no backend.
//! * Bytes go both ways through [`crate::io::tunnel`] (which upgraded HTTP
//!   connections use too): each direction ends on its own, a FIN passed on
//!   as a write shutdown (a client that shuts its write side still reads
//!   the whole response).
//! * With `send_proxy_protocol`, the backend connection starts with a PROXY
//!   protocol header naming the client and the address it connected to.
//! * `timeouts.tcp_idle`: no byte read either way for that long closes both.
//! * Reloads never cut a connection: it holds its backend's state, not the
//!   snapshot. Shutdown lets it run until lb's drain sender is dropped
//!   (after `--shutdown-grace`), then closes it.

use crate::obs::local::{Op, Shortage};
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::timeout;

use crate::config::{BackendAddr, Strategy};
use crate::core::conns::ConnectionGuard;
use crate::core::passive::note_failure;
use crate::core::runtime::{Pool, Runtime, Snapshot};
use crate::core::selection::Steer;
use crate::core::state::InFlight;
use crate::io::tunnel::{copy_both_ways, Ended};
use crate::obs::metrics::AttemptOutcome;
use crate::tls::client_hello;

use super::proxy_protocol;

/// Proxies `client` (accepted from `peer` while `snap` was current) in its
/// own task. The task holds `drain` until the connection is closed, which is
/// what shutdown waits for, and `counted` (`limits.max_connections`).
pub(crate) fn serve<C>(
    client: C,
    conn: Accepted,
    runtime: &Arc<Runtime>,
    snap: Arc<Snapshot>,
    drain: watch::Receiver<bool>,
    counted: ConnectionGuard,
) where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Accepted {
        peer,
        local,
        terminated,
        listener,
    } = conn;
    let rt = Arc::clone(runtime);
    tokio::spawn(async move {
        let _counted = counted;
        let mut drain = drain;
        let mut client = client;
        // Routes by SNI: the ClientHello is read (bounded) and relayed as is.
        let Some(own) = snap.config.listener(&listener) else {
            return;
        };
        let sni_routes = own.routes.iter().any(|r| r.host.is_some());
        let (pool, hello) = if let (true, Some(sni)) = (sni_routes, &terminated) {
            // lb terminated TLS: the session has the name.
            let Some(routed) = snap.route(&listener, sni.as_deref(), "/") else {
                tracing::debug!(%peer, sni = sni.as_deref().unwrap_or(""), "tcp connection closed: no route for this server name");
                return;
            };
            (routed.index, Vec::new())
        } else if sni_routes {
            let limit = snap.config.timeouts.client_header;
            let read =
                client_hello::read_client_hello(&mut client, client_hello::MAX_PEEK_BYTES, limit);
            let (hello, sni) = match read.await {
                Ok(read) => read,
                Err(e) => {
                    tracing::debug!(%peer, "tcp connection closed: no TLS server name to route by: {e}");
                    return;
                }
            };
            let Some(routed) = snap.route(&listener, sni.as_deref(), "/") else {
                tracing::debug!(%peer, sni = sni.as_deref().unwrap_or(""), "tcp connection closed: no route for this server name");
                return;
            };
            (routed.index, hello)
        } else {
            // The catch-all route's pool (a one-pool file's only pool).
            let Some(routed) = snap.route(&listener, None, "/") else {
                return;
            };
            let pool = routed.index;
            (pool, Vec::new())
        };
        let Some(upstream) = connect(&rt, &snap, &snap.pools[pool], peer).await else {
            return;
        };
        let idle = snap.config.timeouts.tcp_idle;
        let send_proxy_protocol = snap.config.send_proxy_protocol;
        // The connection outlives reloads; it must not pin the old config.
        drop(snap);
        let Upstream {
            stream: mut backend,
            addr,
            in_flight,
        } = upstream;
        let backend_state = Arc::clone(in_flight.state());
        let proxied = async {
            if let Some(version) = send_proxy_protocol {
                let header = proxy_protocol::header(version, peer, local);
                backend.write_all(&header).await.map_err(Ended::Error)?;
            }
            if !hello.is_empty() {
                backend.write_all(&hello).await.map_err(Ended::Error)?;
            }
            Ok(copy_both_ways(
                &mut client,
                &mut backend,
                Some(&backend_state.metrics),
                rt.clock,
                idle,
            )
            .await)
        };
        let ended = tokio::select! {
            ended = proxied => ended.unwrap_or_else(|e| e),
            () = closing(&mut drain) => Ended::Shutdown,
        };
        drop(in_flight);
        match ended {
            Ended::Done { up, down } => {
                tracing::debug!(%peer, backend = %addr, up, down, "tcp connection closed");
            }
            Ended::Idle => {
                tracing::debug!(%peer, backend = %addr, "tcp connection idle for {idle:?}: closed");
            }
            Ended::Error(e) => {
                tracing::debug!(%peer, backend = %addr, error = %e, "tcp connection ended with an error");
            }
            Ended::Shutdown => {
                tracing::debug!(%peer, backend = %addr, "tcp connection closed at shutdown");
            }
        }
    });
}

/// What the listener knows of an accepted connection.
#[derive(Debug, Clone)]
pub(crate) struct Accepted {
    pub peer: SocketAddr,
    /// The listener's address the client reached (for the PROXY header).
    pub local: SocketAddr,
    /// `Some` when lb terminated TLS: the server name the client asked for.
    pub terminated: Option<Option<String>>,
    /// The name of the listener that accepted it, whose routes apply.
    pub listener: Arc<str>,
}

/// A connected backend, counted in flight until the guard drops.
struct Upstream {
    /// The backend connection, TCP_NODELAY set like the client's.
    stream: TcpStream,
    /// For logs.
    addr: BackendAddr,
    /// Keeps the connection counted in the backend's in-flight load.
    in_flight: InFlight,
}

/// Picks and connects a backend, trying the next eligible one after a
/// failed or timed-out connect. `None` closes the client connection.
async fn connect(rt: &Runtime, snap: &Snapshot, pool: &Pool, peer: SocketAddr) -> Option<Upstream> {
    let policy = &pool.config.retry;
    let limit = snap.config.timeouts.connect;
    pool.shared.budget.deposit(&policy.budget);
    // consistent_hash keys a TCP connection by its client's address.
    let steer = Steer {
        key: (pool.config.strategy == Strategy::ConsistentHash)
            .then(|| crate::core::selection::hash::client_ip(peer.ip())),
        pinned: None,
    };
    let mut tried: Vec<usize> = Vec::new();
    let mut last_failure: Option<(usize, String)> = None;
    for attempt in 0..policy.attempts.get() {
        if attempt > 0
            && !(policy.retry_on.connect_failure && pool.shared.budget.try_withdraw(&policy.budget))
        {
            break;
        }
        let now_ms = rt.clock.now_ms();
        let eligible =
            |i: usize| !tried.contains(&i) && pool.backends[i].state.is_available(now_ms);
        let Some(index) = pool.select_for(&steer, &eligible) else {
            break;
        };
        tried.push(index);
        let backend = &pool.backends[index];
        let in_flight = backend.state.start();
        let why = match timeout(limit, TcpStream::connect(backend.addr.as_str())).await {
            Ok(Ok(stream)) => {
                backend.state.metrics.attempt(AttemptOutcome::Success);
                backend.state.record_success();
                let _ = stream.set_nodelay(true);
                return Some(Upstream {
                    stream,
                    addr: backend.addr.clone(),
                    in_flight,
                });
            }
            Ok(Err(e)) => {
                if let Some(shortage) = Shortage::of(&e) {
                    // lb's own shortage: close the client, blame no backend.
                    let what = format_args!(
                        "tcp connection from {peer}: connecting to {}: {e}",
                        backend.addr
                    );
                    rt.local_errors
                        .record(Op::Connect, shortage, rt.clock.now_ms(), what);
                    return None;
                }
                backend.state.metrics.attempt(AttemptOutcome::Connect);
                e.to_string()
            }
            Err(_) => {
                backend.state.metrics.attempt(AttemptOutcome::Timeout);
                format!("connect timed out after {limit:?}")
            }
        };
        drop(in_flight);
        note_failure(rt, pool, &backend.state, &why);
        tracing::debug!(%peer, backend = %backend.addr, %why, attempt, "tcp connect failed");
        last_failure = Some((index, why));
    }
    match last_failure {
        Some((index, why)) => tracing::warn!(
            %peer,
            "tcp connection closed: backend {} unreachable: {why} ({} tried)",
            pool.backends[index].addr,
            tried.len()
        ),
        // Like HTTP's 503, not logged: health checks already said why.
        None => tracing::debug!(%peer, "tcp connection closed: no healthy backend available"),
    }
    None
}

/// Resolves when lb drops its drain sender: the end of shutdown's grace (or
/// of lb). Draining itself (`true`) lets tcp connections run on.
async fn closing(drain: &mut watch::Receiver<bool>) {
    while drain.changed().await.is_ok() {}
}

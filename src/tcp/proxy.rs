//! One client connection in tcp mode: connect to a backend via the
//! configured strategy (the next eligible backend after a failed or slow
//! connect), then copy bytes both ways with half-close preserved.
//!
//! * A connect failure or timeout is counted against the backend (passive
//!   detection) and, within `retry.attempts` and the retry budget, tried on
//!   another eligible backend, never the same one twice. Once connected,
//!   nothing is retried: bytes may have reached the backend.
//! * Each direction ends on its own: a FIN read from one side is passed on
//!   as a write shutdown to the other, and the other direction keeps
//!   flowing (a client that shuts its write side still reads the whole
//!   response). The connection ends when both directions have, or at the
//!   first error on either side.
//! * With `send_proxy_protocol`, the backend connection starts with a PROXY
//!   protocol header naming the client and the address it connected to.
//! * `timeouts.tcp_idle`: no byte read either way for that long closes both.
//! * Reloads never cut a connection: it holds its backend's state, not the
//!   snapshot. Shutdown lets it run until lb's drain sender is dropped
//!   (after `--shutdown-grace`), then closes it.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::timeout;

use crate::config::{BackendAddr, Strategy};
use crate::metrics::AttemptOutcome;
use crate::retry::note_failure;
use crate::runtime::{Runtime, Snapshot};
use crate::selection::Steer;
use crate::server::ConnectionGuard;
use crate::state::{BackendState, Clock, InFlight};

use super::proxy_protocol;

/// Bytes read at once per direction to start with (nginx's and HAProxy's
/// default buffer size): two per connection, allocated while it is open.
const BUFFER: usize = 16 * 1024;
/// A direction whose reads fill [`BUFFER`] is a bulk transfer: it reads this
/// much at once from then on, for a quarter of the system calls.
const BULK_BUFFER: usize = 64 * 1024;

/// Proxies `client` (accepted from `peer` while `snap` was current) in its
/// own task. The task holds `drain` until the connection is closed, which is
/// what shutdown waits for, and `counted` (`limits.max_connections`).
pub(crate) fn serve(
    client: TcpStream,
    peer: SocketAddr,
    runtime: &Arc<Runtime>,
    snap: Arc<Snapshot>,
    drain: watch::Receiver<bool>,
    counted: ConnectionGuard,
) {
    let rt = Arc::clone(runtime);
    tokio::spawn(async move {
        let _counted = counted;
        let mut drain = drain;
        let Some(upstream) = connect(&rt, &snap, peer).await else {
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
        let mut client = client;
        let proxied = async {
            if let Some(version) = send_proxy_protocol {
                let local = client.local_addr().map_err(Ended::Error)?;
                let header = proxy_protocol::header(version, peer, local);
                backend.write_all(&header).await.map_err(Ended::Error)?;
            }
            Ok(copy_both_ways(&mut client, &mut backend, &backend_state, rt.clock, idle).await)
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
async fn connect(rt: &Runtime, snap: &Snapshot, peer: SocketAddr) -> Option<Upstream> {
    let policy = &snap.config.retry;
    let limit = snap.config.timeouts.connect;
    rt.budget.deposit(&policy.budget);
    // consistent_hash keys a TCP connection by its client's address.
    let steer = Steer {
        key: (snap.config.strategy == Strategy::ConsistentHash)
            .then(|| crate::selection::hash::client_ip(peer.ip())),
        pinned: None,
    };
    let mut tried: Vec<usize> = Vec::new();
    let mut last_failure: Option<(usize, String)> = None;
    for attempt in 0..policy.attempts.get() {
        if attempt > 0
            && !(policy.retry_on.connect_failure && rt.budget.try_withdraw(&policy.budget))
        {
            break;
        }
        let now_ms = rt.clock.now_ms();
        let eligible =
            |i: usize| !tried.contains(&i) && snap.backends[i].state.is_available(now_ms);
        let Some(index) = snap.select_for(&steer, &eligible) else {
            break;
        };
        tried.push(index);
        let backend = &snap.backends[index];
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
                backend.state.metrics.attempt(AttemptOutcome::Connect);
                e.to_string()
            }
            Err(_) => {
                backend.state.metrics.attempt(AttemptOutcome::Timeout);
                format!("connect timed out after {limit:?}")
            }
        };
        drop(in_flight);
        note_failure(rt, snap, &backend.state, &why);
        tracing::debug!(%peer, backend = %backend.addr, %why, attempt, "tcp connect failed");
        last_failure = Some((index, why));
    }
    match last_failure {
        Some((index, why)) => tracing::warn!(
            %peer,
            "tcp connection closed: backend {} unreachable: {why} ({} tried)",
            snap.backends[index].addr,
            tried.len()
        ),
        // Like HTTP's 503, not logged: health checks already said why.
        None => tracing::debug!(%peer, "tcp connection closed: no healthy backend available"),
    }
    None
}

/// How a proxied connection ended.
enum Ended {
    /// Both sides finished; bytes client→backend and backend→client.
    Done { up: u64, down: u64 },
    /// No byte either way for `timeouts.tcp_idle`.
    Idle,
    /// A read, write or shutdown failed on either side.
    Error(io::Error),
    /// lb's shutdown grace ran out.
    Shutdown,
}

/// Copies both ways until both directions are done, one fails, or nothing
/// moved for `idle`.
async fn copy_both_ways(
    client: &mut TcpStream,
    backend: &mut TcpStream,
    state: &BackendState,
    clock: Clock,
    idle: Duration,
) -> Ended {
    let (to_backend, to_client) = (state.metrics.bytes(true), state.metrics.bytes(false));
    let last_read_ms = AtomicU64::new(clock.now_ms());
    let one_done = AtomicBool::new(false);
    let (mut client_rx, mut client_tx) = client.split();
    let (mut backend_rx, mut backend_tx) = backend.split();
    let both = async {
        tokio::try_join!(
            pipe(
                &mut client_rx,
                &mut backend_tx,
                to_backend,
                &last_read_ms,
                &one_done,
                clock
            ),
            pipe(
                &mut backend_rx,
                &mut client_tx,
                to_client,
                &last_read_ms,
                &one_done,
                clock
            ),
        )
    };
    tokio::select! {
        copied = both => match copied {
            Ok((up, down)) => Ended::Done { up, down },
            Err(e) => Ended::Error(e),
        },
        () = quiet_for(&last_read_ms, clock, idle) => Ended::Idle,
    }
}

/// One direction: copies until EOF, then shuts `to`'s write side (the
/// half-close), returning the bytes copied. The second direction to end
/// skips the shutdown: closing both sockets right after sends that FIN.
async fn pipe(
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    relayed: &AtomicU64,
    last_read_ms: &AtomicU64,
    one_done: &AtomicBool,
    clock: Clock,
) -> io::Result<u64> {
    // Read into spare capacity: no zeroing of a buffer per connection.
    let mut buf = Vec::with_capacity(BUFFER);
    let mut copied = 0u64;
    loop {
        buf.clear();
        let n = from.read_buf(&mut buf).await?;
        if n == 0 {
            if !one_done.swap(true, Relaxed) {
                to.shutdown().await?;
            }
            return Ok(copied);
        }
        last_read_ms.store(clock.now_ms(), Relaxed);
        to.write_all(&buf).await?;
        copied += n as u64;
        relayed.fetch_add(n as u64, Relaxed);
        if n == BUFFER {
            buf.clear();
            buf.reserve_exact(BULK_BUFFER);
        }
    }
}

/// Resolves once no read happened for `idle`.
async fn quiet_for(last_read_ms: &AtomicU64, clock: Clock, idle: Duration) {
    let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
    loop {
        let quiet = clock.now_ms().saturating_sub(last_read_ms.load(Relaxed));
        if quiet >= idle_ms {
            return;
        }
        tokio::time::sleep(Duration::from_millis(idle_ms - quiet)).await;
    }
}

/// Resolves when lb drops its drain sender: the end of shutdown's grace (or
/// of lb). Draining itself (`true`) lets tcp connections run on.
async fn closing(drain: &mut watch::Receiver<bool>) {
    while drain.changed().await.is_ok() {}
}

//! Bytes both ways between two connections, for everything lb relays without
//! reading it: `mode: tcp` connections and HTTP connections upgraded to
//! another protocol (WebSocket).
//!
//! * Each direction ends on its own: a FIN read from one side is passed on
//!   as a write shutdown to the other, and the other direction keeps
//!   flowing. The tunnel ends when both directions have, or at the first
//!   error on either side.
//! * `idle`: no byte read either way for that long ends it
//!   (`timeouts.tcp_idle`), so a peer that vanished without a FIN does not
//!   hold the other side, a descriptor and the backend's in-flight count
//!   forever.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::core::state::Clock;
use crate::obs::metrics::BackendMetrics;

/// Bytes read at once per direction to start with (nginx's and HAProxy's
/// default buffer size): two per tunnel, allocated while it is open.
const BUFFER: usize = 16 * 1024;
/// A direction whose reads fill [`BUFFER`] is a bulk transfer: it reads this
/// much at once from then on, for a quarter of the system calls.
const BULK_BUFFER: usize = 64 * 1024;

/// How a tunnel ended.
#[derive(Debug)]
pub(crate) enum Ended {
    /// Both sides finished; bytes client→backend and backend→client.
    Done { up: u64, down: u64 },
    /// No byte either way for the idle bound.
    Idle,
    /// A read, write or shutdown failed on either side.
    Error(io::Error),
    /// lb's shutdown grace ran out.
    Shutdown,
}

/// Copies both ways between `client` and `backend` until both directions
/// are done, one fails, or nothing moved for `idle`; adds the bytes to the
/// backend's counters when given.
pub(crate) async fn copy_both_ways<C, B>(
    client: C,
    backend: B,
    counters: Option<&BackendMetrics>,
    clock: Clock,
    idle: Duration,
) -> Ended
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let last_read_ms = AtomicU64::new(clock.now_ms());
    let one_done = AtomicBool::new(false);
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut backend_rx, mut backend_tx) = tokio::io::split(backend);
    let both = async {
        tokio::try_join!(
            pipe(
                &mut client_rx,
                &mut backend_tx,
                counters.map(|c| c.bytes(true)),
                &last_read_ms,
                &one_done,
                clock
            ),
            pipe(
                &mut backend_rx,
                &mut client_tx,
                counters.map(|c| c.bytes(false)),
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
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    relayed: Option<&AtomicU64>,
    last_read_ms: &AtomicU64,
    one_done: &AtomicBool,
    clock: Clock,
) -> io::Result<u64> {
    // Read into spare capacity: no zeroing of a buffer per tunnel.
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
        if let Some(relayed) = relayed {
            relayed.fetch_add(n as u64, Relaxed);
        }
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

//! Counts of what is open, kept by the runtime across reloads: client
//! connections against `limits.max_connections`, and relayed upgraded
//! connections; and [`Grace`], the end of shutdown's grace period, which
//! ends what would otherwise run on past it (upgraded connections,
//! response bodies still waiting on their backend).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;

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
    pub fn admit(self: &Arc<Self>) -> ConnectionGuard {
        self.open.fetch_add(1, Relaxed);
        self.total.fetch_add(1, Relaxed);
        ConnectionGuard(Arc::clone(self))
    }

    /// Counts a new connection if fewer than `cap` are open: workers accept
    /// concurrently, so the check and the count are one atomic step.
    pub fn try_admit(self: &Arc<Self>, cap: usize) -> Option<ConnectionGuard> {
        self.open
            .fetch_update(Relaxed, Relaxed, |n| (n < cap).then_some(n + 1))
            .ok()?;
        self.total.fetch_add(1, Relaxed);
        Some(ConnectionGuard(Arc::clone(self)))
    }

    /// Returns once fewer than `cap` connections are open. Re-checks every
    /// second too, so a reload that raises the cap is seen.
    pub async fn below(&self, cap: &(dyn Fn() -> usize + Sync)) {
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
pub struct ConnectionGuard(Arc<ConnectionCount>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
        self.0.closed.notify_waiters();
    }
}

/// Relayed upgraded connections, process-wide.
#[derive(Debug, Default)]
pub struct Upgrades {
    /// Relays open now.
    pub open: Arc<AtomicUsize>,
}

impl Upgrades {
    pub fn open(&self) -> usize {
        self.open.load(Relaxed)
    }
}

/// Shutdown's grace period, and its end: what is still open then is ended
/// as cleanly as lb can (an upgraded connection closed, a gRPC response
/// ended with lb's own `grpc-status`, any other response body cut).
///
/// Costs nothing until something waits: a response body makes a
/// [`GraceWaiter`] only once its backend keeps it waiting, and asking
/// whether the grace ran out is one atomic load, never a lock.
#[derive(Debug, Default)]
pub struct Grace {
    /// Set once, when the grace runs out; a waiter reads it after it
    /// registered, so one made after the notification still hears it.
    ran_out: Arc<AtomicBool>,
    /// Wakes every waiter when the grace runs out.
    ended: Arc<Notify>,
}

impl Grace {
    /// Ends the grace period: every waiter is woken, and every one made
    /// from now on is ready at once.
    pub fn run_out(&self) {
        // Before the notification: a waiter made after it (which that
        // notification does not wake) sees the flag instead.
        self.ran_out.store(true, SeqCst);
        self.ended.notify_waiters();
    }

    /// True once the grace period has run out.
    pub fn has_run_out(&self) -> bool {
        self.ran_out.load(SeqCst)
    }

    /// A future ready once the grace period has run out; heap-allocated,
    /// so made only by what actually waits.
    pub fn waiter(&self) -> GraceWaiter {
        GraceWaiter {
            notified: Box::pin(Arc::clone(&self.ended).notified_owned()),
            ran_out: Arc::clone(&self.ran_out),
            registered: None,
        }
    }
}

/// One wait for the end of the grace period, from [`Grace::waiter`].
#[derive(Debug)]
pub struct GraceWaiter {
    /// Made before the flag is first read: a notification after that makes
    /// it ready, one before it had set the flag.
    notified: Pin<Box<OwnedNotified>>,
    ran_out: Arc<AtomicBool>,
    /// The waker the notification will wake: polled again with the same
    /// one, only the flag is read, so a body polled many times while it
    /// waits takes the `Notify`'s lock (shared by every worker) once.
    registered: Option<Waker>,
}

impl Future for GraceWaiter {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.ran_out.load(SeqCst) {
            return Poll::Ready(());
        }
        if self
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            return Poll::Pending;
        }
        let polled = self.notified.as_mut().poll(cx);
        if polled.is_pending() {
            self.registered = Some(cx.waker().clone());
        }
        polled
    }
}

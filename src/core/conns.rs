//! Counts of what is open, kept by the runtime across reloads: client
//! connections against `limits.max_connections`, and relayed upgraded
//! connections (closed together at the end of shutdown's grace).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

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
#[derive(Debug)]
pub struct Upgrades {
    /// Relays open now.
    pub open: Arc<AtomicUsize>,
    /// `true` ends every relay (end of the shutdown grace period).
    pub closing: watch::Sender<bool>,
}

impl Default for Upgrades {
    fn default() -> Self {
        Upgrades {
            open: Arc::default(),
            closing: watch::channel(false).0,
        }
    }
}

impl Upgrades {
    pub fn open(&self) -> usize {
        self.open.load(Relaxed)
    }

    /// Ends every relay now.
    pub fn close_all(&self) {
        self.closing.send_replace(true);
    }
}

//! Per-backend runtime state, kept outside the config so it survives reloads.
//!
//! The [`StateTable`] maps a backend's address to its [`BackendState`]. Only a
//! reload touches the table (under a std mutex, off the request path); each
//! config snapshot holds the `Arc<BackendState>` of its backends directly, so
//! a request never looks anything up. A backend whose address stays in the
//! config keeps its state whatever else changes (weight, strategy, order);
//! a removed one is dropped from the table, and its in-flight requests finish
//! on the `Arc` they hold.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{BackendAddr, Config};
use crate::metrics::BackendMetrics;

/// Monotonic milliseconds since the table was created, on tokio's clock (so
/// tests can pause time). Stored in atomics as `u64`; 0 means "never".
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// Reference point; `now_ms` counts from here, plus one so 0 stays "never".
    base: Instant,
}

impl Clock {
    pub fn new() -> Self {
        Clock {
            base: Instant::now(),
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64 + 1
    }

    /// The tokio instant of a `now_ms` reading, for timers.
    pub fn instant(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms.saturating_sub(1))
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// Everything lb knows about one backend at run time.
#[derive(Debug)]
pub struct BackendState {
    /// Identity; also used in logs and error bodies.
    pub addr: BackendAddr,
    /// Requests sent and not yet finished (response body included); read by
    /// least_connections and power_of_two_choices.
    in_flight: AtomicU32,
    /// Attempts sent to this backend, for stats.
    requests: AtomicU64,
    /// Attempts that failed (connect error, reset, timeout or 5xx).
    failures: AtomicU64,
    /// Verdict of the active health checker; true when checks are off.
    healthy: AtomicBool,
    /// Failures in a row seen on live traffic, for passive ejection.
    consecutive_failures: AtomicU32,
    /// `Clock` ms until which passive detection keeps the backend out.
    ejected_until_ms: AtomicU64,
    /// This backend's Prometheus counters: reached through the snapshot,
    /// so the request path never looks a label set up.
    pub metrics: BackendMetrics,
}

/// Counts one request in flight on a backend until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<BackendState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// What passive detection concluded from one attempt's outcome.
#[derive(Debug, PartialEq, Eq)]
pub enum Ejection {
    None,
    /// This failure ejected the backend (log it once).
    Ejected,
    /// The threshold was reached but too much of the pool is out already.
    Capped,
}

impl BackendState {
    /// Fresh state: healthy, nothing in flight, counters at zero.
    pub fn new(addr: BackendAddr) -> Self {
        BackendState {
            addr,
            in_flight: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            consecutive_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            metrics: BackendMetrics::default(),
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Relaxed)
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Relaxed)
    }

    pub fn failures(&self) -> u64 {
        self.failures.load(Relaxed)
    }

    /// Starts an attempt: counts it and holds it in flight until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.requests.fetch_add(1, Relaxed);
        self.in_flight.fetch_add(1, Relaxed);
        InFlight(Arc::clone(self))
    }

    /// Eligible for new requests: up by active checks and not ejected.
    pub fn is_available(&self, now_ms: u64) -> bool {
        self.healthy.load(Relaxed) && self.ejected_until_ms.load(Relaxed) <= now_ms
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Relaxed)
    }

    /// Sets the active verdict; returns true when it changed.
    pub fn set_healthy(&self, up: bool) -> bool {
        let changed = self.healthy.swap(up, Relaxed) != up;
        if changed && up {
            // A backend the checker just saw recover gets a clean slate.
            self.consecutive_failures.store(0, Relaxed);
            self.ejected_until_ms.store(0, Relaxed);
        }
        changed
    }

    pub fn record_success(&self) {
        if self.consecutive_failures.load(Relaxed) != 0 {
            self.consecutive_failures.store(0, Relaxed);
        }
    }

    /// Held out by passive detection right now.
    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Relaxed) > now_ms
    }

    /// Records a failed attempt; ejects the backend for `ejection` once
    /// `threshold` failures happen in a row and `may_eject` agrees (it is
    /// asked only then). A capped streak is kept, so the backend goes out as
    /// soon as room is made.
    pub fn record_failure(
        &self,
        now_ms: u64,
        threshold: Option<std::num::NonZeroU32>,
        ejection: Duration,
        may_eject: impl FnOnce() -> bool,
    ) -> Ejection {
        self.failures.fetch_add(1, Relaxed);
        let n = self.consecutive_failures.fetch_add(1, Relaxed) + 1;
        match threshold {
            Some(t) if n >= t.get() && !self.is_ejected(now_ms) && !may_eject() => Ejection::Capped,
            Some(t) if n >= t.get() => {
                self.consecutive_failures.store(0, Relaxed);
                let until = now_ms + ejection.as_millis() as u64;
                let before = self.ejected_until_ms.swap(until, Relaxed);
                if before <= now_ms {
                    Ejection::Ejected
                } else {
                    Ejection::None
                }
            }
            _ => Ejection::None,
        }
    }
}

/// Address → state for every backend of the current config.
#[derive(Debug, Default)]
pub struct StateTable {
    /// Touched only when a config is applied, never per request.
    states: Mutex<HashMap<BackendAddr, Arc<BackendState>>>,
}

impl StateTable {
    /// Returns the state of each backend of `config`, in config order, keeping
    /// existing ones and creating fresh ones; forgets backends no longer listed.
    pub fn sync(&self, config: &Config) -> Vec<Arc<BackendState>> {
        let mut states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        let current: Vec<Arc<BackendState>> = config
            .backends
            .iter()
            .map(|b| {
                Arc::clone(
                    states
                        .entry(b.address.clone())
                        .or_insert_with(|| Arc::new(BackendState::new(b.address.clone()))),
                )
            })
            .collect();
        states.retain(|addr, _| config.backends.iter().any(|b| &b.address == addr));
        current
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    #[test]
    fn passive_ejection_after_threshold_and_reset_on_success() {
        let s = BackendState::new(BackendAddr::from_static("a:1"));
        let t = NonZeroU32::new(3);
        let ej = Duration::from_secs(10);
        let yes = || true;
        assert_eq!(s.record_failure(100, t, ej, yes), Ejection::None);
        s.record_success();
        assert_eq!(s.record_failure(100, t, ej, yes), Ejection::None);
        assert_eq!(s.record_failure(100, t, ej, yes), Ejection::None);
        assert!(s.is_available(100));
        assert_eq!(s.record_failure(100, t, ej, || false), Ejection::Capped);
        assert!(s.is_available(100));
        assert_eq!(s.record_failure(100, t, ej, yes), Ejection::Ejected);
        assert!(!s.is_available(100));
        assert!(s.is_available(10_100));
        assert_eq!(s.failures(), 5);
    }
}

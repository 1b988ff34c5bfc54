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

use crate::config::{BackendAddr, Config, PoolName};
use crate::obs::metrics::BackendMetrics;

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

    /// `now_ms` as it read at `at` (a reading the caller already took).
    pub fn ms_at(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_millis() as u64 + 1
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
    /// Identity, with `pool`; also used in logs and error bodies.
    pub addr: BackendAddr,
    /// The pool this backend serves in: the same address in two pools is
    /// two backends, each with its own health and counters.
    pub pool: PoolName,
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
    /// Time base of `ramp_from_ms` and the latency estimate (the table's, so
    /// every backend's times compare).
    clock: Clock,
    /// `Clock` ms from which slow start ramps the backend's share up: when it
    /// joined by a reload, came back up by the health checker, or when its
    /// passive ejection ends. 0 when it has served since lb started or its
    /// ramp is over, so a pick need not read the clock.
    ramp_from_ms: AtomicU64,
    /// Peak-EWMA response-time estimate in ns, as `f64` bits; 0 = no sample yet.
    latency_ns: AtomicU64,
    /// `Clock` ms of the last latency sample: the estimate decays from here.
    latency_at_ms: AtomicU64,
    /// This backend's Prometheus counters: reached through the snapshot,
    /// so the request path never looks a label set up.
    pub metrics: BackendMetrics,
}

/// Counts one request in flight on a backend until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<BackendState>);

impl InFlight {
    /// The backend this guard counts on.
    pub fn state(&self) -> &Arc<BackendState> {
        &self.0
    }
}

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
    /// Fresh state: healthy, nothing in flight, counters at zero, serving
    /// since startup (no slow start).
    pub fn new(addr: BackendAddr) -> Self {
        Self::joining(
            PoolName::from_static(PoolName::DEFAULT),
            addr,
            Clock::new(),
            0,
        )
    }

    /// Fresh state on `clock`, ramping from `ramp_from_ms` (0 = no ramp).
    fn joining(pool: PoolName, addr: BackendAddr, clock: Clock, ramp_from_ms: u64) -> Self {
        BackendState {
            pool,
            clock,
            ramp_from_ms: AtomicU64::new(ramp_from_ms),
            latency_ns: AtomicU64::new(0f64.to_bits()),
            latency_at_ms: AtomicU64::new(0),
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
            self.ramp_from_ms.store(self.clock.now_ms(), Relaxed);
        }
        changed
    }

    /// `Clock` ms from which slow start ramps this backend up (0 = no ramp).
    pub fn ramp_start_ms(&self) -> u64 {
        self.ramp_from_ms.load(Relaxed)
    }

    /// Forgets the ramp that started at `start` once slow start saw it end,
    /// unless a newer one began meanwhile.
    pub fn ramp_over(&self, start: u64) {
        let _ = self
            .ramp_from_ms
            .compare_exchange(start, 0, Relaxed, Relaxed);
    }

    /// Folds one response time into the peak-EWMA estimate: a sample above
    /// the estimate replaces it at once (the "peak"); a lower one pulls it
    /// down with time constant `decay`, weighted by the time since the last
    /// sample (Finagle's and Linkerd's PeakEwma).
    pub fn record_latency(&self, sample: Duration, decay: Duration) {
        let now = self.clock.now_ms();
        // Swapping the stamp gives concurrent samples disjoint intervals.
        let last = self.latency_at_ms.swap(now, Relaxed);
        let w = weight_of_past(now.saturating_sub(last), decay);
        let sample = sample.as_nanos() as f64;
        let _ = self.latency_ns.fetch_update(Relaxed, Relaxed, |bits| {
            let old = f64::from_bits(bits);
            let next = if sample > old {
                sample
            } else {
                old * w + sample * (1.0 - w)
            };
            Some(next.to_bits())
        });
    }

    /// The latency estimate in ns at `now_ms`: the last one, decayed toward
    /// zero since its sample, so a backend nobody picks is tried again.
    pub fn latency_estimate_ns(&self, now_ms: u64, decay: Duration) -> f64 {
        let (est, at) = self.latency_sample();
        if est == 0.0 {
            return 0.0;
        }
        est * weight_of_past(now_ms.saturating_sub(at), decay)
    }

    /// The estimate in ns as of its last sample (0 = none yet) and that
    /// sample's `Clock` ms. Two backends' decayed estimates compare without
    /// reading the clock: see `selection::PeakEwma`.
    pub fn latency_sample(&self) -> (f64, u64) {
        (
            f64::from_bits(self.latency_ns.load(Relaxed)),
            self.latency_at_ms.load(Relaxed),
        )
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
                // Back in traffic when the ejection ends, through slow start.
                self.ramp_from_ms.store(until, Relaxed);
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

/// e^(−elapsed/decay): how much of an estimate survives `elapsed_ms`.
fn weight_of_past(elapsed_ms: u64, decay: Duration) -> f64 {
    let tau = decay.as_secs_f64() * 1000.0;
    if tau <= 0.0 {
        return 0.0;
    }
    (-(elapsed_ms as f64) / tau).exp()
}

/// (pool, address) → state for every backend of the current config.
#[derive(Debug, Default)]
pub struct StateTable {
    /// Touched only when a config is applied, never per request.
    states: Mutex<HashMap<(PoolName, BackendAddr), Arc<BackendState>>>,
    /// Time base given to every state, so their stamps compare.
    clock: Clock,
    /// Set by the first `sync`: backends of the startup config have been up
    /// all along; later ones join by reload and slow-start.
    synced: AtomicBool,
}

impl StateTable {
    /// A table whose states stamp times on `clock`.
    pub fn new(clock: Clock) -> Self {
        StateTable {
            states: Mutex::default(),
            clock,
            synced: AtomicBool::new(false),
        }
    }

    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// Returns the state of each backend of each pool of `config`, in
    /// config order, keeping existing ones (by pool and address) and creating
    /// fresh ones; forgets backends no longer listed. Fresh ones of a pool
    /// `unramped` names start without a slow-start ramp, as at startup.
    pub fn sync(
        &self,
        config: &Config,
        unramped: &dyn Fn(&PoolName) -> bool,
    ) -> Vec<Vec<Arc<BackendState>>> {
        let mut states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        let joined_at = if self.synced.swap(true, Relaxed) {
            self.clock.now_ms()
        } else {
            0
        };
        let mut listed = std::collections::HashSet::new();
        let current = config
            .pools
            .iter()
            .map(|pool| {
                let joined_at = if unramped(&pool.name) { 0 } else { joined_at };
                pool.backends
                    .iter()
                    .map(|b| {
                        let key = (pool.name.clone(), b.address.clone());
                        listed.insert(key.clone());
                        Arc::clone(states.entry(key).or_insert_with(|| {
                            Arc::new(BackendState::joining(
                                pool.name.clone(),
                                b.address.clone(),
                                self.clock,
                                joined_at,
                            ))
                        }))
                    })
                    .collect()
            })
            .collect();
        states.retain(|key, _| listed.contains(key));
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
        // Slow start takes it back from the end of its ejection.
        assert_eq!(s.ramp_start_ms(), 10_100);
        assert!(s.is_available(10_100));
        assert_eq!(s.failures(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_jumps_to_peaks_and_decays_toward_zero() {
        let s = BackendState::new(BackendAddr::from_static("a:1"));
        let decay = Duration::from_secs(10);
        let ms = Duration::from_millis;
        s.record_latency(ms(1), decay);
        assert_eq!(s.latency_estimate_ns(s.clock.now_ms(), decay), 1e6);
        s.record_latency(ms(150), decay);
        assert_eq!(s.latency_estimate_ns(s.clock.now_ms(), decay), 150e6);
        // Unpicked for one decay period: e^-1 of the peak is left.
        tokio::time::advance(decay).await;
        let est = s.latency_estimate_ns(s.clock.now_ms(), decay);
        assert!((est - 150e6 / std::f64::consts::E).abs() < 1e6, "{est}");
        // A fast sample after five decay periods replaces nearly all of it.
        tokio::time::advance(decay * 4).await;
        s.record_latency(ms(1), decay);
        let est = s.latency_estimate_ns(s.clock.now_ms(), decay);
        assert!(est < 2.1e6, "{est}");
    }

    #[tokio::test(start_paused = true)]
    async fn only_backends_joining_after_startup_or_recovering_ramp() {
        let yaml = |n: usize| {
            let list: String = (0..n)
                .map(|i| format!("  - address: 127.0.0.1:{}\n", 9000 + i))
                .collect();
            Config::parse(
                format!("backends:\n{list}").as_bytes(),
                std::path::Path::new("t"),
            )
            .unwrap()
        };
        let table = StateTable::new(Clock::new());
        let first = table.sync(&yaml(1), &|_| false).remove(0);
        assert_eq!(first[0].ramp_start_ms(), 0);
        tokio::time::advance(Duration::from_secs(5)).await;
        let second = table.sync(&yaml(2), &|_| false).remove(0);
        assert_eq!(second[0].ramp_start_ms(), 0);
        assert!(second[1].ramp_start_ms() >= 5000);
        second[0].set_healthy(false);
        tokio::time::advance(Duration::from_secs(1)).await;
        second[0].set_healthy(true);
        assert!(second[0].ramp_start_ms() >= 6000);
    }
}

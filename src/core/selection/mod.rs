//! Load-balancing strategies.
//!
//! A strategy is a [`Selector`]: built once from the backend list when a
//! config is applied, then asked for one backend per attempt. The caller says
//! which backends are acceptable (healthy, not ejected, not already tried by
//! this request) through `eligible`, so the retry loop simply asks again.
//!
//! Every `select` is lock-free and O(1) or O(log n) in the pool size on its
//! fast path; only when the fast path keeps landing on ineligible backends
//! (most of the pool down) does it fall back to one O(n) scan.
//! Backends with weight 0 are never selected.
//!
//! A request may bring a key ([`Pick::key`], a stable hash of its
//! `hash_key`); only `consistent_hash` reads it. Slow start is not a strategy
//! but a wrapper around any of them ([`SlowStart`]).

mod consistent_hash;
pub mod hash;
mod least_connections;
mod peak_ewma;
mod random;
mod round_robin;
mod slow_start;

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use crate::config::{BackendAddr, Steering, Strategy};
use crate::core::state::{BackendState, Clock};

pub use consistent_hash::Maglev;
pub use least_connections::LeastConnections;
pub use peak_ewma::PeakEwma;
pub use random::{PowerOfTwoChoices, WeightedRandom};
pub use round_robin::SmoothRoundRobin;
pub use slow_start::SlowStart;

/// One pool member as the selectors see it.
#[derive(Debug, Clone)]
pub struct Backend {
    pub addr: BackendAddr,
    /// Configured weight; 0 means no new requests.
    pub weight: u32,
    /// Runtime state shared with every snapshot that lists this address.
    pub state: Arc<BackendState>,
}

/// What one attempt asks of a selector.
#[derive(Clone, Copy)]
pub struct Pick<'a> {
    /// Stable hash of the request's `hash_key` ([`hash::stable`]); `None`
    /// when the request has none (or the strategy does not hash).
    pub key: Option<u64>,
    /// Which backends are acceptable: healthy, not ejected, not yet tried.
    pub eligible: &'a dyn Fn(usize) -> bool,
}

impl<'a> Pick<'a> {
    /// A pick without a key.
    pub fn any(eligible: &'a dyn Fn(usize) -> bool) -> Self {
        Pick {
            key: None,
            eligible,
        }
    }
}

/// What a request brings to selection: its hash key and the backend its
/// affinity cookie names. The default (neither) is a plain pick.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Steer {
    /// Stable hash of the request's `hash_key`, for `consistent_hash`.
    pub key: Option<u64>,
    /// Backend index from the affinity cookie; used while it is eligible
    /// (weight 0 included: draining keeps existing sessions).
    pub pinned: Option<usize>,
}

/// A load-balancing strategy over a fixed backend list.
pub trait Selector: Send + Sync + std::fmt::Debug {
    /// Index into `backends` of the next backend to try, or `None` when no
    /// backend with a non-zero weight is eligible. `backends` is the list
    /// the selector was built from.
    fn select(&self, backends: &[Backend], pick: &Pick<'_>) -> Option<usize>;
}

/// Builds the selector for `strategy` over `backends`, wrapped in slow start
/// when `steering.slow_start` is set; `clock` is the state table's.
pub fn build(
    strategy: Strategy,
    steering: &Steering,
    backends: &[Backend],
    clock: Clock,
) -> Arc<dyn Selector> {
    let inner: Box<dyn Selector> = match strategy {
        Strategy::RoundRobin => Box::new(SmoothRoundRobin::build(backends)),
        Strategy::LeastConnections => Box::new(LeastConnections::build(backends)),
        Strategy::Random => Box::new(WeightedRandom::build(backends)),
        Strategy::PowerOfTwoChoices => Box::new(PowerOfTwoChoices::build(backends)),
        Strategy::ConsistentHash => Box::new(Maglev::build(backends)),
        Strategy::PeakEwma => Box::new(PeakEwma::build(backends, steering.peak_ewma_decay, clock)),
    };
    match steering.slow_start {
        Some(window) => Arc::new(SlowStart::wrap(inner, window, clock)),
        None => Arc::from(inner),
    }
}

/// Whether a selector built for `a` can serve `b` unchanged: same strategy,
/// parameters and pool (addresses and weights, in order). A reload that
/// changes none of these keeps the selector, and with it the Maglev table,
/// the round-robin position and so on.
pub fn same_build(
    (sa, pa, ba): (Strategy, &Steering, &[Backend]),
    (sb, pb, bb): (Strategy, &Steering, &[Backend]),
) -> bool {
    sa == sb
        && pa.peak_ewma_decay == pb.peak_ewma_decay
        && pa.slow_start == pb.slow_start
        && ba.len() == bb.len()
        && ba
            .iter()
            .zip(bb)
            .all(|(x, y)| x.addr == y.addr && x.weight == y.weight)
}

/// How many fast-path candidates a selector tries before scanning.
const FAST_TRIES: usize = 8;

/// The slow path shared by all strategies: the first eligible, weighted
/// backend at or after a rotating start, so a mostly-down pool still spreads
/// its load over the survivors.
#[derive(Debug, Default)]
struct Fallback {
    /// Rotates the scan's starting point between calls.
    next_start: AtomicUsize,
}

impl Fallback {
    /// All indexes `0..n`, starting one further along at each call.
    fn rotation(&self, n: usize) -> impl Iterator<Item = usize> {
        let start = self
            .next_start
            .fetch_add(1, Relaxed)
            .checked_rem(n)
            .unwrap_or(0);
        (start..n).chain(0..start)
    }

    /// Eligible, weighted candidates in rotation order.
    fn candidates<'a>(
        &self,
        backends: &'a [Backend],
        eligible: &'a dyn Fn(usize) -> bool,
    ) -> impl Iterator<Item = usize> + 'a {
        self.rotation(backends.len())
            .filter(move |&i| backends[i].weight > 0 && eligible(i))
    }

    fn scan(&self, backends: &[Backend], eligible: &dyn Fn(usize) -> bool) -> Option<usize> {
        self.candidates(backends, eligible).next()
    }
}

/// Draws a backend index with probability proportional to its weight: one
/// random number and a binary search over cumulative weights, O(log n).
#[derive(Debug)]
struct WeightedDraw {
    /// Running sum of weights; entry i is Σ w₀..=wᵢ.
    cumulative: Box<[u64]>,
}

impl WeightedDraw {
    fn build(backends: &[Backend]) -> Self {
        let mut sum = 0u64;
        let cumulative = backends
            .iter()
            .map(|b| {
                sum += u64::from(b.weight);
                sum
            })
            .collect();
        WeightedDraw { cumulative }
    }

    fn draw(&self) -> Option<usize> {
        let total = *self.cumulative.last()?;
        if total == 0 {
            return None;
        }
        let r = fastrand::u64(0..total);
        Some(self.cumulative.partition_point(|&c| c <= r))
    }
}

/// Compares load per unit of weight without dividing: is `a` less loaded than `b`?
fn less_loaded(a: &Backend, b: &Backend) -> bool {
    u64::from(a.state.in_flight()) * u64::from(b.weight)
        < u64::from(b.state.in_flight()) * u64::from(a.weight)
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::config::BackendAddr;

    pub fn pool(weights: &[u32]) -> Vec<Backend> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| {
                let addr = BackendAddr::from_static(Box::leak(format!("b{i}:1").into_boxed_str()));
                Backend {
                    state: Arc::new(BackendState::new(addr.clone())),
                    addr,
                    weight,
                }
            })
            .collect()
    }

    pub fn all(_: usize) -> bool {
        true
    }

    /// A keyless pick of any backend.
    pub const ANY: Pick<'static> = Pick {
        key: None,
        eligible: &all,
    };
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    /// A discovered pool whose name has no address yet has no members:
    /// every strategy builds over none and picks none, without a panic.
    #[test]
    fn every_strategy_builds_over_an_empty_pool_and_picks_nothing() {
        let none = pool(&[]);
        for strategy in [
            Strategy::RoundRobin,
            Strategy::LeastConnections,
            Strategy::Random,
            Strategy::PowerOfTwoChoices,
            Strategy::ConsistentHash,
            Strategy::PeakEwma,
        ] {
            for slow_start in [None, Some(std::time::Duration::from_secs(10))] {
                let steering = Steering {
                    slow_start,
                    ..Steering::default()
                };
                let selector = build(strategy, &steering, &none, Clock::new());
                let keyed = Pick {
                    key: Some(7),
                    eligible: &all,
                };
                assert_eq!(selector.select(&none, &ANY), None, "{strategy:?}");
                assert_eq!(selector.select(&none, &keyed), None, "{strategy:?}");
            }
        }
    }
}
